-- Spend and volume per feature, with the teams it ran for.
-- cost_by_team splits the spend by team. A feature none of whose calls had a price has no known
-- spend: NULL, not a $0 that reads as free (its calls are counted in unpriced_calls).
SELECT r.feature AS feature, arrayStringConcat(arraySort(arrayFilter(t -> t != '', groupUniqArray(r.team))), ', ')
           AS teams,
       sum(r.calls) AS calls, if(sum(r.calls) > sum(r.price_missing), round(sum(r.cost_usd), 6), NULL) AS cost_usd,
       sum(r.price_missing) AS unpriced_calls
FROM llm_calls_1m AS r
WHERE r.minute >= {start:DateTime} AND r.minute < {end:DateTime}
GROUP BY feature
ORDER BY cost_usd DESC NULLS LAST, feature
