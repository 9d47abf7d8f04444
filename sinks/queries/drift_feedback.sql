-- Thumbs-down rate per feature and model, for a window and its baseline period. Feedback rolls up
-- per hour, so the window's side starts at the hour holding its start (up to 59 minutes early).
SELECT f.feature AS feature, f.model AS model,
       if(f.hour >= toStartOfHour({wstart:DateTime}), 'window', 'baseline') AS period,
       sum(f.thumbs_up + f.thumbs_down) AS thumbs, sum(f.thumbs_down) AS thumbs_down
FROM feedback_1h AS f
WHERE (f.hour >= toStartOfHour({bstart:DateTime}) AND f.hour < {bend:DateTime})
   OR (f.hour >= toStartOfHour({wstart:DateTime}) AND f.hour < {wend:DateTime})
GROUP BY feature, model, period
