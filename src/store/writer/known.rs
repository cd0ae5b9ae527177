//! What the front knows, in memory, about each series' stored keys: enough to decide
//! most older readings — a device's retry after a timeout, an offline buffer replayed
//! beside live data — without asking DuckDB.
//!
//! Issue 23 measured re-sent and out-of-order small requests 20× slower than in-order
//! ones: every group holding one reading not newer than its series' newest went the
//! database way (wait for the flusher, read a window of stored keys, one transaction
//! per group), and with 2,000 devices the windows evicted each other. Most of those
//! readings can be decided from two small facts per series:
//!
//! - **spans**: a few `[lo, hi]` ranges that together cover every stored timestamp of
//!   the series (a superset: gaps inside a span may or may not hold readings). A
//!   reading outside every span is not stored. A replayed backlog of an earlier day
//!   walks forward through a gap, extending the span below it, so each of its
//!   readings falls outside.
//! - **tails**: per span, its [`TAIL`] newest stored timestamps, and the point from
//!   which the tail holds *every* stored timestamp of the span (`exact_from`). A
//!   reading at or after that point is stored exactly when it is in the tail: an
//!   exact re-send of the last requests.
//!
//! Anything else (a re-send of an old backlog, a reading inside a span's unknown
//! part) is left to the database, as before. Both facts are only ever made coarser
//! when dropped — a series without an entry is one span `[first, last]` with an empty
//! tail, which its statistics give — so an entry can be evicted at any time: one map
//! holds at most a budget's worth of series (`--known-keys-memory`), and when it is
//! full the half of them written longest ago is forgotten (memory stays bounded
//! however many devices appear).
//!
//! Invariant (what makes it exact): every key recorded was stored (recorded only after
//! its commit succeeded, see [`Known::record`]), and every stored key is recorded.
//! Anything that deletes readings must [`Known::clear`] it.

use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use crate::domain::{DeviceId, SensorId};

/// Newest timestamps kept per span. A fleet device sends one reading per sensor per
/// request, so a re-send of any of its last six requests is decided in memory.
pub(super) const TAIL: usize = 6;
/// Spans kept per series; beyond it the two closest merge (coarser, still exact).
const MAX_SPANS: usize = 4;
/// Memory the known keys may take by default: 229,376 series (38,000 devices of six
/// sensors each) in a map of 256 Ki buckets of 73 bytes, 19 MB (113 bytes, 30 MB, in a
/// budget of 32 MiB before spans kept their tails as 32-bit distances).
///
/// Two generations of maps (a series not written for a whole generation forgotten)
/// held half as many in the same memory, 114,688 a generation: 20,000 devices of six
/// sensors (120,000 series) did not fit, every rotation forgot the series not written
/// in the last generation, and their backlog readings went to the database — 7.3 k
/// req/s with p99 394 ms against 43 k and 6 ms with twice the budget.
pub const DEFAULT_BUDGET: usize = 20 << 20;

/// Bytes one bucket of the map takes: key, entry and control byte. An entry of one
/// span (the common case) is inline, so this is all a series costs.
const BUCKET_BYTES: usize = std::mem::size_of::<((DeviceId, SensorId), Entry)>() + 1;

/// Series the map holds within `budget` bytes: 7/8 of the largest power of two of
/// buckets that fits it (hashbrown's maps grow by doubling at 7/8 full, so the map
/// is trimmed before it would double). At least 7 (a map of 8 buckets).
fn capacity_for(budget: usize) -> usize {
    let buckets = (budget / BUCKET_BYTES).max(8);
    let buckets = 1usize << buckets.ilog2();
    buckets / 8 * 7
}

/// One series' entry: what is known, and when it was last written.
#[derive(Debug, Clone)]
struct Entry {
    keys: Keys,
    /// [`Known::clock`] when the series was last recorded.
    written: u64,
}

