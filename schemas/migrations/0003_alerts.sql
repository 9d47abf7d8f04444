-- Every alert state change, as delivered: what fired, when, on which scope, with what value,
-- and what it saw. The last row per dedup key is the alert's state (restored after a restart).
CREATE TABLE IF NOT EXISTS {db}.alerts {on_cluster}
(
    dedup_key    String,
    rule         LowCardinality(String),
    state        LowCardinality(String),   -- firing | resolved
    severity     LowCardinality(String),
    action       LowCardinality(String),
    metric       LowCardinality(String),
    value        Nullable(Float64),
    condition    String,
    scope        Map(LowCardinality(String), String),
    labels       Map(LowCardinality(String), String),
    window_start DateTime64(3, 'UTC'),
    window_end   DateTime64(3, 'UTC'),
    started_at   DateTime64(3, 'UTC'),
    ended_at     Nullable(DateTime64(3, 'UTC')),
    summary      String,
    runbook_url  String,
    query        String,
    extra        String,                   -- JSON: calls, baseline, forecast...
    emitted_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = {replacing_merge_tree}(emitted_at)
PARTITION BY toYYYYMM(started_at)
ORDER BY (dedup_key, started_at, state)
TTL toDateTime(started_at) + INTERVAL {raw_ttl_days} DAY
SETTINGS non_replicated_deduplication_window = {dedup_window};
