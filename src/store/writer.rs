//! The single writer.
//!
//! One OS thread owns the write connection. Requests hand it parsed batches through a
//! bounded queue; it takes whatever is queued (up to `max_group_rows`) and commits it
//! as one transaction — group commit — then answers every request of the group. A
//! request is answered only after its readings are committed.
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
//! Appended rows are sorted by (device, sensor, time) per group commit: runs of one
//! series fill DuckDB's 1024-value compression vectors, which compress far better
//! than sensors interleaved in arrival order. The same pass over the sorted rows
//! yields the commit's 15-minute rollup rows (see [`super::rollup`]), appended in the
//! same transaction.

use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use duckdb::Connection;
use duckdb::arrow::array::{Int16Array, Int64Array};
use tokio::sync::{Notify, mpsc, oneshot};

use super::columns::Columns;
use super::compact::{self, Compaction, DueDays};
use super::recent::{MAX_SPAN_MS, RecentKeys, WINDOW_KEYS, Window};
use super::retention::{self, Retired};
use super::ingest_log::{self, IngestLog};
use super::rollup::{self, Live, Partial, Partials};
use super::{SeriesEntry, SeriesStats, Shared, StoreError};
use crate::domain::{Batch, Device, DeviceId, SensorId};
use crate::metrics::{Metrics, UNKNOWN_SENSOR};

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
    /// The database failed the commit; nothing of the batch was stored.
    #[error("commit failed: {0}")]
    Failed(String),
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
        let state = State::new(
            conn,
            shared,
            cfg.metrics.clone(),
            signals.clone(),
            cfg.rollup_merge_rows,
            cfg.clock.clone(),
            log,
        )?;
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        // Queries wake the writer to move the ingest log into DuckDB; a ticker makes
        // an idle one look at its age. Neither keeps the writer alive.
        let weak = tx.downgrade();
        state.shared.start_visibility(
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
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let max_rows = cfg.max_group_rows.max(1);
        let thread = std::thread::Builder::new()
            .name("milepost-writer".into())
            .spawn(move || {
                run(state, rx, max_rows);
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

fn run(mut state: State, mut rx: mpsc::Receiver<Msg>, max_rows: usize) {
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
        state.commit_group(group);
        state.maybe_flush();
        if let Some(reply) = compact {
            let today = chrono::Utc::now().date_naive();
            // Held rollup partials go first: compaction recomputes its days' rollups
            // from the readings, and they must not be added on top later.
            let done = state
                .flush_pending()
                .and_then(|()| state.flush_live())
                .and_then(|()| state.due.compact_next(&state.conn, today));
            let _ = reply.send(done);
        }
        if let Some(job) = retire {
            let done = state
                .flush_pending()
                .and_then(|()| state.retire(&job.days));
            let _ = job.reply.send(done);
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
            state.commit_group(rest);
            let result = state.checkpoint();
            drop(state);
            let _ = ack.send(result);
            return;
        }
    }
    // Every handle was dropped without a shutdown: still leave a checkpointed file.
    if let Err(e) = state.checkpoint() {
        tracing::error!(error = %e, "checkpoint at writer exit failed");
    }
}

/// What the group commit decided for one row.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Same identity earlier in this group.
    Duplicate,
    /// Newer than everything stored for its series: cannot be a stored duplicate.
    Fresh,
    /// Must be checked against stored readings.
    Maybe,
}

/// A group's rows classified, before anything is written.
struct Plan {
    new_devices: Vec<(DeviceId, Device)>,
    /// Per job: its batch's device indices → ids.
    device_maps: Vec<Vec<DeviceId>>,
    keys: Vec<KeyAcc>,
    /// Per row (in group order): index into `keys`.
    row_keys: Vec<u32>,
    verdicts: Vec<Verdict>,
    maybe: usize,
    rows: usize,
}

/// The live rollup slots' move with the next append (see [`super::rollup`]).
struct SlotMove {
    /// The first live slot moves here; held partials before it are written.
    advance: Option<i64>,
    /// Partials of slots from here on are held.
    hold_from: i64,
}

/// Largest group that goes through the ingest log; larger ones (bulk imports) cost
/// DuckDB little per reading and go there directly rather than being written twice.
const LOG_GROUP_ROWS: usize = 16 * 1024;
/// The ingest log is moved into DuckDB once it holds this many readings…
const FLUSH_ROWS: usize = 64 * 1024;
/// …or once its oldest reading has waited this long (or a query asks for it).
const FLUSH_AGE: Duration = Duration::from_millis(1000);
/// How often an idle writer checks [`FLUSH_AGE`].
const TICK: Duration = Duration::from_millis(250);

/// Readings acknowledged through the ingest log, not yet in DuckDB.
#[derive(Default)]
struct Pending {
    rows: Columns,
    series: ingest_log::Series,
    devices: Vec<(DeviceId, Device)>,
    /// Sequence number of the last record they came with.
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

    fn is_empty(&self) -> bool {
        self.since.is_none()
    }

    fn clear(&mut self) {
        self.rows = Columns::default();
        self.series.clear();
        self.devices.clear();
        self.since = None;
    }
}

/// Per-series bookkeeping while classifying a group.
struct KeyAcc {
    device: DeviceId,
    sensor: SensorId,
    stored_last: Option<i64>,
    prev: i64,
    monotonic: bool,
    seen: FxHashSet<i64>,
    delta: Option<SeriesStats>,
    duplicates: u64,
}

struct State {
    conn: Connection,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    signals: Arc<Signals>,
    next_device: u32,
    recent: RecentKeys,
    due: DueDays,
    rollups: Unmerged,
    live: Live,
    clock: Clock,
    log: IngestLog,
    pending: Pending,
}

/// The first live rollup slot at `now_ms`: the previous quarter hour's.
fn live_from(now_ms: i64) -> i64 {
    rollup::slot_of(now_ms) - rollup::SLOT_MS
}

/// Rollup rows appended since the last consolidation, and the slots they touched.
struct Unmerged {
    rows: usize,
    span: Option<(i64, i64)>,
    merge_at: usize,
}

impl Unmerged {
    fn add(&mut self, partials: &Partials) {
        self.rows += partials.len();
        if let Some((lo, hi)) = partials.slot_span() {
            self.span = Some(self.span.map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
        }
    }
}

impl State {
    fn new(
        conn: Connection,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
        signals: Arc<Signals>,
        rollup_merge_rows: usize,
        clock: Clock,
        log: IngestLog,
    ) -> Result<Self, StoreError> {
        let next_device = shared
            .devices()
            .last()
            .map_or(1, |(id, _)| id.0.saturating_add(1));
        let from = live_from(clock.now_ms());
        if let Some(previous) = rollup::recover(&conn, from)? {
            tracing::debug!(from = previous, "recomputed the rollups of recent slots");
        }
        shared.set_rollups_from(from);
        Ok(Self {
            conn,
            shared,
            metrics,
            signals,
            next_device,
            recent: RecentKeys::default(),
            due: DueDays::default(),
            rollups: Unmerged {
                rows: 0,
                // The first consolidation also covers partials an earlier run left
                // in slots since yesterday; older days are consolidated by compaction.
                span: Some((
                    rollup::slot_of(compact::today_start().as_micros() / 1000 - 86_400_000),
                    i64::MAX,
                )),
                merge_at: rollup_merge_rows.max(1),
            },
            live: Live::new(from),
            clock,
            log,
            pending: Pending::default(),
        })
    }

    fn commit_group(&mut self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let rows: usize = jobs.iter().map(|j| j.batch.len()).sum();
        let span = tracing::debug_span!("commit", requests = jobs.len(), rows);
        let _enter = span.enter();
        let started = Instant::now();
        match self.commit(&jobs) {
            Ok(results) => {
                let elapsed = started.elapsed();
                self.metrics.commit_seconds.observe(elapsed.as_secs_f64());
                tracing::debug!(elapsed_ms = elapsed.as_secs_f64() * 1e3, "committed");
                for (job, r) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(Ok(r));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed; rolled back");
                let msg = e.to_string();
                for job in jobs {
                    let _ = job.reply.send(Err(WriteError::Failed(msg.clone())));
                }
            }
        }
    }

    fn commit(&mut self, jobs: &[Job]) -> Result<Vec<Committed>, StoreError> {
        let plan = self.classify(jobs);
        if plan.maybe == 0 && plan.rows <= LOG_GROUP_ROWS {
            return self.commit_logged(jobs, plan);
        }
        // Older readings are checked against DuckDB, and large groups go there
        // directly (logging them would write them twice): both after everything the
        // log holds, so DuckDB sees the readings in the order they were acknowledged.
        self.flush_pending()?;
        self.commit_direct(jobs, plan)
    }

    /// Device ids and a verdict for every row of the group.
    fn classify(&self, jobs: &[Job]) -> Plan {
        // 1. Device names → ids, new ones numbered now and stored with the readings.
        let mut new_devices: Vec<(DeviceId, Device)> = Vec::new();
        let mut device_maps = Vec::with_capacity(jobs.len());
        for job in jobs {
            let ids = job
                .batch
                .devices
                .iter()
                .map(|d| {
                    if let Some(id) = self.shared.device_id(d) {
                        return id;
                    }
                    if let Some((id, _)) = new_devices.iter().find(|(_, n)| n == d) {
                        return *id;
                    }
                    let id = DeviceId(self.next_device + new_devices.len() as u32);
                    new_devices.push((id, d.clone()));
                    id
                })
                .collect::<Vec<_>>();
            device_maps.push(ids);
        }

        // 2. Classify every row: duplicate within the group, fresh, or maybe.
        let rows = jobs.iter().map(|j| j.batch.len()).sum();
        let mut keys: Vec<KeyAcc> = Vec::new();
        let mut key_index: FxHashMap<(DeviceId, SensorId), usize> = FxHashMap::default();
        let mut row_keys: Vec<u32> = Vec::with_capacity(rows);
        let mut last: Option<((DeviceId, SensorId), usize)> = None;
        for (job, ids) in jobs.iter().zip(&device_maps) {
            for row in &job.batch.rows {
                let k = (ids[row.device as usize], row.sensor);
                let idx = match last {
                    Some((lk, i)) if lk == k => i,
                    _ => {
                        let i = *key_index.entry(k).or_insert_with(|| {
                            keys.push(KeyAcc {
                                device: k.0,
                                sensor: k.1,
                                stored_last: self
                                    .shared
                                    .series(k.0, k.1)
                                    .map(|s| s.last.as_micros()),
                                prev: i64::MIN,
                                monotonic: true,
                                seen: FxHashSet::default(),
                                delta: None,
                                duplicates: 0,
                            });
                            keys.len() - 1
                        });
                        last = Some((k, i));
                        i
                    }
                };
                let acc = &mut keys[idx];
                let ts = row.ts.as_micros();
                if ts <= acc.prev {
                    acc.monotonic = false;
                }
                acc.prev = ts;
                row_keys.push(idx as u32);
            }
        }
        let mut verdicts = Vec::with_capacity(row_keys.len());
        let mut maybe = 0usize;
        let mut seq = 0usize;
        for job in jobs {
            for row in &job.batch.rows {
                let acc = &mut keys[row_keys[seq] as usize];
                let ts = row.ts.as_micros();
                let v = if !acc.monotonic && !acc.seen.insert(ts) {
                    Verdict::Duplicate
                } else if acc.stored_last.is_none_or(|m| ts > m) {
                    Verdict::Fresh
                } else {
                    maybe += 1;
                    Verdict::Maybe
                };
                verdicts.push(v);
                seq += 1;
            }
        }
        Plan {
            new_devices,
            device_maps,
            keys,
            row_keys,
            verdicts,
            maybe,
            rows,
        }
    }

    /// A group of new readings only: into the ingest log, acknowledged once it is on
    /// disk; DuckDB gets them with the next [`Self::flush_pending`].
    fn commit_logged(&mut self, jobs: &[Job], mut plan: Plan) -> Result<Vec<Committed>, StoreError> {
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

    /// A group with older readings or many readings: deduplicated against DuckDB and
    /// committed there in one transaction.
    fn commit_direct(&mut self, jobs: &[Job], mut plan: Plan) -> Result<Vec<Committed>, StoreError> {
        // 3. Column buffers for the Appender, built before the transaction opens.
        let (fresh, staged) = split_columns(
            jobs,
            &plan.device_maps,
            &plan.verdicts,
            &plan.row_keys,
            plan.maybe,
        );
        let series: Vec<(DeviceId, SensorId)> =
            plan.keys.iter().map(|k| (k.device, k.sensor)).collect();

        // 4. One transaction for the whole group: devices, dedupe of older rows, series
        //    statistics, then the fresh rows and the rollups of ended slots.
        let slots = self.slot_move();
        let started = Instant::now();
        self.conn.execute_batch("BEGIN TRANSACTION")?;
        let in_tx = (|| {
            ingest_log::insert_devices(&self.conn, &plan.new_devices)?;
            let mut fresh = fresh;
            let stored_dups = if staged.is_empty() {
                Vec::new()
            } else {
                self.dedupe_staged(&staged, &mut fresh)?
            };
            let (results, updated) = tally(
                jobs,
                &plan.verdicts,
                &plan.row_keys,
                &mut plan.keys,
                &stored_dups,
                &self.shared,
            );
            let (partials, held) = self.append_fresh(fresh, &series, &slots)?;
            let before_commit = Instant::now();
            self.conn.execute_batch("COMMIT")?;
            tracing::debug!(
                write_ms = (before_commit - started).as_secs_f64() * 1e3,
                commit_ms = before_commit.elapsed().as_secs_f64() * 1e3,
                "committed group"
            );
            Ok::<_, StoreError>((results, updated, partials, held))
        })();
        let (results, updated, partials, held) = match in_tx {
            Ok(r) => r,
            Err(e) => {
                self.conn.execute_batch("ROLLBACK").ok();
                // The key windows may hold rows that are not stored after all.
                self.recent.clear();
                return Err(e);
            }
        };

        // 5. Only now, with the data durable, show it to readers.
        self.publish(&plan.new_devices, &updated, &plan.keys);
        self.after_append(slots, partials, held);
        Ok(results)
    }

    /// Moves everything the ingest log holds into DuckDB in one transaction, records
    /// how far, and empties the log. Queries waiting for it go on.
    fn flush_pending(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let through = self.pending.through;
        let rows = self.pending.rows.len();
        let _span = tracing::debug_span!("log_flush", rows, through).entered();
        let started = Instant::now();
        let slots = self.slot_move();
        self.conn.execute_batch("BEGIN TRANSACTION")?;
        let in_tx = (|| {
            ingest_log::insert_devices(&self.conn, &self.pending.devices)?;
            // A copy: on failure the readings stay pending (and in the log).
            let fresh = self.pending.rows.clone();
            let series = std::mem::take(&mut self.pending.series.keys);
            let appended = self.append_fresh(fresh, &series, &slots);
            self.pending.series.keys = series;
            let appended = appended?;
            ingest_log::set_through(&self.conn, through)?;
            self.conn.execute_batch("COMMIT")?;
            Ok::<_, StoreError>(appended)
        })();
        let (partials, held) = match in_tx {
            Ok(r) => r,
            Err(e) => {
                self.conn.execute_batch("ROLLBACK").ok();
                self.recent.clear();
                return Err(e);
            }
        };
        self.pending.clear();
        if let Err(e) = self.log.reset() {
            // Harmless: start-up skips records DuckDB already holds.
            tracing::warn!(error = %e, "emptying the ingest log failed");
        }
        self.shared.flushed(through);
        self.after_append(slots, partials, held);
        let elapsed = started.elapsed();
        self.metrics.log_flush_seconds.observe(elapsed.as_secs_f64());
        tracing::debug!(elapsed_ms = elapsed.as_secs_f64() * 1e3, "flushed the ingest log");
        Ok(())
    }

    /// Flushes the ingest log when a query waits for it, when it holds many
    /// readings, or when its oldest reading has waited long enough. A failure leaves
    /// the readings pending (they are in the log) and is retried at the next chance.
    fn maybe_flush(&mut self) {
        let Some(since) = self.pending.since else {
            return;
        };
        if self.shared.flush_requested()
            || self.pending.rows.len() >= FLUSH_ROWS
            || since.elapsed() >= FLUSH_AGE
        {
            if let Err(e) = self.flush_pending() {
                tracing::error!(error = %e, "moving the ingest log into the database failed; retrying later");
                // Not again at once: the next tick or group.
                self.pending.since = Some(Instant::now());
            }
        }
    }

    /// Where the live rollup slots stand for the next append.
    fn slot_move(&self) -> SlotMove {
        let now_from = live_from(self.clock.now_ms());
        let advance = (now_from > self.live.from).then_some(now_from);
        SlotMove {
            advance,
            hold_from: advance.unwrap_or(self.live.from),
        }
    }

    /// Inside the caller's transaction: appends fresh rows (sorted by series), their
    /// rollup partials except those of live slots (returned, to be held), and the
    /// held partials of slots that have ended.
    fn append_fresh(
        &mut self,
        fresh: Columns,
        series: &[(DeviceId, SensorId)],
        slots: &SlotMove,
    ) -> Result<(Partials, Vec<Partial>), StoreError> {
        if !self.recent.is_empty() {
            for i in 0..fresh.len() {
                self.recent
                    .record(fresh.device[i], fresh.sensor[i], fresh.ts[i]);
            }
        }
        let mut partials = ingest_log::append_readings(&self.conn, fresh, series)?;
        let held = partials.split_off_from(slots.hold_from);
        if let Some(to) = slots.advance {
            partials.extend(self.live.before(to));
            self.conn.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                duckdb::params![rollup::META_FROM, to.to_string()],
            )?;
        }
        partials.append(&self.conn)?;
        Ok((partials, held))
    }

    /// After the commit of [`Self::append_fresh`]: the live slots move on.
    fn after_append(&mut self, slots: SlotMove, partials: Partials, held: Vec<Partial>) {
        if let Some(to) = slots.advance {
            self.live.release_before(to);
            self.live.from = to;
            self.shared.set_rollups_from(to);
        }
        self.live.hold(held);
        self.rollups.add(&partials);
        self.merge_rollups();
    }

    /// Shows acknowledged readings to readers and counts them.
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
            self.due.invalidate();
            self.signals.past_days.notify_one();
        }
        self.signals.touched(
            keys.iter()
                .filter(|k| k.delta.is_some())
                .map(|k| (k.device, k.sensor)),
        );
    }

    /// Writes every held rollup partial, in its own transaction. The boundary
    /// readers use stays: these slots may still get readings.
    fn flush_live(&mut self) -> Result<(), StoreError> {
        if self.live.is_empty() {
            return Ok(());
        }
        let rows = self.live.before(i64::MAX);
        super::in_transaction(&self.conn, || rollup::append_rows(&self.conn, &rows))?;
        self.live.release_before(i64::MAX);
        Ok(())
    }

    /// Consolidates the rollup slots recent commits touched once enough partial rows
    /// have accumulated. A failure only leaves more rows to combine at query time.
    fn merge_rollups(&mut self) {
        let Some((lo, hi)) = self.rollups.span else {
            return;
        };
        if self.rollups.rows < self.rollups.merge_at {
            return;
        }
        let started = Instant::now();
        match rollup::merge(&self.conn, lo, hi) {
            Ok(replaced) => {
                tracing::debug!(
                    replaced,
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "consolidated rollups"
                );
                self.rollups.rows = 0;
                self.rollups.span = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "consolidating rollups failed");
                self.rollups.rows = 0;
            }
        }
    }

    /// Per-sensor accepted and duplicate counters.
    fn count(&self, keys: &[KeyAcc]) {
        let catalog = self.shared.catalog();
        let m = &self.metrics;
        for k in keys {
            let name = catalog
                .by_id(k.sensor)
                .map_or(UNKNOWN_SENSOR, |s| s.name.as_str());
            Metrics::add(
                &m.readings_accepted,
                name,
                k.delta.map_or(0, |d| d.readings),
            );
            Metrics::add(&m.readings_duplicate, name, k.duplicates);
        }
    }

    /// Checks the "maybe" rows against stored readings: those not stored yet move to
    /// `fresh`; returns, indexed by `seq`, which were (shorter than the group when the
    /// last rows were not staged).
    ///
    /// Per device and time cluster, the staged keys are probed against a window of
    /// the device's stored keys (see [`super::recent`]), read when no kept window
    /// covers the cluster: one scan of the nearby row groups (a plain range filter on
    /// `ts_ms`, so zone maps skip the rest) serves the following requests of a replay
    /// too. Staging the rows in a temp table and joining there was ~40% slower per
    /// reading than appending fresh ones.
    fn dedupe_staged(
        &mut self,
        staged: &Columns,
        fresh: &mut Columns,
    ) -> Result<Vec<bool>, StoreError> {
        let _span = tracing::debug_span!("dedupe", rows = staged.ts.len()).entered();
        let last_seq = staged.seq.iter().max().map_or(0, |m| *m as usize + 1);
        let mut dups = vec![false; last_seq];
        let mut order: Vec<usize> = (0..staged.ts.len()).collect();
        order.sort_unstable_by_key(|&i| (staged.device[i], staged.ts[i]));
        for run in order.chunk_by(|&a, &b| staged.device[a] == staged.device[b]) {
            let device = staged.device[run[0]];
            let ms = |i: usize| staged.ts[i].div_euclid(1000);
            // A late upload mixed with a replay would make one span cover months, so
            // the staged times are cut into clusters and each is looked up on its own.
            let clusters = time_clusters(run.iter().map(|&i| ms(i)).collect());
            for (lo, hi) in clusters.into_iter().flat_map(window_spans) {
                if self.recent.covering(device, lo, hi).is_none() {
                    let window = self.read_window(device, lo, hi)?;
                    self.recent.keep(window);
                }
                let window = self
                    .recent
                    .covering(device, lo, hi)
                    .ok_or_else(|| StoreError::Internal("key window not kept".into()))?;
                for &i in run.iter().filter(|&&i| (lo..=hi).contains(&ms(i))) {
                    if window.contains(staged.sensor[i], staged.ts[i]) {
                        dups[staged.seq[i] as usize] = true;
                    } else {
                        fresh.push_raw(
                            staged.seq[i],
                            staged.key[i],
                            device,
                            staged.sensor[i],
                            staged.ts[i],
                            staged.value[i],
                        );
                    }
                }
            }
        }
        Ok(dups)
    }

    /// Reads the stored keys of `device` from `lo_ms` on: at least to `hi_ms`, and on
    /// as far as [`WINDOW_KEYS`] readings reach at the device's average density
    /// (never past its newest reading, after which nothing is stored).
    fn read_window(&self, device: i32, lo_ms: i64, hi_ms: i64) -> Result<Window, StoreError> {
        let series = self.shared.series_of(DeviceId(device as u32));
        let readings: u64 = series.iter().map(|(_, s)| s.readings).sum();
        let first = series.iter().map(|(_, s)| s.first.as_micros() / 1000).min();
        let newest = series.iter().map(|(_, s)| s.last.as_micros() / 1000).max();
        // Stored readings per ms, on average.
        let density = match (first, newest) {
            (Some(first), Some(newest)) => readings as f64 / (newest - first).max(1) as f64,
            _ => 0.0,
        };
        let hi = match newest {
            Some(newest) if density > 0.0 => lo_ms
                .saturating_add((WINDOW_KEYS as f64 / density) as i64)
                .min(newest)
                .min(lo_ms + MAX_SPAN_MS)
                .max(hi_ms),
            _ => hi_ms,
        };
        // Sized once for what the density predicts: growing the set while reading
        // would hold the old and the new table at once.
        let expected = ((hi - lo_ms + 1) as f64 * density) as usize;
        let mut window = Window::new(device, lo_ms, hi);
        window.reserve(expected.min(2 * WINDOW_KEYS as usize));
        let sql = format!(
            "SELECT sensor_id, ts_ms, ts_us FROM readings
             WHERE device_id = {device} AND ts_ms BETWEEN {lo_ms} AND {hi}"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        for batch in stmt.query_arrow([])? {
            let col = |i: usize| batch.column(i).as_any();
            let (Some(s), Some(ms), Some(us)) = (
                col(0).downcast_ref::<Int16Array>(),
                col(1).downcast_ref::<Int64Array>(),
                col(2).downcast_ref::<Int16Array>(),
            ) else {
                return Err(StoreError::Internal("unexpected key column types".into()));
            };
            for i in 0..batch.num_rows() {
                window.insert(s.value(i), ms.value(i) * 1000 + i64::from(us.value(i)));
            }
        }
        Ok(window)
    }

    /// Runs [`retention::retire`]; the key windows and the list of days due for
    /// compaction describe what was stored before, so both are dropped.
    fn retire(&mut self, days: &BTreeMap<NaiveDate, u64>) -> Result<Retired, StoreError> {
        let done = retention::retire(&self.conn, &self.shared, days, self.live.from)?;
        if !done.days.is_empty() {
            self.recent.clear();
            self.due.invalidate();
        }
        Ok(done)
    }

    fn checkpoint(&mut self) -> Result<(), StoreError> {
        // Whatever fails here stays in the ingest log for the next start.
        self.flush_pending()?;
        // Not needed for correctness (the next start recomputes the live slots) but
        // leaves a file whose rollups are whole for offline tools.
        if let Err(e) = self.flush_live() {
            tracing::warn!(error = %e, "writing held rollups at shutdown failed");
        }
        super::close(&self.conn, &self.shared)
    }
}

