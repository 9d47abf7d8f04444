-- Spend per owning team.
SELECT team, sum(calls) AS calls, round(sum(cost_usd), 6) AS cost_usd
FROM llm_calls_1m
WHERE minute >= {start:DateTime} AND minute < {end:DateTime}
GROUP BY team
ORDER BY cost_usd DESC
