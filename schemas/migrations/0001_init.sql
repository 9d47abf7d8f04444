-- llmpulse schema v1: raw calls, minute rollups fed by a materialized view, DLQ, judge samples, feedback.
-- Placeholders in braces are filled by sinks/migrations.py (database, cluster clause, retention).
-- Every statement is idempotent (IF NOT EXISTS): a migration interrupted half-way is simply run again.

CREATE TABLE IF NOT EXISTS {db}.llm_calls {on_cluster}
(
    event_id            String,
    ts                  DateTime64(3, 'UTC'),
    ingested_at         DateTime64(3, 'UTC') DEFAULT now64(3),
    schema_version      UInt16 DEFAULT 1,
    source              LowCardinality(String),
    kafka_partition     Int32 DEFAULT -1,
    kafka_offset        Int64 DEFAULT -1,

    service             LowCardinality(String),
    feature             LowCardinality(String),
    team                LowCardinality(String),
    tenant              LowCardinality(String),
    user_id             String,

    provider            LowCardinality(String),
    model               LowCardinality(String),
    response_model      LowCardinality(String),
    temperature         Nullable(Float64),
    max_tokens          Nullable(UInt32),
    top_p               Nullable(Float64),

    prompt_version      LowCardinality(String),
    variant             LowCardinality(String),
    adapter             LowCardinality(String),
    feature_view        LowCardinality(String),
    guardrail_version   LowCardinality(String),
    release             Map(LowCardinality(String), String),
    release_id          LowCardinality(String),

    request_id          String,
    conversation_id     String,
    trace_id            String,

    input_tokens        UInt32,
    output_tokens       UInt32,
    cached_input_tokens UInt32,
    cache_write_tokens  UInt32,
    latency_ms          Float64,
    ttft_ms             Nullable(Float64),

    cost_usd            Nullable(Float64),
    cost_source         LowCardinality(String),
    price_version       LowCardinality(String),
    price_missing       Bool,

    status              LowCardinality(String),
    refusal             Bool,
    finish_reason       LowCardinality(String),
    error_type          LowCardinality(String),
    error_message       String,
    tool_calls          Array(LowCardinality(String)),
    fallback_from       LowCardinality(String),
    schema_valid        Nullable(Bool),

    prompt_hash         String,
    prompt              Nullable(String) TTL toDateTime(ts) + INTERVAL {content_ttl_days} DAY,
    output              Nullable(String) TTL toDateTime(ts) + INTERVAL {content_ttl_days} DAY,
    output_chars        Nullable(UInt32),

    attributes          Map(LowCardinality(String), String),

    -- the Kafka worker reads back what it already wrote per partition (DESIGN.md, delivery semantics)
    INDEX idx_kafka_offset kafka_offset TYPE minmax GRANULARITY 1
)
ENGINE = {replacing_merge_tree}(ingested_at)
PARTITION BY toYYYYMM(ts)
ORDER BY (feature, toDate(ts), event_id)
TTL toDateTime(ts) + INTERVAL {raw_ttl_days} DAY
SETTINGS non_replicated_deduplication_window = {dedup_window}, index_granularity = 8192;

