-- Weekly report: calls and spend per feature, team and model (and the total) for a period and the
-- period before it ({pstart} to {start}), for week-over-week change. Minute rollups only.
-- A key whose calls in a period all lack a price has no known spend there: NULL, not a $0 that
-- reads as free (and a week-over-week change against it is unknown, not "new").
SELECT kv.1 AS dimension, kv.2 AS key, sum(w_calls) AS calls,
       if(sum(w_unpriced) > 0 AND sum(w_unpriced) = sum(w_calls), NULL, sum(w_cost)) AS cost_usd,
       sum(p_calls) AS prev_calls,
       if(sum(p_unpriced) > 0 AND sum(p_unpriced) = sum(p_calls), NULL, sum(p_cost)) AS prev_cost_usd,
       sum(w_unpriced) AS unpriced_calls
FROM (
    SELECT r.feature AS feature, r.team AS team, r.model AS model,
           sumIf(r.calls, r.minute >= {start:DateTime}) AS w_calls,
           sumIf(r.cost_usd, r.minute >= {start:DateTime}) AS w_cost,
           sumIf(r.price_missing, r.minute >= {start:DateTime}) AS w_unpriced,
           sumIf(r.calls, r.minute < {start:DateTime}) AS p_calls,
           sumIf(r.cost_usd, r.minute < {start:DateTime}) AS p_cost,
           sumIf(r.price_missing, r.minute < {start:DateTime}) AS p_unpriced
    FROM llm_calls_1m AS r
    WHERE r.minute >= {pstart:DateTime} AND r.minute < {end:DateTime}
    GROUP BY feature, team, model
)
ARRAY JOIN [('total', ''), ('feature', feature), ('team', team), ('model', model)] AS kv
GROUP BY dimension, key
ORDER BY dimension, cost_usd DESC, key
