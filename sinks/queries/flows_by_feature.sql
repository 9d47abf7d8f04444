-- Multi-step flows per feature: calls, tokens and cost per flow, and the latency a user perceives
-- (first call start to last call end) as p50/p95. A flow is a trace, or without one a conversation,
-- until it goes quiet: a call starting more than {idle_s} seconds after the previous ended starts a
-- new flow (a conversation's next turn; an agent run resumed after a long wait), as the stream's
-- flow tracker (processors/flows.py) splits it. Single-call flows are left out. Raw rows read FINAL:
-- a call written twice before a merge would add a step (and its tokens and cost) to its flow.
-- Cost per flow is over the flows whose every call has a cost (an unpriced call makes its flow's
-- cost unknown, not cheaper); flows_without_cost counts the others, as the stream's metric does.
SELECT feature, count() AS flows, round(avg(calls), 2) AS calls_per_flow, round(avg(tokens)) AS tokens_per_flow,
       round(avgIf(cost, unpriced = 0), 6) AS cost_per_flow_usd, countIf(unpriced > 0) AS flows_without_cost,
       round(quantileExact(0.5)(perceived_ms)) AS perceived_p50_ms,
       round(quantileExact(0.95)(perceived_ms)) AS perceived_p95_ms,
       round(avg(active_ms)) AS model_time_ms
FROM (
    SELECT feature, flow, turn, count() AS calls, sum(input_tokens + output_tokens) AS tokens,
           sum(ifNull(cost_usd, 0)) AS cost, countIf(cost_usd IS NULL) AS unpriced, sum(latency_ms) AS active_ms,
           dateDiff('millisecond', min(ts), max(end_ts)) AS perceived_ms
    FROM (
        SELECT feature, flow, ts, end_ts, input_tokens, output_tokens, cost_usd, latency_ms,
               sum(new_turn) OVER (PARTITION BY feature, flow ORDER BY ts ROWS UNBOUNDED PRECEDING) AS turn
        FROM (
            SELECT feature, flow, ts, end_ts, input_tokens, output_tokens, cost_usd, latency_ms,
                   ts > addSeconds(max(end_ts) OVER (PARTITION BY feature, flow ORDER BY ts
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), {idle_s:UInt32}) AS new_turn
            FROM (
                SELECT feature, if(trace_id != '', trace_id, conversation_id) AS flow, ts,
                       ts + toIntervalMillisecond(toInt64(latency_ms)) AS end_ts,
                       input_tokens, output_tokens, cost_usd, latency_ms
                FROM llm_calls FINAL
                WHERE ts >= {start:DateTime64(3)} AND ts < {end:DateTime64(3)}
                  AND (trace_id != '' OR conversation_id != '')
            )
        )
    )
    GROUP BY feature, flow, turn
    HAVING calls > 1
)
GROUP BY feature
ORDER BY perceived_p95_ms DESC
