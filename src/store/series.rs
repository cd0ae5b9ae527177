//! Per-series statistics (count, first, last, newest value) of every device, held in
//! memory for the devices that are active and in the `series` table for the rest.
//!
//! Every device ever seen used to keep its statistics in memory: ~270 bytes a device
//! with six sensors, 228 MB of a 594 MiB server after a million devices (heaptrack,
//! issue 23). Now memory holds them within a budget (`--series-memory`); when it is
//! exceeded, the devices idle longest (at least `--series-idle`) are written to the
//! `series` table and leave memory ("on disk"); past twice the budget, the least
//! recently active ones too, idle or not (a burst of new devices). A device on disk comes back in one
//! query when it sends again, before its readings are classified, so deduplication
//! and the statistics stay exact; readers of a device on disk read its row.
//!
//! The protocol keeps one copy authoritative at every moment:
//! - memory for a resident device (its table row, if any, is stale and ignored);
//! - the table for a device on disk (memory holds one bit for it).
//!
//! A device leaves memory only after the flusher committed its row, and only if its
//! statistics did not change meanwhile (the front compares them, between groups); it
//! comes back before anything uses them. Totals over devices on disk (readings,
//! newest) are kept beside, so `/metrics` never scans the table.
//!
//! After a crash the whole table is recomputed from `readings` (one scan, as before),
//! so the table never needs to be in step with the readings' transactions.

use std::time::{Duration, Instant};

use duckdb::Connection;
use duckdb::types::{TimeUnit, Value};
use rustc_hash::FxHashMap;

use super::StoreError;
use super::state::{SeriesEntry, SeriesStats};
use crate::domain::{DeviceId, SensorId, Timestamp};

/// Default for `--series-memory`: ~116,000 devices with six sensors, so a fleet of
/// 100,000 streaming devices never touches the table.
pub const DEFAULT_BUDGET: usize = 32 << 20;
/// Default for `--series-idle`: longer than devices usually wait between reports,
/// so that a fleet larger than the budget does not move its statistics to disk and
/// back with every report (bringing a device back costs a query: 5–15 ms with a
/// million devices' rows).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);

/// How far over the budget devices that sent within `--series-idle` keep their
/// statistics in memory; beyond it the least recently active go to the table too, so
/// memory stays bounded however many devices appear at once (a burst of a million
/// new devices held ~270 MB here before any was idle for 5 minutes). A fleet that
/// streams steadily within it never moves to disk and back.
pub const CEILING: usize = 2;

/// Most memory one batch of devices moved to the table frees (~30,000 devices of
/// six sensors): the front copies them and later takes them out between groups, so
/// a batch's size is a pause of ingest (~4 ms for this many).
const SPILL_BATCH: usize = 8 << 20;

/// Memory one series takes in a device's slice (sensor id and statistics, aligned).
const SERIES_BYTES: usize = std::mem::size_of::<(SensorId, SeriesStats)>();
/// Memory per resident device besides its series: the allocator's overhead for its
/// slice (glibc: 16 bytes a chunk), its entry in the map and the entry's control byte.
const DEVICE_BYTES: usize = 16 + std::mem::size_of::<(u32, Resident)>() + 1;

/// Memory a resident device with these series takes, as the budget counts it.
fn device_bytes(series: &[(SensorId, SeriesStats)]) -> usize {
    series.len() * SERIES_BYTES + DEVICE_BYTES
}

/// One device's series and their statistics, ordered by sensor.
pub(super) type DeviceSeries = Box<[(SensorId, SeriesStats)]>;

/// Copies of devices' statistics on their way to the table: one flat vector, not a
/// box per device (copying 30,000 devices' boxes took the front ~9 ms).
#[derive(Debug, Clone, Default)]
pub(super) struct SpillBatch {
    /// Each device and where its series end in `series`.
    devices: Vec<(DeviceId, u32)>,
    series: Vec<(SensorId, SeriesStats)>,
}

