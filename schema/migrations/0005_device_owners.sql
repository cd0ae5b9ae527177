-- Milepost schema, version 5: which API key brought in each device, for per-key
-- device quotas (`--max-devices-per-key`, issue 23).
--
-- One row per device a key introduced (a key bound to one device, and devices from
-- before this version, have none). Written by the readings writer in the
-- transaction that inserts the device; deleted with it. A device acknowledged
-- through the ingest log in the last half second before a crash is replayed
-- without its owner (the log does not carry it), so a quota can only be lenient
-- by those. `key_id` is the first 8 bytes (little-endian) of the key's SHA-256.
CREATE TABLE device_owners (
    device_id INTEGER NOT NULL,
    key_id    BIGINT  NOT NULL
);
