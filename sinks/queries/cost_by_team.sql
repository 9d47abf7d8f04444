-- Spend per owning team (NULL when none of its calls had a price; see cost_by_feature).
SELECT r.team AS team, sum(r.calls) AS calls,
       if(sum(r.calls) > sum(r.price_missing), round(sum(r.cost_usd), 6), NULL) AS cost_usd,
       sum(r.price_missing) AS unpriced_calls
FROM llm_calls_1m AS r
WHERE r.minute >= {start:DateTime} AND r.minute < {end:DateTime}
GROUP BY team
ORDER BY cost_usd DESC NULLS LAST, team
