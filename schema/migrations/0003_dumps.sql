-- Milepost schema, version 3: daily dumps to blob storage (see src/export/mod.rs).
--
-- One row per (blob store, UTC day, format) that was dumped: what the object holds
-- and where it is. `manifest.json` at the store's prefix is generated from these
-- rows. A day is due again when its stored reading count differs from `readings`:
-- identity is first-write-wins and nothing but retention deletes readings, so a
-- day's count only ever grows and a changed count means late readings arrived.
CREATE TABLE dumps (
    store        VARCHAR   NOT NULL,
    day          DATE      NOT NULL,
    format       VARCHAR   NOT NULL,
    object_key   VARCHAR   NOT NULL,
    readings     BIGINT    NOT NULL,
    bytes        BIGINT    NOT NULL,
    sha256       VARCHAR   NOT NULL,
    min_ts       TIMESTAMP,
    max_ts       TIMESTAMP,
    generated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (store, day, format)
);

-- Days whose readings retention deleted locally after they were dumped: never
-- dumped again (their dumps hold the history), never counted as pending.
CREATE TABLE retired_days (
    day        DATE      PRIMARY KEY,
    readings   BIGINT    NOT NULL,
    retired_at TIMESTAMP NOT NULL
);
