//! The ingest log's segments on their way into DuckDB: the sealed-segment queue and
//! the flusher thread that drains it while the front goes on acknowledging.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use duckdb::arrow::record_batch::RecordBatch;

use super::Persisting;
use super::db::Db;
use crate::domain::{Device, DeviceId};
use crate::store::StoreError;
use crate::store::columns;
use crate::store::ingest_log;
use crate::store::rollup::Partials;
use crate::store::series::SpillBatch;
use crate::store::state::Logged;

/// Groups up to this size are a live fleet's; larger ones (bulk imports, backlogs)
/// hold a segment open while they keep coming ([`Pending::aged`]).
pub(super) const SMALL_GROUP_ROWS: usize = 4 * 1024;
/// The current log segment is handed to the flusher once it holds at least a DuckDB
/// row group (see [`Pending::full`]): DuckDB writes a transaction that appends at
/// least a row group straight into the data file, compressed, and a smaller one
/// into its own write-ahead log first, then again, compressed, at the next
/// checkpoint. Bulk imports (10,000-line requests from 4 clients) committed in
/// groups of ~40 k readings wrote their data three times.
///
/// A live fleet's segments too (32 Ki readings until session 42). A flush is sorted
/// by series, so in a row group of one flush each device's readings lie together,
/// and a scan for one device decodes the other columns only in the few vectors
/// where its filter found rows; four flushes to a row group put each device in four
/// places. A readings page on the file of a minute of 2,000 devices streaming
/// (one DuckDB thread): 5.8–6.5 ms → 3.2–3.6 ms a query. And the fleet's readings
/// no longer pass through DuckDB's write-ahead log, so its automatic checkpoints —
/// which compressed ~1 M rows in a burst every 7–9 s beside the fleet — are rare.
/// The cost is memory: up to ~1.5 row groups acknowledged and not yet applied,
/// twice (the segment filling and the one being applied), +8–10 MiB at 100,000
/// devices (docs/performance.md, session 42).
pub(super) const ROW_GROUP_ROWS: usize = 122_880;
/// …or once its oldest reading has waited this long (or a query waits for it): at
/// ~120 k readings/s (2,000 devices at 64 connections here) a segment fills its row
/// groups first; a slower fleet's, short of a row group, goes through the
/// write-ahead log as before.
pub(super) const LIVE_SEAL_AGE: Duration = Duration::from_secs(2);
/// …a bulk segment once no bulk group came for this long…
pub(super) const SEAL_AGE: Duration = Duration::from_millis(500);
/// …or, while its groups keep coming, once its oldest reading has waited this long.
pub(super) const BULK_SEAL_AGE: Duration = Duration::from_secs(5);
/// How often an idle writer looks at its segment's age.
pub(super) const TICK: Duration = Duration::from_millis(100);

/// A closed log segment's readings on their way into DuckDB.
pub(super) struct Sealed {
    /// Its records, shared with readers until DuckDB holds them.
    pub(super) records: Vec<Arc<Logged>>,
    pub(super) devices: Vec<(DeviceId, Device)>,
    /// Which key brought in which of `devices` (not in the log: lost in a crash).
    pub(super) owners: Vec<(DeviceId, u64)>,
    /// Sequence number of the segment's last record.
    pub(super) through: u64,
    /// The segment file, reused or deleted once DuckDB holds it; `None` when the part holds no
    /// log record (only series rows).
    pub(super) segment: Option<PathBuf>,
    /// Idle devices' series statistics to write to the `series` table in the same
    /// transaction (then they leave memory, see [`crate::store::series`]).
    pub(super) spill: SpillBatch,
}

/// Readings acknowledged into the current log segment.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) records: Vec<Arc<Logged>>,
    /// Readings in `records`.
    pub(super) rows: usize,
    pub(super) devices: Vec<(DeviceId, Device)>,
    pub(super) owners: Vec<(DeviceId, u64)>,
    pub(super) through: u64,
    /// When the oldest of them was acknowledged.
    pub(super) since: Option<Instant>,
    /// When the newest group larger than [`SMALL_GROUP_ROWS`] (a bulk group) among
    /// them was acknowledged; `None` if none is.
    last_bulk: Option<Instant>,
    /// See [`Sealed::spill`].
    pub(super) spill: SpillBatch,
}

impl Pending {
    pub(super) fn add(
        &mut self,
        record: Arc<Logged>,
        devices: &[(DeviceId, Device)],
        owners: &[(DeviceId, u64)],
    ) {
        let rows = record.rows.len();
        let now = Instant::now();
        self.rows += rows;
        if rows > SMALL_GROUP_ROWS {
            self.last_bulk = Some(now);
        }
        self.through = record.seq;
        self.records.push(record);
        self.devices.extend_from_slice(devices);
        self.owners.extend_from_slice(owners);
        self.since.get_or_insert(now);
    }

