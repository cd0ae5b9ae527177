-- Milepost schema, version 6: compacted days are stored apart, each value as an
-- integer mantissa and a divisor (issue 23, ≤ 3.0 bytes per reading).
--
-- DuckDB compresses a sorted DOUBLE column with ALP: per vector of 1,024 values
-- it finds a decimal exponent and bit-packs the integers frame-of-reference, so a
-- series that wanders needs as many bits as its range in the vector. As
-- integers, the same values are bit-packed as deltas (DuckDB's DELTA_FOR), which
-- need only the bits of one step: ~0.5 bytes per reading less for the bench's
-- four-decimal random walks (VictoriaMetrics stores values the same way).
--
-- `received_readings` (the table `readings` was) holds readings as they arrive,
-- unchanged; compaction moves each finished day into `compacted_readings`, sorted.
-- There a row holds `mant` and `div` with `value` NULL, where `mant / div` is bit
-- for bit the value received (compaction checks each row with the very
-- expression the view computes), or `value` alone when no such form exists. `div`
-- is a power of ten, one per sensor and day, so it costs nothing stored. Every
-- reader uses the view `readings`, both tables together. A finished day with rows
-- in `received_readings` is due for compaction: days compacted before this
-- version are compacted again (in the background, a day per writer turn).
ALTER TABLE readings RENAME TO received_readings;
CREATE TABLE compacted_readings (
    device_id INTEGER  NOT NULL,
    sensor_id SMALLINT NOT NULL,
    ts_ms     BIGINT   NOT NULL,
    ts_us     SMALLINT NOT NULL,
    mant      BIGINT,
    div       DOUBLE,
    value     DOUBLE
);
CREATE VIEW readings AS
    SELECT device_id, sensor_id, ts_ms, ts_us, value FROM received_readings
    UNION ALL
    SELECT device_id, sensor_id, ts_ms, ts_us, coalesce(value, mant / div)
    FROM compacted_readings;
