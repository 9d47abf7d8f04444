-- Which snapshot (response_model) answered each requested model, per minute: `llmpulse drift`
-- and the weekly report find silent snapshot switches here instead of scanning raw calls
-- (at 10M calls the raw scan was the slowest query of the report). Its history before this
-- migration is rebuilt from raw by sinks.migrations (BACKFILLS), idempotently.
CREATE TABLE IF NOT EXISTS {db}.served_models_1m {on_cluster}
(
    minute         DateTime('UTC'),
    feature        LowCardinality(String),
    model          LowCardinality(String),
    response_model LowCardinality(String),
    calls          SimpleAggregateFunction(sum, UInt64)
)
ENGINE = {aggregating_merge_tree}
PARTITION BY toYYYYMM(minute)
ORDER BY (model, feature, response_model, minute)
TTL minute + INTERVAL {rollup_ttl_days} DAY
SETTINGS non_replicated_deduplication_window = {dedup_window};

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.served_models_1m_mv {on_cluster} TO {db}.served_models_1m AS
SELECT toStartOfMinute(c.ts) AS minute, c.feature AS feature, c.model AS model, c.response_model AS response_model,
       count() AS calls
FROM {db}.llm_calls AS c
WHERE c.response_model != ''
GROUP BY minute, feature, model, response_model;
