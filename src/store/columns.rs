//! Rows on their way into `readings`, column by column, and their order on disk.
//!
//! Appended rows are sorted by (device, sensor, time) per append: runs of one series
//! fill DuckDB's 1024-value compression vectors, which compress far better than
//! sensors interleaved in arrival order.

use std::sync::Arc;

use duckdb::arrow::array::{ArrayRef, Float64Array, Int16Array, Int32Array, Int64Array};
use duckdb::arrow::datatypes::{DataType, Field, Schema};
use duckdb::arrow::record_batch::RecordBatch;

use super::StoreError;
use crate::domain::{DeviceId, Row, SensorId};

/// Rows to append, column by column.
#[derive(Clone, Default)]
pub(super) struct Columns {
    /// Position of the row in its group (request order), for the per-request counts.
    pub seq: Vec<u32>,
    /// Index of the row's series in the series list the columns are ordered by.
    pub key: Vec<u32>,
    pub device: Vec<i32>,
    pub sensor: Vec<i16>,
    /// µs since the epoch.
    pub ts: Vec<i64>,
    pub value: Vec<f64>,
}

impl Columns {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            seq: Vec::with_capacity(n),
            key: Vec::with_capacity(n),
            device: Vec::with_capacity(n),
            sensor: Vec::with_capacity(n),
            ts: Vec::with_capacity(n),
            value: Vec::with_capacity(n),
        }
    }

    pub fn len(&self) -> usize {
        self.ts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }

    pub fn push(&mut self, seq: u32, key: u32, device: DeviceId, row: &Row) {
        self.push_raw(
            seq,
            key,
            device.0 as i32,
            row.sensor.0 as i16,
            row.ts.as_micros(),
            row.value,
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub fn push_raw(&mut self, seq: u32, key: u32, device: i32, sensor: i16, ts: i64, value: f64) {
        self.seq.push(seq);
        self.key.push(key);
        self.device.push(device);
        self.sensor.push(sensor);
        self.ts.push(ts);
        self.value.push(value);
    }

    /// Row order grouped by series (ordered by device, sensor) and time (see
    /// [`series_time_order`]). `None` when the rows are already in that order.
    /// `series[k]` is the (device, sensor) of series index `k`.
    pub fn series_order(&self, series: &[(DeviceId, SensorId)]) -> Option<Vec<u32>> {
        let rows = (0..self.len() as u32).zip(self.key.iter().copied());
        let order = series_time_order(rows, series, |i| self.ts[i as usize]);
        let identity = order.iter().enumerate().all(|(i, &o)| i as u32 == o);
        (!identity).then_some(order)
    }

    /// Columns in table order (`device_id, sensor_id, ts_ms, ts_us, value`), sorted
    /// by series and time. Already-sorted buffers move into Arrow without a copy.
    pub fn into_record_batch(
        self,
        series: &[(DeviceId, SensorId)],
    ) -> Result<RecordBatch, StoreError> {
        let cols = match self.series_order(series) {
            None => self,
            Some(order) => {
                let at = |i: &u32| *i as usize;
                Columns {
                    seq: Vec::new(),
                    key: Vec::new(),
                    device: order.iter().map(|i| self.device[at(i)]).collect(),
                    sensor: order.iter().map(|i| self.sensor[at(i)]).collect(),
                    ts: order.iter().map(|i| self.ts[at(i)]).collect(),
                    value: order.iter().map(|i| self.value[at(i)]).collect(),
                }
            }
        };
        let (ms, us) = split_micros(cols.ts.iter().copied());
        table_batch(cols.device, cols.sensor, ms, us, cols.value)
    }
}

/// The rows of several column sets (a log segment's records, shared with readers)
/// as one batch in table order, sorted by series and time.
///
/// Gathers straight from the parts: merging them into one set of columns first cost
/// the flusher 8 % of its time and 30 bytes a reading of fresh pages.
pub(super) fn sorted_batch<'a>(
    parts: impl Iterator<Item = &'a Columns>,
) -> Result<RecordBatch, StoreError> {
    let parts: Vec<&Columns> = parts.collect();
    let rows: usize = parts.iter().map(|p| p.len()).sum();
    let ts = |(p, r): (u32, u32)| parts[p as usize].ts[r as usize];
    let order = match series_keys(&parts, rows / FEW_SERIES) {
        Some((series, key)) => {
            let rows = parts
                .iter()
                .enumerate()
                .flat_map(|(p, c)| (0..c.len() as u32).map(move |r| (p as u32, r)))
                .zip(key.iter().copied());
            series_time_order(rows, &series, ts)
        }
        None => sorted_by_comparison(&parts, rows),
    };
    let at = |&(p, r): &(u32, u32)| (parts[p as usize], r as usize);
    let (ms, us) = split_micros(order.iter().map(|&o| ts(o)));
    table_batch(
        order.iter().map(at).map(|(c, r)| c.device[r]).collect(),
        order.iter().map(at).map(|(c, r)| c.sensor[r]).collect(),
        ms,
        us,
        order.iter().map(at).map(|(c, r)| c.value[r]).collect(),
    )
}

