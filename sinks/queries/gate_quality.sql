-- One side of `llmpulse gate`: judge scores (count, sum, sum of squares) of the representative sample.
-- Read from judge_scores, which carries the call's team and provider (eval_1h does not); calls judged
-- because they errored, refused or were flagged are left out, as in eval_1h. The hour the period
-- starts in counts whole, as in eval_1h. Selectors: '' = any value. Tenant '' = every tenant; else
-- only scores of that tenant's calls (judge_scores has no tenant column: matched by the call's event_id).
SELECT count() AS n, sum(s.score) AS score_sum, sum(s.score * s.score) AS score_sumsq
FROM judge_scores AS s FINAL
WHERE toStartOfHour(s.ts) BETWEEN toStartOfHour({start:DateTime}) AND {end:DateTime}
  AND s.sample_reason NOT IN ('error', 'refusal', 'thumbs_down')  -- processors.sampling.BOOSTED_REASONS
  AND ({feature:String} = '' OR s.feature = {feature:String})
  AND ({release_id:String} = '' OR s.release_id = {release_id:String})
  AND ({prompt_version:String} = '' OR s.prompt_version = {prompt_version:String})
  AND ({variant:String} = '' OR s.variant = {variant:String})
  AND ({model:String} = '' OR s.model = {model:String})
  AND ({team:String} = '' OR s.team = {team:String})
  AND ({provider:String} = '' OR s.provider = {provider:String})
  AND ({tenant:String} = '' OR s.event_id IN (
        SELECT c.event_id FROM llm_calls AS c
        WHERE {tenant:String} != '' AND c.tenant = {tenant:String}
          -- the judged calls' own time span bounds the set built here
          AND c.ts BETWEEN (SELECT min(j.call_ts) FROM judge_scores AS j
                            WHERE toStartOfHour(j.ts) BETWEEN toStartOfHour({start:DateTime}) AND {end:DateTime})
                       AND (SELECT max(j.call_ts) FROM judge_scores AS j
                            WHERE toStartOfHour(j.ts) BETWEEN toStartOfHour({start:DateTime}) AND {end:DateTime})))
