//! The single writer.
//!
//! One OS thread — the front — takes parsed batches from a bounded queue, whatever
//! is queued (up to `max_group_rows`) as one group — group commit — and answers every
//! request of the group only once its readings are durable:
//! - a group of small requests whose readings are all new for their series (a live
//!   fleet) is appended to the ingest log with one `fdatasync` (~0.2 ms; see
//!   [`super::ingest_log`]); a second thread, the flusher, moves closed log segments
//!   into DuckDB in large transactions meanwhile;
//! - anything else (older readings to check against stored ones, bulk imports,
//!   compaction, retention) waits until the flusher has caught up, then goes to
//!   DuckDB directly, in one transaction per group.
//!
//! The write connection and its companions ([`db::Db`]) sit behind one lock, held by
//! the flusher or the front, never both. Groups are classified in `classify.rs`;
//! older readings are deduplicated in `dedupe.rs`.
//!
//! ## Exact dedupe without an index
//! Identity is (device, sensor, timestamp), first write wins. A unique index would
//! cost ~60 bytes of RAM per stored reading, so instead:
//! - the writer knows the newest stored timestamp of every series (from `series`);
//!   a reading newer than that cannot be a duplicate of a stored one ("fresh") and is
//!   appended straight into `readings` with the Appender — the live-stream case;
//! - duplicates inside the group are found in memory: per series, rows that arrive in
//!   strictly increasing time need no check, others go through a hash set;
//! - only older readings ("maybe", i.e. replays and late uploads) are checked against
//!   the stored keys of their own device and time range, read back with a plain range
//!   filter so DuckDB's zone maps skip all other row groups, and read ahead so a
//!   replay's next requests are checked in memory (see [`super::recent`]).
//!
//! Appended rows are sorted by (device, sensor, time) per transaction (see
//! [`super::columns`]). The same pass over the sorted rows yields the 15-minute rollup
//! rows (see [`super::rollup`]), appended in the same transaction.

mod classify;
mod db;
mod dedupe;

use rustc_hash::FxHashSet;
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use duckdb::Connection;
use tokio::sync::{Notify, mpsc, oneshot};

use super::columns::Columns;
use super::compact::{self, Compaction};
use super::ingest_log::{self, IngestLog};
use super::retention::Retired;
use super::{SeriesEntry, Shared, StoreError};
use crate::domain::{Batch, Device, DeviceId, SensorId};
use crate::metrics::{Metrics, UNKNOWN_SENSOR};
use classify::{KeyAcc, Plan, classify, split_columns, tally};
use db::Db;

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
    /// Decides which rollup slots are live; the system clock but in tests.
    pub clock: Clock,
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

    fn now_ms(&self) -> i64 {
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
            clock: Clock::system(),
        }
    }
}

/// Outcome of one committed batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Readings newly stored.
    pub accepted: u64,
    /// Readings dropped because their identity was already stored (or came earlier in
    /// the same group).
    pub duplicates: u64,
}

/// Why a batch was not committed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The queue stayed full: the client should retry later.
    #[error("the writer is busy; retry later")]
    Overloaded,
    /// The writer has stopped (shutdown).
    #[error("the server is shutting down")]
    Stopped,
    /// The filesystem of the data directory is full; nothing of the batch was stored.
    #[error("the disk holding the data directory is full; nothing of this batch was stored")]
    DiskFull,
    /// The database failed the commit; nothing of the batch was stored.
    #[error("commit failed: {0}")]
    Failed(String),
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

    fn failed(&mut self, what: &'static str, e: &StoreError) {
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

    fn succeeded(&mut self, what: &'static str) {
        if let Some((n, _)) = self.failing.take() {
            tracing::info!(failures = n, "{what}: works again");
        }
    }
}

enum Msg {
    Append(Job),
    Compact(oneshot::Sender<Result<Compaction, StoreError>>),
    Retire(RetireJob),
    Shutdown(oneshot::Sender<Result<(), StoreError>>),
    /// Time to look at the ingest log (a query waits for it, or it has aged).
    Tick,
}

struct RetireJob {
    days: BTreeMap<NaiveDate, u64>,
    reply: oneshot::Sender<Result<Retired, StoreError>>,
}

struct Job {
    batch: Batch,
    reply: oneshot::Sender<Result<Committed, WriteError>>,
}

