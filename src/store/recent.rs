//! Read-ahead of stored keys for the dedupe of older readings.
//!
//! A replay — a device re-sending its backlog, a re-imported export, the bench's
//! second pass — walks forward through time in many small requests. Reading back the
//! stored keys of each request's own time range costs one scan of every row group
//! overlapping it, and in a file still in arrival order a row group holds hours of
//! several devices. So the writer reads a *window* per device, sized to hold about
//! [`WINDOW_KEYS`] keys, and keeps it: the following requests of that device are
//! probed in memory until they leave it.
//!
//! Invariant (what makes it exact): a window holds every stored key of its device
//! between its bounds. The writer keeps it true by recording every row it appends in
//! the window's range ([`RecentKeys::record`]) and by dropping all windows when a
//! transaction rolls back ([`RecentKeys::clear`]). Anything that deletes readings must
//! clear them too.

use rustc_hash::FxHashSet;

/// Keys one window aims to hold (the window's time span follows from the device's
/// stored density): at one reading per second of six sensors, six hours. Replaying
/// the bench's 100 M readings into a file holding them ran at 1.05 M readings/s
/// without windows, 1.31 with 64 Ki keys, 2.08–2.27 with 128 Ki and 1.77–2.10 with
/// 256 Ki keys per window (more reading ahead than a request needs, and ~12 MB more
/// peak memory).
pub(super) const WINDOW_KEYS: u64 = 128 * 1024;
/// Keys held by all windows together, enough for 16 devices replaying at once; least
/// recently used windows go beyond it. A key takes 8 bytes in the hash set (9 with
/// its control byte, up to twice that in spare capacity): ~40 MB at most.
const BUDGET_KEYS: usize = 2 * 1024 * 1024;

/// Longest span of one window, ms: offsets from its start are packed in 48 bits of
/// microseconds (8.9 years).
pub(super) const MAX_SPAN_MS: i64 = (1 << 48) / 1000 - 1;

/// The stored keys of one device between `lo_ms` and `hi_ms`.
pub(super) struct Window {
    device: i32,
    lo_ms: i64,
    hi_ms: i64,
    /// `(sensor, micros)` packed into 8 bytes: see [`Window::key`].
    keys: FxHashSet<u64>,
    used: u64,
}

impl Window {
    /// An empty window over `[lo_ms, hi_ms]` (at most [`MAX_SPAN_MS`] long);
    /// [`Window::insert`] must then add every stored key of `device` in that range.
    pub(super) fn new(device: i32, lo_ms: i64, hi_ms: i64) -> Self {
        debug_assert!(hi_ms - lo_ms <= MAX_SPAN_MS);
        Self {
            device,
            lo_ms,
            hi_ms,
            keys: FxHashSet::default(),
            used: 0,
        }
    }

    /// Room for `n` more keys.
    pub(super) fn reserve(&mut self, n: usize) {
        self.keys.reserve(n);
    }

    /// Adds a stored key; `micros` must lie inside the window.
    pub(super) fn insert(&mut self, sensor: i16, micros: i64) {
        let key = self.key(sensor, micros);
        self.keys.insert(key);
    }

    /// True if the key is stored; `micros` must lie inside the window.
    pub(super) fn contains(&self, sensor: i16, micros: i64) -> bool {
        self.keys.contains(&self.key(sensor, micros))
    }

    /// The sensor in the top 16 bits, the offset from the window's start in the low
    /// 48 (a window spans at most [`MAX_SPAN_MS`]).
    fn key(&self, sensor: i16, micros: i64) -> u64 {
        let offset = (micros - self.lo_ms * 1000) as u64 & ((1 << 48) - 1);
        (u64::from(sensor as u16) << 48) | offset
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    fn covers(&self, device: i32, lo_ms: i64, hi_ms: i64) -> bool {
        self.device == device && self.lo_ms <= lo_ms && hi_ms <= self.hi_ms
    }
}

/// The windows the writer keeps, one per device at most.
#[derive(Default)]
pub(super) struct RecentKeys {
    windows: Vec<Window>,
    clock: u64,
}

impl RecentKeys {
    /// The window of `device` that covers `[lo_ms, hi_ms]`, if one is kept.
    pub(super) fn covering(&mut self, device: i32, lo_ms: i64, hi_ms: i64) -> Option<&Window> {
        self.clock += 1;
        let w = self
            .windows
            .iter_mut()
            .find(|w| w.covers(device, lo_ms, hi_ms))?;
        w.used = self.clock;
        Some(w)
    }

    /// Keeps `window`, replacing the device's previous one and dropping the least
    /// recently used others beyond the budget.
    pub(super) fn keep(&mut self, mut window: Window) -> &Window {
        self.clock += 1;
        window.used = self.clock;
        self.windows.retain(|w| w.device != window.device);
        let mut held = window.len();
        self.windows
            .sort_unstable_by_key(|w| std::cmp::Reverse(w.used));
        self.windows.retain(|w| {
            held += w.len();
            held <= BUDGET_KEYS
        });
        self.windows.push(window);
        self.windows.last().expect("just pushed")
    }

    /// Notes a row the current transaction appends, so windows stay complete.
    pub(super) fn record(&mut self, device: i32, sensor: i16, micros: i64) {
        let ms = micros.div_euclid(1000);
        if let Some(w) = self
            .windows
            .iter_mut()
            .find(|w| w.device == device && w.lo_ms <= ms && ms <= w.hi_ms)
        {
            w.insert(sensor, micros);
        }
    }

    /// True when no window is kept (the live-stream case): nothing to record.
    pub(super) fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Forgets every window (after a rollback, or when readings are deleted).
    pub(super) fn clear(&mut self) {
        self.windows.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(device: i32, lo: i64, hi: i64, n: i64) -> Window {
        let mut w = Window::new(device, lo, hi);
        for i in 0..n {
            w.insert(1, lo * 1000 + i);
        }
        w
    }

    #[test]
    fn covers_only_its_device_and_range() {
        let mut r = RecentKeys::default();
        r.keep(window(1, 100, 200, 10));
        assert!(r.covering(1, 100, 200).is_some());
        assert!(r.covering(1, 150, 160).is_some());
        assert!(r.covering(1, 99, 150).is_none());
        assert!(r.covering(1, 150, 201).is_none());
        assert!(r.covering(2, 150, 160).is_none());
        r.keep(window(1, 300, 400, 10));
        assert!(r.covering(1, 150, 160).is_none(), "replaced");
    }

    #[test]
    fn records_appends_inside_windows_only() {
        let mut r = RecentKeys::default();
        r.keep(window(1, 100, 200, 0));
        r.record(1, 2, 150_500);
        r.record(1, 2, 250_000);
        r.record(2, 2, 150_000);
        let w = r.covering(1, 100, 200).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w.contains(2, 150_500));
        assert!(!w.contains(1, 150_500));
        assert!(!w.contains(2, 150_501));
        r.clear();
        assert!(r.is_empty());
    }

    #[test]
    fn stays_within_the_budget_dropping_the_least_recently_used() {
        let mut r = RecentKeys::default();
        let n = (BUDGET_KEYS / 3) as i64;
        r.keep(window(1, 0, 10, n));
        r.keep(window(2, 0, 10, n));
        r.keep(window(3, 0, 10, n));
        assert!(r.covering(1, 0, 10).is_some());
        r.keep(window(4, 0, 10, n));
        assert!(r.covering(2, 0, 10).is_none(), "least recently used");
        assert!(r.covering(1, 0, 10).is_some());
        assert!(r.covering(3, 0, 10).is_some());
        assert!(r.covering(4, 0, 10).is_some());
    }
}
