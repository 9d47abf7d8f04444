-- Latency and TTFT percentiles per feature from the rollups' t-digest states.
SELECT feature,
       sum(calls) AS calls,
       quantilesTDigestMerge(0.5, 0.9, 0.95, 0.99)(latency_ms_q) AS latency_q,
       quantilesTDigestMerge(0.5, 0.9, 0.95, 0.99)(ttft_ms_q) AS ttft_q,
       round(latency_q[1], 1) AS p50_ms,
       round(latency_q[3], 1) AS p95_ms,
       round(latency_q[4], 1) AS p99_ms,
       if(sum(ttft_calls) > 0, round(ttft_q[3], 1), NULL) AS ttft_p95_ms
FROM llm_calls_1m
WHERE minute >= {start:DateTime} AND minute < {end:DateTime}
GROUP BY feature
ORDER BY feature