/// Cheap, cloneable way to submit batches.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Msg>,
    timeout: Duration,
    running: Arc<AtomicBool>,
    signals: Arc<Signals>,
}

/// A submitted batch; await [`PendingCommit::wait`] for its commit.
pub struct PendingCommit(oneshot::Receiver<Result<Committed, WriteError>>);

impl PendingCommit {
    /// Waits until the batch is committed (or failed).
    pub async fn wait(self) -> Result<Committed, WriteError> {
        self.0.await.unwrap_or(Err(WriteError::Stopped))
    }
}

impl WriterHandle {
    /// Queues a batch, waiting at most the configured timeout for room.
    pub async fn submit(&self, batch: Batch) -> Result<PendingCommit, WriteError> {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::Append(Job { batch, reply });
        match self.tx.send_timeout(msg, self.timeout).await {
            Ok(()) => Ok(PendingCommit(rx)),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(WriteError::Overloaded),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(WriteError::Stopped),
        }
    }

    /// Submits a batch and waits for its commit.
    pub async fn append(&self, batch: Batch) -> Result<Committed, WriteError> {
        self.submit(batch).await?.wait().await
    }

    /// Compacts one finished day between commits (see [`super::compact`]); call
    /// again while it reports a day done.
    pub async fn compact(&self) -> Result<Compaction, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Compact(reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.unwrap_or(Err(StoreError::WriterGone))
    }

    /// Deletes the readings of `days` (with the reading count each had when it was
    /// dumped) between commits; a day whose count has changed since is kept (see
    /// [`super::retention`]).
    pub async fn retire(&self, days: BTreeMap<NaiveDate, u64>) -> Result<Retired, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Retire(RetireJob { days, reply }))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.unwrap_or(Err(StoreError::WriterGone))
    }

    /// True while the writer thread accepts work.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire) && !self.tx.is_closed()
    }

    /// Batches waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Completes after a commit stored readings of a finished (before today, UTC) day:
    /// an import or a late upload that compaction should look at.
    pub async fn wrote_past_days(&self) {
        self.signals.past_days.notified().await;
    }

    /// Waits until commits have stored readings, then returns the series they went
    /// to (each once) since the last call. One consumer: background detection.
    pub async fn committed_series(&self) -> Vec<(DeviceId, SensorId)> {
        loop {
            let notified = self.signals.touched_notify.notified();
            {
                let mut touched = self
                    .signals
                    .touched
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if !touched.is_empty() {
                    return touched.drain().collect();
                }
            }
            notified.await;
        }
    }
}

/// What the writer tells the rest of the server after its commits.
#[derive(Default)]
struct Signals {
    /// A commit stored readings of a finished day (compaction wants to know).
    past_days: Notify,
    /// Series that got readings since `committed_series` last looked.
    touched: std::sync::Mutex<FxHashSet<(DeviceId, SensorId)>>,
    touched_notify: Notify,
}

