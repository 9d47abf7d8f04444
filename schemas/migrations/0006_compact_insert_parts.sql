-- Inserted blocks of llm_calls are written as compact parts: one data file and one marks file for
-- all columns, where a wide part has two or more files per column (~150 for a block of this
-- table). Creating those files was half of an insert's cost here: on chDB, 200k calls in 50k-row
-- blocks cost 5.5-7.2 µs a row as wide parts against 2.9-3.9 µs as compact ones, ext4 spending
-- the difference allocating inodes among recently deleted ones (merges delete parts all the time).
-- ClickHouse already writes parts under 10 MB compact; insert blocks (pipeline.batch_max_events,
-- 50k by default) are larger. Merged parts of 256k rows and more are wide again: a compact part
-- read 3 columns of 1M rows 25% slower (30 against 24 ms), and big parts are what scans read.
ALTER TABLE {db}.llm_calls {on_cluster} MODIFY SETTING min_rows_for_wide_part = 262144;
