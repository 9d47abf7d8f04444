-- Weekly report: calls, errors (status != ok), timeouts, rate-limited calls and refusals per day, feature
-- and model; the report sums these per feature, per model and per day. Minute rollups only.
SELECT toDate(r.minute) AS day, r.feature AS feature, r.model AS model, sum(r.calls) AS calls,
       sum(r.errors) AS errors, sum(r.timeouts) AS timeouts, sum(r.rate_limited) AS rate_limited,
       sum(r.refusals) AS refusals
FROM llm_calls_1m AS r
WHERE r.minute >= {start:DateTime} AND r.minute < {end:DateTime}
GROUP BY day, feature, model
ORDER BY day, feature, model
