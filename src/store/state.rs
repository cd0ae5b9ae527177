//! The small, hot part of the database mirrored in memory: sensor catalog, device ids
//! and per-series statistics. The writer updates it right after each commit, so
//! "latest" answers never touch DuckDB.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use super::columns::Columns;
use super::live::{LiveSlots, slot_after};
use super::names::DeviceNames;
use super::owners::Owners;
use super::series::{DiskTotals, Held, SeriesMap, SpillBatch};
use crate::domain::{Catalog, Device, DeviceId, SensorId, Timestamp};

/// A series and its statistics.
pub type SeriesEntry = ((DeviceId, SensorId), SeriesStats);

/// Count, span and newest value of one (device, sensor) series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeriesStats {
    /// Stored readings.
    pub readings: u64,
    /// Oldest timestamp.
    pub first: Timestamp,
    /// Newest timestamp.
    pub last: Timestamp,
    /// Value at `last`.
    pub last_value: f64,
}

impl SeriesStats {
    /// Folds newly stored readings summarised by `new` into these statistics.
    pub fn merge(&mut self, new: &SeriesStats) {
        self.readings += new.readings;
        self.first = self.first.min(new.first);
        if new.last > self.last {
            self.last = new.last;
            self.last_value = new.last_value;
        }
    }
}

/// Shared view of the small tables. Cheap reads, written only by the writer.
pub struct Shared {
    catalog: RwLock<Arc<Catalog>>,
    /// Held over a whole catalog change (read, write to the database, publish), so
    /// two operators' changes at once never publish a snapshot without the other's
    /// sensor, nor pick the same id.
    catalog_update: Mutex<()>,
    devices: RwLock<DeviceNames>,
    /// Per device (indexed by id), its series ordered by sensor: a device's
    /// statistics are one lookup (the dashboard asks for them every few seconds),
    /// and a device costs only what it sent (a 16-byte slot and 40 bytes a series).
    /// Idle devices' statistics go to the `series` table within a budget (see
    /// [`super::series`]).
    series: RwLock<SeriesMap>,
    /// Devices whose rows the flusher committed to the `series` table, for the
    /// front to take out of memory between groups (see [`super::series`]).
    spilled: Mutex<Vec<SpillBatch>>,
    /// Rollup slots from this one (ms) on are live: their rollups are written when
    /// they end (see `rollup`); readers take them from `readings`. Starts at the
    /// earliest instant — everything raw — until the writer has started.
    rollups_from: AtomicI64,
    /// How far DuckDB has caught up with the ingest log.
    visible: Visibility,
    /// The readings of every log record DuckDB may not hold yet, oldest first, and
    /// how many readings they hold.
    unapplied: Mutex<(VecDeque<Arc<Logged>>, u64)>,
    /// The live quarter hours of every series, from acknowledgement on.
    pub(super) live: LiveSlots,
    /// Which key brought in each device.
    owners: RwLock<Owners>,
}

/// The readings of one ingest log record (one group commit), kept in memory from its
/// acknowledgement until DuckDB holds them, so that queries can add them to what
/// DuckDB answers instead of waiting for the flusher (see `Reader`).
pub(super) struct Logged {
    /// The record's sequence number (`meta.ingest_log_through` once applied).
    pub seq: u64,
    /// Its readings (`device`, `sensor`, `ts`, `value` are used).
    pub rows: Columns,
    /// When it was acknowledged.
    pub at: Instant,
}

/// How far DuckDB trails the acknowledged readings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ApplyLag {
    /// Readings acknowledged through the ingest log that DuckDB does not hold yet.
    pub readings: u64,
    /// How long the oldest of them has waited, seconds.
    pub seconds: f64,
}

