//! Prometheus metrics (`GET /metrics`), with the `prometheus-client` crate.
//!
//! One [`Metrics`] per server, not a process-global registry: tests start several
//! servers in one process and each must see only its own counters. Counters are
//! labelled by sensor name, and only catalogued names become labels (anything a
//! client makes up is counted under `unknown`), so clients cannot blow up the
//! number of series.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

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

/// Label of counters by how something ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// Short, fixed outcome name.
    pub outcome: &'static str,
}

/// Label of counters by cause.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Short, fixed cause name.
    pub reason: &'static str,
}

/// Label of counters by the path something took.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    /// Short, fixed path name.
    pub path: &'static str,
}

/// `path` of readings the ingest log moved into DuckDB in transactions of at least a
/// row group (see `ingest_log_applied_readings`).
pub const APPLIED_TO_DATA_FILE: &str = "data_file";
/// `path` of readings it moved in smaller transactions, through DuckDB's own WAL.
pub const APPLIED_THROUGH_WAL: &str = "wal";

/// Label name used for readings whose sensor is not in the catalog.
pub const UNKNOWN_SENSOR: &str = "unknown";

/// Declares [`Metrics`] — each metric once: its field, documentation, initial value,
/// exported name, help text and unit — and `Metrics::new`, which registers them in
/// this order.
macro_rules! metrics {
    ($(
        $(#[$doc:meta])*
        $field:ident: $ty:ty = $init:expr => $name:literal, $help:literal $(, $unit:ident)?;
    )+) => {
        /// Every metric the server exports.
        pub struct Metrics {
            registry: Registry,
            /// Readings accepted per minute over the last day (the console's
            /// sparkline; not exported).
            pub activity: Activity,
            /// The latest refused lines (the console's system page; not exported).
            pub recent_errors: RecentErrors,
            $( $(#[$doc])* pub $field: $ty, )+
        }

        impl Metrics {
            /// A fresh set of metrics, all zero.
            pub fn new() -> Self {
                let mut registry = Registry::with_prefix("milepost");
                $(
                    let $field: $ty = $init;
                    metrics!(@register registry, $name, $help, $field $(, $unit)?);
                )+
                Self {
                    registry,
                    activity: Activity::default(),
                    recent_errors: RecentErrors::default(),
                    $($field),+
                }
            }
        }
    };
    (@register $r:ident, $name:literal, $help:literal, $f:ident) => {
        $r.register($name, $help, $f.clone())
    };
    (@register $r:ident, $name:literal, $help:literal, $f:ident, $unit:ident) => {
        $r.register_with_unit($name, $help, Unit::$unit, $f.clone())
    };
}

metrics! {
    /// Readings newly stored, by sensor.
    readings_accepted: Family<SensorLabel, Counter> = Family::default()
        => "readings_accepted", "Readings newly stored";
    /// Readings dropped as duplicates of stored ones, by sensor.
    readings_duplicate: Family<SensorLabel, Counter> = Family::default()
        => "readings_duplicate",
        "Readings dropped because their (device, sensor, timestamp) was already stored";
    /// Lines refused, by sensor (`unknown` when the line named no catalogued sensor).
    readings_rejected: Family<SensorLabel, Counter> = Family::default()
        => "readings_rejected", "Ingest lines refused";
    /// Devices new to the server whose readings a request was refused, by reason
    /// (`ceiling`: `--max-devices`; `key_quota`: `--max-devices-per-key`; `rate`:
    /// the key's new devices per minute).
    devices_refused: Family<ReasonLabel, Counter> = Family::default()
        => "new_devices_refused",
        "New devices whose readings were refused (reason: ceiling, key_quota or rate), once per request and device";
    /// Ingest requests answered, by status.
    ingest_requests: Family<StatusLabel, Counter> = Family::default()
        => "ingest_requests", "Ingest requests answered, by HTTP status";
    /// Time from request start to answer of `POST /ingest` (1 ms .. ~16 s).
    ingest_seconds: Histogram = Histogram::new(exponential_buckets(0.001, 2.0, 15))
        => "ingest_request_duration",
        "Time to answer an ingest request (all its readings committed)", Seconds;
    /// Time of one group commit in the writer (an ingest-log append or a DuckDB
    /// transaction; 0.1 ms .. ~6.5 s).
    commit_seconds: Histogram = Histogram::new(exponential_buckets(0.0001, 2.0, 17))
        => "batch_commit_duration",
        "Time of one group commit (ingest-log append and fdatasync, or dedupe, append and COMMIT in DuckDB)",
        Seconds;
    /// Time of one `fdatasync` of the ingest log, which acknowledges every group
    /// written before it started (10 µs .. ~0.65 s). Its count over time is the
    /// number of syncs a second; the disk's flush latency shows here first.
    log_sync_seconds: Histogram = Histogram::new(exponential_buckets(0.00001, 2.0, 17))
        => "ingest_log_sync_duration",
        "Time of one fdatasync of the ingest log (it acknowledges every group written before it started)",
        Seconds;
    /// Time of moving the ingest log into DuckDB.
    log_flush_seconds: Histogram = Histogram::new(exponential_buckets(0.0005, 2.0, 15))
        => "ingest_log_flush_duration",
        "Time of moving the readings acknowledged through the ingest log into the database",
        Seconds;
    /// Readings moved from the ingest log into DuckDB, by how DuckDB wrote them:
    /// `data_file` in transactions of at least a row group (122,880 readings),
    /// compressed straight into the database file; `wal` in smaller ones (a live
    /// fleet's), into DuckDB's own write-ahead log first and again at its next
    /// checkpoint.
    log_applied: Family<PathLabel, Counter> = Family::default()
        => "ingest_log_applied_readings",
        "Readings moved from the ingest log into the database, by how DuckDB wrote them (data_file: transactions of a row group or more; wal: smaller ones, written again at the next checkpoint)";
    /// Batches waiting for the writer (set when scraped).
    queue_depth: Gauge = Gauge::default()
        => "write_queue_depth", "Batches waiting for the writer";
    /// Readings acknowledged through the ingest log that DuckDB does not hold yet
    /// (set when scraped; queries see them anyway).
    unapplied_readings: Gauge = Gauge::default()
        => "ingest_log_unapplied_readings",
        "Readings acknowledged through the ingest log and not yet applied to the database";
    /// Age of the oldest of them (set when scraped).
    apply_lag_seconds: Gauge<f64, AtomicU64> = Gauge::default()
        => "ingest_log_apply_lag",
        "How long the oldest acknowledged reading not yet applied to the database has waited",
        Seconds;
    /// Size of the database file plus its WAL (set when scraped).
    database_bytes: Gauge = Gauge::default()
        => "database_size", "Size of the DuckDB file and its write-ahead log", Bytes;
    /// Readings stored over all series (set when scraped).
    stored_readings: Gauge = Gauge::default()
        => "stored_readings", "Readings stored over all devices and sensors";
    /// Known devices (set when scraped).
    devices: Gauge = Gauge::default() => "devices", "Devices that sent readings";
    /// Devices whose live quarter hours are held in memory (set when scraped).
    live_slots_devices: Gauge = Gauge::default()
        => "live_slots_devices",
        "Devices whose live quarter hours memory holds for charts (the others are read from the database)";
    /// Memory those take, against `--live-slots-memory` (set when scraped).
    live_slots_bytes: Gauge = Gauge::default()
        => "live_slots_memory", "Memory the live quarter hours take (--live-slots-memory bounds it)", Bytes;
    /// Memory the resident devices' series statistics take (set when scraped).
    series_bytes: Gauge = Gauge::default()
        => "series_statistics_memory",
        "Memory the series statistics of active devices take (--series-memory bounds it)", Bytes;
    /// Devices whose series statistics are on disk (set when scraped).
    series_devices_on_disk: Gauge = Gauge::default()
        => "series_statistics_devices_on_disk",
        "Devices idle long enough that their series statistics were moved to the database";
    /// `--max-devices` (0: no ceiling), to alert on `devices / devices_limit`.
    devices_limit: Gauge = Gauge::default()
        => "devices_limit", "Devices the server holds at most (--max-devices; 0: no ceiling)";
    /// Seconds since the Unix epoch of the newest stored reading (set when scraped).
    last_reading_seconds: Gauge<f64, AtomicU64> = Gauge::default()
        => "last_reading_timestamp_seconds", "Timestamp of the newest stored reading";
    /// Dump objects written and recorded.
    dumps_ok: Counter = Counter::default()
        => "dumps_ok", "Daily dump objects written to the blob store";
    /// Days whose dump failed (retried by the next run).
    dumps_failed: Counter = Counter::default()
        => "dumps_failed", "Days whose dump failed (retried by the next run)";
    /// Bytes of dump objects written.
    dump_bytes: Counter = Counter::default()
        => "dump", "Bytes of dump objects written", Bytes;
    /// Time to dump one day (copy, upload, record, manifest; 10 ms .. ~5 min).
    dump_seconds: Histogram = Histogram::new(exponential_buckets(0.01, 2.0, 15))
        => "dump_day_duration", "Time to dump one day (copy, upload, record, manifest)",
        Seconds;
    /// Finished days still waiting for a dump after the last run.
    dump_days_pending: Gauge = Gauge::default()
        => "dump_days_pending", "Finished days still waiting for a dump after the last run";
    /// Readings deleted by retention after their days were dumped.
    retention_deleted_readings: Counter = Counter::default()
        => "retention_deleted_readings",
        "Readings deleted by retention after their days were dumped";
    /// Anomalies background step detection stored.
    anomalies_found: Counter = Counter::default()
        => "anomalies_found", "Anomalies background step detection stored";
    /// Time of one background detection pass over the alerts of the touched series
    /// (1 ms .. ~30 s).
    detection_seconds: Histogram = Histogram::new(exponential_buckets(0.001, 2.0, 15))
        => "detection_pass_duration", "Time of one background detection pass", Seconds;
    /// Webhook attempts the receiver answered with 2xx.
    webhook_ok: Counter = Counter::default()
        => "webhook_deliveries_ok", "Webhook attempts answered with 2xx";
    /// Webhook attempts that failed (retried, up to `--webhook-attempts`).
    webhook_failed: Counter = Counter::default()
        => "webhook_deliveries_failed", "Webhook attempts that failed";
    /// `POST /api/v1/sql` requests answered, by status (200 answered; 400 refused or
    /// failed; 408 timed out; 413 over the cap; 503 busy).
    sql_requests: Family<StatusLabel, Counter> = Family::default()
        => "sql_requests", "User SQL requests answered, by HTTP status";
    /// Time to answer a user SQL query (1 ms .. ~33 s).
    sql_seconds: Histogram = Histogram::new(exponential_buckets(0.001, 2.0, 16))
        => "sql_query_duration", "Time to answer a user SQL request", Seconds;
    /// Queries over the PostgreSQL listener, by outcome (`ok`, `refused`, `failed`,
    /// `timeout`, `cancelled`, `too_large`, `busy`, `internal`); their times are in
    /// `sql_query_duration` too.
    pg_queries: Family<OutcomeLabel, Counter> = Family::default()
        => "pg_queries", "User SQL queries over the PostgreSQL listener, by outcome";
    /// Open connections to the PostgreSQL listener.
    pg_connections: Gauge = Gauge::default()
        => "pg_connections", "Open connections to the PostgreSQL listener";
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
    /// lines), the ingest request counters of `statuses`, those of refused devices and
    /// of applied readings, at 0. A series that
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
        for reason in ["ceiling", "key_quota", "rate"] {
            let _ = self.devices_refused.get_or_create(&ReasonLabel { reason });
        }
        for path in [APPLIED_TO_DATA_FILE, APPLIED_THROUGH_WAL] {
            let _ = self.log_applied.get_or_create(&PathLabel { path });
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

/// Minutes [`Activity`] remembers.
const ACTIVITY_MINUTES: usize = 24 * 60;

/// Readings accepted per minute over the last day, in a ring of per-minute counters
/// stamped with their minute: two atomics a commit, no lock on the ingest path.
/// Approximate by design (a count racing the minute's reset may be lost): it draws
/// a sparkline, it is not a metric.
pub struct Activity {
    minutes: Box<[(AtomicI64, AtomicU64)]>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            minutes: (0..ACTIVITY_MINUTES)
                .map(|_| (AtomicI64::new(i64::MIN), AtomicU64::new(0)))
                .collect(),
        }
    }
}

fn current_minute() -> i64 {
    chrono::Utc::now().timestamp().div_euclid(60)
}

impl Activity {
    /// Counts `n` readings accepted now.
    pub fn record(&self, n: u64) {
        self.record_at(current_minute(), n);
    }

    fn record_at(&self, minute: i64, n: u64) {
        let (stamp, count) = &self.minutes[minute.rem_euclid(ACTIVITY_MINUTES as i64) as usize];
        let seen = stamp.load(Ordering::Acquire);
        if seen != minute
            && stamp
                .compare_exchange(seen, minute, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            count.store(0, Ordering::Release);
        }
        count.fetch_add(n, Ordering::AcqRel);
    }

    /// Readings accepted in each of the last 24 hours (the current one last).
    pub fn per_hour(&self) -> Vec<u64> {
        self.per_hour_at(current_minute())
    }

    fn per_hour_at(&self, now: i64) -> Vec<u64> {
        let mut hours = vec![0u64; 24];
        for (stamp, count) in self.minutes.iter() {
            let m = stamp.load(Ordering::Acquire);
            let age = now - m;
            if (0..ACTIVITY_MINUTES as i64).contains(&age) {
                hours[23 - (age / 60) as usize] += count.load(Ordering::Acquire);
            }
        }
        hours
    }
}

/// Refused lines kept for the console.
const RECENT_ERRORS: usize = 20;

/// The latest refused lines, newest first: when, and why.
#[derive(Default)]
pub struct RecentErrors(Mutex<VecDeque<(chrono::DateTime<chrono::Utc>, String)>>);

impl RecentErrors {
    /// Remembers refused lines' reasons (only requests with refusals get here).
    pub fn record<'a>(&self, reasons: impl IntoIterator<Item = &'a str>) {
        let now = chrono::Utc::now();
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for r in reasons {
            if q.len() == RECENT_ERRORS {
                q.pop_back();
            }
            q.push_front((now, r.to_owned()));
        }
    }

    /// The kept ones, newest first.
    pub fn list(&self) -> Vec<(chrono::DateTime<chrono::Utc>, String)> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_counts_by_hour_and_forgets_after_a_day() {
        let a = Activity::default();
        let now = 1_000_000;
        a.record_at(now, 5);
        a.record_at(now - 59, 1);
        a.record_at(now - 60, 2);
        a.record_at(now - 23 * 60 - 59, 3);
        let h = a.per_hour_at(now);
        assert_eq!((h[23], h[22], h[0]), (6, 2, 3));
        // A day later the minute's slot is reused, and the rest is too old to count.
        a.record_at(now + 1440, 7);
        let h = a.per_hour_at(now + 1440);
        assert_eq!((h[23], h.iter().sum::<u64>()), (7, 7));
    }
}
