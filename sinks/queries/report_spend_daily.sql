-- Weekly report: calls and spend per day and feature (the stacked daily spend chart). Minute rollups only.
SELECT toDate(r.minute) AS day, r.feature AS feature, sum(r.calls) AS calls, sum(r.cost_usd) AS cost_usd
FROM llm_calls_1m AS r
WHERE r.minute >= {start:DateTime} AND r.minute < {end:DateTime}
GROUP BY day, feature
ORDER BY day, feature
