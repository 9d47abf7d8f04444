-- `llmpulse trace`: where a call sits in its agent flow (by trace_id or, without one, conversation_id):
-- its position, the flow's calls, tokens, cost and span from the first call's start to the last call's end.
-- Tenant '' = every tenant (admin keys); a tenant key is bound to its own.
SELECT count() AS calls, countIf(ts < {ts:DateTime64(3)}) + 1 AS position,
       sum(input_tokens + output_tokens) AS tokens, sum(ifNull(cost_usd, 0)) AS cost_usd,
       dateDiff('millisecond', min(ts), max(ts + toIntervalMillisecond(toInt64(latency_ms)))) AS span_ms
FROM llm_calls FINAL
WHERE feature = {feature:String}
  AND if({by:String} = 'trace_id', trace_id, conversation_id) = {flow_id:String}
  AND ({tenant:String} = '' OR tenant = {tenant:String})
