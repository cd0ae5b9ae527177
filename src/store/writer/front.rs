//! The front thread: takes what is queued as one group, classifies it, writes small
//! live groups to the ingest log (the syncer thread makes them durable and answers
//! them) and sends everything else to DuckDB itself, answering those requests.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use duckdb::Connection;
use tokio::sync::mpsc;

use super::Clock;
use super::classify::{KeyAcc, Plan, classify, device_ids, split_columns, tally};
use super::db::Db;
use super::flusher::flush_queued;
use super::known::Known;
use super::syncer::{Syncer, Written};
use super::{Committed, Job, Msg, Pending, Persisting, Queue, Signals, WriteError};
use crate::domain::{Device, DeviceId, SensorId};
use crate::metrics::{Metrics, UNKNOWN_SENSOR};
use crate::store::compact;
use crate::store::ingest_log::IngestLog;
use crate::store::live::live_from;
use crate::store::series;
use crate::store::{DeletedDevice, SeriesEntry, Shared, StoreError};

/// How often the front looks whether idle devices' series statistics must leave
/// memory (a pass over every device: ~2 ms for a million).
const SPILL_EVERY: Duration = Duration::from_secs(1);

/// Longest the front waits for the flusher to bring the apply lag under its bound
/// (one segment's transaction takes 40–100 ms); after that the group goes to DuckDB
/// directly, where a failing database reports itself.
const LAG_WAIT: Duration = Duration::from_secs(1);

/// The writer thread's state: classifies groups, appends the log, acknowledges, and
/// uses the database directly for everything else.
pub(super) struct Front {
    pub(super) shared: Arc<Shared>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) signals: Arc<Signals>,
    pub(super) next_device: u32,
    pub(super) log: IngestLog,
    pub(super) pending: Pending,
    pub(super) db: Arc<Mutex<Db>>,
    pub(super) queue: Arc<Queue>,
    /// What memory knows of stored keys: decides most older readings.
    pub(super) known: Known,
    /// Decides which quarter hours are live.
    pub(super) clock: Clock,
    /// See [`super::WriterConfig::max_unapplied_readings`].
    pub(super) max_unapplied: usize,
    /// Readings of finished days were acknowledged through the log since the front
    /// last used the database.
    pub(super) past_days: bool,
    /// Group commits failing in a row.
    pub(super) commit_failures: Persisting,
    /// Segment rotations failing in a row.
    pub(super) seal_failures: Persisting,
    /// The last log record in a sealed segment: a query's request to see the log
    /// up to a record it covers is already on its way to DuckDB.
    pub(super) sealed_through: u64,
    /// A read connection of its own: brings back the series statistics of devices
    /// on disk (see [`crate::store::series`]) without the write lock.
    pub(super) lookup: Connection,
    /// A retention's update of the series rows of devices on disk may still run
    /// (see [`Db::refreshing`]): devices come back through the database then.
    pub(super) refresh_pending: bool,
    /// Idle devices' statistics are on their way into the table.
    pub(super) spilling: bool,
    /// When the front last looked for idle devices' statistics to write.
    pub(super) spill_looked: Instant,
    /// Makes written log records durable and answers them.
    pub(super) syncer: Arc<Syncer>,
    /// The syncer's thread, joined at close.
    pub(super) syncer_thread: Option<JoinHandle<()>>,
}

