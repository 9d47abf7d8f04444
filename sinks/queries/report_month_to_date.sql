-- Weekly report: month-to-date spend per team up to {end}, and the last 7 days' spend (the burn rate the
-- end-of-month projection extrapolates). Rows are read from the earlier of the month's start and 7 days
-- before {end}: early in a month the burn window reaches back into the previous one. Minute rollups only.
-- The priced-call counts tell a team with no known spend (every call unpriced) from one that spent $0.
WITH toStartOfMonth({end:DateTime} - INTERVAL 1 SECOND) AS month_start, {end:DateTime} - INTERVAL 7 DAY AS burn_start
SELECT r.team AS team, sumIf(r.cost_usd, r.minute >= month_start) AS mtd_cost_usd,
       sumIf(r.cost_usd, r.minute >= burn_start) AS last_7d_cost_usd,
       sumIf(r.calls, r.minute >= month_start) AS mtd_calls,
       sumIf(r.calls - r.price_missing, r.minute >= month_start) AS mtd_priced_calls,
       sumIf(r.calls, r.minute >= burn_start) AS last_7d_calls,
       sumIf(r.calls - r.price_missing, r.minute >= burn_start) AS last_7d_priced_calls
FROM llm_calls_1m AS r
WHERE r.minute >= least(toDateTime(month_start, 'UTC'), burn_start) AND r.minute < {end:DateTime}
GROUP BY team
ORDER BY mtd_cost_usd DESC, team
