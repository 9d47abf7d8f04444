-- Weekly report: judge score (representative samples only) and user thumbs per day and feature, from the
-- hourly eval and feedback rollups.
SELECT day, feature, sum(j_n) AS judged, sum(j_sum) AS score_sum,
       if(judged > 0, score_sum / judged, NULL) AS eval_score,
       sum(t_n) AS thumbs, sum(t_down) AS thumbs_down
FROM (
    SELECT toDate(e.hour) AS day, e.feature AS feature, sum(e.n) AS j_n, sum(e.score_sum) AS j_sum,
           toUInt64(0) AS t_n, toUInt64(0) AS t_down
    FROM eval_1h AS e
    WHERE e.hour >= toStartOfHour({start:DateTime}) AND e.hour < {end:DateTime}
    GROUP BY day, feature
    UNION ALL
    SELECT toDate(f.hour) AS day, f.feature AS feature, toUInt64(0) AS j_n, 0.0 AS j_sum,
           sum(f.thumbs_up + f.thumbs_down) AS t_n, sum(f.thumbs_down) AS t_down
    FROM feedback_1h AS f
    WHERE f.hour >= toStartOfHour({start:DateTime}) AND f.hour < {end:DateTime}
    GROUP BY day, feature
)
GROUP BY day, feature
ORDER BY day, feature
