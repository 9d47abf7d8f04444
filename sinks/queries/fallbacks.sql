-- Fallback calls per provider pair: which provider a call fell back from, and to which. FINAL: a call
-- written twice (a client retry) before a merge counts once.
SELECT fallback_from, provider AS fell_back_to, count() AS calls, countIf(status = 'ok') AS succeeded
FROM llm_calls FINAL
WHERE ts >= {start:DateTime64(3)} AND ts < {end:DateTime64(3)} AND fallback_from != ''
GROUP BY fallback_from, fell_back_to
ORDER BY calls DESC
