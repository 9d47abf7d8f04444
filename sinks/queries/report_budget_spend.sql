-- Weekly report: spend per hour within one budget's scope (an empty filter matches any value), from the
-- budget period's start to {end}: the budget's cumulative line, burn rate and forecast. Minute rollups only.
SELECT toStartOfHour(r.minute) AS hour, sum(r.calls) AS calls, sum(r.cost_usd) AS cost_usd
FROM llm_calls_1m AS r
WHERE r.minute >= {start:DateTime} AND r.minute < {end:DateTime}
  AND ({feature:String} = '' OR r.feature = {feature:String}) AND ({team:String} = '' OR r.team = {team:String})
  AND ({model:String} = '' OR r.model = {model:String}) AND ({provider:String} = '' OR r.provider = {provider:String})
  AND ({prompt_version:String} = '' OR r.prompt_version = {prompt_version:String})
  AND ({variant:String} = '' OR r.variant = {variant:String})
GROUP BY hour
ORDER BY hour
