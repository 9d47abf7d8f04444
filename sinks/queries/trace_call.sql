-- `llmpulse trace`: one call by request id, with its release tuple and everything measured about it.
-- Tenant '' = every tenant (admin keys); a tenant key is bound to its own, so another tenant's request id is not found.
SELECT event_id, ts, service, feature, team, tenant, user_id, provider, model, response_model,
       prompt_version, variant, adapter, feature_view, guardrail_version, release, release_id,
       request_id, conversation_id, trace_id, input_tokens, output_tokens, cached_input_tokens,
       cache_write_tokens, latency_ms, ttft_ms, cost_usd, cost_source, price_version, price_missing,
       status, refusal, finish_reason, error_type, error_message, tool_calls, fallback_from,
       schema_valid, prompt_hash, prompt, output, output_chars
FROM llm_calls FINAL
WHERE request_id = {request_id:String} AND ({tenant:String} = '' OR tenant = {tenant:String})
ORDER BY ts
LIMIT 1
