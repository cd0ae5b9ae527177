//! The live quarter hours of recently active devices, aggregated in memory as
//! readings are acknowledged, so that charts never scan the fleet's newest readings.
//!
//! Until their slot ends, readings sit in DuckDB in arrival order: every row group of
//! the last minutes holds every device, so zone maps cannot skip any and a chart's
//! live quarter hours scanned the whole fleet's recent readings — with 2,000 devices
//! streaming, 25–70 ms per chart under load, growing with the fleet (issue 23). The
//! writer's front, which acknowledges every stored reading, folds each one whose slot
//! is live (at or after `from`) into a per-sensor, per-slot aggregate of its device
//! here, after its commit and before its request is answered. A query takes the
//! slots this holds exactly from here and everything before them from DuckDB.
//!
//! `from` only moves forward: it follows the previous quarter hour of the clock, and
//! slots before it are dropped. When the writer starts, the live slots are read once
//! from the rollups, which are whole at that moment ([`LiveSlots::load`]); before that
//! (offline commands, which never write) `from` is the first slot after every stored
//! reading and the clock, so nothing is held and everything comes from DuckDB.
//! This is the only copy: the writer computes a live slot's rollups from its readings
//! once it has ended (see `store::rollup`).
//!
//! ## Bounded
//! What is held has a budget (`--live-slots-memory`): a device streaming six sensors
//! at 1 Hz takes ~0.9 KB (two slots per sensor), a million devices seen in the last
//! half hour would take ~0.5 GB. When a new device finds no room, devices idle for a
//! while (`--live-slots-idle`, longest idle first) are evicted; if none is, the new
//! device is not held. Exactness is kept by one number, `lost_through`: the latest
//! slot some device's readings were evicted from or never held in. A device's entry
//! made after that holds exactly only the slots after it (noted in the entry), and a
//! device without an entry holds nothing up to it; queries read the slots before that
//! from DuckDB — as fast as before this existed, and only for devices nobody kept
//! streaming.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use duckdb::Connection;
use duckdb::arrow::array::{Array, Float64Array, Int16Array, Int32Array, Int64Array};
use duckdb::arrow::record_batch::RecordBatch;
use rustc_hash::FxHashMap;

use super::StoreError;
use super::rollup::{COMBINED, SLOT_MS, slot_of};
use crate::domain::{Aggregate, DeviceId, SensorId};

/// One slot of a series as memory holds it.
#[derive(Debug, Clone, Copy)]
pub(super) struct HeldSlot {
    /// The slot's start (ms).
    pub(super) start_ms: i64,
    /// Every acknowledged reading of the series in the slot.
    pub(super) aggregate: Aggregate,
    /// Times (µs) of its first and last reading.
    pub(super) first_us: i64,
    pub(super) last_us: i64,
}

/// Memory the live slots may take by default: with six sensors, a device streaming
/// at 1 Hz holds two slots per sensor, ~0.9 KB, so ~70,000 such devices.
pub const DEFAULT_BUDGET: usize = 64 << 20;
/// A device idle this long may be evicted when the budget is reached.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(10);

/// Bytes one held slot takes.
const SLOT_BYTES: usize = std::mem::size_of::<Slot>();
/// Bytes one bucket of the map of devices takes (key, value, control byte).
const BUCKET_BYTES: usize = std::mem::size_of::<(DeviceId, DeviceSlots)>() + 1;
/// The allocator's bookkeeping of a device's slots.
const ALLOC_BYTES: usize = 16;

/// Bytes of a map of devices with room for `items` (hashbrown's buckets: a power of
/// two, at most 7/8 full).
fn map_bytes(items: usize) -> usize {
    let buckets = match items {
        0 => 0,
        1..4 => 4,
        4..8 => 8,
        _ => (items * 8 / 7).next_power_of_two(),
    };
    buckets * BUCKET_BYTES
}

/// The aggregate of one sensor's readings in one slot: 64 bytes (the flat map of
/// `(device, sensor, slot)` → aggregate this replaced took ~120 per entry with the
/// map's spare room, and the writer held a second copy).
#[derive(Debug, Clone, Copy)]
struct Slot {
    sensor: u16,
    /// Slot number: its start over [`SLOT_MS`].
    slot: i32,
    count: u32,
    /// Microseconds of the first and the last reading after the slot's start.
    first_off: u32,
    last_off: u32,
    min: f64,
    max: f64,
    sum: f64,
    first: f64,
    last: f64,
}