impl SpillBatch {
    /// Room for devices taking `bytes` as the budget counts them: each device takes
    /// at least one series and its [`DEVICE_BYTES`], so this is enough, and the
    /// batch (up to [`SPILL_BATCH`]) is not grown by doubling, old and new alive.
    fn with_capacity(bytes: usize) -> Self {
        Self {
            devices: Vec::with_capacity(bytes / (SERIES_BYTES + DEVICE_BYTES)),
            series: Vec::with_capacity(bytes / SERIES_BYTES),
        }
    }

    fn push(&mut self, device: DeviceId, of: &[(SensorId, SeriesStats)]) {
        self.series.extend_from_slice(of);
        self.devices.push((device, self.series.len() as u32));
    }

    /// Whether it holds no device.
    pub(super) fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Devices it holds.
    pub(super) fn len(&self) -> usize {
        self.devices.len()
    }

    /// Each device and its series.
    pub(super) fn iter(&self) -> impl Iterator<Item = (DeviceId, &[(SensorId, SeriesStats)])> {
        let mut start = 0;
        self.devices.iter().map(move |&(device, end)| {
            let of = &self.series[start as usize..end as usize];
            start = end;
            (device, of)
        })
    }
}

/// What memory holds of a device's statistics.
pub(super) enum Held<'a> {
    /// These (empty: the device has no readings).
    Here(&'a [(SensorId, SeriesStats)]),
    /// Nothing: they are in the `series` table.
    OnDisk,
}

/// Totals over the devices whose statistics are on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct DiskTotals {
    /// Readings of their series.
    pub readings: u64,
    /// Newest `last` in the whole table (rows of resident devices are never newer
    /// than their memory, so the maximum with memory's is exact).
    pub newest: Option<Timestamp>,
}

/// A resident device: its series and when it last stored readings.
struct Resident {
    /// Seconds since [`SeriesMap::epoch`].
    active: u32,
    /// Never empty.
    series: DeviceSeries,
}

/// See the module docs.
pub(super) struct SeriesMap {
    /// The statistics of resident devices, by id. A device on disk costs only its bit
    /// in `on_disk` (a vector indexed by id cost 20 bytes for each of them).
    resident: FxHashMap<u32, Resident>,
    /// A bit per device id: its statistics are in the table, not in `resident`.
    on_disk: Vec<u64>,
    epoch: Instant,
    resident_series: usize,
    devices_on_disk: usize,
    disk: DiskTotals,
    budget: usize,
    idle_secs: u32,
}

impl Default for SeriesMap {
    fn default() -> Self {
        Self {
            resident: FxHashMap::default(),
            on_disk: Vec::new(),
            epoch: Instant::now(),
            resident_series: 0,
            devices_on_disk: 0,
            disk: DiskTotals::default(),
            budget: DEFAULT_BUDGET,
            idle_secs: DEFAULT_IDLE.as_secs() as u32,
        }
    }
}

impl SeriesMap {
    /// Sets the budget and idle time (`--series-memory`, `--series-idle`).
    pub(super) fn set_limits(&mut self, budget: usize, idle: Duration) {
        self.budget = budget;
        self.set_idle(idle);
    }

    /// Sets the idle time (`--series-idle`).
    pub(super) fn set_idle(&mut self, idle: Duration) {
        self.idle_secs = u32::try_from(idle.as_secs()).unwrap_or(u32::MAX);
    }

    /// Devices `0..=last` without statistics in memory are on disk, with `disk`
    /// their totals (at open).
    pub(super) fn mark_rest_on_disk(&mut self, last: Option<DeviceId>, disk: DiskTotals) {
        let Some(last) = last else { return };
        for id in 0..=last.0 {
            if !self.resident.contains_key(&id) {
                self.set_bit(id as usize, true);
            }
        }
        self.disk = disk;
    }

