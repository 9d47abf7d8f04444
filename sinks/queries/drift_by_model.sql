-- Drift inputs per feature and model, for a window and its baseline period: volume, mean and p95
-- output tokens, refusal / schema-valid / tool-call rates, and 100 evenly spaced quantiles of
-- output tokens (the distribution PSI is computed on). Rollups only: fast over any history.
SELECT r.feature AS feature, r.model AS model, if(r.minute >= {wstart:DateTime}, 'window', 'baseline') AS period,
       sum(r.calls) AS calls,
       sum(r.output_tokens) / sum(r.calls) AS output_tokens_avg,
       quantilesTDigestMerge(0.95)(r.output_tokens_q)[1] AS output_tokens_p95,
       sum(r.refusals) / sum(r.calls) AS refusal_rate,
       if(sum(r.schema_checked) > 0, sum(r.schema_valid) / sum(r.schema_checked), NULL) AS schema_valid_rate,
       sum(r.schema_checked) AS schema_checked,
       sum(r.tool_call_calls) / sum(r.calls) AS tool_call_rate,
       quantilesTDigestMerge(0.005, 0.015, 0.025, 0.035, 0.045, 0.055, 0.065, 0.075, 0.085, 0.095, 0.105, 0.115, 0.125, 0.135, 0.145, 0.155, 0.165, 0.175, 0.185, 0.195, 0.205, 0.215, 0.225, 0.235, 0.245, 0.255, 0.265, 0.275, 0.285, 0.295, 0.305, 0.315, 0.325, 0.335, 0.345, 0.355, 0.365, 0.375, 0.385, 0.395, 0.405, 0.415, 0.425, 0.435, 0.445, 0.455, 0.465, 0.475, 0.485, 0.495, 0.505, 0.515, 0.525, 0.535, 0.545, 0.555, 0.565, 0.575, 0.585, 0.595, 0.605, 0.615, 0.625, 0.635, 0.645, 0.655, 0.665, 0.675, 0.685, 0.695, 0.705, 0.715, 0.725, 0.735, 0.745, 0.755, 0.765, 0.775, 0.785, 0.795, 0.805, 0.815, 0.825, 0.835, 0.845, 0.855, 0.865, 0.875, 0.885, 0.895, 0.905, 0.915, 0.925, 0.935, 0.945, 0.955, 0.965, 0.975, 0.985, 0.995)(r.output_tokens_q) AS output_tokens_quantiles
FROM llm_calls_1m AS r
WHERE (r.minute >= {bstart:DateTime} AND r.minute < {bend:DateTime})
   OR (r.minute >= {wstart:DateTime} AND r.minute < {wend:DateTime})
GROUP BY feature, model, period
ORDER BY feature, model, period
