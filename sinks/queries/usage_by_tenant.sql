-- Calls, tokens and cost per tenant, feature and model from the rollups; tenant '' = every tenant (admin keys).
SELECT tenant, feature, model, sum(calls) AS calls, sum(input_tokens) AS input_tokens,
       sum(cached_input_tokens) AS cached_input_tokens, sum(output_tokens) AS output_tokens,
       round(sum(cost_usd), 6) AS cost_usd, sum(price_missing) AS unpriced_calls
FROM llm_calls_1m
WHERE minute >= toStartOfMinute({start:DateTime}) AND minute < {end:DateTime}
  AND ({tenant:String} = '' OR tenant = {tenant:String})
GROUP BY tenant, feature, model
ORDER BY cost_usd DESC, calls DESC