    /// Whether a bulk group is among its readings.
    pub(super) fn bulk(&self) -> bool {
        self.last_bulk.is_some()
    }

    /// Whether the segment has waited long enough for the flusher: [`LIVE_SEAL_AGE`]
    /// since its oldest reading, or for a bulk segment [`SEAL_AGE`] since its newest bulk group
    /// (and at most [`BULK_SEAL_AGE`] since its oldest reading). While an import's
    /// groups keep coming, its segment fills up to its row groups even when the
    /// front waits for the apply lag meanwhile (up to a second); sealed by the age
    /// of its oldest reading, it went to DuckDB short of a row group. A live fleet's
    /// small groups beside it do not hold it open.
    pub(super) fn aged(&self) -> bool {
        let waited = |t: Option<Instant>, age| t.is_some_and(|t| t.elapsed() >= age);
        if self.bulk() {
            waited(self.last_bulk, SEAL_AGE) || waited(self.since, BULK_SEAL_AGE)
        } else {
            waited(self.since, LIVE_SEAL_AGE)
        }
    }

    /// Whether the segment holds enough readings to be handed to the flusher.
    ///
    /// Its last row group must be at least half full: DuckDB's
    /// checkpoint merges runs of row groups that fit in fewer ("vacuum"), so
    /// transactions of 130,000 rows (a full row group and 7,120 rows) had their rows
    /// compressed and written again at every checkpoint — 22 % of the flusher's time.
    /// A live fleet's segments (groups of ~100 readings) are therefore handed over
    /// at 1.5 row groups.
    pub(super) fn full(&self) -> bool {
        let last = self.rows % ROW_GROUP_ROWS;
        self.rows >= 3 * ROW_GROUP_ROWS
            || (self.rows >= ROW_GROUP_ROWS && (last == 0 || last >= ROW_GROUP_ROWS / 2))
    }

    pub(super) fn take(&mut self, segment: Option<PathBuf>) -> Sealed {
        let sealed = Sealed {
            records: std::mem::take(&mut self.records),
            devices: std::mem::take(&mut self.devices),
            owners: std::mem::take(&mut self.owners),
            through: self.through,
            segment,
            spill: std::mem::take(&mut self.spill),
        };
        self.rows = 0;
        self.since = None;
        self.last_bulk = None;
        sealed
    }
}

/// Sealed segments waiting for the flusher, oldest first.
#[derive(Default)]
pub(super) struct Queue {
    pub(super) parts: Mutex<QueueState>,
    pub(super) changed: Condvar,
    /// Where applied segment files go for reuse.
    pub(super) spares: ingest_log::Spares,
}

#[derive(Default)]
pub(super) struct QueueState {
    pub(super) parts: VecDeque<Sealed>,
    pub(super) stop: bool,
    /// The front left work that the flusher does a step at a time (see
    /// [`Db::stepping`]), to start even if no segment follows.
    pub(super) steps: bool,
}

impl Queue {
    pub(super) fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn push(&self, part: Sealed) {
        self.lock().parts.push_back(part);
        self.changed.notify_all();
    }

    /// Has the flusher look at the database's step-wise work (see [`QueueState::steps`]).
    pub(super) fn wake_for_steps(&self) {
        self.lock().steps = true;
        self.changed.notify_all();
    }
}

/// A sealed part's readings as DuckDB takes them: one batch sorted by series and
/// time, and its rollup partials of the slots before the live ones.
pub(super) struct Prepared {
    pub(super) batch: RecordBatch,
    pub(super) partials: Partials,
    /// The live slots' start when it was prepared: `partials` leaves out the rows at
    /// and after it (see [`Partials::of_sorted_below`]).
    pub(super) partials_below: i64,
}

impl Prepared {
    fn of(records: &[Arc<Logged>], live_from: i64) -> Result<Self, StoreError> {
        let batch = columns::sorted_batch(records.iter().map(|r| &r.rows))?;
        let partials = Partials::of_sorted_below(&batch, live_from)?;
        Ok(Self {
            batch,
            partials,
            partials_below: live_from,
        })
    }

    /// Its partials of every slot before `below`: computed again when the live
    /// slots moved on since it was prepared (once a quarter hour at most).
    pub(super) fn partials_below(&mut self, below: i64) -> Result<(), StoreError> {
        if self.partials_below < below {
            self.partials = Partials::of_sorted_below(&self.batch, below)?;
            self.partials_below = below;
        }
        Ok(())
    }
}