/// What is known of one series' stored timestamps: ordered, disjoint spans.
type Keys = SmallVec<[Span; 1]>;

/// A range holding stored timestamps, and its newest ones, kept as 32-bit distances
/// below the span's newest (`hi`, always a stored timestamp): 48 bytes instead of the
/// 80 that six full timestamps took, so a series' bucket is 73 bytes, not 113 (the
/// default map of 256 Ki buckets: 19 MB instead of 30, the same 229,376 series).
/// 32 bits of microseconds reach 71 minutes below `hi`; what lies further is dropped
/// from the tail and `exact_from` rises to what is kept ([`Wide::narrow`]): coarser,
/// still exact. A fleet device's last six requests lie seconds apart.
#[derive(Debug, Clone)]
struct Span {
    lo: i64,
    hi: i64,
    /// `hi + 1 - exact_from`: every stored timestamp in `[exact_from, hi]` is in the
    /// tail (0: none is known exactly).
    exact_ago: u32,
    /// `hi - t` for the tail's timestamps `t`, ascending in `t` (so descending): the
    /// first `len`.
    ago: [u32; TAIL],
    len: u8,
}

impl Span {
    /// A span known only by its bounds (what the series statistics say).
    fn bounds(lo: i64, hi: i64) -> Self {
        Self {
            lo,
            hi,
            exact_ago: 0,
            ago: [0; TAIL],
            len: 0,
        }
    }

    /// A span of one stored timestamp, below everything else stored.
    fn point(ts: i64) -> Self {
        Self {
            exact_ago: 1,
            len: 1,
            ..Self::bounds(ts, ts)
        }
    }

    fn exact_from(&self) -> i64 {
        self.hi + 1 - i64::from(self.exact_ago)
    }

    /// Whether `ts` (at or after `exact_from`, so within 32 bits of `hi`) is in the tail.
    fn holds(&self, ts: i64) -> bool {
        u32::try_from(self.hi - ts).is_ok_and(|a| self.ago[..usize::from(self.len)].contains(&a))
    }

    /// Records `ts` above `hi` (the gap above a span holds nothing stored, see
    /// [`add`]) on the compact form: every distance grows by the step, `ts` joins the
    /// tail at distance 0, and a full tail drops its oldest, from which on it stays
    /// complete. `false` (nothing changed) when a distance would pass 32 bits: the
    /// caller goes through [`Wide`]. The in-order case, so every reading of a bulk
    /// import: `record` took 44–46 ns a reading through `Wide` alone, 20–23 with
    /// this, 27–29 with full timestamps (scratch benchmark, 10 M readings of 24
    /// series in runs of 417).
    fn push_newest(&mut self, ts: i64) -> bool {
        let Some(step) = ts.checked_sub(self.hi).and_then(|d| u32::try_from(d).ok()) else {
            return false;
        };
        // `exact_from` is at or below the tail's oldest, so `exact_ago` is the
        // largest distance held.
        if step == 0 || self.exact_ago.checked_add(step).is_none() {
            return false;
        }
        let len = usize::from(self.len);
        for a in &mut self.ago[..len] {
            *a += step;
        }
        self.exact_ago += step;
        if len < TAIL {
            self.ago[len] = 0;
            self.len += 1;
        } else {
            self.ago.copy_within(1.., 0);
            self.ago[TAIL - 1] = 0;
            self.exact_ago = self.ago[0] + 1;
        }
        self.hi = ts;
        true
    }

    /// The span with full timestamps, to change it.
    fn wide(&self) -> Wide {
        let mut tail = [0; TAIL];
        for (t, a) in tail.iter_mut().zip(&self.ago[..usize::from(self.len)]) {
            *t = self.hi - i64::from(*a);
        }
        Wide {
            lo: self.lo,
            hi: self.hi,
            exact_from: self.exact_from(),
            tail,
            len: self.len,
        }
    }
}

