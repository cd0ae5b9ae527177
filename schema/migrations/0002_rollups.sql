-- Milepost schema, version 2: 15-minute rollups (see src/store/rollup.rs).
--
-- Per (device, sensor, UTC quarter hour): count, min, max, sum, and the first and last
-- reading (instant in epoch microseconds, value). The writer appends one row per
-- slot each commit stores readings in; several rows of one slot combine at query time
-- (sum the counts and sums, min/max the extremes, first of the firsts, last of the
-- lasts) and are consolidated later. No key: like `readings`, identity is kept by
-- the single writer.
CREATE TABLE rollups (
    device_id   INTEGER  NOT NULL,
    sensor_id   SMALLINT NOT NULL,
    slot_ms     BIGINT   NOT NULL,
    readings    BIGINT   NOT NULL,
    min_value   DOUBLE   NOT NULL,
    max_value   DOUBLE   NOT NULL,
    sum_value   DOUBLE   NOT NULL,
    first_us    BIGINT   NOT NULL,
    first_value DOUBLE   NOT NULL,
    last_us     BIGINT   NOT NULL,
    last_value  DOUBLE   NOT NULL
);

-- Readings stored before this version.
INSERT INTO rollups
    SELECT device_id, sensor_id, ts_ms - ((ts_ms % 900000) + 900000) % 900000 AS slot_ms,
           count(*), min(value), max(value), sum(value),
           min(ts_ms * 1000 + ts_us), arg_min(value, ts_ms * 1000 + ts_us),
           max(ts_ms * 1000 + ts_us), arg_max(value, ts_ms * 1000 + ts_us)
    FROM readings
    GROUP BY device_id, sensor_id, slot_ms
    ORDER BY device_id, sensor_id, slot_ms;
