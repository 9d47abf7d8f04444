-- User feedback per feature and release: thumbs-down rate and mean rating.
SELECT f.feature AS feature, f.release_id AS release_id, any(f.prompt_version) AS prompt_version,
       any(f.variant) AS variant, sum(f.n) AS feedback, sum(f.thumbs_down) AS flagged,
       if(sum(f.thumbs_up + f.thumbs_down) > 0, sum(f.thumbs_down) / sum(f.thumbs_up + f.thumbs_down), NULL)
           AS thumbs_down_rate,
       if(sum(f.rated) > 0, sum(f.rating_sum) / sum(f.rated), NULL) AS rating_avg
FROM feedback_1h AS f
WHERE f.hour >= toStartOfHour({start:DateTime}) AND f.hour < {end:DateTime}
GROUP BY feature, release_id
ORDER BY flagged DESC