/// A [`Span`] with full timestamps, while it changes.
#[derive(Debug, Clone)]
struct Wide {
    lo: i64,
    hi: i64,
    /// Every stored timestamp in `[exact_from, hi]` is in `tail`.
    exact_from: i64,
    /// Ascending: the first `len`.
    tail: [i64; TAIL],
    len: u8,
}

impl Wide {
    fn tail(&self) -> &[i64] {
        &self.tail[..usize::from(self.len)]
    }

    /// A stored timestamp at or after `exact_from` (and within the span).
    fn add_exact(&mut self, ts: i64) {
        let Err(i) = self.tail().binary_search(&ts) else {
            return;
        };
        let len = usize::from(self.len);
        if len < TAIL {
            self.tail.copy_within(i..len, i + 1);
            self.tail[i] = ts;
            self.len += 1;
        } else if i > 0 {
            // Full: the smallest goes; everything dropped lies below the smallest
            // kept one, from which on the tail stays complete.
            self.tail.copy_within(1..i, 0);
            self.tail[i - 1] = ts;
            self.exact_from = self.tail[0];
        } else {
            // Older than the whole full tail: the span can no longer say exactly
            // what lies below the tail's start.
            self.exact_from = self.tail[0];
        }
    }

    /// The compact span. Whatever lies more than 32 bits below `hi` is dropped from
    /// the tail and `exact_from` rises to the oldest timestamp kept (or above `hi`):
    /// the tail stays complete from there on.
    fn narrow(&self) -> Span {
        let reach = self.hi + 1 - i64::from(u32::MAX);
        let mut exact_from = self.exact_from;
        let mut tail = self.tail();
        if exact_from < reach {
            let keep = tail.partition_point(|&t| t < reach);
            tail = &tail[keep..];
            exact_from = tail.first().copied().unwrap_or(self.hi + 1);
        }
        let mut ago = [0; TAIL];
        for (a, t) in ago.iter_mut().zip(tail) {
            *a = u32::try_from(self.hi - t).expect("within 32 bits of hi");
        }
        Span {
            lo: self.lo,
            hi: self.hi,
            exact_ago: u32::try_from(self.hi + 1 - exact_from).expect("within 32 bits of hi"),
            ago,
            len: u8::try_from(tail.len()).expect("at most TAIL"),
        }
    }
}

/// A stored reading's fate, as far as memory knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lookup {
    /// Stored: the reading is a duplicate.
    Stored,
    /// Not stored: the reading is new.
    Absent,
    /// Only the database can tell.
    Unknown,
}

/// Per series, its spans and tails (see the module docs).
pub(super) struct Known {
    series: FxHashMap<(DeviceId, SensorId), Entry>,
    /// Series held at most ([`capacity_for`]).
    capacity: usize,
    /// Counts recordings: an entry's `written` orders it by its last one.
    clock: u64,
    /// The map has grown to [`Self::capacity`] (its buckets never shrink).
    largest: bool,
}

#[cfg(test)]
impl Default for Known {
    fn default() -> Self {
        Self::with_budget(DEFAULT_BUDGET)
    }
}

impl Known {
    /// Nothing known yet; the map takes at most `budget` bytes
    /// (`--known-keys-memory`). A smaller budget forgets series sooner: their
    /// older readings are then decided by the database (exact, slower).
    pub(super) fn with_budget(budget: usize) -> Self {
        Self {
            series: FxHashMap::default(),
            capacity: capacity_for(budget),
            clock: 0,
            largest: false,
        }
    }

