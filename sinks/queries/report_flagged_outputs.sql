-- Weekly report: the outputs users flagged most (thumbs down or a rating of 2 or less) in a period, as
-- top_flagged_outputs, but the raw calls are read only for the flagged request ids and from the earliest
-- flagged call's time (feedback without a call time looks back 7 days), so it stays cheap on a big table.
-- A verdict or call written twice counts once: feedback FINAL, and the flagged calls deduplicated on the
-- table's key (feature, day, event_id) after the request-id filter (FINAL would read every row).
WITH flagged AS (
    SELECT f.request_id AS request_id, f.user_id AS user_id, f.comment AS comment, f.ts AS ts, f.call_ts AS call_ts
    FROM feedback AS f FINAL
    WHERE f.ts >= {start:DateTime64(3)} AND f.ts < {end:DateTime64(3)} AND (f.thumbs = 'down' OR f.rating <= 2)
)
SELECT c.feature AS feature, c.release_id AS release_id, c.model AS model, c.prompt_hash AS prompt_hash,
       count() AS flags, uniqExact(fl.user_id) AS users, any(c.output) AS example_output,
       groupArray(3)(fl.comment) AS comments, max(fl.ts) AS last_flagged
FROM flagged AS fl
INNER JOIN (
    SELECT request_id, feature, release_id, model, prompt_hash, output
    FROM llm_calls
    WHERE request_id IN (SELECT request_id FROM flagged)
      AND ts >= (SELECT min(ifNull(call_ts, ts - INTERVAL 7 DAY)) FROM flagged) AND ts < {end:DateTime64(3)}
    LIMIT 1 BY feature, toDate(ts), event_id
) AS c ON c.request_id = fl.request_id
GROUP BY feature, release_id, model, prompt_hash
ORDER BY flags DESC, last_flagged DESC, prompt_hash
LIMIT 20
