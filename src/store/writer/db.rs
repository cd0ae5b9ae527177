//! The DuckDB side of the writer: the write connection and everything that must
//! change with it in step — key windows for dedupe, the live rollup slots'
//! boundary, the days due for compaction, today's readings not sorted by device
//! yet. Used by one thread at a time (the writer's front for direct commits,
//! compaction and retention; the flusher for the ingest log), behind a lock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::NaiveDate;
use duckdb::Connection;
use tokio::sync::oneshot;

use super::classify::{Plan, split_columns, tally};
use super::flusher::{Ahead, Prepared, ROW_GROUP_ROWS};
use super::{Clock, Job, Sealed};
use crate::domain::{DeviceId, SensorId};
use crate::metrics::{APPLIED_THROUGH_WAL, APPLIED_TO_DATA_FILE, Metrics, PathLabel};
use crate::store::cluster::Clustering;
use crate::store::columns::Columns;
use crate::store::compact::{self, Compaction, DueDays};
use crate::store::forget;
use crate::store::ingest_log;
use crate::store::live::live_from;
use crate::store::recent::RecentKeys;
use crate::store::retention::{self, Retired};
use crate::store::rollup::{self, Partials};
use crate::store::series;
use crate::store::state::Logged;
use crate::store::{Committed, DeletedDevice, SeriesEntry, Shared, StoreError};

/// The write connection and its companions.
pub(super) struct Db {
    pub(super) conn: Connection,
    pub(super) shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    pub(super) recent: RecentKeys,
    due: DueDays,
    /// Today's readings in `received_readings`, sorted by device into
    /// `compacted_readings` a chunk at a time (see [`crate::store::cluster`]).
    clustering: Clustering,
    rollups: Unmerged,
    /// Rollups of slots from this one on are written when their slot has ended (see
    /// [`crate::store::rollup`]).
    live_from: i64,
    /// No sealing of ended slots before this (after a failed one).
    seal_after: Instant,
    /// The rollups of ended live slots being computed, a range of devices at a time
    /// (see [`Self::seal_step`]).
    sealing: Option<rollup::Rebuild>,
    /// The `series` rows of devices on disk being brought up to date after a
    /// retention, a range of devices at a time (see [`Self::step`]), and who waits
    /// for the retention's outcome until they are.
    refreshing: Option<(retention::DiskRefresh, Option<Answer>)>,
    clock: Clock,
    /// The next queued log segment, prepared while this one goes in.
    pub(super) ahead: Ahead,
}

/// A retention's outcome and who waits for it.
type Answer = (oneshot::Sender<Result<Retired, StoreError>>, Retired);

/// The live rollup slots' move with the next append (see [`crate::store::rollup`]).
pub(super) struct SlotMove {
    /// The first live slot: rollup partials of slots from here on are not written.
    from: i64,
    /// The first live slot moves here: the slots from `from` to it have ended, and
    /// their rollups are computed from their readings.
    advance: Option<i64>,
    /// While they are: the end of those slots and the devices (ids below) whose
    /// rollups there are computed already, so appends write partials for them.
    rebuilt: Option<(i64, u64)>,
}

impl SlotMove {
    /// The slots before which [`Partials::drop_live`] may keep partials.
    fn kept_below(&self) -> i64 {
        self.rebuilt.map_or(self.from, |(to, _)| to.max(self.from))
    }
}

/// Rollup rows appended since the last consolidation, and the slots they touched.
struct Unmerged {
    rows: usize,
    span: Option<(i64, i64)>,
    /// Rows that start a consolidation: `--rollup-merge-rows`, or as many as the last
    /// one left in its span, whichever is more, so that its cost (a pass over every
    /// row of the span) is paid once per as many new rows. A backlog of an earlier day
    /// from a million devices touches every slot of that day with each commit: at
    /// a fixed 20,000 rows it consolidated millions of rows after every commit and
    /// was loaded at 29 k readings/s.
    merge_at: usize,
    /// `--rollup-merge-rows`.
    base: usize,
}