/// [`sorted_batch`] counts rows into series while a part has at most one series
/// for this many rows (a bulk import, a small fleet); a fleet of many devices, whose
/// series in one part hold a reading or two each, is sorted by comparison instead.
/// Counting needs ~70 bytes a series (a hash map, the series and four arrays over
/// them): 100,000 devices streaming put ~180,000 series in a part of 1.5 row groups,
/// ~13 MB; the comparison sort's 24 bytes a row, 4.4 MB.
const FEW_SERIES: usize = 8;

/// A part's series and every row's index into them.
type SeriesKeys = (Vec<(DeviceId, SensorId)>, Vec<u32>);

/// The series of `parts` (first appearance order) and every row's index into them,
/// or `None` once there are more than `most`.
fn series_keys(parts: &[&Columns], most: usize) -> Option<SeriesKeys> {
    let mut series: Vec<(DeviceId, SensorId)> = Vec::new();
    let mut index: rustc_hash::FxHashMap<(DeviceId, SensorId), u32> = Default::default();
    let mut key = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        for (&device, &sensor) in p.device.iter().zip(&p.sensor) {
            let k = (DeviceId(device as u32), SensorId(sensor as u16));
            let next = series.len() as u32;
            key.push(*index.entry(k).or_insert_with(|| {
                series.push(k);
                next
            }));
            if series.len() > most {
                return None;
            }
        }
    }
    Some((series, key))
}

/// The rows of `parts` (`(part, row)`) in series-then-time order, by sorting them.
fn sorted_by_comparison(parts: &[&Columns], rows: usize) -> Vec<(u32, u32)> {
    let mut keyed: Vec<(u64, i64, (u32, u32))> = Vec::with_capacity(rows);
    for (p, c) in parts.iter().enumerate() {
        for r in 0..c.len() {
            let series = (u64::from(c.device[r] as u32) << 16) | u64::from(c.sensor[r] as u16);
            keyed.push((series, c.ts[r], (p as u32, r as u32)));
        }
    }
    keyed.sort_unstable_by_key(|&(series, ts, _)| (series, ts));
    keyed.into_iter().map(|(_, _, at)| at).collect()
}

/// The rows (`(row, series index)`, every row once) in series-then-time order:
/// a counting sort on the series' rank by (device, sensor), then a time sort of the
/// series whose rows arrived out of order. `series[k]` is the (device, sensor) of
/// series index `k`; `ts` is a row's time.
fn series_time_order<R: Copy + Default>(
    rows: impl Iterator<Item = (R, u32)> + Clone,
    series: &[(DeviceId, SensorId)],
    ts: impl Fn(R) -> i64,
) -> Vec<R> {
    let mut rank: Vec<usize> = (0..series.len()).collect();
    rank.sort_unstable_by_key(|&k| series[k]);
    let mut counts = vec![0usize; series.len()];
    for (_, k) in rows.clone() {
        counts[k as usize] += 1;
    }
    let mut start = vec![0usize; series.len() + 1];
    let mut pos_of = vec![0usize; series.len()];
    for (r, &k) in rank.iter().enumerate() {
        start[r + 1] = start[r] + counts[k];
        pos_of[k] = start[r];
    }
    let mut order = vec![R::default(); start[series.len()]];
    for (row, k) in rows {
        order[pos_of[k as usize]] = row;
        pos_of[k as usize] += 1;
    }
    for w in start.windows(2) {
        let run = &mut order[w[0]..w[1]];
        if !run.windows(2).all(|p| ts(p[0]) < ts(p[1])) {
            run.sort_unstable_by_key(|&r| ts(r));
        }
    }
    order
}

