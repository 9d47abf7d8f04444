-- Per provider and model: error, timeout and rate-limit rates (for fallback decisions).
SELECT r.provider AS provider, r.model AS model, sum(r.calls) AS calls,
       round(sum(r.errors) / sum(r.calls), 4) AS error_rate,
       round(sum(r.timeouts) / sum(r.calls), 4) AS timeout_rate,
       round(sum(r.rate_limited) / sum(r.calls), 4) AS rate_limited_rate,
       round(quantilesTDigestMerge(0.5, 0.9, 0.95, 0.99)(r.latency_ms_q)[3], 1) AS latency_p95_ms
FROM llm_calls_1m AS r
WHERE r.minute >= {start:DateTime} AND r.minute < {end:DateTime}
GROUP BY provider, model
ORDER BY error_rate DESC