impl Unmerged {
    fn add(&mut self, partials: &Partials) {
        self.rows += partials.len();
        if let Some((lo, hi)) = partials.slot_span() {
            self.span = Some(self.span.map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
        }
    }
}

impl Db {
    pub(super) fn new(
        conn: Connection,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
        rollup_merge_rows: usize,
        cluster_rows: u64,
        clock: Clock,
    ) -> Result<Self, StoreError> {
        let from = live_from(clock.now_ms());
        if let Some(previous) = rollup::recover(&conn, from)? {
            tracing::debug!(from = previous, "recomputed the rollups of recent slots");
        }
        // The rollups are whole now (written at the last shutdown, or recomputed just
        // above): the live slots' aggregates start from them.
        shared.live.load(&conn, from)?;
        shared.set_rollups_from(from);
        let clustering = Clustering::new(&conn, cluster_rows)?;
        Ok(Self {
            conn,
            shared,
            metrics,
            recent: RecentKeys::default(),
            due: DueDays::default(),
            clustering,
            rollups: Unmerged {
                rows: 0,
                // The first consolidation also covers partials an earlier run left
                // in slots since yesterday; older days are consolidated by compaction.
                span: Some((
                    rollup::slot_of(compact::today_start().as_micros() / 1000 - 86_400_000),
                    i64::MAX,
                )),
                merge_at: rollup_merge_rows.max(1),
                base: rollup_merge_rows.max(1),
            },
            live_from: from,
            seal_after: Instant::now(),
            sealing: None,
            refreshing: None,
            clock,
            ahead: Ahead::default(),
        })
    }

    /// A group with older readings or many readings: deduplicated against DuckDB and
    /// committed there in one transaction.
    /// Returns the per-request counts and the series statistics to publish.
    pub(super) fn commit_direct(
        &mut self,
        jobs: &[Job],
        plan: &mut Plan,
    ) -> Result<(Vec<Committed>, Vec<SeriesEntry>), StoreError> {
        // 3. Column buffers for the insert, built before the transaction opens.
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
        let (results, updated, partials) = self.in_transaction(|db| {
            ingest_log::insert_devices(&db.conn, &plan.new_devices)?;
            ingest_log::insert_owners(&db.conn, &plan.new_owners)?;
            let mut fresh = fresh;
            let stored_dups = if staged.is_empty() {
                Vec::new()
            } else {
                db.dedupe_staged(&staged, &mut fresh)?
            };
            let (results, updated) = tally(
                jobs,
                &plan.verdicts,
                &plan.row_keys,
                &mut plan.keys,
                &stored_dups,
                &db.shared,
            );
            let partials = db.append_fresh(fresh, &series, &slots)?;
            Ok((results, updated, partials))
        })?;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "committed group"
        );

        self.after_append(slots, partials);
        Ok((results, updated))
    }

    /// Moves one sealed part of the ingest log into DuckDB in one transaction and
    /// records how far the log is applied (`meta.ingest_log_through`). On failure
    /// nothing of it is stored; it stays in the log.
    pub(super) fn flush(&mut self, part: &Sealed, prepared: Prepared) -> Result<(), StoreError> {
        let rows = prepared.batch.num_rows();
        let _span = tracing::debug_span!("log_flush", rows, through = part.through).entered();
        let started = Instant::now();
        let slots = self.slot_move();
        let partials = self.in_transaction(|db| {
            ingest_log::insert_devices(&db.conn, &part.devices)?;
            ingest_log::insert_owners(&db.conn, &part.owners)?;
            let appended = db.append_logged(&part.records, prepared, &slots)?;
            if part.segment.is_some() {
                ingest_log::set_through(&db.conn, part.through)?;
            }
            if !part.spill.is_empty() {
                series::write_devices(
                    &db.conn,
                    part.spill.iter().map(|(d, of)| (d, of.iter().copied())),
                )?;
            }
            Ok(appended)
        })?;
        if !part.spill.is_empty() {
            tracing::debug!(
                devices = part.spill.len(),
                "idle devices' series statistics written"
            );
            self.shared.series_written(part.spill.clone());
        }
        self.after_append(slots, partials);
        let elapsed = started.elapsed();
        self.metrics
            .log_flush_seconds
            .observe(elapsed.as_secs_f64());
        let path = if rows >= ROW_GROUP_ROWS {
            APPLIED_TO_DATA_FILE
        } else {
            APPLIED_THROUGH_WAL
        };
        self.metrics
            .log_applied
            .get_or_create(&PathLabel { path })
            .inc_by(rows as u64);
        tracing::debug!(
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            "moved ingest log into the database"
        );
        Ok(())
    }

