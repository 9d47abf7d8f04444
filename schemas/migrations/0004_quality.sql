-- The quality loop: judge scores and feedback joined to their calls (lineage copied at ingest, so
-- per-release quality needs no join at query time), hourly rollups of both, and the history of
-- re-pricing.
CREATE TABLE IF NOT EXISTS {db}.judge_scores {on_cluster}
(
    request_id     String,
    event_id       String,
    rubric         LowCardinality(String),
    score          Float64,
    judge_model    LowCardinality(String),
    ts             DateTime64(3, 'UTC'),
    ingested_at    DateTime64(3, 'UTC') DEFAULT now64(3),
    call_ts        Nullable(DateTime64(3, 'UTC')),
    feature        LowCardinality(String),
    team           LowCardinality(String),
    model          LowCardinality(String),
    provider       LowCardinality(String),
    prompt_version LowCardinality(String),
    variant        LowCardinality(String),
    release_id     LowCardinality(String),
    sample_reason  LowCardinality(String),
    rationale      String
)
ENGINE = {replacing_merge_tree}(ingested_at)
PARTITION BY toYYYYMM(ts)
ORDER BY (feature, release_id, rubric, request_id, judge_model)
TTL toDateTime(ts) + INTERVAL {raw_ttl_days} DAY
SETTINGS non_replicated_deduplication_window = {dedup_window};

CREATE TABLE IF NOT EXISTS {db}.eval_1h {on_cluster}
(
    hour        DateTime('UTC'),
    feature     LowCardinality(String),
    release_id  LowCardinality(String),
    prompt_version LowCardinality(String),
    variant     LowCardinality(String),
    model       LowCardinality(String),
    rubric      LowCardinality(String),
    n           SimpleAggregateFunction(sum, UInt64),
    score_sum   SimpleAggregateFunction(sum, Float64),
    score_sumsq SimpleAggregateFunction(sum, Float64)
)
ENGINE = {aggregating_merge_tree}
PARTITION BY toYYYYMM(hour)
ORDER BY (feature, hour, release_id, rubric, prompt_version, variant, model)
TTL hour + INTERVAL {rollup_ttl_days} DAY
SETTINGS non_replicated_deduplication_window = {dedup_window};

-- The rolling eval score reads the representative sample only: calls judged because they
-- errored, refused or were flagged stay in judge_scores for inspection but would drag the mean.
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.eval_1h_mv {on_cluster} TO {db}.eval_1h AS
SELECT toStartOfHour(s.ts) AS hour, s.feature AS feature, s.release_id AS release_id,
       s.prompt_version AS prompt_version, s.variant AS variant, s.model AS model, s.rubric AS rubric,
       count() AS n, sum(s.score) AS score_sum, sum(s.score * s.score) AS score_sumsq
FROM {db}.judge_scores AS s
WHERE s.sample_reason NOT IN ('error', 'refusal', 'thumbs_down')  -- processors.sampling.BOOSTED_REASONS
GROUP BY hour, feature, release_id, prompt_version, variant, model, rubric;

ALTER TABLE {db}.feedback {on_cluster} ADD COLUMN IF NOT EXISTS event_id String DEFAULT '';
ALTER TABLE {db}.feedback {on_cluster} ADD COLUMN IF NOT EXISTS call_ts Nullable(DateTime64(3, 'UTC'));
ALTER TABLE {db}.feedback {on_cluster} ADD COLUMN IF NOT EXISTS team LowCardinality(String) DEFAULT '';
ALTER TABLE {db}.feedback {on_cluster} ADD COLUMN IF NOT EXISTS model LowCardinality(String) DEFAULT '';
ALTER TABLE {db}.feedback {on_cluster} ADD COLUMN IF NOT EXISTS prompt_version LowCardinality(String) DEFAULT '';
ALTER TABLE {db}.feedback {on_cluster} ADD COLUMN IF NOT EXISTS variant LowCardinality(String) DEFAULT '';
ALTER TABLE {db}.feedback {on_cluster} ADD COLUMN IF NOT EXISTS release_id LowCardinality(String) DEFAULT '';

CREATE TABLE IF NOT EXISTS {db}.feedback_1h {on_cluster}
(
    hour        DateTime('UTC'),
    feature     LowCardinality(String),
    release_id  LowCardinality(String),
    prompt_version LowCardinality(String),
    variant     LowCardinality(String),
    model       LowCardinality(String),
    n           SimpleAggregateFunction(sum, UInt64),
    thumbs_up   SimpleAggregateFunction(sum, UInt64),
    thumbs_down SimpleAggregateFunction(sum, UInt64),
    rated       SimpleAggregateFunction(sum, UInt64),
    rating_sum  SimpleAggregateFunction(sum, Float64)
)
ENGINE = {aggregating_merge_tree}
PARTITION BY toYYYYMM(hour)
ORDER BY (feature, hour, release_id, prompt_version, variant, model)
TTL hour + INTERVAL {rollup_ttl_days} DAY
SETTINGS non_replicated_deduplication_window = {dedup_window};

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.feedback_1h_mv {on_cluster} TO {db}.feedback_1h AS
SELECT toStartOfHour(f.ts) AS hour, f.feature AS feature, f.release_id AS release_id,
       f.prompt_version AS prompt_version, f.variant AS variant, f.model AS model,
       count() AS n, countIf(f.thumbs = 'up') AS thumbs_up, countIf(f.thumbs = 'down') AS thumbs_down,
       countIf(isNotNull(f.rating)) AS rated, sum(toFloat64(ifNull(f.rating, 0))) AS rating_sum
FROM {db}.feedback AS f
GROUP BY hour, feature, release_id, prompt_version, variant, model;

CREATE TABLE IF NOT EXISTS {db}.cost_history {on_cluster}
(
    event_id          String,
    ts                DateTime64(3, 'UTC'),
    feature           LowCardinality(String),
    model             LowCardinality(String),
    old_price_version LowCardinality(String),
    new_price_version LowCardinality(String),
    old_cost_usd      Nullable(Float64),
    new_cost_usd      Nullable(Float64),
    repriced_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (feature, ts, event_id)
TTL toDateTime(ts) + INTERVAL {raw_ttl_days} DAY;
