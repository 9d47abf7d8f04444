-- Every call of one trace (an OTel trace id or a client-set trace_id), in order, with tokens, cost and latency.
-- Tenant '' = every tenant (admin keys); a tenant key is bound to its own.
SELECT event_id, ts, tenant, service, feature, provider, model, response_model, status, finish_reason,
       input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, cost_usd, price_missing,
       latency_ms, ttft_ms, request_id
FROM llm_calls FINAL
WHERE trace_id = {trace_id:String} AND ({tenant:String} = '' OR tenant = {tenant:String})
ORDER BY ts, event_id
LIMIT 10000