    /// Runs `f` in one transaction on the write connection. On failure it is rolled
    /// back and the key windows are dropped: they may hold rows that were not stored.
    fn in_transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.conn.execute_batch("BEGIN TRANSACTION")?;
        let done = f(self).and_then(|v| {
            self.conn.execute_batch("COMMIT")?;
            Ok(v)
        });
        if done.is_err() {
            self.conn.execute_batch("ROLLBACK").ok();
            self.recent.clear();
        }
        done
    }

    /// Compacts the next finished day due (see [`crate::store::compact`]).
    pub(super) fn compact(&mut self) -> Result<Compaction, StoreError> {
        self.finish_seal();
        let today = chrono::Utc::now().date_naive();
        // A live slot it recomputes (the quarter hour before midnight) is computed
        // again when it ends: `rollup::rebuild` replaces, it never adds.
        self.due.compact_next(&self.conn, today)
    }

    /// Readings of finished days were acknowledged: the days due for compaction
    /// must be looked up again.
    pub(super) fn past_days_written(&mut self) {
        self.due.invalidate();
    }

    /// Where the live rollup slots start.
    pub(super) fn live_from(&self) -> i64 {
        self.live_from
    }

    /// Where the live rollup slots stand for the next append.
    pub(super) fn slot_move(&self) -> SlotMove {
        let now_from = live_from(self.clock.now_ms());
        SlotMove {
            from: self.live_from,
            advance: (now_from > self.live_from && self.sealing.is_none()).then_some(now_from),
            rebuilt: self.sealing.as_ref().map(|r| (r.to_ms(), r.done_below())),
        }
    }

    /// Inside the caller's transaction: appends fresh rows (sorted by series) and their
    /// rollup partials except those of live slots (at or after `slots.from`).
    fn append_fresh(
        &mut self,
        fresh: Columns,
        series: &[(DeviceId, SensorId)],
        slots: &SlotMove,
    ) -> Result<Partials, StoreError> {
        self.remember(&fresh);
        self.clustering.appended(fresh.len() as u64);
        let partials = ingest_log::append_readings(&self.conn, fresh, series)?;
        self.append_partials(partials, slots)
    }

    /// [`Self::append_fresh`] for the records of a sealed log segment.
    fn append_logged(
        &mut self,
        records: &[Arc<Logged>],
        mut prepared: Prepared,
        slots: &SlotMove,
    ) -> Result<Partials, StoreError> {
        prepared.partials_below(slots.kept_below())?;
        for r in records {
            self.remember(&r.rows);
        }
        self.clustering.appended(prepared.batch.num_rows() as u64);
        ingest_log::insert_readings(&self.conn, prepared.batch)?;
        self.append_partials(prepared.partials, slots)
    }

    /// Adds appended rows to the replay's key windows, if any are kept.
    fn remember(&mut self, rows: &Columns) {
        if self.recent.is_empty() {
            return;
        }
        for i in 0..rows.len() {
            self.recent
                .record(rows.device[i], rows.sensor[i], rows.ts[i]);
        }
    }

    /// Appends the rollup partials of appended rows except those of live slots (at or
    /// after `slots.from`).
    fn append_partials(
        &mut self,
        mut partials: Partials,
        slots: &SlotMove,
    ) -> Result<Partials, StoreError> {
        partials.drop_live(slots.from, slots.rebuilt);
        partials.append(&self.conn)?;
        Ok(partials)
    }

    /// After the commit of [`Self::append_fresh`]: the live slots that have ended
    /// start getting their rollups (the flusher computes them, see
    /// [`Self::seal_step`]).
    fn after_append(&mut self, slots: SlotMove, partials: Partials) {
        if let Some(to) = slots.advance.filter(|_| Instant::now() >= self.seal_after) {
            self.seal_start(slots.from, to);
        }
        self.rollups.add(&partials);
        self.merge_rollups();
    }

    /// Starts computing the rollups of the ended live slots `[from, to)` from their
    /// readings (deletes what they hold, plans the device ranges); the flusher runs
    /// one range at a time ([`Self::seal_step`]) and applies the ingest log in
    /// between, so it keeps moving into DuckDB meanwhile. Not in the append's
    /// transaction but after it, each statement committed on its own (readers do not
    /// read rollups at or after the boundary): inside it, 100,000 devices streaming at a 64 MB limit ran out of
    /// memory at the quarter hour, and so did every commit after — ingest answered
    /// 500. On failure the boundary stays, the live slots keep answering, and a
    /// commit 10 s later starts again; a crash in between leaves the boundary in
    /// `meta`, from which the next start recomputes.
    fn seal_start(&mut self, from: i64, to: i64) {
        let _span = tracing::debug_span!("rollup_seal", from, to).entered();
        match rollup::Rebuild::start(&self.conn, "readings", from, to) {
            Ok(rebuild) => self.sealing = Some(rebuild),
            Err(e) => self.seal_failed(&e),
        }
    }

    /// Computes one more range of the ended slots' rollups, if they are being
    /// computed; after the last, moves the boundary.
    pub(super) fn seal_step(&mut self) {
        let Some(rebuild) = &mut self.sealing else {
            return;
        };
        let to = rebuild.to_ms();
        let _span = tracing::debug_span!("rollup_seal_step", to).entered();
        let started = Instant::now();
        let done = rebuild.step(&self.conn).and_then(|done| {
            if done {
                self.conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    duckdb::params![rollup::META_FROM, to.to_string()],
                )?;
            }
            Ok(done)
        });
        tracing::debug!(
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "computed rollups of ended live slots for a range of devices"
        );
        match done {
            Ok(false) => {}
            Ok(true) => {
                self.sealing = None;
                self.live_from = to;
                self.shared.set_rollups_from(to);
            }
            Err(e) => {
                self.sealing = None;
                self.seal_failed(&e);
            }
        }
    }

    fn seal_failed(&mut self, e: &StoreError) {
        tracing::warn!(
            error = %e,
            "computing the rollups of ended quarter hours failed; retried in 10 s"
        );
        self.seal_after = Instant::now() + std::time::Duration::from_secs(10);
    }

    /// Finishes computing the ended slots' rollups before an operation that writes
    /// rollups itself (compaction, retention, deleting a device): one that ran
    /// between two ranges could be counted twice.
    fn finish_seal(&mut self) {
        while self.sealing.is_some() {
            self.seal_step();
        }
    }

    /// Computes the rollups of every live slot from their readings, so the file's
    /// rollups are whole (see [`rollup::rebuild_from`]). The boundary readers use
    /// stays: these slots may still get readings, and are computed again when they
    /// end.
    fn seal_live(&mut self) -> Result<(), StoreError> {
        rollup::rebuild_from(&self.conn, self.live_from)
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
        tracing::debug!(rows = self.rollups.rows, "consolidating rollups");
        match rollup::merge(&self.conn, lo, hi) {
            Ok(merged) => {
                tracing::debug!(
                    replaced = merged.replaced,
                    rows = merged.rows,
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "consolidated rollups"
                );
                self.rollups.rows = 0;
                self.rollups.span = None;
                let left = usize::try_from(merged.rows).unwrap_or(usize::MAX);
                self.rollups.merge_at = left.max(self.rollups.base);
            }
            Err(e) => {
                // Tried again after twice as many rows, not at every commit.
                tracing::warn!(error = %e, "consolidating rollups failed");
                self.rollups.rows = 0;
                self.rollups.merge_at = self.rollups.merge_at.saturating_mul(2);
            }
        }
    }

    /// Whether work is left that the flusher does a step at a time between its
    /// commits: the ended slots' rollups, the series rows after a retention, or a
    /// chunk of today's readings to sort by device.
    pub(super) fn stepping(&self) -> bool {
        self.sealing.is_some() || self.refreshing.is_some() || self.clustering.due()
    }

    /// One step of what [`Self::stepping`] says is left: the rollups first, a chunk
    /// to sort last.
    pub(super) fn step(&mut self) {
        if self.sealing.is_some() {
            self.seal_step();
        } else if self.refreshing.is_some() {
            self.refresh_step();
        } else if self.clustering.due() {
            self.clustering.step(&self.conn);
        }
    }

    /// Updates the series rows of the next range of devices after a retention; after
    /// the last, answers who waits for the retention.
    fn refresh_step(&mut self) {
        let Some((refresh, _)) = &mut self.refreshing else {
            return;
        };
        if refresh.step(&self.conn, &self.shared)
            && let Some((_, Some((reply, done)))) = self.refreshing.take()
        {
            let _ = reply.send(Ok(done));
        }
    }

    /// Answers with `done` once the series rows are up to date after the retention
    /// (at once if they are).
    pub(super) fn answer_retention(
        &mut self,
        reply: oneshot::Sender<Result<Retired, StoreError>>,
        done: Retired,
    ) {
        match &mut self.refreshing {
            Some((_, answer)) => *answer = Some((reply, done)),
            None => drop(reply.send(Ok(done))),
        }
    }

    /// Whether the series rows of devices on disk are being brought up to date
    /// after a retention: a device on disk then comes back with
    /// [`Self::series_rows`], not from another connection.
    pub(super) fn refreshing(&self) -> bool {
        self.refreshing.is_some()
    }

    /// The `series` rows of these devices, on disk and coming back into memory,
    /// as they are after the last retention (see [`retention::take_corrected_rows`]).
    pub(super) fn series_rows(
        &mut self,
        devices: &[DeviceId],
    ) -> Result<Vec<SeriesEntry>, StoreError> {
        if let Some((refresh, _)) = &self.refreshing {
            retention::take_corrected_rows(&self.conn, refresh, devices)
        } else {
            series::read_devices(&self.conn, devices)
        }
    }

    /// Runs the rest of a retention's update of the series rows (before a shutdown
    /// or the next retention, which need the table whole).
    fn finish_refresh(&mut self) {
        while self.refreshing.is_some() {
            self.refresh_step();
        }
    }

    /// Runs [`retention::retire`]; the key windows and the list of days due for
    /// compaction describe what was stored before, so both are dropped. The series
    /// rows of devices on disk are brought up to date afterwards, by the flusher a
    /// step at a time ([`Self::step`]); [`Self::answer_retention`] waits for them.
    pub(super) fn retire(
        &mut self,
        days: &BTreeMap<NaiveDate, u64>,
    ) -> Result<Retired, StoreError> {
        self.finish_seal();
        self.finish_refresh();
        let (done, refresh) = retention::retire(&self.conn, &self.shared, days, self.live_from)?;
        self.refreshing = refresh.map(|r| (r, None));
        if !done.days.is_empty() {
            self.recent.clear();
            self.due.invalidate();
        }
        Ok(done)
    }

    /// Deletes a device's rows (see [`crate::store::forget`]) and what this side of
    /// the writer holds of it.
    pub(super) fn delete_device(&mut self, device: DeviceId) -> Result<DeletedDevice, StoreError> {
        self.finish_seal();
        let done = forget::delete_device(&self.conn, device)?;
        self.recent.clear();
        self.due.invalidate();
        Ok(done)
    }

    pub(super) fn checkpoint(&mut self) -> Result<(), StoreError> {
        // Leaves a file whose rollups are whole, for offline tools and for the next
        // start, which then need not recompute the live slots from `readings`. If
        // this fails the boundary stays and the next start recomputes them. A seal
        // in progress is part of what this recomputes.
        self.sealing = None;
        self.finish_refresh();
        let whole = self.seal_live().and_then(|()| {
            self.conn.execute(
                "DELETE FROM meta WHERE key = ?",
                duckdb::params![rollup::META_FROM],
            )?;
            Ok(())
        });
        if let Err(e) = whole {
            tracing::warn!(error = %e, "writing held rollups at shutdown failed");
        }
        crate::store::close(&self.conn, &self.shared)
    }
}
