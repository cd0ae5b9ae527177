//! The single writer.
//!
//! One OS thread — the front — takes parsed batches from a bounded queue, whatever
//! is queued (up to `max_group_rows`) as one group — group commit — and answers every
//! request of the group only once its readings are durable:
//! - a group whose readings are all new for their series (a live fleet, a bulk
//!   import, a backlog replayed in order) is written to the ingest log (see
//!   [`super::ingest_log`]); a syncer thread answers it after an `fdatasync` (~0.2 ms
//!   under load) while the front goes on with the next group (`syncer.rs`); a flusher
//!   thread moves closed log segments into DuckDB in large transactions meanwhile —
//!   a bulk import's in row groups, which DuckDB writes straight into its file;
//! - anything else (older readings to check against stored ones, compaction,
//!   retention) waits until the flusher has caught up, then goes to DuckDB directly,
//!   in one transaction per group. What can be done in ranges of devices afterwards
//!   — the rollups of ended quarter hours, the series rows of idle devices after a
//!   retention — the flusher does between its commits, and so it sorts today's
//!   readings by device a chunk at a time (see [`super::cluster`]).
//!
//! The write connection and its companions ([`db::Db`]) sit behind one lock, held by
//! the flusher or the front, never both. The files follow the threads: `handle.rs`
//! (what request handlers hold, and the messages to the front), `front.rs` (the front
//! thread and its loop), `syncer.rs` (written groups waiting for their `fdatasync`),
//! `flusher.rs` (the sealed-segment queue and the flusher);
//! this file starts them. Groups are classified in `classify.rs` (with `known.rs`);
//! older readings memory cannot decide are deduplicated in `dedupe.rs`.
//!
//! ## Exact dedupe without an index
//! Identity is (device, sensor, timestamp), first write wins. A unique index would
//! cost ~60 bytes of RAM per stored reading, so instead:
//! - the writer knows the newest stored timestamp of every series (from `series`;
//!   a device idle long enough to have its statistics on disk gets them back before
//!   its readings are classified, see [`crate::store::series`]);
//!   a reading newer than that cannot be a duplicate of a stored one ("fresh") and is
//!   appended to `readings` without a lookup — the live-stream case;
//! - duplicates inside the group are found in memory: per series, rows that arrive in
//!   strictly increasing time need no check, others go through a hash set;
//! - older readings are first looked up in what the front knows of each series'
//!   stored keys ([`known`]: a few spans covering them and their newest keys), which
//!   decides a device's re-sends of its last requests and a backlog replayed in order
//!   beside live data; such groups still go through the ingest log;
//! - only the rest ("maybe": re-sends of old data, late uploads into stored ranges)
//!   is checked against the stored keys of its own device and time range, read back
//!   with a plain range filter so DuckDB's zone maps skip all other row groups, and
//!   read ahead so a replay's next requests are checked in memory (see
//!   [`super::recent`]).
//!
//! Appended rows are sorted by (device, sensor, time) per transaction (see
//! [`super::columns`]). The same pass over the sorted rows yields the 15-minute rollup
//! rows (see [`super::rollup`]), appended in the same transaction.

mod classify;
mod db;
mod dedupe;
mod flusher;
mod front;
mod handle;
mod known;
mod syncer;

pub use handle::{Committed, PendingCommit, WriteError, WriterHandle};

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use duckdb::Connection;
use tokio::sync::{mpsc, oneshot};

use super::ingest_log::IngestLog;
use super::{Shared, StoreError};
use crate::metrics::Metrics;
use db::Db;
use flusher::{Pending, Queue, Sealed, TICK, flusher};
use front::{Front, run};
use handle::{Job, Msg, Signals};
use known::Known;
use syncer::Syncer;

