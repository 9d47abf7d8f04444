-- The 1-hour prompt-cache writes among cache_write_tokens (Anthropic bills them 2x input against
-- 1.25x for 5-minute ones): kept on the raw row so `llmpulse reprice` prices them as ingest did.
-- Rows from before read 0, as their events had no such field. The rollups keep cache_write_tokens
-- only: the split matters to a call's price, which cost_usd already carries.
ALTER TABLE {db}.llm_calls {on_cluster} ADD COLUMN IF NOT EXISTS cache_write_1h_tokens UInt32 DEFAULT 0 AFTER cache_write_tokens;