/// A batch with the columns of `received_readings` (`device_id, sensor_id, ts_ms,
/// ts_us, value`).
fn table_batch(
    device: Vec<i32>,
    sensor: Vec<i16>,
    ts_ms: Vec<i64>,
    ts_us: Vec<i16>,
    value: Vec<f64>,
) -> Result<RecordBatch, StoreError> {
    let fields = vec![
        Field::new("device_id", DataType::Int32, false),
        Field::new("sensor_id", DataType::Int16, false),
        Field::new("ts_ms", DataType::Int64, false),
        Field::new("ts_us", DataType::Int16, false),
        Field::new("value", DataType::Float64, false),
    ];
    let arrays: Vec<ArrayRef> = vec![
        Arc::new(Int32Array::from(device)),
        Arc::new(Int16Array::from(sensor)),
        Arc::new(Int64Array::from(ts_ms)),
        Arc::new(Int16Array::from(ts_us)),
        Arc::new(Float64Array::from(value)),
    ];
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
        .map_err(|e| StoreError::Internal(format!("building an append batch: {e}")))
}

/// µs since the epoch as the table stores them: ms, and the µs within the ms.
fn split_micros(ts: impl ExactSizeIterator<Item = i64>) -> (Vec<i64>, Vec<i16>) {
    let mut ms = Vec::with_capacity(ts.len());
    let mut us = Vec::with_capacity(ts.len());
    for t in ts {
        ms.push(t.div_euclid(1000));
        us.push(t.rem_euclid(1000) as i16);
    }
    (ms, us)
}

#[cfg(test)]
mod tests {
    use super::*;
    use duckdb::arrow::array::AsArray as _;
    use duckdb::arrow::datatypes::{Int16Type, Int64Type};