impl Slot {
    fn one(sensor: u16, slot: i32, off: u32, v: f64) -> Self {
        Self {
            sensor,
            slot,
            count: 1,
            first_off: off,
            last_off: off,
            min: v,
            max: v,
            sum: v,
            first: v,
            last: v,
        }
    }

    /// Adds a reading, in any order in time.
    fn add(&mut self, off: u32, v: f64) {
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
        if off < self.first_off {
            (self.first_off, self.first) = (off, v);
        }
        if off > self.last_off {
            (self.last_off, self.last) = (off, v);
        }
    }

    fn start_ms(&self) -> i64 {
        i64::from(self.slot) * SLOT_MS
    }

    fn aggregate(&self) -> Aggregate {
        Aggregate {
            count: u64::from(self.count),
            min: self.min,
            max: self.max,
            sum: self.sum,
            first: self.first,
            last: self.last,
        }
    }
}

/// The slot number of a slot start (ms).
fn number(slot_ms: i64) -> i32 {
    slot_ms.div_euclid(SLOT_MS) as i32
}

/// One device's live slots.
struct DeviceSlots {
    /// Slots from this one (ms) on hold every acknowledged reading of the device.
    exact_from: i64,
    /// When it last got readings, in seconds since the slots were made.
    used: u32,
    /// In no order; a device has a few per sensor.
    slots: Vec<Slot>,
}

impl DeviceSlots {
    /// Heap bytes of its slots.
    fn bytes(&self) -> usize {
        match self.slots.capacity() {
            0 => 0,
            n => ALLOC_BYTES + n * SLOT_BYTES,
        }
    }
}

/// How many maps the devices are spread over: one grows at a time, so a growth
/// never holds an old and a new table of every device at once (a million new
/// devices: the one map's last doubling, old and new table alive, was 26 MiB of the
/// burst's peak).
const SHARDS: usize = 16;

/// The devices' slots, by device, in [`SHARDS`] maps.
struct Devices([FxHashMap<DeviceId, DeviceSlots>; SHARDS]);

impl Default for Devices {
    fn default() -> Self {
        Self(std::array::from_fn(|_| FxHashMap::default()))
    }
}

impl Devices {
    /// The map of `device`: by a multiplicative hash's top bits, unrelated to the
    /// bits the maps' own hash uses.
    fn shard(device: DeviceId) -> usize {
        (u64::from(device.0).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize
    }

    fn of(&self, device: DeviceId) -> &FxHashMap<DeviceId, DeviceSlots> {
        &self.0[Self::shard(device)]
    }

    fn of_mut(&mut self, device: DeviceId) -> &mut FxHashMap<DeviceId, DeviceSlots> {
        &mut self.0[Self::shard(device)]
    }

    fn len(&self) -> usize {
        self.0.iter().map(|m| m.len()).sum()
    }

    /// Bytes of the maps, with their spare room; with one more device when `adding`
    /// (its map may have to grow).
    fn bytes(&self, adding: Option<DeviceId>) -> usize {
        let grows = adding.map(Self::shard);
        self.0
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let more = usize::from(grows == Some(i));
                map_bytes(m.capacity().max(m.len() + more))
            })
            .sum()
    }

    fn get(&self, device: &DeviceId) -> Option<&DeviceSlots> {
        self.of(*device).get(device)
    }

    fn get_mut(&mut self, device: &DeviceId) -> Option<&mut DeviceSlots> {
        self.of_mut(*device).get_mut(device)
    }

    fn contains_key(&self, device: &DeviceId) -> bool {
        self.of(*device).contains_key(device)
    }

    fn insert(&mut self, device: DeviceId, slots: DeviceSlots) {
        self.of_mut(device).insert(device, slots);
    }

    fn remove(&mut self, device: &DeviceId) -> Option<DeviceSlots> {
        self.of_mut(*device).remove(device)
    }

    fn iter(&self) -> impl Iterator<Item = (&DeviceId, &DeviceSlots)> {
        self.0.iter().flat_map(|m| m.iter())
    }

    fn retain(&mut self, mut keep: impl FnMut(&DeviceId, &mut DeviceSlots) -> bool) {
        for m in &mut self.0 {
            m.retain(&mut keep);
        }
    }

    /// Gives back the room of maps at most a quarter full (devices went quiet).
    fn shrink_sparse(&mut self) {
        for m in &mut self.0 {
            if m.len() * 4 < m.capacity() {
                m.shrink_to(m.len() * 2);
            }
        }
    }
}