/// The next queued part, prepared on a thread of its own while DuckDB takes the
/// current one: sorting a part and computing its partials was a fifth of the
/// flusher's time during a bulk import, and the flusher is the stage every reading
/// passes alone (see [`flush_queued`]).
#[derive(Default)]
pub(super) struct Ahead(Option<(u64, JoinHandle<Result<Prepared, StoreError>>)>);

impl Ahead {
    /// Only parts at least this large are prepared ahead: a live fleet's segments
    /// rarely queue behind each other, and a thread is not worth a small one.
    const MIN_ROWS: usize = 16 * 1024;

    /// The part ending at `through` (`records`) prepared: by the thread if it
    /// prepared that part, here otherwise. `through` names a part that has records
    /// (the only ones prepared ahead): it is the sequence number of its last one.
    /// `live_from` is where the live slots start now.
    fn take(
        &mut self,
        through: u64,
        records: &[Arc<Logged>],
        live_from: i64,
    ) -> Result<Prepared, StoreError> {
        if let Some((ahead, thread)) = self.0.take() {
            let prepared = thread.join().unwrap_or_else(|_| {
                Err(StoreError::Internal(
                    "preparing a log segment panicked".into(),
                ))
            });
            if ahead == through {
                return prepared;
            }
        }
        Prepared::of(records, live_from)
    }

    /// Starts preparing `next` (a queued part's last sequence number and records),
    /// the live slots starting at `live_from`.
    fn start(&mut self, next: Option<(u64, Vec<Arc<Logged>>)>, live_from: i64) {
        let Some((through, records)) = next else {
            return;
        };
        if records.iter().map(|r| r.rows.len()).sum::<usize>() < Self::MIN_ROWS {
            return;
        }
        let span = tracing::debug_span!("log_prepare", through);
        let thread = std::thread::Builder::new()
            .name("milepost-prep".into())
            .spawn(move || span.in_scope(|| Prepared::of(&records, live_from)));
        // No thread (out of resources): the flusher prepares the part itself.
        self.0 = thread.ok().map(|t| (through, t));
    }
}

/// Moves every queued part into DuckDB, oldest first. Called with the database
/// locked, by the flusher or by the front before it uses the database itself; a part
/// that fails goes back to the head of the queue.
pub(super) fn flush_queued(db: &mut Db, queue: &Queue) -> Result<(), StoreError> {
    loop {
        let (part, next) = {
            let mut q = queue.lock();
            let Some(part) = q.parts.pop_front() else {
                return Ok(());
            };
            let next = q.parts.front().map(|p| (p.through, p.records.clone()));
            (part, next)
        };
        let live_from = db.live_from();
        let rows = db.ahead.take(part.through, &part.records, live_from);
        db.ahead.start(next, live_from);
        if let Err(e) = rows.and_then(|rows| db.flush(&part, rows)) {
            queue.lock().parts.push_front(part);
            return Err(e);
        }
        if let Some(segment) = &part.segment {
            queue.spares.recycle(segment);
        }
        db.shared.flushed(part.through);
    }
}