/// Writer tuning.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Batches that may wait in the queue.
    pub queue_capacity: usize,
    /// How long a request waits for room in a full queue before it is told to retry.
    pub queue_timeout: Duration,
    /// Most readings committed in one transaction.
    pub max_group_rows: usize,
    /// Where commit times and per-sensor accepted/duplicate counts are recorded.
    pub metrics: Arc<Metrics>,
    /// Rollup rows appended by commits before their slots are consolidated (see
    /// [`super::rollup`]).
    pub rollup_merge_rows: usize,
    /// Today's readings that make a chunk the flusher sorts by device (see
    /// [`super::cluster`]); 0: never.
    pub cluster_rows: u64,
    /// Decides which rollup slots are live; the system clock but in tests.
    pub clock: Clock,
    /// Most readings acknowledged through the ingest log and not yet in DuckDB. A
    /// group that would go past it is committed to DuckDB directly, after the front
    /// has moved the log in itself: when the flusher falls behind (a slow disk, a
    /// long checkpoint), the front slows down with it, the queue fills and requests
    /// are told to retry (503) — memory never grows without bound. 512 Ki readings
    /// take ~11.5 MB (22 bytes each, held once: readers and the flusher share them):
    /// two or three of a bulk import's segments, so the flusher always has the next
    /// one ready; at the fleet rate measured in issue 23 the lag stayed under 40 k.
    pub max_unapplied_readings: usize,
    /// Memory the live quarter hours readers use may take (see [`crate::store::live`]).
    pub live_slots_memory: usize,
    /// Memory for what the writer knows of recently written series' stored keys,
    /// which decides most re-sent and older readings without the database (see
    /// `known.rs`).
    pub known_keys_memory: usize,
    /// How long a device must have sent nothing before its live quarter hours may be
    /// evicted to make room.
    pub live_slots_idle: Duration,
    /// How long a device must have stored nothing before its series statistics may
    /// go to disk.
    pub series_idle: Duration,
}

/// Wall-clock time in epoch milliseconds.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self(Arc::new(|| chrono::Utc::now().timestamp_millis()))
    }

    /// Any source of time (for tests).
    pub fn from_fn(f: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    pub(crate) fn now_ms(&self) -> i64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now_ms())
    }
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            queue_timeout: Duration::from_secs(2),
            max_group_rows: 512 * 1024,
            metrics: Arc::new(Metrics::new()),
            rollup_merge_rows: 20_000,
            cluster_rows: super::cluster::DEFAULT_CHUNK_ROWS,
            clock: Clock::system(),
            max_unapplied_readings: 512 << 10,
            live_slots_memory: crate::store::live::DEFAULT_BUDGET,
            known_keys_memory: known::DEFAULT_BUDGET,
            live_slots_idle: crate::store::live::DEFAULT_IDLE,
            series_idle: crate::store::series::DEFAULT_IDLE,
        }
    }
}

/// A failure that repeats while its cause lasts (a full disk): logged when it starts,
/// then at most once a minute with the count, and once when it ends, so that it does
/// not also fill the log.
#[derive(Default)]
struct Persisting {
    /// Failures since the last success, and when one was last logged.
    failing: Option<(u64, Instant)>,
}

impl Persisting {
    const EVERY: Duration = Duration::from_secs(60);

    pub(super) fn failed(&mut self, what: &'static str, e: &StoreError) {
        match &mut self.failing {
            None => {
                tracing::error!(error = %e, "{what}");
                self.failing = Some((1, Instant::now()));
            }
            Some((n, logged)) => {
                *n += 1;
                if logged.elapsed() >= Self::EVERY {
                    tracing::error!(error = %e, failures = *n, "{what} (still)");
                    *logged = Instant::now();
                }
            }
        }
    }

    pub(super) fn succeeded(&mut self, what: &'static str) {
        if let Some((n, _)) = self.failing.take() {
            tracing::info!(failures = n, "{what}: works again");
        }
    }
}

