-- Weekly report: the most frequent failures, grouped by error type and the error message with numbers,
-- ids and hex strings masked; with the features and models they hit. Raw rows (only the raw table keeps
-- messages), bounded to the period's failed calls. A call written twice (a retry in another block, not yet
-- merged away) counts once: the failed rows are deduplicated on the table's key (feature, day, event_id),
-- as FINAL would, but after the status filter, so only the failed calls are read (FINAL reads every row).
SELECT error_type, pattern, any(status) AS status, count() AS calls,
       groupUniqArray(5)(feature) AS features, groupUniqArray(5)(model) AS models,
       min(ts) AS first_seen, max(ts) AS last_seen, any(error_message) AS example
FROM (
    SELECT c.error_type AS error_type, c.status AS status, c.feature AS feature, c.model AS model, c.ts AS ts,
           c.error_message AS error_message,
           replaceRegexpAll(replaceRegexpAll(replaceRegexpAll(c.error_message,
               '[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}', '<id>'),
               '(0x)?[0-9a-fA-F]{12,}', '<hex>'), '[0-9]+([.][0-9]+)?', '<n>') AS pattern
    FROM llm_calls AS c
    WHERE c.ts >= {start:DateTime64(3)} AND c.ts < {end:DateTime64(3)} AND c.status != 'ok'
    LIMIT 1 BY c.feature, toDate(c.ts), c.event_id
)
GROUP BY error_type, pattern
ORDER BY calls DESC, error_type, pattern
LIMIT 20
