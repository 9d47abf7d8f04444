-- Weekly report: month-to-date spend per team up to {end}, and the last 7 days' spend (the burn rate the
-- end-of-month projection extrapolates). Minute rollups only.
SELECT r.team AS team, sum(r.cost_usd) AS mtd_cost_usd,
       sumIf(r.cost_usd, r.minute >= {end:DateTime} - INTERVAL 7 DAY) AS last_7d_cost_usd
FROM llm_calls_1m AS r
WHERE r.minute >= toStartOfMonth({end:DateTime} - INTERVAL 1 SECOND) AND r.minute < {end:DateTime}
GROUP BY team
ORDER BY mtd_cost_usd DESC