impl Signals {
    /// Publishes the series a commit stored readings in: a few hash inserts per
    /// commit, one lock, no allocation once the set has grown.
    fn touched(&self, series: impl Iterator<Item = (DeviceId, SensorId)>) {
        let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        touched.extend(series);
        if !touched.is_empty() {
            drop(touched);
            self.touched_notify.notify_one();
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
        let through = log.next_seq() - 1;
        let next_device = shared
            .devices()
            .last()
            .map_or(1, |(id, _)| id.0.saturating_add(1));
        let db = Db::new(
            conn,
            shared.clone(),
            cfg.metrics.clone(),
            cfg.rollup_merge_rows,
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
        let queue = Arc::new(Queue::default());
        let flusher = {
            let (db, queue) = (db.clone(), queue.clone());
            std::thread::Builder::new()
                .name("milepost-flush".into())
                .spawn(move || flusher(db, queue))
                .map_err(|e| StoreError::Internal(format!("cannot start flusher thread: {e}")))?
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
            past_days: false,
            commit_failures: Persisting::default(),
            seal_failures: Persisting::default(),
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

/// Largest group that goes through the ingest log. In larger groups DuckDB's cost per
/// transaction is small against its cost per reading, and writing them twice (log,
/// then DuckDB) cost bulk imports (10,000-line requests) ~8 % at 16 Ki.
const LOG_GROUP_ROWS: usize = 4 * 1024;
/// The current log segment is handed to the flusher once it holds this many
/// readings…
const SEAL_ROWS: usize = 32 * 1024;
/// …or once its oldest reading has waited this long (or a query waits for it).
const SEAL_AGE: Duration = Duration::from_millis(500);
/// How often an idle writer looks at [`SEAL_AGE`].
const TICK: Duration = Duration::from_millis(100);

/// A closed log segment's readings on their way into DuckDB.
pub(super) struct Sealed {
    rows: Columns,
    /// (device, sensor) of each series index in `rows.key`.
    series: Vec<(DeviceId, SensorId)>,
    devices: Vec<(DeviceId, Device)>,
    /// Sequence number of the segment's last record.
    through: u64,
    /// The segment file, deleted once DuckDB holds it.
    segment: Option<PathBuf>,
}

/// Readings acknowledged into the current log segment.
#[derive(Default)]
struct Pending {
    rows: Columns,
    series: ingest_log::Series,
    devices: Vec<(DeviceId, Device)>,
    through: u64,
    /// When the oldest of them was acknowledged.
    since: Option<Instant>,
}

impl Pending {
    fn add(&mut self, rows: Columns, devices: &[(DeviceId, Device)], seq: u64) {
        self.series.add(rows, &mut self.rows);
        self.devices.extend_from_slice(devices);
        self.through = seq;
        self.since.get_or_insert_with(Instant::now);
    }

    fn take(&mut self, segment: Option<PathBuf>) -> Sealed {
        let sealed = Sealed {
            rows: std::mem::take(&mut self.rows),
            series: std::mem::take(&mut self.series.keys),
            devices: std::mem::take(&mut self.devices),
            through: self.through,
            segment,
        };
        self.series.clear();
        self.since = None;
        sealed
    }
}

/// Sealed segments waiting for the flusher, oldest first.
#[derive(Default)]
struct Queue {
    parts: Mutex<QueueState>,
    changed: Condvar,
}

#[derive(Default)]
struct QueueState {
    parts: VecDeque<Sealed>,
    stop: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, part: Sealed) {
        self.lock().parts.push_back(part);
        self.changed.notify_all();
    }
}

/// Moves every queued part into DuckDB, oldest first. Called with the database
/// locked, by the flusher or by the front before it uses the database itself; a part
/// that fails goes back to the head of the queue.
fn flush_queued(db: &mut Db, queue: &Queue) -> Result<(), StoreError> {
    loop {
        let Some(part) = queue.lock().parts.pop_front() else {
            return Ok(());
        };
        if let Err(e) = db.flush(&part) {
            queue.lock().parts.push_front(part);
            return Err(e);
        }
        if let Some(segment) = &part.segment {
            // Harmless if it fails: start-up skips records DuckDB already holds.
            if let Err(e) = std::fs::remove_file(segment) {
                tracing::warn!(path = %segment.display(), error = %e, "cannot delete an applied ingest log segment");
            }
        }
        db.shared.flushed(part.through);
    }
}

/// The flusher thread: moves sealed segments into DuckDB while the front goes on
/// acknowledging new ones (a DuckDB transaction of 30 k readings takes 20–40 ms here;
/// done on the front, every request behind it waited that long).
fn flusher(db: Arc<Mutex<Db>>, queue: Arc<Queue>) {
    let mut failures = Persisting::default();
    loop {
        {
            let mut q = queue.lock();
            while q.parts.is_empty() && !q.stop {
                q = queue.changed.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.parts.is_empty() {
                return;
            }
        }
        let mut db = db.lock().unwrap_or_else(|p| p.into_inner());
        match flush_queued(&mut db, &queue) {
            Ok(()) => failures.succeeded("moving the ingest log into the database"),
            Err(e) => {
                drop(db);
                failures.failed(
                    "moving the ingest log into the database failed; retrying every second",
                    &e,
                );
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// The writer thread's state: classifies groups, appends the log, acknowledges, and
/// uses the database directly for everything else.
struct Front {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    signals: Arc<Signals>,
    next_device: u32,
    log: IngestLog,
    pending: Pending,
    db: Arc<Mutex<Db>>,
    queue: Arc<Queue>,
    /// Readings of finished days were acknowledged through the log since the front
    /// last used the database.
    past_days: bool,
    /// Group commits failing in a row.
    commit_failures: Persisting,
    /// Segment rotations failing in a row.
    seal_failures: Persisting,
}

impl Front {
    fn commit_group(&mut self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let rows: usize = jobs.iter().map(|j| j.batch.len()).sum();
        let span = tracing::debug_span!("commit", requests = jobs.len(), rows);
        let _enter = span.enter();
        tracing::debug!("committing group");
        let started = Instant::now();
        match self.commit(&jobs) {
            Ok(results) => {
                let elapsed = started.elapsed();
                self.metrics.commit_seconds.observe(elapsed.as_secs_f64());
                tracing::debug!(elapsed_ms = elapsed.as_secs_f64() * 1e3, "committed");
                self.commit_failures.succeeded("group commit");
                for (job, r) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(Ok(r));
                }
            }
            Err(e) => {
                self.commit_failures
                    .failed("group commit failed; nothing of it stored", &e);
                let err = if e.is_disk_full() {
                    WriteError::DiskFull
                } else {
                    WriteError::Failed(e.to_string())
                };
                for job in jobs {
                    let _ = job.reply.send(Err(err.clone()));
                }
            }
        }
    }

    fn commit(&mut self, jobs: &[Job]) -> Result<Vec<Committed>, StoreError> {
        let mut plan = classify(&self.shared, self.next_device, jobs);
        if plan.maybe == 0 && plan.rows <= LOG_GROUP_ROWS {
            return self.commit_logged(jobs, plan);
        }
        // Older readings are checked against DuckDB, and large groups go there
        // directly (logging them would write them twice): both after everything the
        // log holds, so DuckDB gets the readings in the order they were acknowledged.
        let (results, updated) = self.with_db(|db| db.commit_direct(jobs, &mut plan))?;
        self.publish(&plan.new_devices, &updated, &plan.keys);
        Ok(results)
    }

    /// A group of new readings only: into the ingest log, acknowledged once it is on
    /// disk; the flusher moves it into DuckDB later.
    fn commit_logged(
        &mut self,
        jobs: &[Job],
        mut plan: Plan,
    ) -> Result<Vec<Committed>, StoreError> {
        let (fresh, _) = split_columns(jobs, &plan.device_maps, &plan.verdicts, &plan.row_keys, 0);
        let seq = {
            let _span = tracing::debug_span!("log_append", rows = fresh.len()).entered();
            self.log.append(&plan.new_devices, &fresh)?
        };
        let (results, updated) = tally(
            jobs,
            &plan.verdicts,
            &plan.row_keys,
            &mut plan.keys,
            &[],
            &self.shared,
        );
        self.pending.add(fresh, &plan.new_devices, seq);
        self.publish(&plan.new_devices, &updated, &plan.keys);
        self.shared.acked(seq);
        Ok(results)
    }

    /// Shows stored readings to readers and counts them.
    fn publish(
        &mut self,
        new_devices: &[(DeviceId, Device)],
        updated: &[SeriesEntry],
        keys: &[KeyAcc],
    ) {
        self.next_device += new_devices.len() as u32;
        self.shared.add_devices(new_devices);
        self.shared.set_series(updated);
        self.count(keys);
        let oldest = keys.iter().filter_map(|k| k.delta).map(|d| d.first).min();
        if oldest.is_some_and(|t| t < compact::today_start()) {
            self.past_days = true;
            self.signals.past_days.notify_one();
        }
        self.signals.touched(
            keys.iter()
                .filter(|k| k.delta.is_some())
                .map(|k| (k.device, k.sensor)),
        );
    }

    /// Per-sensor accepted and duplicate counters, summed per sensor first: a group
    /// of a fleet's requests has many series but few sensors, and every counter update
    /// takes a lock and allocates its label.
    fn count(&self, keys: &[KeyAcc]) {
        let mut per_sensor: Vec<(SensorId, u64, u64)> = Vec::new();
        for k in keys {
            let accepted = k.delta.map_or(0, |d| d.readings);
            match per_sensor.iter_mut().find(|(s, ..)| *s == k.sensor) {
                Some((_, a, d)) => {
                    *a += accepted;
                    *d += k.duplicates;
                }
                None => per_sensor.push((k.sensor, accepted, k.duplicates)),
            }
        }
        let catalog = self.shared.catalog();
        let m = &self.metrics;
        for (sensor, accepted, duplicates) in per_sensor {
            let name = catalog
                .by_id(sensor)
                .map_or(UNKNOWN_SENSOR, |s| s.name.as_str());
            Metrics::add(&m.readings_accepted, name, accepted);
            Metrics::add(&m.readings_duplicate, name, duplicates);
        }
    }

    /// Hands the current segment to the flusher when a query waits for it, when it
    /// holds many readings, or when its oldest reading has waited long enough.
    fn maybe_seal(&mut self) {
        let Some(since) = self.pending.since else {
            return;
        };
        let due = self.shared.flush_requested()
            || self.pending.rows.len() >= SEAL_ROWS
            || since.elapsed() >= SEAL_AGE;
        if due {
            match self.seal() {
                Ok(()) => self
                    .seal_failures
                    .succeeded("starting a new ingest log segment"),
                Err(e) => self
                    .seal_failures
                    .failed("cannot start a new ingest log segment; retrying", &e),
            }
        }
    }

    /// Closes the current segment and queues its readings for the flusher.
    fn seal(&mut self) -> Result<(), StoreError> {
        if self.pending.since.is_none() {
            return Ok(());
        }
        let segment = self.log.rotate()?;
        self.queue.push(self.pending.take(segment));
        Ok(())
    }

    /// Runs `f` on the database once it holds everything acknowledged.
    fn with_db<T>(
        &mut self,
        f: impl FnOnce(&mut Db) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.seal()?;
        let db = self.db.clone();
        let mut db = db.lock().unwrap_or_else(|p| p.into_inner());
        if std::mem::take(&mut self.past_days) {
            db.past_days_written();
        }
        flush_queued(&mut db, &self.queue)?;
        f(&mut db)
    }

    /// Everything queued and logged into DuckDB, the flusher stopped, a checkpoint.
    fn close(mut self, flusher: JoinHandle<()>) -> Result<(), StoreError> {
        let done = self.with_db(|db| db.checkpoint());
        self.queue.lock().stop = true;
        self.queue.changed.notify_all();
        let _ = flusher.join();
        done
    }
}

fn run(mut front: Front, mut rx: mpsc::Receiver<Msg>, max_rows: usize, flusher: JoinHandle<()>) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = Vec::new();
        let mut shutdown = None;
        let mut compact = None;
        let mut retire = None;
        let mut rows = 0;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Append(job) => {
                    rows += job.batch.len();
                    group.push(job);
                }
                Msg::Compact(reply) => compact = Some(reply),
                Msg::Retire(job) => retire = Some(job),
                Msg::Shutdown(ack) => shutdown = Some(ack),
                Msg::Tick => {}
            }
            if shutdown.is_none() && compact.is_none() && retire.is_none() && rows < max_rows {
                next = rx.try_recv().ok();
            }
        }
        front.commit_group(group);
        front.maybe_seal();
        if let Some(reply) = compact {
            let _ = reply.send(front.with_db(Db::compact));
        }
        if let Some(job) = retire {
            let _ = job.reply.send(front.with_db(|db| db.retire(&job.days)));
        }
        if let Some(ack) = shutdown {
            rx.close();
            let mut rest = Vec::new();
            while let Ok(msg) = rx.try_recv() {
                match msg {
                    Msg::Append(job) => rest.push(job),
                    Msg::Compact(reply) => drop(reply.send(Err(StoreError::WriterGone))),
                    Msg::Retire(job) => drop(job.reply.send(Err(StoreError::WriterGone))),
                    Msg::Shutdown(other) => drop(other.send(Ok(()))),
                    Msg::Tick => {}
                }
            }
            front.commit_group(rest);
            let _ = ack.send(front.close(flusher));
            return;
        }
    }
    // Every handle was dropped without a shutdown: still leave a checkpointed file.
    if let Err(e) = front.close(flusher) {
        tracing::error!(error = %e, "checkpoint at writer exit failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Device, Row, SensorId, Timestamp};
    use crate::store::{Store, StoreConfig};

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
        let store = Store::open(&StoreConfig {
            data_dir: dir.to_owned(),
            memory_limit: "128MB".into(),
            threads: 1,
        })
        .unwrap();
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
        let store = Store::open(&StoreConfig {
            data_dir: dir.path().to_owned(),
            memory_limit: "128MB".into(),
            threads: 1,
        })
        .unwrap();
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