struct Inner {
    /// Slots (ms) from this one on are live.
    from: i64,
    /// The latest slot (ms) whose readings of some device are not held: evicted, or
    /// never held for want of room. A device's entry made later holds exactly only
    /// the slots after it, and a device without an entry none up to it.
    lost_through: i64,
    devices: Devices,
    /// What the devices' slots take ([`DeviceSlots::bytes`]); the map's own size
    /// follows from its capacity.
    slot_bytes: usize,
    budget: usize,
    idle_secs: u32,
    /// The second of the last look for idle devices to evict (at most one a second).
    looked: Option<u32>,
}

impl Inner {
    /// Memory taken: the slots, and the map with its spare room.
    fn bytes(&self) -> usize {
        self.slot_bytes + self.devices.bytes(None)
    }

    /// Whether `device` fits, with room for two slots (its map may have to grow for
    /// it).
    fn room(&self, device: DeviceId) -> bool {
        let map = self.devices.bytes(Some(device));
        self.slot_bytes + map + ALLOC_BYTES + 2 * SLOT_BYTES <= self.budget
    }

    /// A device entry for `device`, or `None` when there is no room even after
    /// evicting idle devices.
    fn entry(&mut self, device: DeviceId, now: u32) -> Option<&mut DeviceSlots> {
        if !self.devices.contains_key(&device) {
            if !self.room(device) {
                self.evict_idle(now);
            }
            if !self.room(device) {
                return None;
            }
            let exact_from = self.lost_through.saturating_add(SLOT_MS);
            self.devices.insert(
                device,
                DeviceSlots {
                    exact_from,
                    used: now,
                    slots: Vec::new(),
                },
            );
        }
        self.devices.get_mut(&device)
    }

    /// Evicts the devices idle longest, down to three quarters of the budget; at
    /// most once a second (each look walks every device).
    fn evict_idle(&mut self, now: u32) {
        if self.looked == Some(now) {
            return;
        }
        self.looked = Some(now);
        let mut idle: Vec<(u32, DeviceId)> = self
            .devices
            .iter()
            .filter(|(_, d)| now.saturating_sub(d.used) >= self.idle_secs)
            .map(|(id, d)| (d.used, *id))
            .collect();
        idle.sort_unstable();
        let target = self.budget / 4 * 3;
        for (_, id) in idle {
            if self.bytes() <= target {
                break;
            }
            self.remove(id, true);
        }
    }

    /// Drops a device's entry; `lost`: it held readings no one else holds.
    fn remove(&mut self, device: DeviceId, lost: bool) {
        if let Some(d) = self.devices.remove(&device) {
            self.slot_bytes -= d.bytes();
            if lost {
                let last = d.slots.iter().map(Slot::start_ms).max();
                self.lost_through = self.lost_through.max(last.unwrap_or(i64::MIN));
            }
        }
    }
}

/// The columns of a batch [`LiveSlots::load`] reads.
struct LoadColumns<'a> {
    device: &'a Int32Array,
    sensor: &'a Int16Array,
    slot: &'a Int64Array,
    count: &'a Int64Array,
    min: &'a Float64Array,
    max: &'a Float64Array,
    sum: &'a Float64Array,
    first_us: &'a Int64Array,
    first: &'a Float64Array,
    last_us: &'a Int64Array,
    last: &'a Float64Array,
}

impl<'a> LoadColumns<'a> {
    fn of(batch: &'a RecordBatch) -> Result<Self, StoreError> {
        fn col<T: 'static>(batch: &RecordBatch, i: usize) -> Result<&T, StoreError> {
            batch.column(i).as_any().downcast_ref::<T>().ok_or_else(|| {
                StoreError::Internal(format!("live slots: column {i} has another type"))
            })
        }
        Ok(Self {
            device: col(batch, 0)?,
            sensor: col(batch, 1)?,
            slot: col(batch, 2)?,
            count: col(batch, 3)?,
            min: col(batch, 4)?,
            max: col(batch, 5)?,
            sum: col(batch, 6)?,
            first_us: col(batch, 7)?,
            first: col(batch, 8)?,
            last_us: col(batch, 9)?,
            last: col(batch, 10)?,
        })
    }
}