/// The running writer thread.
pub struct Writer {
    handle: WriterHandle,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub(super) fn start(
        conn: Connection,
        shared: Arc<Shared>,
        cfg: WriterConfig,
        log: IngestLog,
        lock: File,
    ) -> Result<Self, StoreError> {
        let signals = Arc::new(Signals::default());
        let handle_shared = shared.clone();
        let through = log.next_seq() - 1;
        // Not from a list of every device: a million devices' names copied once
        // more at start-up, only to take the last id.
        let next_device = shared.next_device_id().0;
        shared
            .live
            .set_limits(cfg.live_slots_memory, cfg.live_slots_idle);
        shared.set_series_idle(cfg.series_idle);
        let lookup = conn.try_clone()?;
        let db = Db::new(
            conn,
            shared.clone(),
            cfg.metrics.clone(),
            cfg.rollup_merge_rows,
            cfg.cluster_rows,
            cfg.clock.clone(),
        )?;
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        // Queries wake the writer to hand the ingest log to the flusher; a ticker
        // makes an idle writer look at its age. Neither keeps the writer alive.
        let weak = tx.downgrade();
        shared.start_visibility(
            through,
            Box::new(move || {
                if let Some(tx) = weak.upgrade() {
                    let _ = tx.try_send(Msg::Tick);
                }
            }),
        );
        let weak = tx.downgrade();
        std::thread::Builder::new()
            .name("milepost-tick".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(TICK);
                    match weak.upgrade() {
                        Some(tx) => drop(tx.try_send(Msg::Tick)),
                        None => return,
                    }
                }
            })
            .map_err(|e| StoreError::Internal(format!("cannot start writer ticker: {e}")))?;
        let db = Arc::new(Mutex::new(db));
        let queue = Arc::new(Queue {
            spares: log.spares(),
            ..Queue::default()
        });
        let flusher = {
            let (db, queue) = (db.clone(), queue.clone());
            std::thread::Builder::new()
                .name("milepost-flush".into())
                .spawn(move || flusher(db, queue))
                .map_err(|e| StoreError::Internal(format!("cannot start flusher thread: {e}")))?
        };
        let syncer = Arc::new(Syncer::default());
        let syncer_thread = {
            let (syncer, metrics) = (syncer.clone(), cfg.metrics.clone());
            std::thread::Builder::new()
                .name("milepost-sync".into())
                .spawn(move || syncer::syncer(syncer, metrics))
                .map_err(|e| StoreError::Internal(format!("cannot start syncer thread: {e}")))?
        };
        let front = Front {
            shared,
            metrics: cfg.metrics.clone(),
            signals: signals.clone(),
            next_device,
            log,
            pending: Pending::default(),
            db,
            queue,
            known: Known::with_budget(cfg.known_keys_memory),
            clock: cfg.clock.clone(),
            max_unapplied: cfg.max_unapplied_readings,
            past_days: false,
            commit_failures: Persisting::default(),
            seal_failures: Persisting::default(),
            sealed_through: 0,
            lookup,
            refresh_pending: false,
            spilling: false,
            spill_looked: Instant::now(),
            syncer,
            syncer_thread: Some(syncer_thread),
        };
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let max_rows = cfg.max_group_rows.max(1);
        let thread = std::thread::Builder::new()
            .name("milepost-writer".into())
            .spawn(move || {
                run(front, rx, max_rows, flusher);
                flag.store(false, Ordering::Release);
                // The data directory stays locked until the database is closed.
                drop(lock);
            })
            .map_err(|e| StoreError::Internal(format!("cannot start writer thread: {e}")))?;
        Ok(Self {
            handle: WriterHandle {
                tx,
                timeout: cfg.queue_timeout,
                running,
                signals,
                shared: handle_shared,
            },
            thread: Some(thread),
        })
    }

    /// A handle for submitting batches.
    pub fn handle(&self) -> WriterHandle {
        self.handle.clone()
    }

    /// Commits everything still queued, checkpoints, closes the database and waits for
    /// the thread to end. Later submissions fail with [`WriteError::Stopped`].
    pub async fn shutdown(mut self) -> Result<(), StoreError> {
        let (ack, done) = oneshot::channel();
        let result = if self.handle.tx.send(Msg::Shutdown(ack)).await.is_ok() {
            done.await.unwrap_or(Err(StoreError::WriterGone))
        } else {
            Err(StoreError::WriterGone)
        };
        if let Some(t) = self.thread.take() {
            tokio::task::spawn_blocking(move || t.join()).await.ok();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Batch, Device, Row, SensorId, Timestamp};
    use crate::metrics::{APPLIED_THROUGH_WAL, APPLIED_TO_DATA_FILE, PathLabel};

    fn batch(from: i64, n: i64) -> Batch {
        Batch {
            devices: vec![Device::default_device()],
            rows: (from..from + n)
                .map(|i| Row {
                    device: 0,
                    sensor: SensorId(1),
                    ts: Timestamp::from_micros(1_600_000_000_000_000 + i * 1000),
                    value: i as f64,
                })
                .collect(),
        }
    }

    fn writer(dir: &std::path::Path, cfg: WriterConfig) -> Writer {
        let store = crate::store::open_for_tests(dir);
        store.start_writer(cfg).unwrap()
    }

    #[tokio::test]
    async fn a_full_queue_answers_overloaded_instead_of_waiting_forever() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(
            dir.path(),
            WriterConfig {
                queue_capacity: 1,
                queue_timeout: Duration::from_millis(5),
                max_group_rows: 1,
                ..WriterConfig::default()
            },
        );
        let h = w.handle();
        // A big batch keeps the writer busy for a while; one more fills the queue.
        let busy = h.submit(batch(0, 3_000_000)).await.unwrap();
        let queued = loop {
            // The writer may not have taken the first batch off the queue yet.
            match h.submit(batch(3_000_000, 10)).await {
                Ok(p) => break p,
                Err(WriteError::Overloaded) => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        };
        let third = h.submit(batch(4_000_000, 10)).await;
        assert!(
            matches!(third, Err(WriteError::Overloaded)),
            "queue full must not block"
        );
        assert_eq!(busy.wait().await.unwrap().accepted, 3_000_000);
        assert_eq!(queued.wait().await.unwrap().accepted, 10);
        w.shutdown().await.unwrap();
        assert!(matches!(
            h.submit(batch(0, 1)).await,
            Err(WriteError::Stopped)
        ));
    }

    #[tokio::test]
    async fn the_apply_lag_stays_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(
            dir.path(),
            WriterConfig {
                max_unapplied_readings: 25,
                ..WriterConfig::default()
            },
        );
        let h = w.handle();
        let now = Timestamp::now().as_micros() - 3_600_000_000;
        let mut most = 0;
        for i in 0..40 {
            let rows = (0..10)
                .map(|k| Row {
                    device: 0,
                    sensor: SensorId(1),
                    ts: Timestamp::from_micros(now + (i * 10 + k) * 1000),
                    value: 1.0,
                })
                .collect();
            let b = Batch {
                devices: vec![Device::default_device()],
                rows,
            };
            assert_eq!(h.append(b).await.unwrap().accepted, 10);
            most = most.max(h.apply_lag().readings);
        }
        // Two groups of ten fit, a third goes to DuckDB after the log was moved in.
        assert_eq!(most, 20);
        w.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_bulk_import_held_by_the_apply_lag_reaches_duckdb_in_whole_row_groups() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let w = writer(
            dir.path(),
            WriterConfig {
                metrics: metrics.clone(),
                ..WriterConfig::default()
            },
        );
        // Four clients of 10,000-reading requests, each its own series in order:
        // the log takes them far faster than DuckDB, so the front keeps waiting for
        // the apply lag's bound.
        let clients: Vec<_> = (1..=4u16)
            .map(|sensor| {
                let h = w.handle();
                tokio::spawn(async move {
                    for k in 0..40 {
                        let mut b = batch(k * 10_000, 10_000);
                        b.rows.iter_mut().for_each(|r| r.sensor = SensorId(sensor));
                        assert_eq!(h.append(b).await.unwrap().accepted, 10_000);
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
        w.shutdown().await.unwrap();
        let applied = |path| metrics.log_applied.get_or_create(&PathLabel { path }).get();
        let (data_file, wal) = (applied(APPLIED_TO_DATA_FILE), applied(APPLIED_THROUGH_WAL));
        assert_eq!(data_file + wal, 1_600_000);
        // Only the segment sealed at shutdown may be short of a row group (before,
        // the front sealed whatever it held each time it waited).
        assert!(
            wal < flusher::ROW_GROUP_ROWS as u64,
            "{wal} readings went through DuckDB's write-ahead log"
        );
    }

    #[tokio::test]
    async fn writes_into_finished_days_are_announced_live_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path(), WriterConfig::default());
        let h = w.handle();
        let announced = || tokio::time::timeout(Duration::from_millis(200), h.wrote_past_days());
        let now = Timestamp::now().as_micros();
        let live = Batch {
            devices: vec![Device::default_device()],
            rows: vec![Row {
                device: 0,
                sensor: SensorId(1),
                ts: Timestamp::from_micros(now),
                value: 1.0,
            }],
        };
        h.append(live).await.unwrap();
        assert!(
            announced().await.is_err(),
            "today's readings are not announced"
        );
        h.append(batch(0, 10)).await.unwrap(); // September 2020
        assert!(announced().await.is_ok());
        w.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn late_uploads_far_apart_are_deduped_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path(), WriterConfig::default());
        let h = w.handle();
        // Stored: a year apart; then a replay touching both ends plus new rows between.
        let year = 365 * 86_400_000_000i64;
        let at = |t: i64, v: f64| Row {
            device: 0,
            sensor: SensorId(2),
            ts: Timestamp::from_micros(1_600_000_000_000_000 + t),
            value: v,
        };
        let b = |rows: Vec<Row>| Batch {
            devices: vec![Device::default_device()],
            rows,
        };
        let first = h
            .append(b(vec![at(0, 1.0), at(year, 2.0), at(2 * year, 3.0)]))
            .await
            .unwrap();
        assert_eq!(first.accepted, 3);
        let again = h
            .append(b(vec![
                at(0, 9.0),
                at(1, 4.0),
                at(year, 9.0),
                at(year + 1, 5.0),
            ]))
            .await
            .unwrap();
        assert_eq!((again.accepted, again.duplicates), (2, 2));
        // More clusters than are read separately, spanning a century: the merged
        // spans are longer than one key window can be.
        let decade = 10 * year;
        let old: Vec<Row> = (-6..6).map(|i| at(i * decade, 1.0)).collect();
        let stored = h.append(b(old.clone())).await.unwrap();
        assert_eq!((stored.accepted, stored.duplicates), (11, 1));
        let mut replay = old;
        replay.extend((-6..6).map(|i| at(i * decade + 7, 2.0)));
        let replayed = h.append(b(replay)).await.unwrap();
        assert_eq!((replayed.accepted, replayed.duplicates), (12, 12));
        w.shutdown().await.unwrap();
    }

    /// The key windows kept for replays must learn every row appended inside them,
    /// also rows that took the fresh path: here sensor 1's window reaches past sensor
    /// 2's newest reading, sensor 2 then gets new rows there, and replaying those must
    /// find them.
    #[tokio::test]
    async fn replays_through_kept_key_windows_stay_exact() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path(), WriterConfig::default());
        let h = w.handle();
        let sec = 1_000_000i64;
        let rows = |sensor: u16, from: i64, to: i64, v: f64| Batch {
            devices: vec![Device::default_device()],
            rows: (from..to)
                .map(|i| Row {
                    device: 0,
                    sensor: SensorId(sensor),
                    ts: Timestamp::from_micros(1_600_000_000_000_000 + i * sec),
                    value: v,
                })
                .collect(),
        };
        let put = async |b: Batch| {
            let c = h.append(b).await.unwrap();
            (c.accepted, c.duplicates)
        };
        assert_eq!(put(rows(1, 0, 1000, 1.0)).await, (1000, 0));
        assert_eq!(put(rows(2, 0, 500, 1.0)).await, (500, 0));
        // A replay of sensor 1 in small requests, one new reading in each.
        for from in (0..1000).step_by(100) {
            let mut b = rows(1, from, from + 100, 2.0);
            b.rows[10].ts = Timestamp::from_micros(b.rows[10].ts.as_micros() + 1);
            assert_eq!(put(b).await, (1, 99), "from {from}");
        }
        // Sensor 2 grows past its newest reading, inside sensor 1's window: fresh rows.
        assert_eq!(put(rows(2, 500, 800, 1.0)).await, (300, 0));
        assert_eq!(put(rows(2, 400, 800, 3.0)).await, (0, 400));
        assert_eq!(put(rows(1, 0, 1000, 3.0)).await, (0, 1000));
        w.shutdown().await.unwrap();
        let store = crate::store::open_for_tests(dir.path());
        let reader = store.reader().unwrap();
        let stored = |sensor| {
            crate::store::ReadStore::count(
                &reader,
                &Device::default_device(),
                &[SensorId(sensor)],
                crate::domain::TimeRange::ALL,
            )
            .unwrap()
        };
        assert_eq!((stored(1), stored(2)), (1010, 800));
    }

    #[tokio::test]
    async fn group_commit_dedupes_across_requests_first_write_wins() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path(), WriterConfig::default());
        let h = w.handle();
        let mut first = batch(0, 100);
        first.rows[5].value = -1.0;
        let a = h.submit(first).await.unwrap();
        let b = h.submit(batch(50, 100)).await.unwrap(); // 50 overlap
        let (a, b) = (a.wait().await.unwrap(), b.wait().await.unwrap());
        assert_eq!((a.accepted, a.duplicates), (100, 0));
        assert_eq!((b.accepted, b.duplicates), (50, 50));
        let again = h.append(batch(0, 150)).await.unwrap();
        assert_eq!((again.accepted, again.duplicates), (0, 150));
        w.shutdown().await.unwrap();
    }
}
