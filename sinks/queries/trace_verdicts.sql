-- `llmpulse trace`: the judge's verdicts on one call. Tenant '' = every tenant (admin keys); a tenant key
-- is bound to its own: judge_scores has no tenant column, so its rows are matched to the tenant's call by event id.
SELECT rubric, score, judge_model, sample_reason, ts, rationale
FROM judge_scores FINAL
WHERE request_id = {request_id:String}
  AND ({tenant:String} = '' OR event_id IN (
        SELECT event_id FROM llm_calls
        WHERE {tenant:String} != '' AND tenant = {tenant:String} AND request_id = {request_id:String}))
ORDER BY ts
