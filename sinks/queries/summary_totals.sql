-- Headline counts for a period: calls and cost from the rollups, rejections from the DLQ.
SELECT
    (SELECT sum(calls) FROM llm_calls_1m WHERE minute >= {start:DateTime} AND minute < {end:DateTime}) AS calls,
    (SELECT sum(cost_usd) FROM llm_calls_1m WHERE minute >= {start:DateTime} AND minute < {end:DateTime}) AS cost_usd,
    (SELECT sum(price_missing) FROM llm_calls_1m WHERE minute >= {start:DateTime} AND minute < {end:DateTime}) AS price_missing,
    (SELECT count() FROM dlq FINAL) AS dlq,
    (SELECT count() FROM judge_samples FINAL WHERE ts >= {start:DateTime} AND ts < {end:DateTime}) AS judge_samples
