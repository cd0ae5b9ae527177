-- Milepost schema, version 7: today's readings sorted by device a chunk at a time
-- (issue 23: a device's readings page beside a streaming fleet).
--
-- The writer moves the live day's readings out of `received_readings`, where they
-- lie in arrival order, into `compacted_readings` a chunk at a time, sorted by
-- (device, sensor, time) and as plain `value`s (`mant` and `div` NULL; see
-- src/store/cluster.rs). Such a day is compacted like any other once it is over,
-- and must be found due even when `received_readings` holds none of it: it is
-- listed here until its compaction (or retention) removes it.
CREATE TABLE uncompacted_days (day DATE PRIMARY KEY);
