-- Milepost schema, version 4: step detection (see src/detect and src/jobs/detection.rs).
--
-- Small tables, written by the backend's own connection (never by the readings
-- writer). Times are UTC epoch microseconds. No indexes: these tables hold
-- thousands of rows, not millions, and identity is kept by the one backend store
-- that writes them (under its lock).

CREATE SEQUENCE alert_ids START 1;
CREATE SEQUENCE anomaly_ids START 1;
CREATE SEQUENCE anomaly_group_ids START 1;
CREATE SEQUENCE delivery_ids START 1;

-- The seed's subscriptions: what to watch and how. `revision` starts at 1 and grows
-- with each update; `detected_through_us` is where background detection has settled
-- (every step before it is decided).
CREATE TABLE alerts (
    id                  BIGINT  NOT NULL,
    name                VARCHAR NOT NULL,
    revision            BIGINT  NOT NULL,
    device              VARCHAR NOT NULL,
    sensor              VARCHAR NOT NULL,
    bucket              VARCHAR NOT NULL,
    algorithm           VARCHAR NOT NULL,
    radius              INTEGER NOT NULL,
    threshold           DOUBLE  NOT NULL,
    direction           VARCHAR NOT NULL,
    min_bucket_readings INTEGER NOT NULL,
    webhook_url         VARCHAR NOT NULL,
    active              BOOLEAN NOT NULL,
    created_us          BIGINT  NOT NULL,
    updated_us          BIGINT  NOT NULL,
    detected_through_us BIGINT
);

-- One row per step an alert found: (alert_id, step_us) is its identity.
CREATE TABLE anomalies (
    id              BIGINT  NOT NULL,
    alert_id        BIGINT  NOT NULL,
    alert_revision  BIGINT  NOT NULL,
    device          VARCHAR NOT NULL,
    sensor          VARCHAR NOT NULL,
    step_us         BIGINT  NOT NULL,
    window_start_us BIGINT  NOT NULL,
    window_end_us   BIGINT  NOT NULL,
    before_mean     DOUBLE  NOT NULL,
    after_mean      DOUBLE  NOT NULL,
    statistic       DOUBLE  NOT NULL,
    direction       VARCHAR NOT NULL,
    status          VARCHAR NOT NULL,
    message         VARCHAR NOT NULL,
    detected_us     BIGINT  NOT NULL,
    triaged_us      BIGINT,
    triaged_by      VARCHAR,
    group_id        BIGINT  NOT NULL,
    -- NULL until the webhook has it (or there is no webhook / it gave up).
    notified_us     BIGINT
);

-- Anomalies of one alert whose windows overlap.
CREATE TABLE anomaly_groups (
    id       BIGINT  NOT NULL,
    alert_id BIGINT  NOT NULL,
    start_us BIGINT  NOT NULL,
    end_us   BIGINT  NOT NULL,
    action   VARCHAR NOT NULL
);

-- Every webhook attempt.
CREATE TABLE deliveries (
    id          BIGINT  NOT NULL,
    alert_id    BIGINT  NOT NULL,
    url         VARCHAR NOT NULL,
    subject     VARCHAR NOT NULL,
    anomaly_ids VARCHAR NOT NULL,
    attempt     INTEGER NOT NULL,
    ok          BOOLEAN NOT NULL,
    status_code INTEGER NOT NULL,
    error       VARCHAR NOT NULL,
    at_us       BIGINT  NOT NULL
);