/// What became of a group the front committed.
enum Outcome {
    /// Durable (in DuckDB): answer now.
    Durable(Vec<Committed>),
    /// Written to the ingest log's `file`: answer once the syncer has synced it.
    Written(Vec<Committed>, Arc<File>),
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
            Ok(outcome) => {
                self.commit_failures.succeeded("group commit");
                match outcome {
                    Outcome::Durable(results) => {
                        let elapsed = started.elapsed();
                        self.metrics.commit_seconds.observe(elapsed.as_secs_f64());
                        tracing::debug!(elapsed_ms = elapsed.as_secs_f64() * 1e3, "committed");
                        for (job, r) in jobs.into_iter().zip(results) {
                            let _ = job.reply.send(Ok(r));
                        }
                    }
                    Outcome::Written(results, file) => self.syncer.push(Written {
                        file,
                        replies: jobs.into_iter().map(|j| j.reply).zip(results).collect(),
                        started,
                    }),
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

    fn commit(&mut self, jobs: &[Job]) -> Result<Outcome, StoreError> {
        let devices = device_ids(&self.shared, self.next_device, jobs);
        self.restore_series(&devices.device_maps)?;
        let mut plan = classify(&self.shared, &self.known, devices, jobs);
        if plan.maybe == 0 && self.lag_room(plan.rows) {
            return self.commit_logged(jobs, plan);
        }
        // Older readings memory cannot decide are checked against DuckDB, as is a
        // group the apply lag has no room for: after everything the log holds, so
        // DuckDB gets the readings in the order they were acknowledged.
        let (results, updated) = self.with_db(|db| db.commit_direct(jobs, &mut plan))?;
        self.publish(&mut plan, &updated);
        Ok(Outcome::Durable(results))
    }

    /// Whether `rows` more readings fit under the apply lag's bound
    /// ([`super::WriterConfig::max_unapplied_readings`]), once the flusher has made
    /// room: the front hands it the current segment (not a bulk one short of its
    /// row groups, when what is queued makes room) and waits up to [`LAG_WAIT`].
    ///
    /// Waiting lets the flusher go on with large transactions while requests queue
    /// (and are told to retry once the queue is full). Before, the front moved the
    /// whole log into DuckDB itself, then committed the group there: a bulk import
    /// stalled every request for ~0.4 s at a time, and the flusher sat idle meanwhile.
    fn lag_room(&mut self, rows: usize) -> bool {
        let Some(room) = self.max_unapplied.checked_sub(rows) else {
            return false;
        };
        if self.shared.apply_lag().readings as usize <= room {
            return true;
        }
        // A bulk segment short of its row groups stays open while the flusher
        // applies what is queued, when that alone makes room: sealed now, it would
        // go through DuckDB's write-ahead log, and the checkpoint it brings merges
        // and rewrites row groups — 0.3–1.9 s a time, 9–13 times in a 100 M
        // import, every request stalled meanwhile (docs/performance.md, session 35).
        let keep_open = self.pending.bulk() && !self.pending.full() && self.pending.rows <= room;
        if !keep_open && self.seal().is_err() {
            // `with_db` seals again, and reports it.
            return false;
        }
        let _span = tracing::debug_span!("lag_wait", rows).entered();
        let started = Instant::now();
        let fits = self.shared.await_apply_lag(room as u64, LAG_WAIT);
        tracing::debug!(
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            fits,
            "waited for the flusher"
        );
        fits
    }

    /// A group of new readings only: written to the ingest log and answered once the
    /// syncer has made it durable; the flusher moves it into DuckDB later.
    ///
    /// The front's own state (newest timestamps, known keys, live slots) counts the
    /// group as stored right away, so the next group is classified against it: if its
    /// `fdatasync` fails, its readings still go into DuckDB with the segment (see
    /// [`super::syncer`]). Queries see its readings from now on, up to one
    /// `fdatasync` (~0.2 ms) before they are acknowledged; a crash in between loses
    /// readings that were shown and never acknowledged.
    fn commit_logged(&mut self, jobs: &[Job], mut plan: Plan) -> Result<Outcome, StoreError> {
        let (mut fresh, _) =
            split_columns(jobs, &plan.device_maps, &plan.verdicts, &plan.row_keys, 0);
        let seq = {
            let _span = tracing::debug_span!("log_write", rows = fresh.len()).entered();
            self.log.write(&plan.new_devices, &fresh)?
        };
        let (results, updated) = tally(
            jobs,
            &plan.verdicts,
            &plan.row_keys,
            &mut plan.keys,
            &[],
            &self.shared,
        );
        // Readers see the readings from memory until DuckDB holds them; they need
        // no per-request positions or group-local series numbers.
        fresh.seq = Vec::new();
        fresh.key = Vec::new();
        let logged = self.shared.acked(seq, fresh);
        self.pending
            .add(logged, &plan.new_devices, &plan.new_owners);
        self.publish(&mut plan, &updated);
        Ok(Outcome::Written(results, self.log.file().clone()))
    }

    /// Brings back the series statistics of the group's devices (`device_maps`) that
    /// are on disk: classifying a reading needs its series' newest stored timestamp.
    fn restore_series(&mut self, device_maps: &[Vec<DeviceId>]) -> Result<(), StoreError> {
        let ids = self
            .shared
            .on_disk_among(device_maps.iter().flatten().copied());
        if ids.is_empty() {
            return Ok(());
        }
        let _span = tracing::debug_span!("series_restore", devices = ids.len()).entered();
        let started = Instant::now();
        let rows = self.series_rows(&ids)?;
        self.shared.restore_series(&ids, &rows);
        tracing::debug!(
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "series statistics back from disk"
        );
        Ok(())
    }

    /// The `series` rows of devices on disk: read on the front's own connection,
    /// without the write lock, but while a retention's update of those rows runs,
    /// through the database, which knows what the update has not reached yet.
    fn series_rows(&mut self, ids: &[DeviceId]) -> Result<Vec<SeriesEntry>, StoreError> {
        if !self.refresh_pending {
            return series::read_devices(&self.lookup, ids);
        }
        let db = self.db.clone();
        let mut db = db.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh_pending = db.refreshing();
        db.series_rows(ids)
    }

    fn lock_db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Between groups: devices whose rows the flusher committed leave memory; when
    /// memory is over its budget, the idle ones' statistics go to the flusher to
    /// be written (at most one batch at a time, looked for once a second, or right
    /// after the last batch when over the ceiling: a burst of new devices).
    fn spill_series(&mut self) {
        if self.shared.take_written_series() {
            self.spilling = false;
        }
        if self.spilling
            || (self.spill_looked.elapsed() < SPILL_EVERY && !self.shared.series_over_ceiling())
        {
            return;
        }
        self.spill_looked = Instant::now();
        let picked = self.shared.pick_idle_series();
        if picked.is_empty() {
            return;
        }
        tracing::debug!(
            devices = picked.len(),
            "idle devices' series statistics to disk"
        );
        self.spilling = true;
        self.pending.spill = picked;
        if let Err(e) = self.seal() {
            self.seal_failures
                .failed("cannot start a new ingest log segment; retrying", &e);
        }
    }

    /// Shows stored readings to readers, counts them and remembers their keys.
    fn publish(&mut self, plan: &mut Plan, updated: &[SeriesEntry]) {
        let keys = &mut plan.keys;
        for k in keys.iter_mut() {
            k.record(&mut self.known, &self.shared.live);
        }
        self.next_device += plan.new_devices.len() as u32;
        self.shared.add_devices(&plan.new_devices);
        self.shared.add_owners(&plan.new_owners);
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
        m.activity
            .record(per_sensor.iter().map(|(_, accepted, _)| accepted).sum());
        for (sensor, accepted, duplicates) in per_sensor {
            let name = catalog
                .by_id(sensor)
                .map_or(UNKNOWN_SENSOR, |s| s.name.as_str());
            Metrics::add(&m.readings_accepted, name, accepted);
            Metrics::add(&m.readings_duplicate, name, duplicates);
        }
    }

    /// Deletes a device in DuckDB, then forgets it in memory: its name, statistics,
    /// live slots and known keys.
    fn delete_device(&mut self, device: &Device) -> Result<Option<DeletedDevice>, StoreError> {
        let Some(id) = self.shared.device_id(device) else {
            return Ok(None);
        };
        // Back in memory first, so that forgetting it also takes its readings out
        // of the totals over devices on disk.
        if self.shared.series_on_disk(id) {
            let rows = self.series_rows(&[id])?;
            self.shared.restore_series(&[id], &rows);
        }
        let done = self.with_db(|db| db.delete_device(id))?;
        self.known.forget_device(id);
        self.shared.forget_device(id);
        tracing::info!(
            device = %device,
            readings = done.readings,
            series = done.series,
            "device deleted"
        );
        Ok(Some(done))
    }

    /// Moves the live slots on with the clock.
    fn advance_live(&self) {
        self.shared.live.advance(live_from(self.clock.now_ms()));
    }

    /// Hands the current segment to the flusher when a query waits for it, when it
    /// holds many readings, or when it has waited long enough ([`Pending::aged`]).
    fn maybe_seal(&mut self) {
        if self.pending.since.is_none() {
            return;
        }
        let due = self.shared.flush_requested_after(self.sealed_through)
            || self.syncer.failed()
            || self.pending.full()
            || self.pending.aged();
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
    ///
    /// Only once everything written to it is synced (and answered): a later segment
    /// must never hold records an earlier one lost, and DuckDB must get readings in
    /// the order they were acknowledged.
    fn seal(&mut self) -> Result<(), StoreError> {
        if self.pending.since.is_none() && self.pending.spill.is_empty() {
            return Ok(());
        }
        self.syncer.settle();
        // Settled: every record written so far is acknowledged, and goes with this
        // segment.
        self.sealed_through = self.shared.acked_through();
        let segment = self.log.rotate()?;
        self.syncer.new_segment();
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
        let done = f(&mut db);
        if db.stepping() {
            self.refresh_pending |= db.refreshing();
            self.queue.wake_for_steps();
        }
        done
    }

    /// Everything queued and logged into DuckDB, the flusher stopped, a checkpoint.
    fn close(mut self, flusher: JoinHandle<()>) -> Result<(), StoreError> {
        let done = self
            .with_db(|db| db.checkpoint())
            .and_then(|()| self.log.trim());
        // `with_db` sealed, so everything written was synced and answered.
        self.syncer.stop();
        if let Some(t) = self.syncer_thread.take() {
            let _ = t.join();
        }
        self.queue.lock().stop = true;
        self.queue.changed.notify_all();
        let _ = flusher.join();
        done
    }
}

pub(super) fn run(
    mut front: Front,
    mut rx: mpsc::Receiver<Msg>,
    max_rows: usize,
    flusher: JoinHandle<()>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = Vec::new();
        let mut shutdown = None;
        let mut compact = None;
        let mut retire = None;
        let mut delete = None;
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
                Msg::DeleteDevice(job) => delete = Some(job),
                Msg::Shutdown(ack) => shutdown = Some(ack),
                Msg::Tick => {}
            }
            let alone = compact.is_none() && retire.is_none() && delete.is_none();
            if shutdown.is_none() && alone && rows < max_rows {
                next = rx.try_recv().ok();
            }
        }
        front.commit_group(group);
        front.maybe_seal();
        front.spill_series();
        front.advance_live();
        if let Some(reply) = compact {
            let _ = reply.send(front.with_db(Db::compact));
        }
        if let Some(job) = retire {
            let retired = front.with_db(|db| db.retire(&job.days));
            if retired.as_ref().is_ok_and(|r| !r.days.is_empty()) || retired.is_err() {
                // Readings were (or may have been) deleted: what memory knew of
                // stored keys is stale.
                front.known.clear();
            }
            match retired {
                // Answered once the series rows are up to date too: the job that
                // asked then finds every device's statistics as they are now.
                Ok(done) => front.lock_db().answer_retention(job.reply, done),
                Err(e) => drop(job.reply.send(Err(e))),
            }
        }
        if let Some(job) = delete {
            let _ = job.reply.send(front.delete_device(&job.device));
        }
        if let Some(ack) = shutdown {
            rx.close();
            let mut rest = Vec::new();
            while let Ok(msg) = rx.try_recv() {
                match msg {
                    Msg::Append(job) => rest.push(job),
                    Msg::Compact(reply) => drop(reply.send(Err(StoreError::WriterGone))),
                    Msg::Retire(job) => drop(job.reply.send(Err(StoreError::WriterGone))),
                    Msg::DeleteDevice(job) => drop(job.reply.send(Err(StoreError::WriterGone))),
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