/// Ingest-log sequence numbers: acknowledged, and held by DuckDB (queries see them).
/// See `ingest_log` for why the two differ.
struct Visibility {
    acked: AtomicU64,
    requested: AtomicU64,
    flushed: Mutex<u64>,
    changed: Condvar,
    /// Wakes the writer to move the log into DuckDB now.
    wake: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// Longest a query waits for the writer to move acknowledged readings into DuckDB
/// before it answers from what DuckDB has (only ever reached if the writer is stuck).
const VISIBLE_WAIT: Duration = Duration::from_secs(30);

impl Shared {
    /// The small tables as loaded at open: `series` holds the statistics memory
    /// starts with; every other device's are on disk, with `disk` their totals.
    pub(super) fn new(
        catalog: Catalog,
        d: DeviceNames,
        series: Vec<SeriesEntry>,
        disk: DiskTotals,
        series_memory: usize,
    ) -> Self {
        let last_device = d.last_id();
        let shared = Self {
            catalog: RwLock::new(Arc::new(catalog)),
            catalog_update: Mutex::new(()),
            devices: RwLock::new(d),
            series: RwLock::new(SeriesMap::default()),
            spilled: Mutex::new(Vec::new()),
            rollups_from: AtomicI64::new(i64::MIN),
            visible: Visibility {
                acked: AtomicU64::new(0),
                requested: AtomicU64::new(0),
                flushed: Mutex::new(0),
                changed: Condvar::new(),
                wake: OnceLock::new(),
            },
            unapplied: Mutex::new((VecDeque::new(), 0)),
            // Nothing stored lies in a slot from here on: the slots can start empty.
            live: LiveSlots::new(slot_after(
                series
                    .iter()
                    .map(|(_, s)| s.last.as_micros().div_euclid(1000))
                    .max()
                    .unwrap_or(i64::MIN)
                    .max(
                        disk.newest
                            .map_or(i64::MIN, |t| t.as_micros().div_euclid(1000)),
                    )
                    .max(chrono::Utc::now().timestamp_millis()),
            )),
            owners: RwLock::new(Owners::default()),
        };
        {
            let mut s = shared.series.write().expect("series lock");
            s.set_limits(series_memory, super::series::DEFAULT_IDLE);
            s.set(&series);
            s.mark_rest_on_disk(last_device, disk);
        }
        shared
    }

    /// Blocks until DuckDB holds every reading acknowledged so far, so that a query
    /// sees everything whose request was answered (read-your-writes). Free when
    /// nothing is waiting in the ingest log; otherwise asks the writer to move it now.
    pub fn await_visible(&self) {
        let v = &self.visible;
        let target = v.acked.load(Ordering::Acquire);
        let flushed = v.flushed.lock().unwrap_or_else(|p| p.into_inner());
        if *flushed >= target {
            return;
        }
        v.requested.fetch_max(target, Ordering::AcqRel);
        if let Some(wake) = v.wake.get() {
            wake();
        }
        let (done, flushed) = self.wait_flushed(flushed, VISIBLE_WAIT, |f| f >= target);
        if !done {
            tracing::warn!(
                target,
                flushed,
                "acknowledged readings are not in the database yet; answering without them"
            );
        }
    }

    /// Blocks until at most `readings` acknowledged readings are not in DuckDB yet,
    /// or `timeout` has passed; returns whether they are.
    pub(super) fn await_apply_lag(&self, readings: u64, timeout: Duration) -> bool {
        let flushed = self
            .visible
            .flushed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.wait_flushed(flushed, timeout, |_| self.apply_lag().readings <= readings)
            .0
    }

