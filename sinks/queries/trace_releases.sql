-- `llmpulse trace`: every release of one feature with its active period (first and last minute) and calls.
-- Tenant '' = every tenant (admin keys); a tenant key is bound to its own.
SELECT release_id, any(prompt_version) AS prompt_version, any(model) AS model, any(variant) AS variant,
       min(minute) AS first_seen, max(minute) AS last_seen, sum(calls) AS calls
FROM llm_calls_1m
WHERE feature = {feature:String} AND ({tenant:String} = '' OR tenant = {tenant:String})
GROUP BY release_id
ORDER BY first_seen