CREATE TABLE IF NOT EXISTS {db}.llm_calls_1m {on_cluster}
(
    minute              DateTime('UTC'),
    tenant              LowCardinality(String),
    service             LowCardinality(String),
    feature             LowCardinality(String),
    team                LowCardinality(String),
    provider            LowCardinality(String),
    model               LowCardinality(String),
    prompt_version      LowCardinality(String),
    variant             LowCardinality(String),
    release_id          LowCardinality(String),

    calls               SimpleAggregateFunction(sum, UInt64),
    errors              SimpleAggregateFunction(sum, UInt64),
    timeouts            SimpleAggregateFunction(sum, UInt64),
    rate_limited        SimpleAggregateFunction(sum, UInt64),
    refusals            SimpleAggregateFunction(sum, UInt64),
    price_missing       SimpleAggregateFunction(sum, UInt64),
    input_tokens        SimpleAggregateFunction(sum, UInt64),
    output_tokens       SimpleAggregateFunction(sum, UInt64),
    cached_input_tokens SimpleAggregateFunction(sum, UInt64),
    cache_write_tokens  SimpleAggregateFunction(sum, UInt64),
    output_chars        SimpleAggregateFunction(sum, UInt64),
    schema_checked      SimpleAggregateFunction(sum, UInt64),
    schema_valid        SimpleAggregateFunction(sum, UInt64),
    tool_call_calls     SimpleAggregateFunction(sum, UInt64),
    ttft_calls          SimpleAggregateFunction(sum, UInt64),
    cost_usd            SimpleAggregateFunction(sum, Float64),
    latency_ms_sum      SimpleAggregateFunction(sum, Float64),
    ttft_ms_sum         SimpleAggregateFunction(sum, Float64),
    latency_ms_q        AggregateFunction(quantilesTDigest(0.5, 0.9, 0.95, 0.99), Float64),
    ttft_ms_q           AggregateFunction(quantilesTDigest(0.5, 0.9, 0.95, 0.99), Float64),
    output_tokens_q     AggregateFunction(quantilesTDigest(0.5, 0.9, 0.95, 0.99), UInt32)
)
ENGINE = {aggregating_merge_tree}
PARTITION BY toYYYYMM(minute)
ORDER BY (feature, minute, team, model, provider, prompt_version, variant, release_id, tenant, service)
TTL minute + INTERVAL {rollup_ttl_days} DAY
SETTINGS non_replicated_deduplication_window = {dedup_window};

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.llm_calls_1m_mv {on_cluster} TO {db}.llm_calls_1m AS
-- Source columns are qualified (c.x) because several output aliases reuse column names.
SELECT
    toStartOfMinute(c.ts) AS minute,
    c.tenant AS tenant, c.service AS service, c.feature AS feature, c.team AS team,
    c.provider AS provider, c.model AS model, c.prompt_version AS prompt_version,
    c.variant AS variant, c.release_id AS release_id,
    count() AS calls,
    countIf(c.status != 'ok') AS errors,
    countIf(c.status = 'timeout') AS timeouts,
    countIf(c.status = 'rate_limited') AS rate_limited,
    countIf(c.refusal) AS refusals,
    countIf(c.price_missing) AS price_missing,
    sum(toUInt64(c.input_tokens)) AS input_tokens,
    sum(toUInt64(c.output_tokens)) AS output_tokens,
    sum(toUInt64(c.cached_input_tokens)) AS cached_input_tokens,
    sum(toUInt64(c.cache_write_tokens)) AS cache_write_tokens,
    sum(toUInt64(ifNull(c.output_chars, 0))) AS output_chars,
    countIf(isNotNull(c.schema_valid)) AS schema_checked,
    countIf(ifNull(c.schema_valid, false)) AS schema_valid,
    countIf(notEmpty(c.tool_calls)) AS tool_call_calls,
    countIf(isNotNull(c.ttft_ms)) AS ttft_calls,
    sum(ifNull(c.cost_usd, 0)) AS cost_usd,
    sum(c.latency_ms) AS latency_ms_sum,
    sum(ifNull(c.ttft_ms, 0)) AS ttft_ms_sum,
    quantilesTDigestState(0.5, 0.9, 0.95, 0.99)(c.latency_ms) AS latency_ms_q,
    quantilesTDigestStateIf(0.5, 0.9, 0.95, 0.99)(ifNull(c.ttft_ms, 0), isNotNull(c.ttft_ms)) AS ttft_ms_q,
    quantilesTDigestState(0.5, 0.9, 0.95, 0.99)(c.output_tokens) AS output_tokens_q
FROM {db}.llm_calls AS c
GROUP BY minute, tenant, service, feature, team, provider, model, prompt_version, variant, release_id;

CREATE TABLE IF NOT EXISTS {db}.dlq {on_cluster}
(
    dlq_id          String,
    received_at     DateTime64(3, 'UTC') DEFAULT now64(3),
    kind            LowCardinality(String),
    source          LowCardinality(String),
    source_name     String,
    source_partition Int32,
    source_offset   Int64,  -- Kafka offset, file line number, or position in an HTTP batch
    reason          String,
    path            String,
    raw             String,
    raw_bytes       UInt32
)
ENGINE = {replacing_merge_tree}
PARTITION BY toYYYYMM(received_at)
ORDER BY (dlq_id)
TTL toDateTime(received_at) + INTERVAL {dlq_ttl_days} DAY
SETTINGS non_replicated_deduplication_window = {dedup_window};

CREATE TABLE IF NOT EXISTS {db}.judge_samples {on_cluster}
(
    event_id        String,
    ts              DateTime64(3, 'UTC'),
    sampled_at      DateTime64(3, 'UTC') DEFAULT now64(3),
    reason          LowCardinality(String),
    feature         LowCardinality(String),
    team            LowCardinality(String),
    tenant          LowCardinality(String),
    model           LowCardinality(String),
    provider        LowCardinality(String),
    prompt_version  LowCardinality(String),
    variant         LowCardinality(String),
    release_id      LowCardinality(String),
    request_id      String,
    conversation_id String,
    status          LowCardinality(String),
    refusal         Bool,
    prompt_hash     String,
    prompt          Nullable(String) TTL toDateTime(ts) + INTERVAL {content_ttl_days} DAY,
    output          Nullable(String) TTL toDateTime(ts) + INTERVAL {content_ttl_days} DAY
)
ENGINE = {replacing_merge_tree}
PARTITION BY toYYYYMM(ts)
ORDER BY (feature, toDate(ts), event_id)
TTL toDateTime(ts) + INTERVAL {raw_ttl_days} DAY
SETTINGS non_replicated_deduplication_window = {dedup_window};

CREATE TABLE IF NOT EXISTS {db}.feedback {on_cluster}
(
    feedback_id String,
    request_id  String,
    ts          DateTime64(3, 'UTC'),
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3),
    thumbs      LowCardinality(String),
    rating      Nullable(UInt8),
    comment     String,
    user_id     String,
    feature     LowCardinality(String),
    tenant      LowCardinality(String),
    attributes  Map(LowCardinality(String), String)
)
ENGINE = {replacing_merge_tree}(ingested_at)
PARTITION BY toYYYYMM(ts)
ORDER BY (request_id, feedback_id)
TTL toDateTime(ts) + INTERVAL {raw_ttl_days} DAY
SETTINGS non_replicated_deduplication_window = {dedup_window};