/// See the module docs.
pub(super) struct LiveSlots {
    inner: RwLock<Inner>,
    started: Instant,
}

impl LiveSlots {
    /// Holding nothing, with slots from `from_ms` (a slot start) on to come, in at
    /// most [`DEFAULT_BUDGET`] bytes.
    pub(super) fn new(from_ms: i64) -> Self {
        Self {
            inner: RwLock::new(Inner {
                from: slot_of(from_ms),
                lost_through: i64::MIN,
                devices: Devices::default(),
                slot_bytes: 0,
                budget: DEFAULT_BUDGET,
                idle_secs: DEFAULT_IDLE.as_secs() as u32,
                looked: None,
            }),
            started: Instant::now(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    /// How much memory the slots may take, and how long a device must have been
    /// idle before it is evicted to make room. Set before the writer starts.
    pub(super) fn set_limits(&self, budget: usize, idle: Duration) {
        let mut inner = self.write();
        inner.budget = budget;
        inner.idle_secs = idle.as_secs().min(u64::from(u32::MAX)) as u32;
    }

    /// Adds a series' readings just stored (`(µs, value)`, ascending in time); those
    /// of slots before `from` are not kept, nor those of a device there is no room
    /// for (its reads then take those slots from DuckDB).
    pub(super) fn record(&self, device: DeviceId, sensor: SensorId, rows: &[(i64, f64)]) {
        debug_assert!(rows.windows(2).all(|w| w[0].0 <= w[1].0));
        let slot_us = |ts: i64| slot_of(ts.div_euclid(1000));
        let now = self.now();
        let mut inner = self.write();
        let from = inner.from;
        let rows = &rows[rows.partition_point(|r| slot_us(r.0) < from)..];
        let Some(&(last_ts, _)) = rows.last() else {
            return;
        };
        // A new entry would hold only slots after the last one lost: readings all
        // before it leave nothing to hold, and an entry holding nothing would still
        // take the map's room (CI once held 30 such empty devices in a 4 KiB budget).
        let lost = inner.lost_through;
        if slot_us(last_ts) <= lost && !inner.devices.contains_key(&device) {
            return;
        }
        let Some(d) = inner.entry(device, now) else {
            inner.lost_through = inner.lost_through.max(slot_us(last_ts));
            return;
        };
        d.used = now;
        let before = d.bytes();
        let mut at = usize::MAX;
        for &(ts, v) in rows {
            let slot_ms = slot_us(ts);
            if slot_ms < d.exact_from {
                continue;
            }
            let (slot, off) = (number(slot_ms), (ts - slot_ms * 1000) as u32);
            let hit = d
                .slots
                .get(at)
                .is_some_and(|s| s.slot == slot && s.sensor == sensor.0);
            if !hit {
                match d
                    .slots
                    .iter()
                    .position(|s| s.slot == slot && s.sensor == sensor.0)
                {
                    Some(i) => at = i,
                    None => {
                        if d.slots.len() == d.slots.capacity() {
                            // Grows by half, not double: a device holds a few
                            // slots per sensor, and spare room is memory.
                            d.slots.reserve_exact((d.slots.len() / 2).max(2));
                        }
                        d.slots.push(Slot::one(sensor.0, slot, off, v));
                        at = d.slots.len() - 1;
                        continue;
                    }
                }
            }
            d.slots[at].add(off, v);
        }
        if d.slots.is_empty() {
            // Made just now, after an eviction that lost these readings' slots.
            inner.remove(device, false);
            return;
        }
        let grown = d.bytes() - before;
        inner.slot_bytes += grown;
        // The room asked for covers two slots; a device with more sensors takes more.
        // Over the budget, idle devices go, and failing that this one.
        if grown > 0 && inner.bytes() > inner.budget {
            inner.evict_idle(now);
            if inner.bytes() > inner.budget {
                inner.remove(device, true);
            }
        }
    }

    /// Replaces what is held by the rollups of slots from `from_ms`'s on, which must
    /// be whole (the writer's start, after its rollup recovery; nothing is
    /// acknowledged meanwhile), as far as the budget goes.
    pub(super) fn load(&self, conn: &Connection, from_ms: i64) -> Result<(), StoreError> {
        let _span = tracing::debug_span!("live_slots_load").entered();
        let from = slot_of(from_ms);
        let now = self.now();
        let mut inner = self.write();
        inner.from = from;
        inner.lost_through = i64::MIN;
        inner.devices = Devices::default();
        inner.slot_bytes = 0;
        // Streamed, and read only as far as the budget goes: a query's materialized
        // result of a million devices' live slots took 480 MB at start-up.
        // A statement per range of devices (see `store::device_ranges`), in order.
        let mut full = false;
        let rows: i64 = conn.query_row(
            &format!("SELECT count(*) FROM rollups WHERE slot_ms >= {from}"),
            [],
            |r| r.get(0),
        )?;
        'statements: for devices in super::device_ranges(conn, rows as u64, u64::MAX)? {
            let mut stmt = conn.prepare(&format!(
                "SELECT device_id, sensor_id, slot_ms, {COMBINED}
                 FROM rollups WHERE slot_ms >= {from} {devices}
                 GROUP BY device_id, sensor_id, slot_ms ORDER BY device_id"
            ))?;
            for batch in stmt.stream_arrow([])? {
                let batch = batch?;
                let c = LoadColumns::of(&batch)?;
                for i in 0..batch.num_rows() {
                    let device = DeviceId(c.device.value(i) as u32);
                    let slot_ms = c.slot.value(i);
                    let Some(d) = inner.entry(device, now) else {
                        // No room (nothing is idle at start): neither for this device
                        // nor for the ones after it.
                        full = true;
                        break 'statements;
                    };
                    let at = |us: i64| (us - slot_ms * 1000).clamp(0, i64::from(u32::MAX)) as u32;
                    let before = d.bytes();
                    d.slots.push(Slot {
                        sensor: c.sensor.value(i) as u16,
                        slot: number(slot_ms),
                        count: c.count.value(i).clamp(0, i64::from(u32::MAX)) as u32,
                        min: c.min.value(i),
                        max: c.max.value(i),
                        sum: c.sum.value(i),
                        first_off: at(c.first_us.value(i)),
                        first: c.first.value(i),
                        last_off: at(c.last_us.value(i)),
                        last: c.last.value(i),
                    });
                    let grown = d.bytes() - before;
                    inner.slot_bytes += grown;
                }
            }
        }
        if full {
            // The devices not read claim no slot up to the newest.
            let newest: Option<i64> = conn.query_row(
                &format!("SELECT max(slot_ms) FROM rollups WHERE slot_ms >= {from}"),
                [],
                |r| r.get(0),
            )?;
            inner.lost_through = inner.lost_through.max(newest.unwrap_or(i64::MIN));
        }
        Ok(())
    }

    /// Moves `from` on to `to_ms`'s slot (never back), dropping earlier slots.
    pub(super) fn advance(&self, to_ms: i64) {
        let to = slot_of(to_ms);
        if to <= self.read().from {
            return;
        }
        let mut guard = self.write();
        let inner = &mut *guard;
        if to <= inner.from {
            return;
        }
        inner.from = to;
        let bytes = &mut inner.slot_bytes;
        inner.devices.retain(|_, d| {
            *bytes -= d.bytes();
            d.slots.retain(|s| s.start_ms() >= to);
            if d.slots.is_empty() {
                return false;
            }
            if d.slots.len() * 2 <= d.slots.capacity() {
                d.slots.shrink_to(d.slots.len() + d.slots.len() / 2);
            }
            *bytes += d.bytes();
            true
        });
        // Devices that went quiet leave; the maps need not keep their room.
        inner.devices.shrink_sparse();
    }

    /// Forgets every slot of a deleted device.
    pub(super) fn forget_device(&self, device: DeviceId) {
        self.write().remove(device, false);
    }

    /// The first slot from which on what is returned is every acknowledged reading of
    /// the series (earlier ones must come from DuckDB), and the aggregates of its
    /// slots in `[lo_ms, hi_ms)` from there on, ascending (slots without readings
    /// left out).
    #[cfg(test)]
    pub(super) fn slots(
        &self,
        device: DeviceId,
        sensor: SensorId,
        lo_ms: i64,
        hi_ms: i64,
    ) -> (i64, Vec<(i64, Aggregate)>) {
        let (from, held) = self.held(device, sensor, lo_ms, hi_ms);
        (
            from,
            held.into_iter()
                .map(|h| (h.start_ms, h.aggregate))
                .collect(),
        )
    }

    /// [`Self::slots`] with the time of each slot's first and last reading: a query
    /// whose range starts or ends inside a slot may take the whole slot's aggregate
    /// when its readings all lie inside the range.
    pub(super) fn held(
        &self,
        device: DeviceId,
        sensor: SensorId,
        lo_ms: i64,
        hi_ms: i64,
    ) -> (i64, Vec<HeldSlot>) {
        let inner = self.read();
        let Some(d) = inner.devices.get(&device) else {
            let from = inner.from.max(inner.lost_through.saturating_add(SLOT_MS));
            return (from, Vec::new());
        };
        let from = inner.from.max(d.exact_from);
        let lo = lo_ms.max(from);
        let mut held: Vec<HeldSlot> = d
            .slots
            .iter()
            .filter(|s| s.sensor == sensor.0 && (lo..hi_ms).contains(&s.start_ms()))
            .map(|s| HeldSlot {
                start_ms: s.start_ms(),
                aggregate: s.aggregate(),
                first_us: s.start_ms() * 1000 + i64::from(s.first_off),
                last_us: s.start_ms() * 1000 + i64::from(s.last_off),
            })
            .collect();
        held.sort_unstable_by_key(|h| h.start_ms);
        (from, held)
    }

    /// Devices held and the bytes they take (for tests and metrics).
    pub(super) fn usage(&self) -> (usize, usize) {
        let inner = self.read();
        (inner.devices.len(), inner.bytes())
    }
}

/// The first slot after `ms`.
pub(super) fn slot_after(ms: i64) -> i64 {
    slot_of(ms) + SLOT_MS
}

/// The first live slot at `now_ms`: the previous quarter hour's (readings of the
/// current quarter hour arrive a little late; the writer's live rollup slots and
/// these follow the same clock).
pub(super) fn live_from(now_ms: i64) -> i64 {
    slot_of(now_ms) - SLOT_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: DeviceId = DeviceId(3);
    const S: SensorId = SensorId(1);

    fn us(ms: i64) -> i64 {
        ms * 1000
    }

    #[test]
    fn slots_hold_exactly_what_was_recorded_from_from_on() {
        let from = 10 * SLOT_MS;
        let live = LiveSlots::new(from);
        // Before `from`: not kept. First and last by time.
        live.record(
            D,
            S,
            &[
                (us(from - 1), 9.0),
                (us(from + 1), 4.0),
                (us(from + 5), 2.0),
            ],
        );
        live.record(D, S, &[(us(from), 3.0), (us(from + SLOT_MS), 7.0)]);
        let (f, held) = live.slots(D, S, 0, i64::MAX);
        assert_eq!(f, from);
        assert_eq!(held.len(), 2);
        let a = held[0].1;
        assert_eq!((held[0].0, a.count, a.sum), (from, 3, 9.0));
        assert_eq!((a.first, a.last, a.min, a.max), (3.0, 2.0, 2.0, 4.0));
        assert_eq!(held[1].1.count, 1);
        // Another series and a range filter.
        assert!(live.slots(D, SensorId(2), 0, i64::MAX).1.is_empty());
        assert_eq!(live.slots(D, S, from + SLOT_MS, i64::MAX).1.len(), 1);
        assert_eq!(live.slots(D, S, from + 1, i64::MAX).1[0].0, from + SLOT_MS);
        assert_eq!(live.slots(D, S, i64::MIN, from + SLOT_MS).1.len(), 1);
        assert!(live.slots(D, S, from + 2 * SLOT_MS, i64::MAX).1.is_empty());
        // Moving on drops what is before; never back.
        live.advance(from + SLOT_MS + 7);
        assert_eq!(live.slots(D, S, 0, i64::MAX).0, from + SLOT_MS);
        assert_eq!(live.slots(D, S, 0, i64::MAX).1.len(), 1);
        live.advance(0);
        assert_eq!(live.slots(D, S, 0, i64::MAX).0, from + SLOT_MS);
        live.record(D, S, &[(us(from + 3), 1.0)]);
        assert_eq!(
            live.slots(D, S, 0, i64::MAX).1.len(),
            1,
            "before `from`: not held"
        );
        // A device with nothing live: exact (and empty) from `from` on.
        assert_eq!(
            live.slots(DeviceId(9), S, 0, i64::MAX),
            (from + SLOT_MS, vec![])
        );
        // What is held is counted, and given back.
        let (devices, bytes) = live.usage();
        assert_eq!(devices, 1);
        assert!(bytes >= ALLOC_BYTES + SLOT_BYTES + map_bytes(1), "{bytes}");
        live.forget_device(D);
        assert_eq!(live.usage().0, 0);
    }

    /// What the maps take holding these devices.
    fn maps_bytes(devices: &[u32]) -> usize {
        let mut maps = Devices::default();
        for &d in devices {
            maps.insert(
                DeviceId(d),
                DeviceSlots {
                    exact_from: 0,
                    used: 0,
                    slots: Vec::new(),
                },
            );
        }
        maps.bytes(None)
    }

    #[test]
    fn a_device_sending_only_into_lost_slots_takes_no_room() {
        let from = 10 * SLOT_MS;
        let live = LiveSlots::new(from);
        live.set_limits(1 << 20, Duration::ZERO);
        // Some device's readings of slot `from` were lost (evicted or never held).
        live.write().lost_through = from;
        for d in 10..40 {
            live.record(DeviceId(d), S, &[(us(from + 7), 1.0)]);
        }
        assert_eq!(live.usage(), (0, 0), "no entries that hold nothing");
        let (exact, held) = live.slots(DeviceId(10), S, 0, i64::MAX);
        assert_eq!((exact, held.len()), (from + SLOT_MS, 0), "read from DuckDB");
        // Readings of the next slot are held.
        live.record(
            DeviceId(10),
            S,
            &[(us(from + 7), 1.0), (us(from + SLOT_MS), 2.0)],
        );
        let (exact, held) = live.slots(DeviceId(10), S, 0, i64::MAX);
        assert_eq!((exact, held.len(), held[0].1.count), (from + SLOT_MS, 1, 1));
    }

    #[test]
    fn over_the_budget_devices_are_evicted_or_not_held_and_never_answered_short() {
        let from = 10 * SLOT_MS;
        let live = LiveSlots::new(from);
        // Room for two devices with one slot each; idle at once.
        let budget = maps_bytes(&[1, 2]) + 2 * (ALLOC_BYTES + 2 * SLOT_BYTES);
        live.set_limits(budget, Duration::ZERO);
        let one = |d: u32, ms: i64| live.record(DeviceId(d), S, &[(us(ms), 1.0)]);
        one(1, from);
        one(2, from + SLOT_MS);
        assert_eq!(live.usage().0, 2);
        // A third device evicts the longest idle (all idle here; the order among
        // equals does not matter): the evicted one's slots are no longer claimed.
        one(3, from + 2);
        let (devices, bytes) = live.usage();
        assert!(devices <= 2 && bytes <= budget, "{devices} {bytes}");
        let mut short = 0;
        for d in 1..=3 {
            let (exact, held) = live.slots(DeviceId(d), S, 0, i64::MAX);
            let ms = [from, from + SLOT_MS, from + 2][d as usize - 1];
            let claims = exact <= slot_of(ms);
            if claims {
                assert_eq!(held.len(), 1, "device {d} claims its slot: it holds it");
            } else {
                assert!(held.is_empty());
                short += 1;
            }
        }
        assert!(short >= 1, "someone was evicted");
        // A device whose entry is made after an eviction claims only later slots,
        // even for a slot it sends into now.
        live.record(DeviceId(1), S, &[(us(from + 5), 2.0)]);
        live.record(DeviceId(4), S, &[(us(from + 6), 2.0)]);
        for d in [1, 4] {
            let (exact, held) = live.slots(DeviceId(d), S, 0, i64::MAX);
            if exact <= from {
                assert_eq!(held[0].1.count, if d == 1 { 2 } else { 1 });
            } else {
                assert!(held.iter().all(|h| h.0 >= exact));
            }
        }
        // Slots move on past what was lost: every device is whole again.
        live.advance(from + 3 * SLOT_MS);
        for d in 1..=4 {
            assert_eq!(
                live.slots(DeviceId(d), S, 0, i64::MAX).0,
                from + 3 * SLOT_MS
            );
        }
    }

    #[test]
    fn a_load_over_the_budget_holds_whole_devices_and_claims_nothing_of_the_others() {
        let from = 10 * SLOT_MS;
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE rollups (device_id INTEGER, sensor_id SMALLINT, slot_ms BIGINT,
                 readings BIGINT, min_value DOUBLE, max_value DOUBLE, sum_value DOUBLE,
                 first_us BIGINT, first_value DOUBLE, last_us BIGINT, last_value DOUBLE)",
        )
        .unwrap();
        // 3,000 devices, two slots each (5 readings in the first, d % 7 + 1 in the
        // second), and an old slot that is not live.
        let (a, b, old) = (from, from + SLOT_MS, from - SLOT_MS);
        conn.execute_batch(&format!(
            "INSERT INTO rollups SELECT d, 1, {a}, 5, 1, 2, 3, {a}::BIGINT * 1000, 1, {a}::BIGINT * 1000 + 5, 2
                 FROM range(3000) t(d);
             INSERT INTO rollups SELECT d, 1, {b}, d % 7 + 1, 1, 2, 3, {b}::BIGINT * 1000, 1, {b}::BIGINT * 1000 + 5, 2
                 FROM range(3000) t(d);
             INSERT INTO rollups SELECT d, 1, {old}, 1, 1, 1, 1, 0, 1, 0, 1 FROM range(3000) t(d);
             CREATE TABLE devices AS SELECT d AS id, 'car-' || d AS name FROM range(3000) t(d);"
        ))
        .unwrap();
        let live = LiveSlots::new(from);
        live.set_limits(64 * 1024, Duration::from_secs(60));
        live.load(&conn, from).unwrap();
        let (held, bytes) = live.usage();
        // Within the budget but for the last device's growth.
        let slack = ALLOC_BYTES + 4 * SLOT_BYTES;
        assert!(
            held > 10 && held < 3000 && bytes <= 64 * 1024 + slack,
            "{held} {bytes}"
        );
        let mut holding = 0;
        for d in 0..3000u32 {
            let (exact, slots) = live.slots(DeviceId(d), S, 0, i64::MAX);
            if exact <= from {
                // Claims both slots: holds both, exactly.
                holding += 1;
                let counts: Vec<u64> = slots.iter().map(|s| s.1.count).collect();
                assert_eq!(counts, [5, u64::from(d % 7 + 1)], "device {d}");
            } else {
                assert!(exact > from + SLOT_MS, "device {d} claims a slot it lacks");
                assert!(slots.is_empty());
            }
        }
        assert_eq!(holding, held);
    }

    #[test]
    fn busy_devices_are_not_evicted_and_a_new_one_is_then_not_held() {
        let from = 10 * SLOT_MS;
        let live = LiveSlots::new(from);
        let budget = maps_bytes(&[1, 2]) + 2 * (ALLOC_BYTES + 2 * SLOT_BYTES);
        live.set_limits(budget, Duration::from_secs(3600));
        live.record(DeviceId(1), S, &[(us(from), 1.0)]);
        live.record(DeviceId(2), S, &[(us(from), 1.0)]);
        live.record(DeviceId(3), S, &[(us(from + SLOT_MS), 1.0)]);
        assert_eq!(live.usage().0, 2);
        for d in [1, 2] {
            assert_eq!(live.slots(DeviceId(d), S, 0, i64::MAX).1.len(), 1);
        }
        // Device 3's reading is not held: its slot and every earlier one are DuckDB's.
        let (exact, held) = live.slots(DeviceId(3), S, 0, i64::MAX);
        assert_eq!((exact, held.len()), (from + 2 * SLOT_MS, 0));
        // Devices 1 and 2 keep their slots exactly.
        live.record(DeviceId(1), S, &[(us(from + 9), 2.0)]);
        assert_eq!(live.slots(DeviceId(1), S, 0, i64::MAX).1[0].1.count, 2);
    }
}
