//! The GPS track: latitude and longitude readings paired by timestamp, then thinned
//! to at most `max_points` with largest-triangle-three-buckets (LTTB), streamed so a
//! month of 1 Hz positions never sits in memory at once.

use crate::domain::SensorId;
use crate::store::ScanChunk;

/// One position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// µs since the epoch.
    pub ts: i64,
    /// Degrees east.
    pub lon: f64,
    /// Degrees north.
    pub lat: f64,
}

/// Pairs a time-ordered stream of latitude and longitude readings: a pair is a
/// latitude and a longitude at most `tolerance` µs apart; a reading that finds no
/// partner in time is dropped.
pub struct Pairer {
    lat_id: SensorId,
    tolerance: i64,
    lat: Option<(i64, f64)>,
    lon: Option<(i64, f64)>,
}

impl Pairer {
    /// A pairer for readings of sensor `lat_id` (latitude) and any other (longitude).
    pub fn new(lat_id: SensorId, tolerance_micros: i64) -> Self {
        Self {
            lat_id,
            tolerance: tolerance_micros,
            lat: None,
            lon: None,
        }
    }

    /// Feeds a scanned chunk, calling `out` for every completed pair.
    pub fn feed(&mut self, chunk: &ScanChunk<'_>, mut out: impl FnMut(Point)) {
        for i in 0..chunk.ts.len() {
            let r = (chunk.ts[i], chunk.values[i]);
            if chunk.sensors[i] == self.lat_id {
                self.lat = Some(r);
            } else {
                self.lon = Some(r);
            }
            if let (Some(lat), Some(lon)) = (self.lat, self.lon) {
                if (lat.0 - lon.0).abs() <= self.tolerance {
                    out(Point {
                        ts: lat.0.min(lon.0),
                        lon: lon.1,
                        lat: lat.1,
                    });
                    self.lat = None;
                    self.lon = None;
                } else if lat.0 < lon.0 {
                    self.lat = None;
                } else {
                    self.lon = None;
                }
            }
        }
    }
}

/// Streaming LTTB over points in time order. Buckets are cut by index from the
/// expected number of points; if more arrive, the last bucket absorbs them, so the
/// output never exceeds `max` points. The first and last points are always kept.
pub struct Downsampler {
    max: usize,
    per_bucket: f64,
    middle_seen: u64,
    out: Vec<Point>,
    cur: Vec<Point>,
    cur_bucket: usize,
    next: Vec<Point>,
    next_bucket: usize,
    held: Option<Point>,
    total: u64,
}

impl Downsampler {
    /// A downsampler to at most `max` (≥ 2) points, expecting about `expected` input
    /// points.
    pub fn new(max: usize, expected: u64) -> Self {
        let max = max.max(2);
        let middle_buckets = (max - 2).max(1) as f64;
        let per_bucket = (expected.saturating_sub(2) as f64 / middle_buckets).max(1.0);
        Self {
            max,
            per_bucket,
            middle_seen: 0,
            out: Vec::with_capacity(max),
            cur: Vec::new(),
            cur_bucket: 0,
            next: Vec::new(),
            next_bucket: 0,
            held: None,
            total: 0,
        }
    }

    /// Points fed so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Adds the next point.
    pub fn push(&mut self, p: Point) {
        self.total += 1;
        if self.out.is_empty() {
            self.out.push(p);
            return;
        }
        // The newest point might be the last one, which is always kept: hold it back
        // until another arrives.
        if let Some(q) = self.held.replace(p) {
            self.middle(q);
        }
    }

    fn middle(&mut self, q: Point) {
        if self.max == 2 {
            return;
        }
        let bucket = ((self.middle_seen as f64 / self.per_bucket) as usize).min(self.max - 3);
        self.middle_seen += 1;
        if self.cur.is_empty() {
            self.cur_bucket = bucket;
            self.cur.push(q);
        } else if bucket == self.cur_bucket {
            self.cur.push(q);
        } else if self.next.is_empty() || bucket == self.next_bucket {
            self.next_bucket = bucket;
            self.next.push(q);
        } else {
            let c = centroid(&self.next);
            self.select_from_cur(c);
            self.cur = std::mem::take(&mut self.next);
            self.cur_bucket = self.next_bucket;
            self.next.push(q);
            self.next_bucket = bucket;
        }
    }

