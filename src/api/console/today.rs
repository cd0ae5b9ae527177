//! "Readings today" per device for the overview, exact and cheap on every view after
//! the first.
//!
//! Counting a streaming device's day afresh scans its day of raw readings: ~8 ms a
//! device with 100 M readings stored (50 cars at 1 Hz × 6 sensors), 160 ms for a page
//! of 20. So the count is kept and extended (`T` a little before the clock, so that
//! live readings in flight land after it): at time `T` the day `[midnight, end)`
//! held `count` readings, `after` of them at or after `T` (future-dated ones, usually
//! none), and the device had `total` readings overall. Next time, with `total'`
//! readings overall, `delta = count[T, end) − after` new readings landed at or after
//! `T`; if `total' − total == delta`, every new reading is one of those (none landed
//! before `T`, none was deleted), and the day holds `count + delta`. Otherwise
//! (a late upload, a replay, retention, a reading stored while the count ran) the
//! day is counted afresh. Either way the answer is exact.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::domain::{Device, Timestamp};

/// Most devices remembered (an entry is ~100 bytes); beyond it the map starts over.
const MAX_ENTRIES: usize = 100_000;

/// What was known of one device's day.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Kept {
    /// The day, `[midnight, end)`.
    midnight: Timestamp,
    end: Timestamp,
    /// When it was counted, and what.
    at: Timestamp,
    count: u64,
    /// Of `count`, readings at or after `at`.
    after: u64,
    /// The device's readings overall, read before the count.
    total: u64,
}

/// Counts of the day the store answers (`count(from, to)` over all of a device's
/// sensors).
pub trait DayCounter {
    /// Readings of the device in `[from, to)`.
    fn count(&self, from: Timestamp, to: Timestamp) -> Result<u64, crate::store::StoreError>;
}

/// Per device, the day as last counted.
#[derive(Default)]
pub struct TodayCounts(Mutex<HashMap<Device, Kept>>);

impl TodayCounts {
    /// Readings of `device` in `[midnight, end)`, given its `total` readings overall
    /// (read just before calling); `now` is the instant after which the next look
    /// counts new readings (a little before the clock: live readings in flight).
    pub fn count(
        &self,
        device: &Device,
        (midnight, end): (Timestamp, Timestamp),
        total: u64,
        now: Timestamp,
        store: &dyn DayCounter,
    ) -> Result<u64, crate::store::StoreError> {
        let kept = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(device)
            .copied()
            .filter(|k| k.midnight == midnight && k.end == end);
        let fresh = |store: &dyn DayCounter| -> Result<Kept, crate::store::StoreError> {
            Ok(Kept {
                midnight,
                end,
                at: now,
                count: store.count(midnight, end)?,
                after: store.count(now, end)?,
                total,
            })
        };
        let next = match kept {
            Some(k) if total == k.total => k,
            Some(k) if total > k.total => {
                let since = store.count(k.at, end)?;
                let delta = since.checked_sub(k.after);
                tracing::debug!(
                    device = %device,
                    since,
                    after = k.after,
                    new = total - k.total,
                    "today: new readings since the last look"
                );
                if delta == Some(total - k.total) {
                    // Moved on to now, so the next look counts only what follows.
                    Kept {
                        at: now,
                        count: k.count + (total - k.total),
                        after: store.count(now, end)?,
                        total,
                        ..k
                    }
                } else {
                    fresh(store)?
                }
            }
            _ => fresh(store)?,
        };
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(device.clone(), next);
        Ok(next.count)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// A device's stored readings (µs) and how many counts were asked.
    struct Fake(RefCell<(Vec<i64>, u32)>);

    impl DayCounter for Fake {
        fn count(&self, from: Timestamp, to: Timestamp) -> Result<u64, crate::store::StoreError> {
            let mut s = self.0.borrow_mut();
            s.1 += 1;
            let range = from.as_micros()..to.as_micros();
            Ok(s.0
                .iter()
                .filter(|t| range.contains(&(**t * 1_000_000)))
                .count() as u64)
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_micros(s * 1_000_000)
    }

    #[test]
    fn the_day_is_extended_when_it_can_be_and_recounted_when_not() {
        let dev = Device::parse("car").unwrap();
        let day = (t(1000), t(2000));
        let counts = TodayCounts::default();
        // Yesterday's 5 and today's 10, one of them future-dated.
        let store = Fake(RefCell::new((
            (995..1000).chain(1000..1009).chain([1900]).collect(),
            0,
        )));
        let total = |s: &Fake| s.0.borrow().0.len() as u64;
        let asked = |s: &Fake| s.0.borrow().1;
        assert_eq!(
            counts
                .count(&dev, day, total(&store), t(1010), &store)
                .unwrap(),
            10
        );
        // Live readings after `at`: extended with two small counts (what came
        // since, and what lies ahead of now).
        store.0.borrow_mut().0.extend(1010..1015);
        let before = asked(&store);
        assert_eq!(
            counts
                .count(&dev, day, total(&store), t(1015), &store)
                .unwrap(),
            15
        );
        assert_eq!(asked(&store) - before, 2);
        // Nothing new: no count at all.
        let before = asked(&store);
        assert_eq!(
            counts
                .count(&dev, day, total(&store), t(1016), &store)
                .unwrap(),
            15
        );
        assert_eq!(asked(&store), before);
        // A late upload from before the last look: counted afresh, exactly.
        store.0.borrow_mut().0.push(1009);
        assert_eq!(
            counts
                .count(&dev, day, total(&store), t(1020), &store)
                .unwrap(),
            16
        );
        // Yesterday's readings deleted (retention): total drops, counted afresh.
        store.0.borrow_mut().0.retain(|&s| s >= 1000);
        assert_eq!(
            counts
                .count(&dev, day, total(&store), t(1021), &store)
                .unwrap(),
            16
        );
        // A late one and a future one at once.
        store.0.borrow_mut().0.extend([1005, 1950]);
        assert_eq!(
            counts
                .count(&dev, day, total(&store), t(1022), &store)
                .unwrap(),
            18
        );
        // Live again: extended from there.
        store.0.borrow_mut().0.extend(1023..1030);
        assert_eq!(
            counts
                .count(&dev, day, total(&store), t(1030), &store)
                .unwrap(),
            25
        );
        // A new day starts over.
        assert_eq!(
            counts
                .count(&dev, (t(2000), t(3000)), total(&store), t(2001), &store)
                .unwrap(),
            0
        );
    }
}
