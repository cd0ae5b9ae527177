//! Exact dedupe of older readings ("maybe" rows: replays and late uploads) against
//! the stored keys of their device and time range.

use duckdb::arrow::array::{Int16Array, Int64Array};

use super::db::Db;
use crate::domain::DeviceId;
use crate::store::StoreError;
use crate::store::columns::Columns;
use crate::store::recent::{MAX_SPAN_MS, WINDOW_KEYS, Window};

impl Db {
    /// Checks the "maybe" rows against stored readings: those not stored yet move to
    /// `fresh`; returns, indexed by `seq`, which were (shorter than the group when the
    /// last rows were not staged).
    ///
    /// Per device and time cluster, the staged keys are probed against a window of
    /// the device's stored keys (see [`super::recent`]), read when no kept window
    /// covers the cluster: one scan of the nearby row groups (a plain range filter on
    /// `ts_ms`, so zone maps skip the rest) serves the following requests of a replay
    /// too. Staging the rows in a temp table and joining there was ~40% slower per
    /// reading than appending fresh ones.
    pub(super) fn dedupe_staged(
        &mut self,
        staged: &Columns,
        fresh: &mut Columns,
    ) -> Result<Vec<bool>, StoreError> {
        let _span = tracing::debug_span!("dedupe", rows = staged.ts.len()).entered();
        let last_seq = staged.seq.iter().max().map_or(0, |m| *m as usize + 1);
        let mut dups = vec![false; last_seq];
        let mut order: Vec<usize> = (0..staged.ts.len()).collect();
        order.sort_unstable_by_key(|&i| (staged.device[i], staged.ts[i]));
        for run in order.chunk_by(|&a, &b| staged.device[a] == staged.device[b]) {
            let device = staged.device[run[0]];
            let ms = |i: usize| staged.ts[i].div_euclid(1000);
            // A late upload mixed with a replay would make one span cover months, so
            // the staged times are cut into clusters and each is looked up on its own.
            let clusters = time_clusters(run.iter().map(|&i| ms(i)).collect());
            for (lo, hi) in clusters.into_iter().flat_map(window_spans) {
                if self.recent.covering(device, lo, hi).is_none() {
                    let window = self.read_window(device, lo, hi)?;
                    self.recent.keep(window);
                }
                let window = self
                    .recent
                    .covering(device, lo, hi)
                    .ok_or_else(|| StoreError::Internal("key window not kept".into()))?;
                for &i in run.iter().filter(|&&i| (lo..=hi).contains(&ms(i))) {
                    if window.contains(staged.sensor[i], staged.ts[i]) {
                        dups[staged.seq[i] as usize] = true;
                    } else {
                        fresh.push_raw(
                            staged.seq[i],
                            staged.key[i],
                            device,
                            staged.sensor[i],
                            staged.ts[i],
                            staged.value[i],
                        );
                    }
                }
            }
        }
        Ok(dups)
    }

    /// Reads the stored keys of `device` from `lo_ms` on: at least to `hi_ms`, and on
    /// as far as [`WINDOW_KEYS`] readings reach at the device's average density
    /// (never past its newest reading, after which nothing is stored).
    fn read_window(&self, device: i32, lo_ms: i64, hi_ms: i64) -> Result<Window, StoreError> {
        // The device is resident: the front brought it back before classifying.
        let series = self
            .shared
            .series_here(DeviceId(device as u32))
            .unwrap_or_default();
        let readings: u64 = series.iter().map(|(_, s)| s.readings).sum();
        let first = series.iter().map(|(_, s)| s.first.as_micros() / 1000).min();
        let newest = series.iter().map(|(_, s)| s.last.as_micros() / 1000).max();
        // Stored readings per ms, on average.
        let density = match (first, newest) {
            (Some(first), Some(newest)) => readings as f64 / (newest - first).max(1) as f64,
            _ => 0.0,
        };
        let hi = match newest {
            Some(newest) if density > 0.0 => lo_ms
                .saturating_add((WINDOW_KEYS as f64 / density) as i64)
                .min(newest)
                .min(lo_ms + MAX_SPAN_MS)
                .max(hi_ms),
            _ => hi_ms,
        };
        // Sized once for what the density predicts: growing the set while reading
        // would hold the old and the new table at once.
        let expected = ((hi - lo_ms + 1) as f64 * density) as usize;
        let mut window = Window::new(device, lo_ms, hi);
        window.reserve(expected.min(2 * WINDOW_KEYS as usize));
        let sql = format!(
            "SELECT sensor_id, ts_ms, ts_us FROM readings
             WHERE device_id = {device} AND ts_ms BETWEEN {lo_ms} AND {hi}"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        for batch in stmt.query_arrow([])? {
            let col = |i: usize| batch.column(i).as_any();
            let (Some(s), Some(ms), Some(us)) = (
                col(0).downcast_ref::<Int16Array>(),
                col(1).downcast_ref::<Int64Array>(),
                col(2).downcast_ref::<Int16Array>(),
            ) else {
                return Err(StoreError::Internal("unexpected key column types".into()));
            };
            for i in 0..batch.num_rows() {
                window.insert(s.value(i), ms.value(i) * 1000 + i64::from(us.value(i)));
            }
        }
        Ok(window)
    }
}