/// Gap between staged timestamps (ms) that starts a new cluster.
const CLUSTER_GAP_MS: i64 = 3_600_000;
/// Most separate range queries per group; the closest clusters are merged beyond it.
const MAX_CLUSTERS: usize = 8;

/// Cuts timestamps (ms) into `[lo, hi]` spans separated by gaps of more than an hour,
/// at most [`MAX_CLUSTERS`] of them (merging across the smallest gaps), so each key
/// window covers only the time near the staged readings.
fn time_clusters(mut ts: Vec<i64>) -> Vec<(i64, i64)> {
    ts.sort_unstable();
    ts.dedup();
    let Some(&first) = ts.first() else {
        return Vec::new();
    };
    let mut spans = vec![(first, first)];
    for &t in &ts[1..] {
        let last = spans.last_mut().expect("non-empty");
        if t - last.1 > CLUSTER_GAP_MS {
            spans.push((t, t));
        } else {
            last.1 = t;
        }
    }
    while spans.len() > MAX_CLUSTERS {
        let i = (1..spans.len())
            .min_by_key(|&i| spans[i].0 - spans[i - 1].1)
            .expect("more than one span");
        spans[i - 1].1 = spans[i].1;
        spans.remove(i);
    }
    spans
}

/// `[lo, hi]` (ms) cut into pieces a key window can span.
fn window_spans((lo, hi): (i64, i64)) -> impl Iterator<Item = (i64, i64)> {
    (0..)
        .map(move |i| lo.saturating_add(i * (MAX_SPAN_MS + 1)))
        .take_while(move |&start| start <= hi)
        .map(move |start| (start, hi.min(start + MAX_SPAN_MS)))
}

