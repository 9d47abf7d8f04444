-- Weekly report: what caching identical prompts would save, as cache_opportunity (calls whose exact prompt,
-- prompt_hash, the same feature already sent within the hour before, and what they cost), at half its CPU on
-- a big table: instead of sorting the period's raw rows, sends are grouped by a 64-bit hash of (feature,
-- prompt_hash) and only prompts sent more than once are put in time order. (Two prompts of a feature would
-- have to share the hash, about a 1-in-a-million chance per week at 5M distinct prompts, and be sent within
-- the same hour, to change the answer.) Raw rows read FINAL: a call written twice (a retry in another block,
-- not yet merged away) is not its own repeat; at 1M calls in 5 parts FINAL cost about what collecting each
-- prompt's sends as a set did. Feature totals from the minute rollups.
SELECT t.feature AS feature, t.calls AS calls, ifNull(p.repeats, 0) AS repeats,
       round(ifNull(p.repeats, 0) / t.calls, 4) AS repeat_share,
       round(ifNull(p.repeat_cost, 0), 4) AS repeat_cost_usd, round(t.cost, 4) AS cost_usd
FROM (
    SELECT r.feature AS feature, sum(r.calls) AS calls, sum(r.cost_usd) AS cost
    FROM llm_calls_1m AS r
    WHERE r.minute >= {start:DateTime} AND r.minute < {end:DateTime}
    GROUP BY feature
) AS t
LEFT JOIN (
    SELECT feature, sum(arrayCount(g -> g <= 3600000, gaps)) AS repeats,
           sum(arraySum(arrayMap((g, x) -> if(g <= 3600000, x, 0), gaps, costs))) AS repeat_cost
    FROM (
        SELECT any(c.feature) AS feature, groupArray(toUnixTimestamp64Milli(c.ts)) AS sent, arraySort(sent) AS times,
               arrayPopFront(arraySort((x, s) -> s, groupArray(ifNull(c.cost_usd, 0)), sent)) AS costs,
               arrayMap(i -> times[i + 1] - times[i], range(1, length(times))) AS gaps
        FROM llm_calls AS c FINAL
        WHERE c.ts >= {start:DateTime64(3)} AND c.ts < {end:DateTime64(3)} AND c.prompt_hash != ''
        GROUP BY cityHash64(c.feature, c.prompt_hash)
        HAVING count() > 1
    )
    GROUP BY feature
) AS p ON p.feature = t.feature
ORDER BY repeat_cost_usd DESC, feature