/// Gap between staged timestamps (ms) that starts a new cluster.
pub(super) const CLUSTER_GAP_MS: i64 = 3_600_000;
/// Most separate range queries per group; the closest clusters are merged beyond it.
const MAX_CLUSTERS: usize = 8;

/// Cuts timestamps (ms) into `[lo, hi]` spans separated by gaps of more than an hour,
/// at most [`MAX_CLUSTERS`] of them (merging across the smallest gaps), so each key
/// window covers only the time near the staged readings.
fn time_clusters(mut ts: Vec<i64>) -> Vec<(i64, i64)> {
    ts.sort_unstable();
    ts.dedup();
    let Some(&first) = ts.first() else {
        return Vec::new();
    };
    let mut spans = vec![(first, first)];
    for &t in &ts[1..] {
        let last = spans.last_mut().expect("non-empty");
        if t - last.1 > CLUSTER_GAP_MS {
            spans.push((t, t));
        } else {
            last.1 = t;
        }
    }
    while spans.len() > MAX_CLUSTERS {
        let i = (1..spans.len())
            .min_by_key(|&i| spans[i].0 - spans[i - 1].1)
            .expect("more than one span");
        spans[i - 1].1 = spans[i].1;
        spans.remove(i);
    }
    spans
}

/// `[lo, hi]` (ms) cut into pieces a key window can span.
fn window_spans((lo, hi): (i64, i64)) -> impl Iterator<Item = (i64, i64)> {
    (0..)
        .map(move |i| lo.saturating_add(i * (MAX_SPAN_MS + 1)))
        .take_while(move |&start| start <= hi)
        .map(move |start| (start, hi.min(start + MAX_SPAN_MS)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_clusters_stay_narrow_and_bounded() {
        let h = CLUSTER_GAP_MS;
        assert_eq!(time_clusters(vec![]), vec![]);
        assert_eq!(time_clusters(vec![5, 1, 3]), vec![(1, 5)]);
        assert_eq!(
            time_clusters(vec![0, 10, 10 + h + 1, 20 * h]),
            vec![(0, 10), (10 + h + 1, 10 + h + 1), (20 * h, 20 * h)]
        );
        let many: Vec<i64> = (0..20).map(|i| i * 10 * h + i).collect();
        let c = time_clusters(many.clone());
        assert_eq!(c.len(), MAX_CLUSTERS);
        assert!(
            many.iter()
                .all(|t| c.iter().any(|(lo, hi)| lo <= t && t <= hi))
        );
    }

    #[test]
    fn window_spans_cover_the_range_in_pieces() {
        assert_eq!(window_spans((5, 9)).collect::<Vec<_>>(), vec![(5, 9)]);
        let m = MAX_SPAN_MS;
        assert_eq!(
            window_spans((0, 2 * m + 5)).collect::<Vec<_>>(),
            vec![(0, m), (m + 1, 2 * m + 1), (2 * m + 2, 2 * m + 5)]
        );
    }
}
