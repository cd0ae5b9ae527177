//! The live quarter hours of every series, aggregated in memory as readings are
//! acknowledged, so that charts never scan the fleet's newest readings.
//!
//! Until their slot ends, readings sit in DuckDB in arrival order: every row group of
//! the last minutes holds every device, so zone maps cannot skip any and a chart's
//! live quarter hours scanned the whole fleet's recent readings — with 2,000 devices
//! streaming, 25–70 ms per chart under load, growing with the fleet (issue 23). The
//! writer's front, which acknowledges every stored reading, folds each one whose slot
//! is at or after [`LiveSlots::from`] into a per-series, per-slot aggregate here,
//! after its commit and before its request is answered. So for slots from `from` on
//! this holds exactly the acknowledged readings, and a query takes them from here and
//! everything before `from` from DuckDB.
//!
//! `from` only moves forward: it follows the previous quarter hour of the clock, and
//! slots before it are dropped. When the writer starts, the live slots are read once
//! from the rollups, which are whole at that moment ([`LiveSlots::load`]); before that
//! (offline commands, which never write) `from` is the first slot after every stored
//! reading and the clock, so nothing is held and everything comes from DuckDB.
//! What is held is what the writer's own held rollup partials hold (the live slots of
//! each series with readings in them, and future ones up to `--max-future-skew`).

use std::sync::RwLock;

use duckdb::Connection;
use rustc_hash::FxHashMap;

use super::StoreError;
use super::rollup::{COMBINED, Held, SLOT_MS, slot_of};
use crate::domain::{Aggregate, DeviceId, SensorId};

#[derive(Default)]
struct Inner {
    /// Slots (ms) from this one on hold every acknowledged reading.
    from: i64,
    /// The latest slot (ms) ever held: queries look up slots from `from` to it.
    last: i64,
    /// One entry per series and slot with readings. Flat, as the writer's held rollup
    /// partials: with 100,000 devices streaming that is 0.6–1.2 M entries, and a
    /// `Vec` of slots per series (its heap block sized for four) cost ~350 bytes per
    /// series where an entry here is ~90 (measured with heaptrack: 208 → ~85 MB for
    /// 600 k series).
    held: FxHashMap<(DeviceId, SensorId, i64), Held>,
}

/// See the module docs.
pub(super) struct LiveSlots(RwLock<Inner>);

impl LiveSlots {
    /// Holding nothing, with slots from `from_ms` (a slot start) on to come.
    pub(super) fn new(from_ms: i64) -> Self {
        Self(RwLock::new(Inner {
            from: slot_of(from_ms),
            last: i64::MIN,
            held: FxHashMap::default(),
        }))
    }

    /// Adds a series' readings just stored (`(µs, value)`, any order); those of slots
    /// before `from` are not kept.
    pub(super) fn record(&self, device: DeviceId, sensor: SensorId, rows: &[(i64, f64)]) {
        let mut inner = self.0.write().unwrap_or_else(|p| p.into_inner());
        let from = inner.from;
        for &(ts, v) in rows {
            let slot = slot_of(ts.div_euclid(1000));
            if slot < from {
                continue;
            }
            inner.last = inner.last.max(slot);
            inner
                .held
                .entry((device, sensor, slot))
                .and_modify(|h| h.add(ts, v))
                .or_insert_with(|| Held::one(ts, v));
        }
    }

