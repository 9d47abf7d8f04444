-- Weekly report: alert incidents that overlap a period, one row per firing (dedup key and start), with
-- when it resolved (NULL: still firing at {end}) and how long it fired within the period: an incident
-- that started before {start} (started_before) counts from {start}, one still firing up to {end}.
-- Budget notices (metric budget_spend_usd) never resolve: they are one-off, duration 0, and count only
-- in the period they were sent. Incidents that started more than 28 days before {start} are left out:
-- one firing that long without resolving is almost always a rule since removed, and it would
-- otherwise fill every later report (and make each read the alerts table's whole history).
SELECT a.dedup_key AS dedup_key, a.started_at AS started_at, any(a.rule) AS rule, any(a.severity) AS severity,
       any(a.metric) AS metric, any(a.action) AS action, any(a.scope) AS scope,
       anyIf(a.value, a.state = 'firing') AS value, anyIf(a.summary, a.state = 'firing') AS summary,
       maxIf(a.ended_at, a.state = 'resolved') AS resolved_at, a.started_at < {start:DateTime64(3)} AS started_before,
       if(metric = 'budget_spend_usd', 0,
          dateDiff('second', greatest(a.started_at, {start:DateTime64(3)}),
                   least(ifNull(resolved_at, {end:DateTime64(3)}), {end:DateTime64(3)}))) AS duration_s
FROM alerts AS a FINAL
WHERE a.started_at < {end:DateTime64(3)} AND a.started_at >= {start:DateTime64(3)} - INTERVAL 28 DAY
GROUP BY dedup_key, started_at
HAVING if(metric = 'budget_spend_usd', started_at >= {start:DateTime64(3)},
          resolved_at IS NULL OR resolved_at > {start:DateTime64(3)})
ORDER BY started_at, rule