/// Counts per request and the merged statistics of every series that got rows.
fn tally(
    jobs: &[Job],
    verdicts: &[Verdict],
    row_keys: &[u32],
    keys: &mut [KeyAcc],
    stored_dups: &[bool],
    shared: &Shared,
) -> (Vec<Committed>, Vec<SeriesEntry>) {
    let mut results = Vec::with_capacity(jobs.len());
    let mut seq = 0usize;
    for job in jobs {
        let mut c = Committed::default();
        for row in &job.batch.rows {
            let stored = match verdicts[seq] {
                Verdict::Duplicate => false,
                Verdict::Fresh => true,
                Verdict::Maybe => !stored_dups.get(seq).copied().unwrap_or(false),
            };
            if stored {
                c.accepted += 1;
                let one = SeriesStats {
                    readings: 1,
                    first: row.ts,
                    last: row.ts,
                    last_value: row.value,
                };
                let acc = &mut keys[row_keys[seq] as usize];
                match &mut acc.delta {
                    Some(d) => d.merge(&one),
                    None => acc.delta = Some(one),
                }
            } else {
                c.duplicates += 1;
                keys[row_keys[seq] as usize].duplicates += 1;
            }
            seq += 1;
        }
        results.push(c);
    }
    let updated = keys
        .iter()
        .filter_map(|k| {
            let delta = k.delta?;
            let merged = match shared.series(k.device, k.sensor) {
                Some(mut s) => {
                    s.merge(&delta);
                    s
                }
                None => delta,
            };
            Some(((k.device, k.sensor), merged))
        })
        .collect();
    (results, updated)
}