    /// Replaces what is held by the rollups of slots from `from_ms`'s on, which must
    /// be whole (the writer's start, after its rollup recovery; nothing is
    /// acknowledged meanwhile). One row per series and slot: with 100,000 devices
    /// streaming, ~1 M rows, where the readings would be tens of millions.
    pub(super) fn load(&self, conn: &Connection, from_ms: i64) -> Result<(), StoreError> {
        let _span = tracing::debug_span!("live_slots_load").entered();
        let from = slot_of(from_ms);
        let sql = format!(
            "SELECT device_id, sensor_id, slot_ms, {COMBINED}
             FROM rollups WHERE slot_ms >= {from}
             GROUP BY device_id, sensor_id, slot_ms"
        );
        let mut held = FxHashMap::default();
        let mut last = i64::MIN;
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let slot: i64 = r.get(2)?;
            let key = (
                DeviceId(r.get::<_, i32>(0)? as u32),
                SensorId(r.get::<_, i16>(1)? as u16),
                slot,
            );
            let agg = Held {
                readings: r.get(3)?,
                min: r.get(4)?,
                max: r.get(5)?,
                sum: r.get(6)?,
                first_us: r.get(7)?,
                first: r.get(8)?,
                last_us: r.get(9)?,
                last: r.get(10)?,
            };
            last = last.max(slot);
            held.insert(key, agg);
        }
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Inner { from, last, held };
        Ok(())
    }

    /// Moves `from` on to `to_ms`'s slot (never back), dropping earlier slots.
    pub(super) fn advance(&self, to_ms: i64) {
        let to = slot_of(to_ms);
        if to <= self.0.read().unwrap_or_else(|p| p.into_inner()).from {
            return;
        }
        let mut inner = self.0.write().unwrap_or_else(|p| p.into_inner());
        if to <= inner.from {
            return;
        }
        inner.from = to;
        let mut last = i64::MIN;
        inner.held.retain(|k, _| {
            let keep = k.2 >= to;
            if keep {
                last = last.max(k.2);
            }
            keep
        });
        inner.last = last;
    }

    /// Forgets every slot of a deleted device.
    pub(super) fn forget_device(&self, device: DeviceId) {
        let mut inner = self.0.write().unwrap_or_else(|p| p.into_inner());
        inner.held.retain(|k, _| k.0 != device);
    }

    /// `from`, and the aggregates of the series' slots in `[lo_ms, hi_ms)` at or after
    /// it, ascending (slots without readings left out).
    pub(super) fn slots(
        &self,
        device: DeviceId,
        sensor: SensorId,
        lo_ms: i64,
        hi_ms: i64,
    ) -> (i64, Vec<(i64, Aggregate)>) {
        let inner = self.0.read().unwrap_or_else(|p| p.into_inner());
        // A few lookups: the live slots run from the previous quarter hour to the
        // newest one held (at most `--max-future-skew` ahead).
        let first = slot_after(lo_ms.max(inner.from).saturating_sub(1));
        let end = hi_ms.min(inner.last.saturating_add(1));
        let held = (first..end)
            .step_by(SLOT_MS as usize)
            .filter_map(|slot| {
                inner
                    .held
                    .get(&(device, sensor, slot))
                    .map(|a| (slot, a.aggregate()))
            })
            .collect();
        (inner.from, held)
    }

    /// Slot entries held (for tests and metrics).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).held.len()
    }
}

/// The first slot after `ms`.
pub(super) fn slot_after(ms: i64) -> i64 {
    slot_of(ms) + SLOT_MS
}

/// The first live slot at `now_ms`: the previous quarter hour's (readings of the
/// current quarter hour arrive a little late; the writer's held rollup partials and
/// these slots follow the same clock).
pub(super) fn live_from(now_ms: i64) -> i64 {
    slot_of(now_ms) - SLOT_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: DeviceId = DeviceId(3);
    const S: SensorId = SensorId(1);

    #[test]
    fn slots_hold_exactly_what_was_recorded_from_from_on() {
        let from = 10 * SLOT_MS;
        let live = LiveSlots::new(from);
        let us = |ms: i64| ms * 1000;
        // Before `from`: not kept. Out of order within a slot: first and last by time.
        live.record(
            D,
            S,
            &[
                (us(from - 1), 9.0),
                (us(from + 5), 2.0),
                (us(from + 1), 4.0),
            ],
        );
        live.record(D, S, &[(us(from + SLOT_MS), 7.0)]);
        let (f, held) = live.slots(D, S, 0, i64::MAX);
        assert_eq!(f, from);
        assert_eq!(held.len(), 2);
        let a = held[0].1;
        assert_eq!((held[0].0, a.count, a.sum), (from, 2, 6.0));
        assert_eq!((a.first, a.last, a.min, a.max), (4.0, 2.0, 2.0, 4.0));
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
        assert_eq!(live.len(), 1);
        live.advance(0);
        assert_eq!(live.slots(D, S, 0, i64::MAX).0, from + SLOT_MS);
        live.record(D, S, &[(us(from + 3), 1.0)]);
        assert_eq!(live.len(), 1, "a reading before `from` is not held");
    }
}
