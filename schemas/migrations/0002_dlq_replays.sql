-- What `llmpulse dlq replay` did with each dead letter: a fixed payload is re-driven once.
CREATE TABLE IF NOT EXISTS {db}.dlq_replays {on_cluster}
(
    dlq_id      String,
    replayed_at DateTime64(3, 'UTC') DEFAULT now64(3),
    outcome     LowCardinality(String),  -- accepted | rejected | republished
    reason      String                   -- why it is still rejected, when it is
)
ENGINE = {replacing_merge_tree}(replayed_at)
ORDER BY (dlq_id)
TTL toDateTime(replayed_at) + INTERVAL {dlq_ttl_days} DAY;