    /// Whether `ts` of the series is stored, given its statistics' `first` and
    /// `last` (micros; `None` for a series with nothing stored).
    pub(super) fn lookup(
        &self,
        series: (DeviceId, SensorId),
        bounds: Option<(i64, i64)>,
        ts: i64,
    ) -> Lookup {
        let Some((first, last)) = bounds else {
            return Lookup::Absent;
        };
        let fallback;
        let spans = match self.series.get(&series) {
            Some(e) => e.keys.as_slice(),
            None => {
                fallback = [Span::bounds(first, last)];
                &fallback[..]
            }
        };
        let Some(span) = spans.iter().find(|s| s.lo <= ts && ts <= s.hi) else {
            return Lookup::Absent;
        };
        if ts < span.exact_from() {
            Lookup::Unknown
        } else if span.holds(ts) {
            Lookup::Stored
        } else {
            Lookup::Absent
        }
    }

    /// Records readings (`(µs, value)`) of a series just stored (ascending in time,
    /// none stored before), given its statistics before them.
    pub(super) fn record(
        &mut self,
        series: (DeviceId, SensorId),
        before: Option<(i64, i64)>,
        stored: &[(i64, f64)],
    ) {
        if stored.is_empty() {
            return;
        }
        // Full: the map has grown to its largest and has no room left (hashbrown's
        // `capacity` is what it holds before it grows; erased slots take room until
        // it rehashes).
        self.largest |= self.series.capacity() >= self.capacity;
        let full = self.largest && self.series.len() >= self.series.capacity();
        if full && !self.series.contains_key(&series) {
            self.evict();
        }
        self.clock += 1;
        let entry = self.series.entry(series).or_insert_with(|| Entry {
            keys: before
                .map(|(first, last)| Span::bounds(first, last))
                .into_iter()
                .collect(),
            written: 0,
        });
        entry.written = self.clock;
        for &(ts, _) in stored {
            add(&mut entry.keys, ts);
        }
    }

    /// Forgets the older half of the series (by their last recording). Every
    /// recording advances the clock by one and entries keep their last one, so the
    /// entries' stamps differ and at most `keep` lie in the last `keep` ticks. Half:
    /// erasing leaves tombstones in hashbrown's table, and a table at most half full
    /// is rehashed in place when it runs out of room; fuller, it would double.
    fn evict(&mut self) {
        let keep = (self.capacity / 2).saturating_sub(1).max(1) as u64;
        let since = self.clock.saturating_sub(keep);
        let before = self.series.len();
        self.series.retain(|_, e| e.written > since);
        tracing::debug!(
            forgotten = before - self.series.len(),
            "known keys full: the series written longest ago forgotten"
        );
    }

    /// Forgets the series of a deleted device.
    pub(super) fn forget_device(&mut self, device: DeviceId) {
        self.series.retain(|(d, _), _| *d != device);
    }

    /// Forgets everything (readings were deleted).
    pub(super) fn clear(&mut self) {
        self.series = FxHashMap::default();
        self.largest = false;
    }

    /// Series with an entry.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.series.len()
    }
}

