-- One side of `llmpulse gate`: calls and per-call averages (tokens, cost, p95 latency, refusal and error rates).
-- Cost per call is over the calls with a cost (`unpriced`: unknown model or usage, never counted as $0).
-- Each selector narrows the calls ('' = any value). Tenant '' = every tenant (admin keys); a tenant key
-- is bound to its own.
SELECT sum(r.calls) AS calls,
       sum(r.input_tokens + r.output_tokens) / sum(r.calls) AS tokens_per_call,
       sum(r.output_tokens) / sum(r.calls) AS output_tokens_per_call,
       if(sum(r.calls) > sum(r.price_missing), sum(r.cost_usd) / (sum(r.calls) - sum(r.price_missing)), NULL)
           AS cost_per_call,
       sum(r.price_missing) AS unpriced,
       quantilesTDigestMerge(0.5, 0.9, 0.95, 0.99)(r.latency_ms_q)[3] AS latency_p95_ms,
       sum(r.refusals) / sum(r.calls) AS refusal_rate,
       sum(r.errors) / sum(r.calls) AS error_rate
FROM llm_calls_1m AS r
WHERE r.minute BETWEEN {start:DateTime} AND {end:DateTime}
  AND ({tenant:String} = '' OR r.tenant = {tenant:String})
  AND ({feature:String} = '' OR r.feature = {feature:String})
  AND ({release_id:String} = '' OR r.release_id = {release_id:String})
  AND ({prompt_version:String} = '' OR r.prompt_version = {prompt_version:String})
  AND ({variant:String} = '' OR r.variant = {variant:String})
  AND ({model:String} = '' OR r.model = {model:String})
  AND ({team:String} = '' OR r.team = {team:String})
  AND ({provider:String} = '' OR r.provider = {provider:String})
