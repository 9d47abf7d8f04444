-- Refusal and error rates per model.
SELECT r.model AS model, any(r.provider) AS provider, sum(r.calls) AS calls,
       sum(r.refusals) / sum(r.calls) AS refusal_rate,
       sum(r.errors) / sum(r.calls) AS error_rate
FROM llm_calls_1m AS r
WHERE r.minute >= {start:DateTime} AND r.minute < {end:DateTime}
GROUP BY r.model
ORDER BY refusal_rate DESC
