-- The outputs users flagged most (thumbs down or a rating of 2 or less), with the release that
-- served them. Output text is shown only where content capture is on. Only the flagged calls are read,
-- and a call written twice (not yet merged) counts once: its rows are deduplicated on the table's key
-- (FINAL would merge the whole table).
WITH flagged AS (
    SELECT f.request_id AS request_id, f.user_id AS user_id, f.comment AS comment, f.ts AS ts
    FROM feedback AS f FINAL
    WHERE f.ts >= {start:DateTime64(3)} AND f.ts < {end:DateTime64(3)} AND (f.thumbs = 'down' OR f.rating <= 2)
)
SELECT c.feature AS feature, c.release_id AS release_id, c.model AS model, c.prompt_hash AS prompt_hash,
       count() AS flags, uniqExact(f.user_id) AS users, any(c.output) AS example_output,
       groupArray(3)(f.comment) AS comments, max(f.ts) AS last_flagged
FROM flagged AS f
INNER JOIN (
    SELECT request_id, feature, release_id, model, prompt_hash, output FROM llm_calls
    WHERE request_id IN (SELECT request_id FROM flagged)
    LIMIT 1 BY feature, toDate(ts), event_id
) AS c ON c.request_id = f.request_id
GROUP BY feature, release_id, model, prompt_hash
ORDER BY flags DESC, last_flagged DESC
LIMIT 20