    /// Waits on the flusher's commits, at most `timeout`, until `done(flushed)`;
    /// returns whether it is, and the log record DuckDB holds through. [`Self::flushed`]
    /// takes applied records off the unapplied list before it takes this lock to
    /// notify: a condition read under the lock cannot miss a wake-up.
    fn wait_flushed(
        &self,
        mut flushed: MutexGuard<'_, u64>,
        timeout: Duration,
        done: impl Fn(u64) -> bool,
    ) -> (bool, u64) {
        let deadline = Instant::now() + timeout;
        loop {
            if done(*flushed) {
                return (true, *flushed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (false, *flushed);
            }
            flushed = self
                .visible
                .changed
                .wait_timeout(flushed, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The writer's side of [`Self::await_visible`]: how to wake it, and where the
    /// log stands when it starts.
    pub(super) fn start_visibility(&self, through: u64, wake: Box<dyn Fn() + Send + Sync>) {
        let v = &self.visible;
        v.acked.store(through, Ordering::Release);
        *v.flushed.lock().unwrap_or_else(|p| p.into_inner()) = through;
        let _ = v.wake.set(wake);
    }

    /// A log record is durable and about to be answered: queries must see `rows`
    /// from now on. The record is returned for the flusher, which moves these same
    /// readings into DuckDB: one copy in memory, not two.
    pub(super) fn acked(&self, seq: u64, rows: Columns) -> Arc<Logged> {
        let logged = Arc::new(Logged {
            seq,
            rows,
            at: Instant::now(),
        });
        let mut u = self.unapplied.lock().unwrap_or_else(|p| p.into_inner());
        u.1 += logged.rows.len() as u64;
        u.0.push_back(logged.clone());
        drop(u);
        self.visible.acked.store(seq, Ordering::Release);
        logged
    }

    /// DuckDB holds the log through `seq` (committed): waiting queries go on, and
    /// the records' readings leave memory.
    pub(super) fn flushed(&self, seq: u64) {
        {
            let mut u = self.unapplied.lock().unwrap_or_else(|p| p.into_inner());
            while u.0.front().is_some_and(|l| l.seq <= seq) {
                if let Some(l) = u.0.pop_front() {
                    u.1 -= l.rows.len() as u64;
                }
            }
        }
        let v = &self.visible;
        let mut flushed = v.flushed.lock().unwrap_or_else(|p| p.into_inner());
        // A part that only writes series rows carries no newer sequence number.
        *flushed = (*flushed).max(seq);
        drop(flushed);
        v.changed.notify_all();
    }

    /// The log records DuckDB may not hold yet. A record leaves this list only after
    /// DuckDB committed it, so a query that takes the list and then its snapshot sees
    /// every acknowledged reading in one or the other (or both: filter on
    /// `meta.ingest_log_through` of the snapshot).
    pub(super) fn unapplied(&self) -> Vec<Arc<Logged>> {
        let u = self.unapplied.lock().unwrap_or_else(|p| p.into_inner());
        u.0.iter().cloned().collect()
    }

    /// How far DuckDB trails what was acknowledged.
    pub fn apply_lag(&self) -> ApplyLag {
        let u = self.unapplied.lock().unwrap_or_else(|p| p.into_inner());
        ApplyLag {
            readings: u.1,
            seconds: u.0.front().map_or(0.0, |l| l.at.elapsed().as_secs_f64()),
        }
    }

    /// Whether a query waits for readings only the current ingest log segment
    /// holds: the segments sealed through record `sealed` are on their way to
    /// DuckDB already. Sealing again for a request they cover would hand the
    /// flusher a segment per front group while the request waits: with a client
    /// looping queries beside a 2,000-device fleet, the flusher fell behind by the
    /// ingest log's whole cap (1 Mi readings) and the fleet's rate dropped to a
    /// quarter.
    pub(super) fn flush_requested_after(&self, sealed: u64) -> bool {
        let v = &self.visible;
        let requested = v.requested.load(Ordering::Acquire);
        requested > sealed && requested > *v.flushed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last log record acknowledged.
    pub(super) fn acked_through(&self) -> u64 {
        self.visible.acked.load(Ordering::Acquire)
    }

    /// The lock of a catalog change: read the catalog, write, and
    /// [`Shared::set_catalog`] while holding it.
    pub(super) fn catalog_update(&self) -> std::sync::MutexGuard<'_, ()> {
        self.catalog_update
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the sensor catalog (an operator changed it).
    pub(super) fn set_catalog(&self, catalog: Catalog) {
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(catalog);
    }

    /// First rollup slot (ms) readers must not take from `rollups`.
    pub(super) fn rollups_from(&self) -> i64 {
        self.rollups_from.load(Ordering::Acquire)
    }

    /// Published by the writer only after every partial of an earlier slot is
    /// committed, so a reader that sees the new value also sees those rows.
    pub(super) fn set_rollups_from(&self, slot_ms: i64) {
        self.rollups_from.store(slot_ms, Ordering::Release);
    }

    /// The current sensor catalog.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().expect("catalog lock").clone()
    }

    /// Id of a known device.
    pub fn device_id(&self, device: &Device) -> Option<DeviceId> {
        self.devices
            .read()
            .expect("devices lock")
            .id(device.as_str())
    }

    /// Whether a device of this name is known.
    pub fn knows_device(&self, name: &str) -> bool {
        self.devices
            .read()
            .expect("devices lock")
            .id(name)
            .is_some()
    }

    /// Number of known devices.
    pub fn device_count(&self) -> usize {
        self.devices.read().expect("devices lock").len()
    }

    /// Where the ids of new devices start (see `DeviceNames::next_id`).
    pub(super) fn next_device_id(&self) -> DeviceId {
        self.devices.read().expect("devices lock").next_id()
    }

    /// See [`super::ReadStore::rank_devices`]: compared by name in place, under one
    /// lock, and only the ranks asked for are put in order and named.
    pub fn rank_devices(
        &self,
        mut devices: Vec<(i64, DeviceId)>,
        ranks: std::ops::Range<usize>,
    ) -> Vec<(i64, Device)> {
        let d = self.devices.read().expect("devices lock");
        let name = |id: DeviceId| d.name(id).unwrap_or("");
        let order = |a: &(i64, DeviceId), b: &(i64, DeviceId)| {
            b.0.cmp(&a.0).then_with(|| name(a.1).cmp(name(b.1)))
        };
        let end = ranks.end.min(devices.len());
        let start = ranks.start.min(end);
        if start < devices.len() {
            devices.select_nth_unstable_by(start, order);
        }
        let rest = &mut devices[start..];
        if end - start < rest.len() {
            rest.select_nth_unstable_by(end - start, order);
        }
        let page = &mut devices[start..end];
        page.sort_by(order);
        page.iter()
            .filter_map(|&(newest, id)| Some((newest, Device::parse(d.name(id)?).ok()?)))
            .collect()
    }

    /// At most `limit` known devices with their ids, by id, from `start` on.
    pub fn devices_from(&self, start: DeviceId, limit: usize) -> Vec<(DeviceId, Device)> {
        let d = self.devices.read().expect("devices lock");
        d.iter_from(start)
            .filter_map(|(i, n)| Some((i, Device::parse(n).ok()?)))
            .take(limit)
            .collect()
    }

    /// Statistics of every series of `device`, by sensor; `None` when they are on
    /// disk (read the `series` table).
    pub(super) fn series_here(&self, device: DeviceId) -> Option<Vec<(SensorId, SeriesStats)>> {
        match self.series.read().expect("series lock").get(device) {
            Held::Here(of) => Some(of.to_vec()),
            Held::OnDisk => None,
        }
    }

    /// Statistics of one series of a resident device (`None` for a device on disk).
    pub(super) fn series(&self, device: DeviceId, sensor: SensorId) -> Option<SeriesStats> {
        match self.series.read().expect("series lock").get(device) {
            Held::Here(of) => of.iter().find(|(id, _)| *id == sensor).map(|(_, st)| *st),
            Held::OnDisk => None,
        }
    }

    /// Those of these devices whose statistics are on disk, each once.
    pub(super) fn on_disk_among(&self, devices: impl Iterator<Item = DeviceId>) -> Vec<DeviceId> {
        let s = self.series.read().expect("series lock");
        if s.devices_on_disk() == 0 {
            return Vec::new();
        }
        let mut ids: Vec<DeviceId> = devices.filter(|id| s.is_on_disk(*id)).collect();
        ids.sort_unstable_by_key(|d| d.0);
        ids.dedup();
        ids
    }

    /// Whether `device`'s statistics are on disk.
    pub(super) fn series_on_disk(&self, device: DeviceId) -> bool {
        self.series.read().expect("series lock").is_on_disk(device)
    }

    /// Devices, readings and newest reading over every series (see
    /// [`super::ReadStore::totals`]).
    pub fn totals(&self) -> super::Totals {
        let devices = self.device_count();
        let (live_devices, live_bytes) = self.live.usage();
        let s = self.series.read().expect("series lock");
        let (readings, newest, series_devices_on_disk) = s.totals();
        super::Totals {
            devices,
            readings,
            newest,
            live_devices,
            live_bytes,
            series_bytes: s.bytes(),
            series_devices_on_disk,
        }
    }

    /// Every device whose series statistics are in memory.
    pub(super) fn resident_series_devices(&self) -> Vec<DeviceId> {
        let s = self.series.read().expect("series lock");
        s.resident().map(|(d, _)| d).collect()
    }

    /// Writes every resident device's statistics to the `series` table (inside the
    /// caller's transaction; at shutdown).
    pub(super) fn write_resident_series(
        &self,
        conn: &duckdb::Connection,
    ) -> Result<(), super::StoreError> {
        let s = self.series.read().expect("series lock");
        super::series::write_devices(conn, s.resident().map(|(d, of)| (d, of.iter().copied())))
    }

    /// Sets how long a device must be idle before its statistics may go to disk
    /// (`--series-idle`).
    pub(super) fn set_series_idle(&self, idle: Duration) {
        self.series.write().expect("series lock").set_idle(idle);
    }

    /// Devices on disk come back into memory with their rows (the front, before it
    /// classifies their readings).
    pub(super) fn restore_series(&self, devices: &[DeviceId], rows: &[SeriesEntry]) {
        self.series
            .write()
            .expect("series lock")
            .restore(devices, rows);
    }

    /// Copies of idle devices' statistics to write to the table, when memory is
    /// over its budget.
    pub(super) fn pick_idle_series(&self) -> SpillBatch {
        self.series.read().expect("series lock").pick_idle()
    }

    /// Whether the series statistics in memory are over their ceiling.
    pub(super) fn series_over_ceiling(&self) -> bool {
        self.series.read().expect("series lock").over_ceiling()
    }

    /// The flusher committed these devices' rows.
    pub(super) fn series_written(&self, devices: SpillBatch) {
        self.spilled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(devices);
    }

    /// The front, between groups: devices whose rows were committed and whose
    /// statistics did not change since leave memory. Returns whether any batch was
    /// taken.
    pub(super) fn take_written_series(&self) -> bool {
        let done = std::mem::take(&mut *self.spilled.lock().unwrap_or_else(|p| p.into_inner()));
        if done.is_empty() {
            return false;
        }
        let mut s = self.series.write().expect("series lock");
        for batch in &done {
            s.written(batch);
        }
        true
    }

    /// Retention deleted `readings` of devices on disk; `newest` is the table's
    /// newest reading now.
    pub(super) fn disk_series_changed(&self, readings: u64, newest: Option<Timestamp>) {
        self.series
            .write()
            .expect("series lock")
            .disk_changed(readings, newest);
    }

    pub(super) fn add_devices(&self, new: &[(DeviceId, Device)]) {
        if new.is_empty() {
            return;
        }
        let mut d = self.devices.write().expect("devices lock");
        for (id, name) in new {
            d.insert(*id, name);
        }
    }

    /// Records which key brought in each of these devices (`(device, key id)`).
    pub(super) fn add_owners(&self, owners: &[(DeviceId, u64)]) {
        if owners.is_empty() {
            return;
        }
        let mut o = self.owners.write().unwrap_or_else(|p| p.into_inner());
        for (device, key) in owners {
            o.set(*device, *key);
        }
    }

    /// Devices the key with this id brought in that still exist.
    pub fn devices_of_key(&self, key: u64) -> u64 {
        self.owners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .count(key)
    }

    /// Forgets a deleted device: its name, the statistics of its series and its live
    /// slots.
    pub(super) fn forget_device(&self, id: DeviceId) {
        self.devices.write().expect("devices lock").remove(id);
        self.series.write().expect("series lock").forget(id);
        self.live.forget_device(id);
        self.owners
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Forgets series whose readings were all deleted (retention).
    pub(super) fn remove_series(&self, gone: &[(DeviceId, SensorId)]) {
        if gone.is_empty() {
            return;
        }
        self.series.write().expect("series lock").remove(gone);
    }

    /// Sets the statistics of these series of resident devices.
    pub(super) fn set_series(&self, updated: &[SeriesEntry]) {
        if updated.is_empty() {
            return;
        }
        self.series.write().expect("series lock").set(updated);
    }
}
