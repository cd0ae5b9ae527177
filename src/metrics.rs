//! Prometheus metrics (`GET /metrics`), with the `prometheus-client` crate.
//!
//! One [`Metrics`] per server, not a process-global registry: tests start several
//! servers in one process and each must see only its own counters. Counters are
//! labelled by sensor name, and only catalogued names become labels (anything a
//! client makes up is counted under `unknown`), so clients cannot blow up the
//! number of series.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Label of per-sensor counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SensorLabel {
    /// Catalogued sensor name, or `unknown`.
    pub sensor: String,
}

/// Label of per-outcome counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// HTTP status code.
    pub status: u16,
}

/// Label name used for readings whose sensor is not in the catalog.
pub const UNKNOWN_SENSOR: &str = "unknown";

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// Readings newly stored, by sensor.
    pub readings_accepted: Family<SensorLabel, Counter>,
    /// Readings dropped as duplicates of stored ones, by sensor.
    pub readings_duplicate: Family<SensorLabel, Counter>,
    /// Lines refused, by sensor (`unknown` when the line named no catalogued sensor).
    pub readings_rejected: Family<SensorLabel, Counter>,
    /// Ingest requests answered, by status.
    pub ingest_requests: Family<StatusLabel, Counter>,
    /// Time from request start to answer of `POST /ingest`.
    pub ingest_seconds: Histogram,
    /// Time of one group commit in the writer (an ingest-log append or a DuckDB
    /// transaction).
    pub commit_seconds: Histogram,
    /// Time of moving the ingest log into DuckDB.
    pub log_flush_seconds: Histogram,
    /// Batches waiting for the writer (set when scraped).
    pub queue_depth: Gauge,
    /// Size of the database file plus its WAL (set when scraped).
    pub database_bytes: Gauge,
    /// Readings stored over all series (set when scraped).
    pub stored_readings: Gauge,
    /// Known devices (set when scraped).
    pub devices: Gauge,
    /// Seconds since the Unix epoch of the newest stored reading (set when scraped).
    pub last_reading_seconds: Gauge<f64, AtomicU64>,
    /// Dump objects written and recorded.
    pub dumps_ok: Counter,
    /// Days whose dump failed (retried by the next run).
    pub dumps_failed: Counter,
    /// Bytes of dump objects written.
    pub dump_bytes: Counter,
    /// Time to dump one day (copy, upload, record, manifest).
    pub dump_seconds: Histogram,
    /// Finished days still waiting for a dump after the last run.
    pub dump_days_pending: Gauge,
    /// Readings deleted by retention after their days were dumped.
    pub retention_deleted_readings: Counter,
    /// Anomalies background step detection stored.
    pub anomalies_found: Counter,
    /// Time of one background detection pass over the alerts of the touched series.
    pub detection_seconds: Histogram,
    /// Webhook attempts the receiver answered with 2xx.
    pub webhook_ok: Counter,
    /// Webhook attempts that failed (retried, up to `--webhook-attempts`).
    pub webhook_failed: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics { .. }")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, all zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("milepost");
        let readings_accepted = Family::<SensorLabel, Counter>::default();
        registry.register(
            "readings_accepted",
            "Readings newly stored",
            readings_accepted.clone(),
        );
        let readings_duplicate = Family::<SensorLabel, Counter>::default();
        registry.register(
            "readings_duplicate",
            "Readings dropped because their (device, sensor, timestamp) was already stored",
            readings_duplicate.clone(),
        );
        let readings_rejected = Family::<SensorLabel, Counter>::default();
        registry.register(
            "readings_rejected",
            "Ingest lines refused",
            readings_rejected.clone(),
        );
        let ingest_requests = Family::<StatusLabel, Counter>::default();
        registry.register(
            "ingest_requests",
            "Ingest requests answered, by HTTP status",
            ingest_requests.clone(),
        );
        // 1 ms .. ~16 s.
        let ingest_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register_with_unit(
            "ingest_request_duration",
            "Time to answer an ingest request (all its readings committed)",
            Unit::Seconds,
            ingest_seconds.clone(),
        );
        // 0.1 ms .. ~6.5 s.
        let commit_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 17));
        registry.register_with_unit(
            "batch_commit_duration",
            "Time of one group commit (ingest-log append and fdatasync, or dedupe, append and COMMIT in DuckDB)",
            Unit::Seconds,
            commit_seconds.clone(),
        );
        let log_flush_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 15));
        registry.register_with_unit(
            "ingest_log_flush_duration",
            "Time of moving the readings acknowledged through the ingest log into the database",
            Unit::Seconds,
            log_flush_seconds.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "write_queue_depth",
            "Batches waiting for the writer",
            queue_depth.clone(),
        );
        let database_bytes = Gauge::default();
        registry.register_with_unit(
            "database_size",
            "Size of the DuckDB file and its write-ahead log",
            Unit::Bytes,
            database_bytes.clone(),
        );
        let stored_readings = Gauge::default();
        registry.register(
            "stored_readings",
            "Readings stored over all devices and sensors",
            stored_readings.clone(),
        );
        let devices = Gauge::default();
        registry.register("devices", "Devices that sent readings", devices.clone());
        let last_reading_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_reading_timestamp_seconds",
            "Timestamp of the newest stored reading",
            last_reading_seconds.clone(),
        );
        let dumps_ok = Counter::default();
        registry.register(
            "dumps_ok",
            "Daily dump objects written to the blob store",
            dumps_ok.clone(),
        );
        let dumps_failed = Counter::default();
        registry.register(
            "dumps_failed",
            "Days whose dump failed (retried by the next run)",
            dumps_failed.clone(),
        );
        let dump_bytes = Counter::default();
        registry.register_with_unit(
            "dump",
            "Bytes of dump objects written",
            Unit::Bytes,
            dump_bytes.clone(),
        );
        // 10 ms .. ~5 min.
        let dump_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 15));
        registry.register_with_unit(
            "dump_day_duration",
            "Time to dump one day (copy, upload, record, manifest)",
            Unit::Seconds,
            dump_seconds.clone(),
        );
        let dump_days_pending = Gauge::default();
        registry.register(
            "dump_days_pending",
            "Finished days still waiting for a dump after the last run",
            dump_days_pending.clone(),
        );
        let retention_deleted_readings = Counter::default();
        registry.register(
            "retention_deleted_readings",
            "Readings deleted by retention after their days were dumped",
            retention_deleted_readings.clone(),
        );
        let anomalies_found = Counter::default();
        registry.register(
            "anomalies_found",
            "Anomalies background step detection stored",
            anomalies_found.clone(),
        );
        // 1 ms .. ~30 s.
        let detection_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register_with_unit(
            "detection_pass_duration",
            "Time of one background detection pass",
            Unit::Seconds,
            detection_seconds.clone(),
        );
        let webhook_ok = Counter::default();
        registry.register(
            "webhook_deliveries_ok",
            "Webhook attempts answered with 2xx",
            webhook_ok.clone(),
        );
        let webhook_failed = Counter::default();
        registry.register(
            "webhook_deliveries_failed",
            "Webhook attempts that failed",
            webhook_failed.clone(),
        );
        Self {
            anomalies_found,
            detection_seconds,
            webhook_ok,
            webhook_failed,
            dumps_ok,
            dumps_failed,
            dump_bytes,
            dump_seconds,
            dump_days_pending,
            retention_deleted_readings,
            registry,
            readings_accepted,
            readings_duplicate,
            readings_rejected,
            ingest_requests,
            ingest_seconds,
            commit_seconds,
            log_flush_seconds,
            queue_depth,
            database_bytes,
            stored_readings,
            devices,
            last_reading_seconds,
        }
    }

    /// Adds `n` to a per-sensor counter.
    pub fn add(family: &Family<SensorLabel, Counter>, sensor: &str, n: u64) {
        if n > 0 {
            family
                .get_or_create(&SensorLabel {
                    sensor: sensor.to_owned(),
                })
                .inc_by(n);
        }
    }

    /// Creates the per-sensor reading counters of `sensors` (and `unknown`'s refused
    /// lines) and the ingest request counters of `statuses`, at 0. A series that
    /// appears only with its first event is invisible to `increase()` and alerts on
    /// that first event, and dashboards show "no data" instead of 0.
    pub fn expose_at_zero<'a>(&self, sensors: impl IntoIterator<Item = &'a str>, statuses: &[u16]) {
        let label = |sensor: &str| SensorLabel {
            sensor: sensor.to_owned(),
        };
        for sensor in sensors {
            let _ = self.readings_accepted.get_or_create(&label(sensor));
            let _ = self.readings_duplicate.get_or_create(&label(sensor));
            let _ = self.readings_rejected.get_or_create(&label(sensor));
        }
        let _ = self.readings_rejected.get_or_create(&label(UNKNOWN_SENSOR));
        for &status in statuses {
            let _ = self.ingest_requests.get_or_create(&StatusLabel { status });
        }
    }

    /// The text exposition (OpenMetrics, which Prometheus reads natively).
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// Content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
