-- Rolling judge score per feature and release, with sample size and a 95% confidence interval.
SELECT feature, release_id, any(prompt_version) AS prompt_version, any(variant) AS variant, rubric,
       sum(n) AS judged, sum(score_sum) / sum(n) AS eval_score,
       1.96 * sqrt(greatest(sum(score_sumsq) / sum(n) - pow(sum(score_sum) / sum(n), 2), 0)
                   * sum(n) / greatest(sum(n) - 1, 1) / sum(n)) AS ci95
FROM eval_1h
WHERE hour >= toStartOfHour({start:DateTime}) AND hour < {end:DateTime}
GROUP BY feature, release_id, rubric
HAVING judged > 0
ORDER BY feature, judged DESC