    fn bit(&self, i: usize) -> bool {
        self.on_disk
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set_bit(&mut self, i: usize, on: bool) {
        if self.bit(i) == on {
            return;
        }
        if self.on_disk.len() <= i / 64 {
            self.on_disk.resize(i / 64 + 1, 0);
        }
        let w = &mut self.on_disk[i / 64];
        if on {
            *w |= 1 << (i % 64);
            self.devices_on_disk += 1;
        } else {
            *w &= !(1 << (i % 64));
            self.devices_on_disk -= 1;
        }
    }

    /// What memory holds of `device`.
    pub(super) fn get(&self, device: DeviceId) -> Held<'_> {
        if self.bit(device.0 as usize) {
            return Held::OnDisk;
        }
        Held::Here(self.resident.get(&device.0).map_or(&[], |r| &r.series[..]))
    }

    /// How many devices' statistics are on disk.
    pub(super) fn devices_on_disk(&self) -> usize {
        self.devices_on_disk
    }

    /// Whether `device`'s statistics are on disk.
    pub(super) fn is_on_disk(&self, device: DeviceId) -> bool {
        self.bit(device.0 as usize)
    }

    fn now_secs(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// Replaces a device's series (`None` or empty: it has none in memory).
    fn replace(&mut self, id: u32, new: Option<DeviceSeries>, active: u32) {
        let new = new.filter(|s| !s.is_empty());
        self.resident_series += new.as_ref().map_or(0, |s| s.len());
        let old = match new {
            Some(series) => self.resident.insert(id, Resident { active, series }),
            None => self.resident.remove(&id),
        };
        self.resident_series -= old.map_or(0, |r| r.series.len());
    }

    /// Sets the statistics of these series of resident devices (the writer, after a
    /// commit; retention).
    ///
    /// A device's entries are taken together (the writer gives them one after
    /// another), so a device whose sensors are new gets one slice of exactly their
    /// number: growing it one sensor at a time allocated and freed five slices for
    /// each new device of six sensors (11 M calls to the allocator in a burst of a
    /// million new devices, heaptrack).
    pub(super) fn set(&mut self, updated: &[SeriesEntry]) {
        let now = self.now_secs();
        for run in updated.chunk_by(|a, b| a.0.0 == b.0.0) {
            let device = run[0].0.0;
            debug_assert!(
                !self.bit(device.0 as usize),
                "statistics set for a device on disk"
            );
            let (held, new): (&[(SensorId, SeriesStats)], usize) =
                match self.resident.get_mut(&device.0) {
                    Some(r) => {
                        r.active = now;
                        let mut new = 0;
                        for ((_, sensor), stats) in run {
                            match r.series.binary_search_by_key(sensor, |(id, _)| *id) {
                                Ok(j) => r.series[j].1 = *stats,
                                Err(_) => new += 1,
                            }
                        }
                        if new == 0 {
                            continue;
                        }
                        (&r.series, new)
                    }
                    None => (&[], run.len()),
                };
            // A device's sensors arrive a few at a time: no spare room kept.
            let mut v = Vec::with_capacity(held.len() + new);
            v.extend_from_slice(held);
            for ((_, sensor), stats) in run {
                match v.binary_search_by_key(sensor, |(id, _)| *id) {
                    Ok(j) => v[j].1 = *stats,
                    Err(j) => v.insert(j, (*sensor, *stats)),
                }
            }
            self.replace(device.0, Some(v.into_boxed_slice()), now);
        }
    }

    /// Drops these series of resident devices (all their readings were deleted).
    pub(super) fn remove(&mut self, gone: &[(DeviceId, SensorId)]) {
        for (device, sensor) in gone {
            if let Some(r) = self.resident.get(&device.0)
                && r.series.iter().any(|(id, _)| id == sensor)
            {
                let kept: DeviceSeries = r
                    .series
                    .iter()
                    .filter(|(id, _)| id != sensor)
                    .copied()
                    .collect();
                let active = r.active;
                self.replace(device.0, Some(kept), active);
            }
        }
    }

    /// Forgets a deleted device (resident: the writer brings it back first).
    pub(super) fn forget(&mut self, device: DeviceId) {
        self.replace(device.0, None, 0);
        self.set_bit(device.0 as usize, false);
    }

    /// Devices on disk come back with the statistics read from their rows (`rows`
    /// holds every row of every device in `devices`).
    pub(super) fn restore(&mut self, devices: &[DeviceId], rows: &[SeriesEntry]) {
        let now = self.now_secs();
        for &d in devices {
            if !self.bit(d.0 as usize) {
                continue;
            }
            let of: DeviceSeries = rows
                .iter()
                .filter(|((dev, _), _)| *dev == d)
                .map(|((_, sensor), s)| (*sensor, *s))
                .collect();
            let readings: u64 = of.iter().map(|(_, s)| s.readings).sum();
            self.disk.readings = self.disk.readings.saturating_sub(readings);
            self.set_bit(d.0 as usize, false);
            self.replace(d.0, Some(of), now);
        }
    }

    /// Memory the resident statistics take, as the budget counts it: the series and
    /// [`DEVICE_BYTES`] per device (the map's spare room, at most as much again as
    /// its entries, is not counted).
    pub(super) fn bytes(&self) -> usize {
        self.resident_series * SERIES_BYTES + self.resident.len() * DEVICE_BYTES
    }

    /// When memory is over budget: copies of the statistics of the devices idle
    /// longest (at least the idle time), enough to bring it to three quarters of the
    /// budget, to be written to the table; over the ceiling ([`CEILING`] times the
    /// budget), also the least recently active of the others, enough to bring it to
    /// three quarters of the ceiling. At most [`SPILL_BATCH`] bytes' worth at once.
    /// They stay in memory until [`Self::written`].
    ///
    /// The front calls this between groups, so it takes one pass to count bytes per
    /// second of last activity and one to collect, not a sort: sorting 250,000
    /// devices by activity held ingest for 27 ms.
    pub(super) fn pick_idle(&self) -> SpillBatch {
        let bytes = self.bytes();
        if bytes <= self.budget {
            return SpillBatch::default();
        }
        let now = self.now_secs();
        let ceiling = self.budget.saturating_mul(CEILING);
        let over_ceiling = bytes > ceiling;
        let candidate =
            |r: &Resident| over_ceiling || now.saturating_sub(r.active) >= self.idle_secs;
        let mut per_second: FxHashMap<u32, usize> = FxHashMap::default();
        for r in self.resident.values().filter(|r| candidate(r)) {
            *per_second.entry(r.active).or_default() += device_bytes(&r.series);
        }
        let mut per_second: Vec<(u32, usize)> = per_second.into_iter().collect();
        per_second.sort_unstable();
        // Devices active before `cutoff` go, and of those active at `cutoff`, as
        // many as `at_cutoff` bytes take.
        let (mut left, mut taken) = (bytes, 0);
        let (mut cutoff, mut at_cutoff) = (0, 0);
        for (second, here) in per_second {
            let idle = now.saturating_sub(second) >= self.idle_secs;
            let goal = if idle { self.budget } else { ceiling } / 4 * 3;
            let take = left.saturating_sub(goal).min(SPILL_BATCH - taken);
            (cutoff, at_cutoff) = (second, take.min(here));
            if take < here {
                break;
            }
            (left, taken) = (left - here, taken + here);
            cutoff = second.saturating_add(1);
            at_cutoff = 0;
        }
        // What goes: `taken`, and at the cutoff `at_cutoff` and at most one device
        // more.
        let mut out = SpillBatch::with_capacity(taken + at_cutoff + 64 * SERIES_BYTES);
        for (id, r) in &self.resident {
            let goes = candidate(r) && (r.active < cutoff || (r.active == cutoff && at_cutoff > 0));
            if goes {
                if r.active == cutoff {
                    at_cutoff = at_cutoff.saturating_sub(device_bytes(&r.series));
                }
                out.push(DeviceId(*id), &r.series);
            }
        }
        out
    }

    /// Whether memory is over the ceiling (see [`Self::pick_idle`]): then the front
    /// looks for devices to move out as soon as the last batch is written.
    pub(super) fn over_ceiling(&self) -> bool {
        self.bytes() > self.budget.saturating_mul(CEILING)
    }

    /// The table holds these devices' statistics (committed): those unchanged since
    /// they were copied leave memory.
    pub(super) fn written(&mut self, devices: &SpillBatch) {
        for (d, copy) in devices.iter() {
            if self.bit(d.0 as usize) || self.resident.get(&d.0).is_none_or(|r| *r.series != *copy)
            {
                continue;
            }
            let readings: u64 = copy.iter().map(|(_, s)| s.readings).sum();
            self.disk.readings += readings;
            let newest = copy.iter().map(|(_, s)| s.last).max();
            self.disk.newest = self.disk.newest.max(newest);
            self.replace(d.0, None, 0);
            self.set_bit(d.0 as usize, true);
        }
        // The map gives back its room once it is mostly empty.
        if self.resident.capacity() > 4 * self.resident.len().max(64) {
            self.resident.shrink_to_fit();
        }
    }

    /// Changes the totals over devices on disk (retention deleted some of their
    /// readings; the newest is read again from the table).
    pub(super) fn disk_changed(&mut self, readings_deleted: u64, newest: Option<Timestamp>) {
        self.disk.readings = self.disk.readings.saturating_sub(readings_deleted);
        self.disk.newest = newest;
    }

    /// Every resident device's id, and its series.
    pub(super) fn resident(&self) -> impl Iterator<Item = (DeviceId, &[(SensorId, SeriesStats)])> {
        self.resident
            .iter()
            .map(|(d, r)| (DeviceId(*d), &r.series[..]))
    }

    /// Readings and newest reading over every series, and devices on disk.
    pub(super) fn totals(&self) -> (u64, Option<Timestamp>, usize) {
        let mut readings = self.disk.readings;
        let mut newest = self.disk.newest;
        for (_, st) in self.resident.values().flat_map(|r| r.series.iter()) {
            readings += st.readings;
            newest = newest.max(Some(st.last));
        }
        (readings, newest, self.devices_on_disk)
    }
}

// ---- the `series` table ----

/// The columns of a row as [`query`] reads them.
pub(super) const COLUMNS: &str =
    "device_id, sensor_id, readings, epoch_us(first_ts), epoch_us(last_ts), last_value";

fn entry(r: &duckdb::Row<'_>) -> duckdb::Result<SeriesEntry> {
    Ok((
        (
            DeviceId(r.get::<_, i32>(0)? as u32),
            SensorId(r.get::<_, i16>(1)? as u16),
        ),
        SeriesStats {
            readings: r.get::<_, i64>(2)? as u64,
            first: Timestamp::from_micros(r.get(3)?),
            last: Timestamp::from_micros(r.get(4)?),
            last_value: r.get(5)?,
        },
    ))
}

/// Rows of `sql`, which selects [`COLUMNS`].
pub(super) fn query(conn: &Connection, sql: &str) -> Result<Vec<SeriesEntry>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([], entry)?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The ids as an SQL list's items (`3,17,42`).
pub(super) fn id_list(devices: &[DeviceId]) -> String {
    devices
        .iter()
        .map(|d| d.0.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Every row of these devices, ordered by device and sensor.
pub(super) fn read_devices(
    conn: &Connection,
    devices: &[DeviceId],
) -> Result<Vec<SeriesEntry>, StoreError> {
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    let ids = id_list(devices);
    // A join with the ids: ~2.5× faster than `device_id IN (…)` for 64 ids over six
    // million rows (6.6 against 17 ms), which DuckDB evaluates as a list per row.
    query(
        conn,
        &format!(
            "SELECT {COLUMNS} FROM series JOIN (SELECT unnest([{ids}]) AS wanted) ON device_id = wanted
             ORDER BY 1, 2"
        ),
    )
}

/// Every row, ordered by device and sensor.
pub(super) fn read_all(conn: &Connection) -> Result<Vec<SeriesEntry>, StoreError> {
    query(conn, &format!("SELECT {COLUMNS} FROM series ORDER BY 1, 2"))
}

/// Per device in the table with an id in `ids`: readings, first and last over its
/// rows. Asked a page of devices at a time (a million devices' summaries at once
/// took 32 MB, and the answer built from them a gigabyte).
pub(super) fn summaries(
    conn: &Connection,
    ids: std::ops::RangeInclusive<DeviceId>,
) -> Result<Vec<(DeviceId, super::reader::DeviceSummary)>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT device_id, sum(readings)::BIGINT, epoch_us(min(first_ts)), epoch_us(max(last_ts))
         FROM series WHERE device_id BETWEEN ? AND ? GROUP BY device_id",
    )?;
    let rows = stmt
        .query_map([i64::from(ids.start().0), i64::from(ids.end().0)], |r| {
            Ok((
                DeviceId(r.get::<_, i32>(0)? as u32),
                super::reader::DeviceSummary {
                    readings: r.get::<_, i64>(1)? as u64,
                    first: Some(Timestamp::from_micros(r.get(2)?)),
                    last: Some(Timestamp::from_micros(r.get(3)?)),
                },
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Replaces the rows of each device given with its series (inside the caller's
/// transaction), streaming: at shutdown a million resident devices' six million
/// series never sit in one vector.
pub(super) fn write_devices<S>(
    conn: &Connection,
    devices: impl Iterator<Item = (DeviceId, S)>,
) -> Result<(), StoreError>
where
    S: IntoIterator<Item = (SensorId, SeriesStats)>,
{
    // Declared column by column: created `AS SELECT * FROM series LIMIT 0` inside the
    // transaction, the table lost what the Appender put in it on first use (the
    // first 35,200 devices' rows of a benchmark, found by recomputing after it).
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS series_new (device_id INTEGER, sensor_id SMALLINT,
             readings BIGINT, first_ts TIMESTAMP, last_ts TIMESTAMP, last_value DOUBLE);
         DELETE FROM temp.series_new;",
    )?;
    let mut app = conn.appender_to_catalog_and_db("series_new", "temp", "main")?;
    for (device, series) in devices {
        for (sensor, s) in series {
            app.append_row(duckdb::params![
                device.0 as i32,
                sensor.0 as i16,
                s.readings as i64,
                Value::Timestamp(TimeUnit::Microsecond, s.first.as_micros()),
                Value::Timestamp(TimeUnit::Microsecond, s.last.as_micros()),
                s.last_value,
            ])?;
        }
    }
    app.flush()?;
    drop(app);
    conn.execute_batch(
        "DELETE FROM series WHERE device_id IN (SELECT DISTINCT device_id FROM temp.series_new);
         INSERT INTO series SELECT * FROM temp.series_new;
         DELETE FROM temp.series_new;",
    )?;
    Ok(())
}

/// Recomputes every row from `readings` (after a crash: the rows of resident
/// devices were stale). Not in one transaction: a DELETE keeps ~8 bytes per deleted
/// row in DuckDB's memory until a checkpoint (50 MB for a million devices' six
/// million rows, which left a 64 MB limit no room to aggregate), so the rows are
/// deleted and checkpointed first, then inserted a range of devices at a time. A
/// crash in between leaves the snapshot marked not valid: the next start recomputes.
pub(super) fn recompute(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch("DELETE FROM series; CHECKPOINT;")?;
    recompute_in_place(conn)
}

/// [`recompute`] for a running server: each range of devices' rows replaced in one
/// transaction, so readers never find a device without its row, and no
/// `CHECKPOINT` (it fails while readers hold transactions).
pub(super) fn recompute_in_place(conn: &Connection) -> Result<(), StoreError> {
    let rows: i64 = conn.query_row("SELECT count(*) FROM readings", [], |r| r.get(0))?;
    let per_device = super::sensor_count(conn)?;
    super::run_in_device_ranges(conn, rows as u64, per_device, |devices| {
        super::in_transaction(conn, || {
            conn.execute_batch(&format!(
                "DELETE FROM series WHERE true {devices};
                 INSERT INTO series
                 SELECT device_id, sensor_id, count(*), make_timestamp(min(t)),
                        make_timestamp(max(t)), arg_max(value, t)
                 FROM (SELECT device_id, sensor_id, ts_ms * 1000 + ts_us AS t, value
                       FROM readings WHERE true {devices})
                 GROUP BY device_id, sensor_id;"
            ))
        })?;
        Ok(())
    })?;
    Ok(())
}

/// Marks the table as not to be trusted at the next start, even after a clean
/// shutdown (see `store::close`): it is recomputed from the readings then.
pub(super) fn distrust(conn: &Connection) -> Result<(), StoreError> {
    tracing::error!(
        "the series table no longer matches the readings; it is recomputed at the next start"
    );
    conn.execute_batch("INSERT OR REPLACE INTO meta VALUES ('series_snapshot', 'recompute')")?;
    Ok(())
}

/// Rows, readings and the newest reading over the whole table.
pub(super) fn table_totals(conn: &Connection) -> Result<(u64, u64, Option<Timestamp>), StoreError> {
    Ok(conn.query_row(
        "SELECT count(*), coalesce(sum(readings), 0)::BIGINT, epoch_us(max(last_ts)) FROM series",
        [],
        |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, Option<i64>>(2)?.map(Timestamp::from_micros),
            ))
        },
    )?)
}

/// The rows of the devices with the newest readings, as many as fit three quarters
/// of `budget` (what memory holds at open; the rest stays on disk). `rows`: the
/// table's.
pub(super) fn read_recent(
    conn: &Connection,
    rows: u64,
    budget: usize,
) -> Result<Vec<SeriesEntry>, StoreError> {
    let room = budget / 4 * 3;
    if rows as usize * SERIES_BYTES <= room / 2 {
        return read_all(conn);
    }
    // Whole devices, by their newest reading, at the table's series per device.
    let devices: u64 = conn.query_row("SELECT count(DISTINCT device_id) FROM series", [], |r| {
        r.get::<_, i64>(0)
    })? as u64;
    let per_device = rows.div_ceil(devices.max(1)).max(1) as usize;
    let take = room / (per_device * SERIES_BYTES + DEVICE_BYTES);
    query(
        conn,
        &format!(
            "SELECT {COLUMNS} FROM series WHERE device_id IN (
                 SELECT device_id FROM series GROUP BY device_id ORDER BY max(last_ts) DESC
                 LIMIT {take})
             ORDER BY 1, 2"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory one device of six sensors takes, as the budget counts it.
    const DEVICE: usize = 6 * SERIES_BYTES + DEVICE_BYTES;

    /// A map with a budget of ten devices, an idle time of 300 s and a clock at
    /// 1,000 s, holding devices `0..` last active at the seconds given.
    fn map_with(active: &[u32]) -> SeriesMap {
        let mut m = SeriesMap {
            epoch: Instant::now() - Duration::from_secs(1000),
            ..SeriesMap::default()
        };
        m.set_limits(10 * DEVICE, Duration::from_secs(300));
        let stats = SeriesStats {
            readings: 1,
            first: Timestamp::from_micros(0),
            last: Timestamp::from_micros(0),
            last_value: 0.0,
        };
        for (id, &at) in active.iter().enumerate() {
            let series: DeviceSeries = (0..6).map(|s| (SensorId(s), stats)).collect();
            m.replace(id as u32, Some(series), at);
        }
        assert_eq!(m.bytes(), active.len() * DEVICE);
        m
    }

    fn picked(m: &SeriesMap) -> Vec<u32> {
        let mut ids: Vec<u32> = m.pick_idle().iter().map(|(d, _)| d.0).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn over_budget_only_idle_devices_go_idle_longest_first() {
        // 12 devices (budget 10): the 4 idle ones go, the 8 active stay.
        let active: Vec<u32> = (0..12).map(|i| if i < 4 { 100 + i } else { 990 }).collect();
        assert_eq!(picked(&map_with(&active)), vec![0, 1, 2, 3]);
        // 15 active devices: over the budget, within the ceiling: nothing goes.
        assert!(picked(&map_with(&[990; 15])).is_empty());
        // Within the budget nothing goes, however idle.
        assert!(picked(&map_with(&[1; 10])).is_empty());
    }

    #[test]
    fn over_the_ceiling_the_least_recently_active_go_too() {
        // 30 devices active within the idle time (ceiling 20): the 15 least recent
        // go, to three quarters of the ceiling.
        let active: Vec<u32> = (0..30).map(|i| 900 + i).collect();
        assert_eq!(picked(&map_with(&active)), (0..15).collect::<Vec<_>>());
        // Idle ones first, then the least recently active.
        let mut active: Vec<u32> = (0..30).map(|i| 990 - i).collect();
        active[29] = 10;
        active[28] = 20;
        let want: Vec<u32> = (15..30).collect();
        assert_eq!(picked(&map_with(&active)), want);
    }

    /// A device's entries set together: new sensors join its slice in sensor order,
    /// known ones change in place, and a device given twice in one call (not what
    /// the writer does) still ends with each sensor once.
    #[test]
    fn a_devices_series_are_set_together_in_sensor_order() {
        let mut m = SeriesMap::default();
        let at = |ts: i64, v: f64| SeriesStats {
            readings: 1,
            first: Timestamp::from_micros(ts),
            last: Timestamp::from_micros(ts),
            last_value: v,
        };
        let entry = |d: u32, s: u16, st| ((DeviceId(d), SensorId(s)), st);
        let series = |m: &SeriesMap, d: u32| match m.get(DeviceId(d)) {
            Held::Here(s) => s.iter().map(|(id, st)| (id.0, st.last_value)).collect(),
            Held::OnDisk => Vec::new(),
        };
        m.set(&[
            entry(1, 3, at(1, 3.0)),
            entry(1, 0, at(1, 0.0)),
            entry(2, 5, at(1, 5.0)),
        ]);
        m.set(&[
            entry(1, 2, at(2, 2.0)),
            entry(1, 3, at(2, 3.5)),
            entry(2, 5, at(2, 5.5)),
        ]);
        m.set(&[
            entry(1, 0, at(3, 0.5)),
            entry(2, 1, at(3, 1.0)),
            entry(1, 4, at(3, 4.0)),
        ]);
        assert_eq!(series(&m, 1), [(0, 0.5), (2, 2.0), (3, 3.5), (4, 4.0)]);
        assert_eq!(series(&m, 2), [(1, 1.0), (5, 5.5)]);
        assert_eq!(m.bytes(), 6 * SERIES_BYTES + 2 * DEVICE_BYTES);
    }

    /// A table that no longer matches the readings (a retention's update of devices
    /// on disk failed half-way) is recomputed at the next start even after a clean
    /// shutdown, which would otherwise mark it valid; recomputed in place, it
    /// matches the readings again.
    #[test]
    fn a_distrusted_table_is_recomputed_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let counts = |conn: &Connection| -> Vec<(i32, i64)> {
            let mut stmt = conn
                .prepare(
                    "SELECT device_id, sum(readings)::BIGINT FROM series GROUP BY 1 ORDER BY 1",
                )
                .unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let want = vec![(1, 3), (2, 6), (3, 9)];
        let broken = vec![(1, 8), (2, 11), (3, 14)];
        for distrusted in [false, true] {
            let store = crate::store::open_for_tests(dir.path());
            store
                .conn
                .execute_batch(
                    "DELETE FROM received_readings; DELETE FROM series;
                     INSERT OR IGNORE INTO devices VALUES (1, 'a'), (2, 'b'), (3, 'c');
                     INSERT INTO received_readings SELECT d::INTEGER, 1::SMALLINT,
                         1711756800000 + k * 1000, 0::SMALLINT, k::DOUBLE
                     FROM range(1, 4) a(d), range(0, 12) b(k) WHERE k < 3 * d;",
                )
                .unwrap();
            recompute_in_place(&store.conn).unwrap();
            assert_eq!(counts(&store.conn), want);
            store
                .conn
                .execute_batch("UPDATE series SET readings = readings + 5")
                .unwrap();
            if distrusted {
                distrust(&store.conn).unwrap();
            }
            store.close().unwrap();
            let store = crate::store::open_for_tests(dir.path());
            let expected = if distrusted { &want } else { &broken };
            assert_eq!(&counts(&store.conn), expected, "distrusted: {distrusted}");
            drop(store);
        }
    }
}