/// The flusher thread: moves sealed segments into DuckDB while the front goes on
/// acknowledging new ones (a DuckDB transaction of 30 k readings takes 20–40 ms here;
/// done on the front, every request behind it waited that long).
///
/// When a quarter hour has ended, it also computes its rollups a range of devices at a
/// time, applying everything queued between two ranges and releasing the database
/// between them: in one go (148 M readings, 21 ranges at 64 MB: ~10 s), the log's
/// unapplied readings grew to a million and the server's memory by 90 MiB. After a
/// retention it brings the series rows of devices on disk up to date the same way.
pub(super) fn flusher(db: Arc<Mutex<Db>>, queue: Arc<Queue>) {
    let mut failures = Persisting::default();
    // Work an earlier run left (today's readings to sort) starts without waiting for
    // the first segment.
    let mut stepping = db.lock().unwrap_or_else(|p| p.into_inner()).stepping();
    loop {
        {
            let mut q = queue.lock();
            while q.parts.is_empty() && !q.stop && !stepping && !q.steps {
                q = queue.changed.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            q.steps = false;
            if q.parts.is_empty() && q.stop {
                return;
            }
        }
        let mut db = db.lock().unwrap_or_else(|p| p.into_inner());
        match flush_queued(&mut db, &queue) {
            Ok(()) => {
                failures.succeeded("moving the ingest log into the database");
                db.step();
                stepping = db.stepping();
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::columns::Columns;
    use duckdb::arrow::array::AsArray as _;
    use duckdb::arrow::datatypes::{Int32Type, Int64Type};

    /// Adds groups of `rows` readings until the segment is full; returns its size.
    fn fill(group: usize) -> usize {
        let mut pending = Pending::default();
        for seq in 1.. {
            let mut rows = Columns::default();
            for i in 0..group {
                rows.push_raw(0, 0, 1, 1, i as i64, 0.0);
            }
            let at = Instant::now();
            pending.add(Arc::new(Logged { seq, rows, at }), &[], &[]);
            if pending.full() {
                return pending.rows;
            }
        }
        unreachable!()
    }

    fn records(n: usize, device: i32) -> Vec<Arc<Logged>> {
        let mut rows = Columns::default();
        // Newest first: preparing sorts them.
        for i in (0..n).rev() {
            rows.push_raw(0, 0, device, 1, i as i64, i as f64);
        }
        vec![Arc::new(Logged {
            seq: 1,
            rows,
            at: Instant::now(),
        })]
    }

    #[test]
    fn a_part_prepared_before_the_live_slots_moved_gets_their_partials() {
        // Readings in the quarter hour from 0: live when prepared, no partials…
        let mut p = Prepared::of(&records(10, 1), 0).unwrap();
        assert_eq!(p.partials.len(), 0);
        p.partials_below(0).unwrap();
        assert_eq!(p.partials.len(), 0, "the same live slots: nothing to do");
        // …but that quarter hour ended before the flush: its partial is written.
        p.partials_below(900_000).unwrap();
        assert_eq!(p.partials.len(), 1);
    }

    #[test]
    fn a_part_prepared_ahead_is_used_only_for_that_part() {
        let n = Ahead::MIN_ROWS;
        let (first, second) = (records(n, 1), records(n + 1, 2));
        let devices = |p: &Prepared| {
            let c = p.batch.column(0).as_primitive::<Int32Type>();
            (c.len(), c.value(0))
        };
        let mut ahead = Ahead::default();
        // Prepared ahead: the second part (through 2). The front then flushed the
        // queue itself, so the flusher next takes part 1: prepared here instead.
        ahead.start(Some((2, second.clone())), i64::MAX);
        let p = ahead.take(1, &first, i64::MAX).unwrap();
        assert_eq!(devices(&p), (n, 1));
        ahead.start(Some((2, second.clone())), i64::MAX);
        let p = ahead.take(2, &second, i64::MAX).unwrap();
        assert_eq!(devices(&p), (n + 1, 2));
        let ts = p.batch.column(2).as_primitive::<Int64Type>();
        assert!(
            ts.values().windows(2).all(|w| w[0] <= w[1]),
            "sorted by time"
        );
        // Small parts are not worth a thread.
        ahead.start(Some((3, records(10, 3))), i64::MAX);
        assert!(ahead.0.is_none());
    }

    #[test]
    fn a_segment_ends_with_its_last_row_group_at_least_half_full() {
        // A live fleet's groups: one and a half row groups.
        assert_eq!(fill(100), 184_400);
        assert_eq!(fill(96), ROW_GROUP_ROWS, "exactly a row group");
        assert_eq!(fill(1_000), 185_000);
        // 10,000-line requests: not at 130,000 (a row group and 7,120 rows, which
        // DuckDB's checkpoint would merge and rewrite) but at 190,000.
        assert_eq!(fill(10_000), 190_000);
        assert_eq!(fill(40_000), 200_000);
        assert_eq!(fill(ROW_GROUP_ROWS), ROW_GROUP_ROWS);
        // Never more than three row groups and a group.
        assert_eq!(fill(250_000), 500_000);
    }

    #[test]
    fn a_bulk_segment_is_sealed_by_age_once_its_groups_stop_coming() {
        let ago = |ms| Instant::now() - Duration::from_millis(ms);
        let live = |ms| Pending {
            since: Some(ago(ms)),
            ..Pending::default()
        };
        assert!(!live(600).aged(), "a live segment fills its row groups…");
        assert!(live(2_100).aged(), "…for at most 2 s");
        let importing = Pending {
            since: Some(ago(2_000)),
            last_bulk: Some(ago(10)),
            ..Pending::default()
        };
        assert!(!importing.aged(), "an import's next group came 10 ms ago");
        let paused = Pending {
            last_bulk: Some(ago(600)),
            ..importing
        };
        assert!(paused.aged(), "no bulk group for 500 ms");
        let trickling = Pending {
            since: Some(ago(5_100)),
            last_bulk: Some(ago(10)),
            ..Pending::default()
        };
        assert!(trickling.aged(), "at most 5 s after its oldest reading");
        let mut fleet_beside = Pending::default();
        fleet_beside.add(records(5_000, 1).pop().unwrap(), &[], &[]);
        fleet_beside.last_bulk = Some(ago(600));
        fleet_beside.add(records(10, 2).pop().unwrap(), &[], &[]);
        assert!(
            fleet_beside.aged(),
            "a live group does not hold a bulk segment open"
        );
    }
}
