-- Which snapshot served each requested model, and when (to the minute): a new response_model
-- appearing under an unchanged model name is the provider silently switching versions.
SELECT feature, model, response_model, sum(calls) AS calls, min(minute) AS first_seen,
       max(minute) + INTERVAL 59 SECOND AS last_seen
FROM served_models_1m
WHERE minute >= toStartOfMinute({bstart:DateTime}) AND minute < {wend:DateTime}
GROUP BY feature, model, response_model
ORDER BY feature, model, first_seen
