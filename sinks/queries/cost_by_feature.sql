-- Spend and volume per feature and team.
SELECT feature, any(team) AS team, sum(calls) AS calls, round(sum(cost_usd), 6) AS cost_usd,
       sum(price_missing) AS unpriced_calls
FROM llm_calls_1m
WHERE minute >= {start:DateTime} AND minute < {end:DateTime}
GROUP BY feature
ORDER BY cost_usd DESC