    #[test]
    fn appends_are_grouped_by_series_then_time() {
        let series = vec![
            (DeviceId(2), SensorId(1)),
            (DeviceId(1), SensorId(3)),
            (DeviceId(1), SensorId(1)),
        ];
        let columns = |rows: &[(usize, i64)]| {
            let mut c = Columns::with_capacity(rows.len());
            for (i, (k, ts)) in rows.iter().enumerate() {
                let (d, s) = series[*k];
                c.push_raw(i as u32, *k as u32, d.0 as i32, s.0 as i16, *ts, i as f64);
            }
            c
        };
        // Arrival order interleaves series, and series (1, 1) arrives out of order.
        let c = columns(&[(0, 10), (1, 10), (2, 30), (0, 11), (2, 20), (1, 11)]);
        let order = c.series_order(&series).expect("needs reordering");
        let got: Vec<(i32, i16, i64, f64)> = order
            .iter()
            .map(|&i| {
                let i = i as usize;
                (c.device[i], c.sensor[i], c.ts[i], c.value[i])
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 1, 20, 4.0),
                (1, 1, 30, 2.0),
                (1, 3, 10, 1.0),
                (1, 3, 11, 5.0),
                (2, 1, 10, 0.0),
                (2, 1, 11, 3.0),
            ]
        );
        let sorted = columns(&[(2, 1), (2, 2), (1, 5), (0, 0)]);
        assert!(sorted.series_order(&series).is_none());
    }

    #[test]
    fn a_segment_of_several_records_is_one_batch_sorted_across_them() {
        let part = |rows: &[(i32, i16, i64)]| {
            let mut c = Columns::default();
            for (i, &(d, s, ts)) in rows.iter().enumerate() {
                c.push_raw(0, 0, d, s, ts, (d * 1000 + i as i32) as f64 + ts as f64);
            }
            c
        };
        // Series interleave within and across records; device 1's speed goes back in
        // time in the third record; one time is before 1970 (negative µs).
        let parts = [
            part(&[(2, 1, 5_000_001), (1, 1, 3_000_000)]),
            part(&[(1, 3, -1_500), (1, 1, 4_000_002), (2, 1, 6_000_000)]),
            part(&[(1, 1, 3_500_000), (1, 3, 7_000_999)]),
        ];
        let got = sorted_batch(parts.iter()).unwrap();

        let mut all = Columns::default();
        let mut series = Vec::new();
        for p in &parts {
            for i in 0..p.len() {
                let k = (DeviceId(p.device[i] as u32), SensorId(p.sensor[i] as u16));
                let idx = series.iter().position(|s| *s == k).unwrap_or_else(|| {
                    series.push(k);
                    series.len() - 1
                });
                all.push_raw(0, idx as u32, p.device[i], p.sensor[i], p.ts[i], p.value[i]);
            }
        }
        assert_eq!(got, all.into_record_batch(&series).unwrap());

        let ts_ms = got.column(2).as_primitive::<Int64Type>().values();
        let ts_us = got.column(3).as_primitive::<Int16Type>().values();
        assert_eq!(
            ts_ms.to_vec(),
            [3_000, 3_500, 4_000, -2, 7_000, 5_000, 6_000]
        );
        assert_eq!(ts_us.to_vec(), [0, 0, 2, 500, 999, 1, 0]);
        assert!(sorted_batch([].iter()).unwrap().num_rows() == 0);
    }

    /// Parts of `records` records with rows of `devices` devices' 6 sensors, each
    /// series' times unique and shuffled across records.
    fn shuffled(rng: &mut fastrand::Rng, devices: i32, records: usize) -> Vec<Columns> {
        let mut rows: Vec<(i32, i16, i64)> = Vec::new();
        for d in 0..devices {
            for s in 0..6 {
                for t in 0..rng.i64(1..4) {
                    rows.push((d * 977 % 5000, s, t * 1_000_001 - 2_000));
                }
            }
        }
        rng.shuffle(&mut rows);
        rows.chunks(rows.len().div_ceil(records))
            .map(|chunk| {
                let mut c = Columns::default();
                for &(d, s, ts) in chunk {
                    c.push_raw(0, 0, d, s, ts, ts as f64 + f64::from(d));
                }
                c
            })
            .collect()
    }

    #[test]
    fn counted_and_compared_parts_come_out_in_the_same_order() {
        let mut rng = fastrand::Rng::with_seed(42);
        // Few series for their rows (counted) and one or two rows a series
        // (compared): the same order as sorting every row by (device, sensor, time).
        for (devices, rows_per_series) in [(3, 1_000), (2_000, 1)] {
            let mut parts = shuffled(&mut rng, devices, 7);
            if rows_per_series > 1 {
                for p in &mut parts {
                    for i in 0..p.len() {
                        for k in 1..rows_per_series as i64 {
                            let (d, s, ts) = (p.device[i], p.sensor[i], p.ts[i]);
                            p.push_raw(0, 0, d, s, ts + k * 10_000_000_000, 1.0);
                        }
                    }
                }
            }
            let refs: Vec<&Columns> = parts.iter().collect();
            let rows: usize = refs.iter().map(|p| p.len()).sum();
            let counted = series_keys(&refs, rows / FEW_SERIES).is_some();
            assert_eq!(counted, devices == 3, "{devices} devices");
            let got = sorted_batch(parts.iter()).unwrap();
            let mut want: Vec<(i32, i16, i64)> = refs
                .iter()
                .flat_map(|p| (0..p.len()).map(|i| (p.device[i], p.sensor[i], p.ts[i])))
                .collect();
            want.sort_unstable_by_key(|&(d, s, ts)| (d as u32, s as u16, ts));
            let device = got
                .column(0)
                .as_primitive::<duckdb::arrow::datatypes::Int32Type>();
            let sensor = got.column(1).as_primitive::<Int16Type>();
            let ts_ms = got.column(2).as_primitive::<Int64Type>();
            let ts_us = got.column(3).as_primitive::<Int16Type>();
            let got: Vec<(i32, i16, i64)> = (0..got.num_rows())
                .map(|i| {
                    let ts = ts_ms.value(i) * 1000 + i64::from(ts_us.value(i));
                    (device.value(i), sensor.value(i), ts)
                })
                .collect();
            assert_eq!(got, want, "{devices} devices");
        }
    }
}
