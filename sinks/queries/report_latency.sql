-- Weekly report: latency and TTFT mean, p50/p90/p95/p99 per feature for the whole period (grain 'week'), per
-- day and per hour, from the minute rollups' sums and t-digest states (every statistic a latency_*/ttft_*
-- rule can use). One pass: the minute states are merged per hour, and the days and the week merge those.
SELECT g.1 AS grain, g.2 AS bucket, feature, sum(h_calls) AS calls, sum(h_ttft_calls) AS ttft_calls,
       quantilesTDigestMerge(0.5, 0.9, 0.95, 0.99)(h_lat) AS lat_q,
       quantilesTDigestMerge(0.5, 0.9, 0.95, 0.99)(h_ttft) AS ttft_q,
       if(calls > 0, sum(h_lat_sum) / calls, NULL) AS latency_avg_ms,
       lat_q[1] AS latency_p50_ms, lat_q[2] AS latency_p90_ms, lat_q[3] AS latency_p95_ms,
       lat_q[4] AS latency_p99_ms, if(ttft_calls > 0, sum(h_ttft_sum) / ttft_calls, NULL) AS ttft_avg_ms,
       if(ttft_calls > 0, ttft_q[1], NULL) AS ttft_p50_ms, if(ttft_calls > 0, ttft_q[2], NULL) AS ttft_p90_ms,
       if(ttft_calls > 0, ttft_q[3], NULL) AS ttft_p95_ms, if(ttft_calls > 0, ttft_q[4], NULL) AS ttft_p99_ms
FROM (
    SELECT toStartOfHour(r.minute) AS hour, r.feature AS feature, sum(r.calls) AS h_calls,
           sum(r.ttft_calls) AS h_ttft_calls, sum(r.latency_ms_sum) AS h_lat_sum, sum(r.ttft_ms_sum) AS h_ttft_sum,
           quantilesTDigestMergeState(0.5, 0.9, 0.95, 0.99)(r.latency_ms_q) AS h_lat,
           quantilesTDigestMergeState(0.5, 0.9, 0.95, 0.99)(r.ttft_ms_q) AS h_ttft
    FROM llm_calls_1m AS r
    WHERE r.minute >= {start:DateTime} AND r.minute < {end:DateTime}
    GROUP BY hour, feature
)
ARRAY JOIN [('week', toDateTime({start:DateTime}, 'UTC')), ('day', toStartOfDay(hour)), ('hour', hour)] AS g
GROUP BY grain, bucket, feature
ORDER BY grain, bucket, feature
