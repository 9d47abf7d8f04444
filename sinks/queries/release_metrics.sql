-- Per feature and release: volume, tokens, cost per call, p95 latency, refusal rate, judge score
-- and thumbs-down rate. Per-call averages, so a canary compares with its control; cost per call over
-- the calls with a cost (NULL when none has one: an unpriced model is not a free one).
SELECT c.feature AS feature, c.release_id AS release_id, c.prompt_version AS prompt_version,
       c.variant AS variant, c.model AS model, c.calls AS calls,
       round(c.tokens_per_call, 1) AS tokens_per_call, round(c.cost_per_call, 6) AS cost_per_call_usd,
       round(c.p95, 1) AS latency_p95_ms, round(c.refusal_rate, 4) AS refusal_rate,
       if(e.n > 0, round(e.score_sum / e.n, 4), NULL) AS eval_score, e.n AS judged,
       if(f.thumbs > 0, round(f.down / f.thumbs, 4), NULL) AS thumbs_down_rate
FROM (
    SELECT r.feature AS feature, r.release_id AS release_id, any(r.prompt_version) AS prompt_version,
           any(r.variant) AS variant, any(r.model) AS model, sum(r.calls) AS calls,
           sum(r.input_tokens + r.output_tokens) / sum(r.calls) AS tokens_per_call,
           if(sum(r.calls) > sum(r.price_missing), sum(r.cost_usd) / (sum(r.calls) - sum(r.price_missing)), NULL)
               AS cost_per_call,
           quantilesTDigestMerge(0.5, 0.9, 0.95, 0.99)(r.latency_ms_q)[3] AS p95,
           sum(r.refusals) / sum(r.calls) AS refusal_rate
    FROM llm_calls_1m AS r
    WHERE r.minute >= {start:DateTime} AND r.minute < {end:DateTime}
    GROUP BY feature, release_id
) AS c
LEFT JOIN (
    SELECT feature, release_id, sum(n) AS n, sum(score_sum) AS score_sum FROM eval_1h
    WHERE hour >= toStartOfHour({start:DateTime}) AND hour < {end:DateTime} GROUP BY feature, release_id
) AS e USING (feature, release_id)
LEFT JOIN (
    SELECT feature, release_id, sum(thumbs_up + thumbs_down) AS thumbs, sum(thumbs_down) AS down FROM feedback_1h
    WHERE hour >= toStartOfHour({start:DateTime}) AND hour < {end:DateTime} GROUP BY feature, release_id
) AS f USING (feature, release_id)
ORDER BY feature, calls DESC
