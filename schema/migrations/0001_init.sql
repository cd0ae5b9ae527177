-- Milepost schema, version 1.
--
-- Readings carry small integer ids for device and sensor; names live in `devices` and
-- `sensors`. There is deliberately NO primary key or unique index on `readings`:
-- DuckDB keeps ART indexes in memory (~60 bytes per key), which a small VM cannot
-- afford at hundreds of millions of rows. Identity (device, sensor, ts) is enforced by
-- the single writer instead (see src/store/writer.rs).

CREATE TABLE sensors (
    id          SMALLINT PRIMARY KEY,
    name        VARCHAR NOT NULL UNIQUE,
    unit        VARCHAR NOT NULL,
    description VARCHAR NOT NULL,
    min_value   DOUBLE,
    max_value   DOUBLE
);

INSERT INTO sensors VALUES
    (1, 'speed',              'km/h',    'Vehicle speed',                 NULL,   NULL),
    (2, 'fuel',               '%',       'Fuel tank level',               NULL,   NULL),
    (3, 'revolution',         'rpm',     'Engine revolutions per minute', NULL,   NULL),
    (4, 'engine_temperature', '°C',      'Engine coolant temperature',    NULL,   NULL),
    (5, 'location_latitude',  'degrees', 'GPS latitude (WGS 84)',         -90.0,  90.0),
    (6, 'location_longitude', 'degrees', 'GPS longitude (WGS 84)',        -180.0, 180.0);

CREATE TABLE devices (
    id   INTEGER PRIMARY KEY,
    name VARCHAR NOT NULL UNIQUE
);

-- The timestamp is split: `ts_ms` is UTC epoch milliseconds and `ts_us` the
-- microseconds within that millisecond (0..999). Clients that send milliseconds get
-- a constant 0 in `ts_us`, which costs nothing, and `ts_ms` compresses ~1 byte per
-- reading better than microseconds would; clients that send microseconds lose
-- nothing. The instant is ts_ms * 1000 + ts_us.
CREATE TABLE readings (
    device_id INTEGER  NOT NULL,
    sensor_id SMALLINT NOT NULL,
    ts_ms     BIGINT   NOT NULL,
    ts_us     SMALLINT NOT NULL,
    value     DOUBLE   NOT NULL
);

-- One row per (device, sensor) that has readings: count, time span and newest value.
-- A snapshot of the writer's in-memory statistics, written at clean shutdown (per-commit
-- upserts cost more than the readings themselves). Start-up reads it in milliseconds
-- when meta.series_snapshot = 'valid' and recomputes it from `readings` otherwise.
CREATE TABLE series (
    device_id  INTEGER   NOT NULL,
    sensor_id  SMALLINT  NOT NULL,
    readings   BIGINT    NOT NULL,
    first_ts   TIMESTAMP NOT NULL,
    last_ts    TIMESTAMP NOT NULL,
    last_value DOUBLE    NOT NULL
);

-- Small key/value facts about the database itself.
CREATE TABLE meta (
    key   VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);

-- Finished UTC days that were rewritten sorted by (device, sensor, ts), with the row
-- count at that time. A day whose count has changed since (late uploads) is compacted
-- again. Sorted days take ~4 bytes per reading instead of ~7 in arrival order.
CREATE TABLE compacted_days (
    day      DATE PRIMARY KEY,
    readings BIGINT NOT NULL
);

-- An empty database has a valid (empty) series snapshot.
INSERT INTO meta VALUES ('series_snapshot', 'valid');