/// Splits the group's rows into fresh rows (appended directly) and "maybe" rows
/// (staged for the anti-join); in-group duplicates go nowhere.
fn split_columns(
    jobs: &[Job],
    device_maps: &[Vec<DeviceId>],
    verdicts: &[Verdict],
    row_keys: &[u32],
    maybe: usize,
) -> (Columns, Columns) {
    let mut fresh = Columns::with_capacity(verdicts.len() - maybe);
    let mut staged = Columns::with_capacity(maybe);
    let mut seq = 0usize;
    for (job, ids) in jobs.iter().zip(device_maps) {
        for row in &job.batch.rows {
            match verdicts[seq] {
                Verdict::Fresh => {
                    fresh.push(seq as u32, row_keys[seq], ids[row.device as usize], row)
                }
                Verdict::Maybe => {
                    staged.push(seq as u32, row_keys[seq], ids[row.device as usize], row)
                }
                Verdict::Duplicate => {}
            }
            seq += 1;
        }
    }
    (fresh, staged)
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

    #[test]
    fn time_clusters_stay_narrow_and_bounded() {
        let h = CLUSTER_GAP_MS;
        assert_eq!(time_clusters(vec![]), vec![]);
        assert_eq!(time_clusters(vec![5, 1, 3]), vec![(1, 5)]);
        assert_eq!(
            time_clusters(vec![0, 10, 10 + h + 1, 20 * h]),
            vec![(0, 10), (10 + h + 1, 10 + h + 1), (20 * h, 20 * h)]
        );
        let many: Vec<i64> = (0..20).map(|i| i * 10 * h + i).collect();
        let c = time_clusters(many.clone());
        assert_eq!(c.len(), MAX_CLUSTERS);
        assert!(
            many.iter()
                .all(|t| c.iter().any(|(lo, hi)| lo <= t && t <= hi))
        );
    }

    #[test]
    fn window_spans_cover_the_range_in_pieces() {
        assert_eq!(window_spans((5, 9)).collect::<Vec<_>>(), vec![(5, 9)]);
        let m = MAX_SPAN_MS;
        assert_eq!(
            window_spans((0, 2 * m + 5)).collect::<Vec<_>>(),
            vec![(0, m), (m + 1, 2 * m + 1), (2 * m + 2, 2 * m + 5)]
        );
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
