-- What caching identical queries would save: calls whose exact prompt (prompt_hash) was already
-- sent by the same feature within the last hour, and what they cost. Raw rows read FINAL: a call
-- written twice before a merge is not its own repeat.
SELECT feature, count() AS calls, countIf(repeat) AS repeats, round(countIf(repeat) / count(), 4) AS repeat_share,
       round(sumIf(cost, repeat), 4) AS repeat_cost_usd, round(sum(cost), 4) AS cost_usd
FROM (
    SELECT feature, ifNull(cost_usd, 0) AS cost,
           prompt_hash != '' AND dateDiff('second', lagInFrame(ts, 1, toDateTime64(0, 3, 'UTC'))
               OVER (PARTITION BY feature, prompt_hash ORDER BY ts), ts) <= 3600 AS repeat
    FROM llm_calls FINAL
    WHERE ts >= {start:DateTime64(3)} AND ts < {end:DateTime64(3)}
)
GROUP BY feature
ORDER BY repeat_cost_usd DESC