    /// Keeps the point of `cur` that spans the largest triangle with the last kept
    /// point and `c`.
    fn select_from_cur(&mut self, c: (f64, f64)) {
        let a = *self.out.last().expect("the first point is kept");
        let area =
            |p: &Point| ((a.lon - c.0) * (p.lat - a.lat) - (a.lon - p.lon) * (c.1 - a.lat)).abs();
        if let Some(best) = self.cur.iter().max_by(|x, y| area(x).total_cmp(&area(y))) {
            self.out.push(*best);
        }
        self.cur.clear();
    }

    /// The kept points, in time order.
    pub fn finish(mut self) -> Vec<Point> {
        let Some(last) = self.held.take() else {
            return self.out;
        };
        let last_xy = (last.lon, last.lat);
        if !self.cur.is_empty() {
            let c = if self.next.is_empty() {
                last_xy
            } else {
                centroid(&self.next)
            };
            self.select_from_cur(c);
        }
        if !self.next.is_empty() {
            self.cur = std::mem::take(&mut self.next);
            self.select_from_cur(last_xy);
        }
        self.out.push(last);
        self.out
    }
}

fn centroid(points: &[Point]) -> (f64, f64) {
    let n = points.len() as f64;
    let (x, y) = points
        .iter()
        .fold((0.0, 0.0), |(x, y), p| (x + p.lon, y + p.lat));
    (x / n, y / n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ts: i64, lon: f64, lat: f64) -> Point {
        Point { ts, lon, lat }
    }

    #[test]
    fn pairs_within_tolerance_only() {
        let lat = SensorId(5);
        let lon = SensorId(6);
        let chunk = ScanChunk {
            sensors: &[lat, lon, lat, lon, lon, lat],
            ts: &[0, 0, 1_000, 5_000_000, 9_000_000, 9_000_400],
            values: &[50.0, 8.0, 50.1, 8.2, 8.3, 50.3],
        };
        let mut out = Vec::new();
        Pairer::new(lat, 500).feed(&chunk, |q| out.push(q));
        assert_eq!(out, vec![p(0, 8.0, 50.0), p(9_000_000, 8.3, 50.3)]);
    }

    #[test]
    fn short_tracks_are_kept_whole() {
        let mut d = Downsampler::new(10, 5);
        let pts: Vec<Point> = (0..5).map(|i| p(i, i as f64, 0.0)).collect();
        for q in &pts {
            d.push(*q);
        }
        assert_eq!(d.finish(), pts);
    }

    #[test]
    fn long_tracks_keep_ends_and_corners_within_the_limit() {
        // An L-shaped route: east along the equator, then north. The corner must
        // survive thinning.
        let mut pts = Vec::new();
        for i in 0..5000 {
            pts.push(p(i, i as f64 * 0.001, 0.0));
        }
        for i in 0..5000 {
            pts.push(p(5000 + i, 5.0, i as f64 * 0.001));
        }
        for (max, expected) in [(50, 10_000), (50, 3_000), (2, 10_000), (3, 10_000)] {
            let mut d = Downsampler::new(max, expected);
            for q in &pts {
                d.push(*q);
            }
            let out = d.finish();
            assert!(out.len() <= max, "{} > {max}", out.len());
            assert_eq!(out.first(), pts.first());
            assert_eq!(out.last(), pts.last());
            assert!(out.windows(2).all(|w| w[0].ts < w[1].ts));
            if max >= 50 {
                let near_corner = out
                    .iter()
                    .any(|q| (q.lon - 5.0).abs() < 0.2 && q.lat.abs() < 0.2);
                assert!(
                    near_corner,
                    "corner lost with max {max}, expected {expected}"
                );
            }
        }
    }
}