/// Records one stored timestamp in a series' spans.
fn add(spans: &mut Keys, ts: i64) {
    // The last span starting at or before `ts`.
    let below = spans.partition_point(|s| s.lo <= ts);
    if below == 0 {
        // Before everything stored: a span of its own.
        spans.insert(0, Span::point(ts));
    } else if !spans[below - 1].push_newest(ts) {
        let mut span = spans[below - 1].wide();
        if ts > span.hi {
            // In the gap above it (or above everything): nothing was stored between
            // its end and `ts`, so the span grows and stays exact where it was. (It
            // stays below the next span, which starts after `ts`.)
            span.hi = ts;
        }
        if ts >= span.exact_from {
            span.add_exact(ts);
        }
        spans[below - 1] = span.narrow();
    }
    if spans.len() > MAX_SPANS {
        let i = (1..spans.len())
            .min_by_key(|&i| spans[i].lo - spans[i - 1].hi)
            .expect("more than one span");
        // The merged span keeps the upper one's tail: exact over the same range (its
        // distances are from the same `hi`).
        let upper = spans.remove(i);
        spans[i - 1] = Span {
            lo: spans[i - 1].lo,
            ..upper
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const S: (DeviceId, SensorId) = (DeviceId(1), SensorId(2));

    /// Stores `ts` through `known` as the writer does, tracking the truth beside it.
    fn store(known: &mut Known, truth: &mut BTreeSet<i64>, ts: &[i64]) {
        let mut new: Vec<i64> = ts.iter().copied().filter(|t| !truth.contains(t)).collect();
        new.sort_unstable();
        new.dedup();
        let before = truth.first().zip(truth.last()).map(|(a, b)| (*a, *b));
        let rows: Vec<(i64, f64)> = new.iter().map(|t| (*t, 0.0)).collect();
        known.record(S, before, &rows);
        truth.extend(new);
    }

    fn bounds(truth: &BTreeSet<i64>) -> Option<(i64, i64)> {
        truth.first().zip(truth.last()).map(|(a, b)| (*a, *b))
    }

    #[test]
    fn retries_and_an_ordered_backlog_are_decided_in_memory() {
        let mut k = Known::default();
        let mut truth = BTreeSet::new();
        // Live data, learned from statistics only (as after a restart).
        truth.extend(1000..2000);
        let b = bounds(&truth);
        assert_eq!(k.lookup(S, b, 1500), Lookup::Unknown);
        assert_eq!(k.lookup(S, b, 999), Lookup::Absent);
        assert_eq!(k.lookup(S, b, 2000), Lookup::Absent);
        // Live requests go on; their re-sends are duplicates, a skipped second is not.
        for t in [2000, 2001, 2003] {
            store(&mut k, &mut truth, &[t]);
        }
        let b = bounds(&truth);
        assert_eq!(k.lookup(S, b, 2001), Lookup::Stored);
        assert_eq!(k.lookup(S, b, 2002), Lookup::Absent);
        // A backlog of an earlier day, in order, beside live data: always absent.
        for t in 100..200 {
            assert_eq!(k.lookup(S, bounds(&truth), t), Lookup::Absent, "{t}");
            store(&mut k, &mut truth, &[t]);
            store(&mut k, &mut truth, &[t + 2004]);
            assert_eq!(k.lookup(S, bounds(&truth), t), Lookup::Stored);
        }
        // The backlog's re-sends of its last requests too; older ones need the database.
        assert_eq!(k.lookup(S, bounds(&truth), 195), Lookup::Stored);
        assert_eq!(k.lookup(S, bounds(&truth), 150), Lookup::Unknown);
        assert_eq!(k.len(), 1);
    }

    #[test]
    fn readings_hours_apart_keep_only_what_32_bits_reach() {
        const MIN: i64 = 60_000_000;
        let mut k = Known::default();
        let mut truth = BTreeSet::new();
        // A device reporting every 30 minutes, then one reading 2 hours later.
        for t in [0, 30 * MIN, 60 * MIN] {
            store(&mut k, &mut truth, &[t]);
        }
        let b = bounds(&truth);
        for t in [0, 30 * MIN, 60 * MIN] {
            assert_eq!(k.lookup(S, b, t), Lookup::Stored, "{t}");
        }
        assert_eq!(k.lookup(S, b, 45 * MIN), Lookup::Absent);
        store(&mut k, &mut truth, &[180 * MIN]);
        let b = bounds(&truth);
        // The newest is known; the tail 2 hours below it no longer fits: the database
        // decides those (and the gap: it may not say "absent" without the tail).
        assert_eq!(k.lookup(S, b, 180 * MIN), Lookup::Stored);
        for t in [60 * MIN, 120 * MIN, 180 * MIN - 1] {
            assert_eq!(k.lookup(S, b, t), Lookup::Unknown, "{t}");
        }
        // Live data again: its re-sends and gaps are decided in memory.
        store(&mut k, &mut truth, &[181 * MIN]);
        let b = bounds(&truth);
        assert_eq!(k.lookup(S, b, 180 * MIN), Lookup::Stored);
        assert_eq!(k.lookup(S, b, 181 * MIN - 1), Lookup::Absent);
    }

    #[test]
    fn memory_is_bounded_and_the_least_recently_written_are_forgotten() {
        // The default holds 229,376 series (38,000 devices of six sensors) in a map
        // of 256 Ki buckets.
        assert_eq!(capacity_for(DEFAULT_BUDGET), 7 * 32 * 1024);
        let budget = 1 << 20;
        let mut k = Known::with_budget(budget);
        let capacity = k.capacity;
        let s = |i: usize| (DeviceId(i as u32), SensorId(0));
        let kept = s(usize::MAX >> 40);
        // A working set of 90 % of the capacity, written round and round, stays
        // known whole (two generations of half the size each forgot some of it).
        let working = capacity / 10 * 9;
        for round in 0..3 {
            for i in 0..working {
                k.record(s(i), None, &[(10 + round, 0.0)]);
            }
        }
        assert_eq!(k.len(), working);
        assert_eq!(k.lookup(s(0), Some((10, 12)), 11), Lookup::Stored);
        // Then many more series than fit, twice over.
        for i in 0..3 * capacity {
            k.record(s(working + i), None, &[(10, 0.0)]);
            // One series written all along stays known.
            k.record(kept, None, &[(i as i64 + 100, 0.0)]);
        }
        assert!(k.len() <= capacity, "{}", k.len());
        // The map, as allocated (hashbrown: 8 buckets per 7 of capacity), within it.
        let buckets = k.series.capacity() / 7 * 8;
        assert!(buckets * BUCKET_BYTES <= budget, "{buckets} buckets");
        assert!(buckets * BUCKET_BYTES > budget / 4, "{buckets} buckets");
        let last = 3 * capacity as i64 + 99;
        assert_eq!(k.lookup(kept, Some((100, last)), last), Lookup::Stored);
        assert_eq!(k.lookup(kept, Some((100, last)), last - 1), Lookup::Stored);
        // The first series was forgotten: only the database can tell.
        assert_eq!(k.lookup(s(0), Some((10, 12)), 11), Lookup::Unknown);
        // A series of one span: key 8 bytes, entry 64 (span 48, the small vector's
        // length, the clock), control byte 1.
        assert_eq!(BUCKET_BYTES, 73);
    }

    proptest! {
        /// Whatever is stored in whatever order, a decided lookup is the truth:
        /// timestamps close together and, scaled, further apart than a span's 32-bit
        /// distances reach (71 minutes of microseconds).
        #[test]
        fn a_decided_lookup_is_always_true(
            start in proptest::collection::vec(0i64..400, 0..50),
            groups in proptest::collection::vec(proptest::collection::vec(0i64..400, 1..12), 1..40),
            probes in proptest::collection::vec(0i64..400, 1..60),
            scale in prop_oneof![Just(1i64), Just(1 << 29), Just(1 << 31)],
        ) {
            let mut k = Known::default();
            let mut truth: BTreeSet<i64> = start.into_iter().map(|t| t * scale).collect();
            let probes: Vec<i64> = probes.into_iter().map(|t| t * scale).collect();
            for g in &groups {
                let g: Vec<i64> = g.iter().map(|t| t * scale).collect();
                store(&mut k, &mut truth, &g);
                for &p in &probes {
                    match k.lookup(S, bounds(&truth), p) {
                        Lookup::Stored => prop_assert!(truth.contains(&p)),
                        Lookup::Absent => prop_assert!(!truth.contains(&p)),
                        Lookup::Unknown => {}
                    }
                }
            }
            k.clear();
            for &p in &probes {
                match k.lookup(S, bounds(&truth), p) {
                    Lookup::Stored => prop_assert!(truth.contains(&p)),
                    Lookup::Absent => prop_assert!(!truth.contains(&p)),
                    Lookup::Unknown => {}
                }
            }
        }
    }
}
