//! Read side: a pool of DuckDB connections separate from the writer's, plus the
//! in-memory [`Shared`] view for answers that need no query at all.
//!
//! Read-your-writes without waiting: readings acknowledged through the ingest log
//! reach DuckDB only when the flusher applies their segment (half a second later, or
//! seconds behind a busy fleet). Queries used to wait for that, and under a fleet's
//! load the seed dashboard's day chart took seconds to 30 s (issue 23). Now a query
//! takes the log records DuckDB may still lack ([`Shared::unapplied`]) and, when some
//! hold readings it asks for, reads inside one transaction whose snapshot says how
//! far the log was applied (`meta.ingest_log_through`): the readings of later records
//! go into a connection-local temp table that the query reads beside `readings`.
//! Every acknowledged reading is counted once, and nobody waits for the flusher.
//!
//! Queries filter on `ts_ms` with plain comparisons so DuckDB's zone maps skip every
//! row group outside the range; the sub-millisecond column only enters the filter
//! when a bound itself has microseconds.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use duckdb::Connection;
use duckdb::arrow::array::{Array, Float64Array, Int16Array, Int64Array};
use duckdb::arrow::record_batch::RecordBatch;

use super::ingest_log;
use super::live::HeldSlot;
use super::pool::Pool;
use super::rollup::{self, SLOT_MS};
use super::series;
use super::{SeriesStats, Shared, StoreError};
use crate::domain::{
    Aggregate, Buckets, Catalog, Device, DeviceId, SensorId, TimeRange, Timestamp,
};

/// A slice of readings from a time-ordered scan. `ts` are µs since the epoch.
pub struct ScanChunk<'a> {
    /// Sensor of each reading.
    pub sensors: &'a [SensorId],
    /// Timestamps, ascending (ties, across sensors only, ordered by sensor).
    pub ts: &'a [i64],
    /// Values.
    pub values: &'a [f64],
}

/// Receives scanned readings; `Break` stops the scan (e.g. the client went away).
pub type ScanSink<'a> = dyn FnMut(ScanChunk<'_>) -> ControlFlow<()> + 'a;

/// See [`ReadStore::totals`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    /// Known devices.
    pub devices: usize,
    /// Stored readings.
    pub readings: u64,
    /// The newest reading's time, if any.
    pub newest: Option<Timestamp>,
    /// Devices whose live quarter hours memory holds, and the bytes they take.
    pub live_devices: usize,
    /// See `live_devices`.
    pub live_bytes: usize,
    /// Memory the series statistics of resident devices take.
    pub series_bytes: usize,
    /// Devices whose series statistics are on disk (idle; see `--series-memory`).
    pub series_devices_on_disk: usize,
}

/// A device's readings over all its series (see [`ReadStore::device_summaries`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeviceSummary {
    /// Stored readings.
    pub readings: u64,
    /// Oldest reading, if any.
    pub first: Option<Timestamp>,
    /// Newest reading, if any.
    pub last: Option<Timestamp>,
}

impl DeviceSummary {
    fn of(series: &[(SensorId, SeriesStats)]) -> Self {
        Self {
            readings: series.iter().map(|(_, s)| s.readings).sum(),
            first: series.iter().map(|(_, s)| s.first).min(),
            last: series.iter().map(|(_, s)| s.last).max(),
        }
    }
}

/// What the HTTP layer needs from storage. Methods may block (they run queries):
/// call them from `spawn_blocking`.
pub trait ReadStore: Send + Sync + 'static {
    /// The sensor catalog.
    fn catalog(&self) -> Arc<Catalog>;

    /// The store's id of `device`, if it has sent anything.
    fn device_id(&self, device: &Device) -> Option<DeviceId>;

    /// Statistics of every series of `device` (empty for an unknown device). From
    /// memory, or one small query for a device idle long enough to be on disk.
    fn series_of(&self, device: &Device) -> Vec<(SensorId, SeriesStats)>;

    /// Known devices with their reading count and time span, by id: at most `limit`
    /// of them from id `start` on (the next page starts after the last id returned;
    /// an empty page is the end). From memory, and one aggregate over the page's
    /// rows of the `series` table for those on disk.
    fn device_summaries(
        &self,
        start: DeviceId,
        limit: usize,
    ) -> Result<Vec<(DeviceId, Device, DeviceSummary)>, StoreError>;

    /// Of `devices` (newest reading, any number, and id), those at `ranks` in order
    /// of newest reading (descending), then name, with their names: from memory,
    /// without a name copied for the others (a million devices sharing one newest
    /// reading, named for a page of 20, took 145 MB).
    fn rank_devices(
        &self,
        devices: Vec<(i64, DeviceId)>,
        ranks: std::ops::Range<usize>,
    ) -> Vec<(i64, Device)>;

    /// Known devices, stored readings and the newest reading over all of them, in
    /// one pass over the in-memory statistics (no name copied: `/metrics` asks on
    /// every scrape, whatever the number of devices).
    fn totals(&self) -> Totals;

    /// Aggregate of every bucket (count 0 where empty), in bucket order.
    fn bucket_stats(
        &self,
        device: &Device,
        sensor: SensorId,
        buckets: &Buckets,
    ) -> Result<Vec<Aggregate>, StoreError>;

    /// Count and sum of every bucket (other fields 0), in bucket order: the means,
    /// cheaper than [`Self::bucket_stats`] where raw readings are read.
    fn bucket_sums(
        &self,
        device: &Device,
        sensor: SensorId,
        buckets: &Buckets,
    ) -> Result<Vec<Aggregate>, StoreError>;

    /// Number of readings of `sensors` in `range`.
    fn count(
        &self,
        device: &Device,
        sensors: &[SensorId],
        range: TimeRange,
    ) -> Result<u64, StoreError>;

    /// Readings of `sensors` of `device` in each of `buckets` (fixed-width ones),
    /// over all the sensors together.
    fn bucket_counts(
        &self,
        device: &Device,
        sensors: &[SensorId],
        buckets: &Buckets,
    ) -> Result<Vec<u64>, StoreError>;

    /// Number of readings of `sensors` in each `(device, range)`, in one statement
    /// (the console's overview counts a page of devices at once; a query each cost
    /// ~4 ms while the ingest log held readings DuckDB had not applied). Queries
    /// over the same range are answered by one grouped scan.
    fn count_each(
        &self,
        sensors: &[SensorId],
        queries: &[(Device, TimeRange)],
    ) -> Result<Vec<u64>, StoreError>;

    /// Streams the readings of `sensors` in `range` in time order, at most `limit`,
    /// to `sink`, with bounded memory however long the range. Returns how many were
    /// delivered.
    fn scan(
        &self,
        device: &Device,
        sensors: &[SensorId],
        range: TimeRange,
        limit: Option<u64>,
        sink: &mut ScanSink<'_>,
    ) -> Result<u64, StoreError>;
}

/// Connections for queries. Idle connections are kept for reuse.
pub struct Reader {
    pool: Pool,
    shared: Arc<Shared>,
}

const MAX_IDLE: usize = 8;

impl Reader {
    pub(super) fn new(base: Connection, shared: Arc<Shared>) -> Self {
        Self {
            pool: Pool::new(base, MAX_IDLE),
            shared,
        }
    }

    /// Runs `f` on a pooled connection with a [`View`] of the readings: every reading
    /// of `device`'s `sensors` in `ranges` acknowledged before the call is in what
    /// [`View::source`] names, once (see the module docs).
    ///
    /// First the records, then the snapshot: a record leaves the list only once
    /// DuckDB committed it, so what the list lacks the snapshot has. The snapshot — a
    /// transaction, narrowing the list to the records after the applied-through
    /// number it holds — opens up front ([`Open::Now`]) or at the first window that
    /// holds a listed reading ([`Open::WhenNeeded`]), and none opens when the list
    /// is empty.
    fn with_view<T>(
        &self,
        device: DeviceId,
        sensors: &[SensorId],
        ranges: &[TimeRange],
        open: Open,
        f: impl FnOnce(&Connection, &mut View<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let extra = Unapplied::of(&self.shared, device, sensors, ranges);
        self.with_conn(|c| {
            let mut view = View {
                conn: c,
                device,
                extra,
                loaded: false,
                open: false,
            };
            let done = match open {
                Open::Now if !view.extra.is_empty() => view.open_snapshot(),
                _ => Ok(()),
            }
            .and_then(|()| f(c, &mut view));
            if !view.open {
                return done;
            }
            let done = done.and_then(|v| {
                c.execute_batch("COMMIT")?;
                Ok(v)
            });
            if done.is_err() {
                c.execute_batch("ROLLBACK").ok();
            }
            done
        })
    }

    /// Statistics of a known device's series, from memory or its rows on disk.
    fn series_of_id(&self, id: DeviceId) -> Vec<(SensorId, SeriesStats)> {
        if let Some(here) = self.shared.series_here(id) {
            return here;
        }
        let _span = tracing::debug_span!("series_on_disk", device = id.0).entered();
        match self.with_conn(|c| series::read_devices(c, &[id])) {
            Ok(rows) => rows.into_iter().map(|((_, s), st)| (s, st)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, device = id.0, "cannot read a device's series statistics");
                Vec::new()
            }
        }
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.pool.with(f)
    }
}

/// Rows a scan aims to sort per query: big enough to amortise the per-query cost,
/// small enough that the sort stays in memory on a small VM.
const SCAN_TARGET_ROWS: i64 = 256 * 1024;

impl ReadStore for Reader {
    fn catalog(&self) -> Arc<Catalog> {
        self.shared.catalog()
    }

    fn device_id(&self, device: &Device) -> Option<DeviceId> {
        self.shared.device_id(device)
    }

    fn totals(&self) -> Totals {
        self.shared.totals()
    }

    fn series_of(&self, device: &Device) -> Vec<(SensorId, SeriesStats)> {
        self.shared
            .device_id(device)
            .map(|id| self.series_of_id(id))
            .unwrap_or_default()
    }

    fn rank_devices(
        &self,
        devices: Vec<(i64, DeviceId)>,
        ranks: std::ops::Range<usize>,
    ) -> Vec<(i64, Device)> {
        self.shared.rank_devices(devices, ranks)
    }

    fn device_summaries(
        &self,
        start: DeviceId,
        limit: usize,
    ) -> Result<Vec<(DeviceId, Device, DeviceSummary)>, StoreError> {
        let page = self.shared.devices_from(start, limit);
        // Which devices are on disk first, then their rows: one that comes back in
        // between has a row at least as new as what it had when asked.
        let on_disk = self.shared.on_disk_among(page.iter().map(|(id, _)| *id));
        let mut from_disk: HashMap<DeviceId, DeviceSummary> = HashMap::new();
        if let (Some(&lo), Some(&hi)) = (on_disk.first(), on_disk.last()) {
            from_disk.extend(self.with_conn(|c| series::summaries(c, lo..=hi))?);
        }
        Ok(page
            .into_iter()
            .map(|(id, d)| {
                let summary = match self.shared.series_here(id) {
                    Some(here) => DeviceSummary::of(&here),
                    None => match from_disk.remove(&id) {
                        Some(summary) => summary,
                        // On disk without a row: nothing stored (retention took
                        // it all). Asking each such device on its own made a
                        // million devices' list take minutes.
                        None if on_disk.binary_search_by_key(&id.0, |d| d.0).is_ok() => {
                            DeviceSummary::default()
                        }
                        // Written to disk since it was asked: its own row.
                        None => DeviceSummary::of(&self.series_of_id(id)),
                    },
                };
                (id, d, summary)
            })
            .collect())
    }

    fn bucket_stats(
        &self,
        device: &Device,
        sensor: SensorId,
        buckets: &Buckets,
    ) -> Result<Vec<Aggregate>, StoreError> {
        self.aggregate(device, sensor, buckets, true)
    }

    fn bucket_sums(
        &self,
        device: &Device,
        sensor: SensorId,
        buckets: &Buckets,
    ) -> Result<Vec<Aggregate>, StoreError> {
        self.aggregate_with(device, sensor, buckets, true, true)
    }

    fn count(
        &self,
        device: &Device,
        sensors: &[SensorId],
        range: TimeRange,
    ) -> Result<u64, StoreError> {
        let Some((device, range, _)) = self.span_of(device, sensors, range) else {
            return Ok(0);
        };
        let filter = series_filter(device, sensors, range);
        self.with_view(device, sensors, &[range], Open::Now, |c, view| {
            let source = view.source(range)?;
            let sql = format!("SELECT count(*) FROM {source} WHERE {filter}");
            Ok(c.query_row(&sql, [], |r| r.get::<_, i64>(0))? as u64)
        })
    }

    fn bucket_counts(
        &self,
        device: &Device,
        sensors: &[SensorId],
        buckets: &Buckets,
    ) -> Result<Vec<u64>, StoreError> {
        let mut out = vec![0u64; buckets.len()];
        if buckets.is_empty() {
            return Ok(out);
        }
        let Some((device, range, _)) = self.span_of(device, sensors, buckets.range()) else {
            return Ok(out);
        };
        let origin_ms = buckets.start(0).as_micros() / 1000;
        let grain_ms = (buckets.grain_micros() / 1000).max(1);
        let filter = series_filter(device, sensors, range);
        let counts = self.with_view(device, sensors, &[range], Open::Now, |c, view| {
            let source = view.source(range)?;
            let sql = format!(
                "SELECT (ts_ms - {origin_ms}) // {grain_ms} AS g, count(*) FROM {source}
                 WHERE {filter} GROUP BY g"
            );
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })?;
        for (g, n) in counts {
            let t = Timestamp::from_micros((origin_ms + g * grain_ms) * 1000);
            if let Some(i) = buckets.index_of(t) {
                out[i] += n as u64;
            }
        }
        Ok(out)
    }

    fn count_each(
        &self,
        sensors: &[SensorId],
        queries: &[(Device, TimeRange)],
    ) -> Result<Vec<u64>, StoreError> {
        let _span = tracing::debug_span!("count_each", queries = queries.len()).entered();
        let mut out = vec![0u64; queries.len()];
        // Only devices with readings in the range (their stored span), as `count`
        // does; the range itself is kept whole so that queries over the same range
        // share one grouped branch (a page's devices are all asked about the same
        // instants: 2 branches instead of 40, each scanning the recent row groups,
        // which hold every streaming device, once).
        let parts: Vec<(usize, DeviceId, TimeRange)> = queries
            .iter()
            .enumerate()
            .filter_map(|(i, (device, range))| {
                let (id, ..) = self.span_of(device, sensors, *range)?;
                Some((i, id, *range))
            })
            .collect();
        if parts.is_empty() {
            return Ok(out);
        }
        let mut groups: Vec<(TimeRange, Vec<DeviceId>)> = Vec::new();
        for (_, id, range) in &parts {
            match groups.iter_mut().find(|(r, _)| r == range) {
                Some((_, ids)) if ids.contains(id) => {}
                Some((_, ids)) => ids.push(*id),
                None => groups.push((*range, vec![*id])),
            }
        }
        // First the records, then the snapshot (see `with_view`); the records' rows
        // are counted here rather than joined into the query.
        let records = self.shared.unapplied();
        let sql = groups
            .iter()
            .enumerate()
            .map(|(g, (range, ids))| {
                let ids: Vec<String> = ids.iter().map(|d| d.0.to_string()).collect();
                format!(
                    "SELECT {g} AS g, device_id, count(*) AS n FROM readings
                     WHERE device_id IN ({}) AND {} GROUP BY device_id",
                    ids.join(", "),
                    range_filter(sensors, *range)
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let (stored, through) = self.with_conn(|c| {
            super::in_transaction(c, || {
                let through = if records.is_empty() {
                    u64::MAX
                } else {
                    ingest_log::through(c)?
                };
                let mut stored: Vec<(usize, i32, i64)> = Vec::new();
                let mut stmt = c.prepare(&sql)?;
                let mut rows = stmt.query([])?;
                while let Some(row) = rows.next()? {
                    stored.push((row.get::<_, i64>(0)? as usize, row.get(1)?, row.get(2)?));
                }
                Ok::<_, StoreError>((stored, through))
            })
        })?;
        for (g, device, n) in stored {
            let Some((range, _)) = groups.get(g) else {
                continue;
            };
            for (i, id, r) in &parts {
                if id.0 as i32 == device && r == range {
                    out[*i] = n as u64;
                }
            }
        }
        let wanted: Vec<i16> = sensors.iter().map(|s| s.0 as i16).collect();
        for logged in records.iter().filter(|l| l.seq > through) {
            let r = &logged.rows;
            for row in 0..r.len() {
                if !wanted.contains(&r.sensor[row]) {
                    continue;
                }
                for (i, id, range) in &parts {
                    if r.device[row] == id.0 as i32
                        && (range.from.as_micros()..range.to.as_micros()).contains(&r.ts[row])
                    {
                        out[*i] += 1;
                    }
                }
            }
        }
        Ok(out)
    }

    fn scan(
        &self,
        device: &Device,
        sensors: &[SensorId],
        range: TimeRange,
        limit: Option<u64>,
        sink: &mut ScanSink<'_>,
    ) -> Result<u64, StoreError> {
        let span = tracing::debug_span!("scan", %device, sensors = sensors.len(), ?limit);
        let _enter = span.enter();
        let Some((device, range, readings)) = self.span_of(device, sensors, range) else {
            return Ok(0);
        };
        // Sort window by window: each query sorts about SCAN_TARGET_ROWS rows, sized
        // from the series' average density and adapted to what each window returned.
        let span_us = range.to.as_micros() - range.from.as_micros();
        let per_row = (span_us / (readings.max(1) as i64)).max(1);
        // A page of `limit` rows aims its first window at a quarter more than that,
        // not at a whole sort's worth: the newest hours lie in arrival order, every
        // row group holds every device (unless `--cluster-rows` sorts them, see
        // `cluster.rs`), so a window costs a scan of the whole fleet's readings in it. (A page of 100 while 2,000 devices streamed: p50 19.6 ms,
        // p99 55 ms with the window over the series' whole day. Afterwards, on the
        // idle file of a minute of that fleet, 6.5 ms with a window of twice the
        // page, 5.4 with 1.3 times, 4.8–5.0 with exactly the page: the Top-N's
        // dynamic filter skips most row groups past the page, not those where some
        // device lagged behind.)
        let (aim, least) = match limit {
            Some(l) => (
                (l as i64 + l as i64 / 4).clamp(64, SCAN_TARGET_ROWS),
                1_000_000,
            ),
            None => (SCAN_TARGET_ROWS, 60_000_000),
        };
        let mut window = per_row.saturating_mul(aim).max(least).min(span_us.max(1));
        let mut lo = range.from;
        let mut delivered = 0u64;
        self.with_view(device, sensors, &[range], Open::WhenNeeded, |c, view| {
            let mut buf = ScanBuffers::default();
            while lo < range.to {
                let hi =
                    Timestamp::from_micros(lo.as_micros().saturating_add(window)).min(range.to);
                let window_range = TimeRange { from: lo, to: hi };
                let source = view.source(window_range)?;
                let limit_sql = match limit {
                    Some(l) => format!(" LIMIT {}", l - delivered),
                    None => String::new(),
                };
                // Prepared once per pooled connection and shape, the window's bounds
                // bound as parameters: DuckDB still prunes row groups by them, and
                // the parse is not paid again for every page (DuckDB binds and plans
                // a statement that reads a table at every execution all the same:
                // see `rollup::aggregate_rows`). On the file of a minute
                // of 2,000 devices: 3.7–4.6 ms a query → 2.6; 20 clients paging at once
                // p50 117–129 ms → 104–110; beside the fleet the page's p50 26–33 →
                // 23–30, its p99 within the runs' spread (docs/performance.md,
                // session 38).
                let sql = format!(
                    "SELECT ts_ms, ts_us, value, sensor_id FROM {source} WHERE {WINDOW_FILTER}
                         AND sensor_id IN ({})
                     ORDER BY ts_ms, ts_us, sensor_id{limit_sql}",
                    sensor_list(sensors)
                );
                // Only a page's: a cached statement keeps its last result until it
                // runs again, and an export's windows sort ~256 Ki rows each.
                let (mut cached, mut plain);
                let stmt: &mut duckdb::Statement<'_> = if limit.is_some() {
                    cached = c.prepare_cached(&sql)?;
                    &mut cached
                } else {
                    plain = c.prepare(&sql)?;
                    &mut plain
                };
                let mut in_window = 0i64;
                for batch in stmt.query_arrow(WindowParams::of(device, window_range).params())? {
                    buf.fill(&batch)?;
                    in_window += buf.ts.len() as i64;
                    delivered += buf.ts.len() as u64;
                    let chunk = ScanChunk {
                        sensors: &buf.sensors,
                        ts: &buf.ts,
                        values: &buf.values,
                    };
                    if sink(chunk).is_break() {
                        return Ok(());
                    }
                }
                if limit.is_some_and(|l| delivered >= l) {
                    break;
                }
                lo = hi;
                if in_window < SCAN_TARGET_ROWS / 4 {
                    window = window.saturating_mul(2);
                } else if in_window > SCAN_TARGET_ROWS * 2 {
                    window = (window / 2).max(1_000_000);
                }
            }
            Ok(())
        })?;
        Ok(delivered)
    }
}

impl Reader {
    /// [`ReadStore::bucket_stats`]; with `rollups` off, from raw readings alone.
    ///
    /// When every bucket bound falls on a rollup slot bound, the whole slots of the
    /// range are read from the rollups and only the partial slots at its ends from
    /// readings; the parts arrive in time order, as `merge_later` needs.
    pub(super) fn aggregate(
        &self,
        device: &Device,
        sensor: SensorId,
        buckets: &Buckets,
        rollups: bool,
    ) -> Result<Vec<Aggregate>, StoreError> {
        self.aggregate_with(device, sensor, buckets, rollups, false)
    }

    /// [`Self::aggregate`]; with `sums_only`, raw readings give only the count and
    /// sum of each bucket (min, max, first and last are 0): the first and last
    /// (`arg_min`/`arg_max` over the timestamp) are most of the cost of the query.
    fn aggregate_with(
        &self,
        device: &Device,
        sensor: SensorId,
        buckets: &Buckets,
        rollups: bool,
        sums_only: bool,
    ) -> Result<Vec<Aggregate>, StoreError> {
        let _span = tracing::debug_span!("bucket_stats", %device, sensor = sensor.0, buckets = buckets.len()).entered();
        let mut out = vec![Aggregate::default(); buckets.len()];
        let Some(device) = self.shared.device_id(device) else {
            return Ok(out);
        };
        if buckets.is_empty() {
            return Ok(out);
        }
        let covered = TimeRange {
            from: buckets.start(0),
            to: buckets.end(buckets.len() - 1),
        };
        let Some(range) = buckets.range().intersect(covered) else {
            return Ok(out);
        };
        // Bounds and grain are whole milliseconds (see `domain::buckets`), so the
        // millisecond column alone decides the group.
        let origin_ms = buckets.start(0).as_micros() / 1000;
        let grain_ms = (buckets.grain_micros() / 1000).max(1);
        let mut fold = |g: i64, part: Aggregate| {
            let t = Timestamp::from_micros((origin_ms + g * grain_ms) * 1000);
            if let Some(i) = buckets.index_of(t) {
                out[i].merge_later(&part);
            }
        };
        let raw = |view: &mut View<'_>, r: TimeRange, fold: &mut dyn FnMut(i64, Aggregate)| {
            let source = view.source(r)?;
            let columns = if sums_only {
                "0.0, 0.0, sum(value), 0.0, 0.0"
            } else {
                "min(value), max(value), sum(value), arg_min(value, ts_ms * 1000 + ts_us),
                 arg_max(value, ts_ms * 1000 + ts_us)"
            };
            // The bounds as parameters, so that the text is one cached statement per
            // shape (see `rollup::aggregate_rows`).
            let sql = format!(
                "SELECT (ts_ms - $6) // $7 AS g, count(*), {columns}
                 FROM {source} WHERE {WINDOW_FILTER} AND sensor_id = {}
                 GROUP BY g ORDER BY g",
                sensor.0
            );
            let window = WindowParams::of(device, r);
            let [a, b, c, d, e] = window.params();
            rollup::aggregate_rows(
                view.conn,
                &sql,
                &[a, b, c, d, e, &origin_ms, &grain_ms],
                fold,
            )
        };
        let aligned = grain_ms % SLOT_MS == 0 && origin_ms.rem_euclid(SLOT_MS) == 0;
        let use_slots = rollups && aligned;
        // The live slots memory holds over the range, the slots it starts and ends in
        // included, in one snapshot (see `store::live`).
        let (outer_from, outer_end) = outer_slots(range);
        let (held_from, mut held) = if use_slots {
            self.shared.live.held(device, sensor, outer_from, outer_end)
        } else {
            (outer_end, Vec::new())
        };
        // A range that starts or ends inside a live slot whose readings all lie in
        // the range (a range from before the series began, or up to now) takes that
        // whole slot from memory instead of scanning the fleet's newest readings for
        // the part: with 2,000 devices streaming, a statistics request from the
        // series' start took 22 ms at the median and 73 ms at p99 that way.
        let range = if use_slots {
            widen_into_held(range, covered, held_from, &held)
        } else {
            range
        };
        let (first_slot, whole_end) = whole_slots(range);
        let slotted = use_slots && first_slot < whole_end;
        // Whole slots, in time order: rollups (finished slots the writer wrote), raw
        // readings (slots whose partials the writer still holds, before the live
        // slots in memory begin), then the live slots from memory, which hold exactly
        // what was acknowledged.
        let mem_from = if slotted {
            held.retain(|h| (first_slot..whole_end).contains(&h.start_ms));
            held_from.clamp(first_slot, whole_end)
        } else {
            held.clear();
            whole_end
        };
        let rollup_end = mem_from.min(self.shared.rollups_from()).max(first_slot);
        let in_rollups = |ts: &i64| (first_slot * 1000..rollup_end * 1000).contains(ts);
        let at = |ms: i64| Timestamp::from_micros(ms * 1000);
        // What DuckDB answers; readings in the live slots memory holds need not be
        // added to it (and usually are all the unapplied ones).
        let from_db = if slotted {
            vec![
                TimeRange {
                    from: range.from,
                    to: at(mem_from),
                },
                TimeRange {
                    from: at(whole_end),
                    to: range.to,
                },
            ]
        } else {
            vec![range]
        };
        self.with_view(device, &[sensor], &from_db, Open::Now, |c, view| {
            if !slotted {
                return raw(view, range, &mut fold);
            }
            // Readings memory adds to slots whose rollups are read would be missing
            // from them: then those slots come from readings too (rare: readings of
            // a past quarter hour not yet applied).
            let past_added = view.extra().iter().any(in_rollups);
            let mut raw_part =
                |from: Timestamp, to: Timestamp, fold: &mut dyn FnMut(i64, Aggregate)| {
                    if from < to {
                        raw(view, TimeRange { from, to }, fold)
                    } else {
                        Ok(())
                    }
                };
            raw_part(range.from, at(first_slot), &mut fold)?;
            if past_added {
                raw_part(at(first_slot), at(mem_from), &mut fold)?;
            } else {
                if first_slot < rollup_end {
                    rollup::bucket_parts(
                        c,
                        device.0,
                        sensor.0 as i16,
                        (first_slot, rollup_end),
                        (origin_ms, grain_ms),
                        &mut fold,
                    )?;
                }
                raw_part(at(rollup_end), at(mem_from), &mut fold)?;
            }
            for h in &held {
                let a = &h.aggregate;
                let part = if sums_only {
                    Aggregate {
                        count: a.count,
                        sum: a.sum,
                        ..Aggregate::default()
                    }
                } else {
                    *a
                };
                fold((h.start_ms - origin_ms).div_euclid(grain_ms), part);
            }
            raw_part(at(whole_end), range.to, &mut fold)
        })?;
        Ok(out)
    }

    /// The device id, the part of `range` where `sensors` have readings at all, and
    /// how many readings they have overall, from the in-memory series statistics.
    fn span_of(
        &self,
        device: &Device,
        sensors: &[SensorId],
        range: TimeRange,
    ) -> Option<(DeviceId, TimeRange, u64)> {
        let id = self.shared.device_id(device)?;
        let stats: Vec<SeriesStats> = self
            .series_of_id(id)
            .into_iter()
            .filter(|(s, _)| sensors.contains(s))
            .map(|(_, st)| st)
            .collect();
        let first = stats.iter().map(|s| s.first).min()?;
        let last = stats.iter().map(|s| s.last).max()?;
        let stored = TimeRange {
            from: first,
            to: Timestamp::from_micros(last.as_micros() + 1),
        };
        let readings = stats.iter().map(|s| s.readings).sum();
        Some((id, range.intersect(stored)?, readings))
    }
}

/// What queries read when memory adds readings: `readings` and the temp table
/// [`Unapplied::load`] fills, on this connection only.
const WITH_UNAPPLIED: &str = "(SELECT device_id, sensor_id, ts_ms, ts_us, value FROM readings
     UNION ALL SELECT device_id, sensor_id, ts_ms, ts_us, value FROM temp.unapplied)";

/// What a query reads, in one snapshot of one connection: DuckDB's readings and the
/// acknowledged readings memory adds to them ([`Reader::with_view`]).
struct View<'c> {
    conn: &'c Connection,
    device: DeviceId,
    /// Readings the snapshot lacks.
    extra: Unapplied,
    /// Whether `extra` is in this connection's temp table yet.
    loaded: bool,
    /// Whether this view opened its snapshot (a transaction on `conn`, `extra`
    /// narrowed to what it lacks).
    open: bool,
}

/// When a [`View`] opens its snapshot (if memory lists any reading at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    /// Before `f` runs: for queries that read a range in several parts at once.
    Now,
    /// At the first window that holds a listed reading: for a walk through disjoint
    /// windows in time order (a readings page, an export). Exact all the same: a
    /// reading acknowledged before the call is in DuckDB or on the list, so a window
    /// holding none of the list's readings finds all of its own in any later
    /// snapshot, and windows do not overlap, so none is read twice. A page's range
    /// reaches the device's newest (unapplied) readings, its windows seldom do; the
    /// frame — `BEGIN`, the look-up, `COMMIT` — cost ~0.75 ms of its ~10 ms of CPU
    /// (session 40).
    WhenNeeded,
}

impl View<'_> {
    /// What to read the readings in `range` from (`FROM {source}`): `readings` alone
    /// when memory adds none there, else its union with the temp table, filled on
    /// first use. A device's readings not yet applied are its newest: a readings page
    /// from the start of its day touches them only if it gets that far, and the
    /// union with them cost it ~2.5 ms of its ~9.5 (2,000 devices streamed, idle
    /// machine afterwards), more under load.
    fn source(&mut self, range: TimeRange) -> Result<&'static str, StoreError> {
        let (from, to) = (range.from.as_micros(), range.to.as_micros());
        let holds = |extra: &Unapplied| extra.ts.iter().any(|t| (from..to).contains(t));
        if !holds(&self.extra) {
            return Ok("readings");
        }
        if !self.open {
            self.open_snapshot()?;
            if !holds(&self.extra) {
                return Ok("readings");
            }
        }
        if !self.loaded {
            self.extra.load(self.conn, self.device)?;
            self.loaded = true;
        }
        Ok(WITH_UNAPPLIED)
    }

    /// Opens the snapshot on `conn` and keeps the listed readings it lacks: those
    /// of records after the applied-through number it holds.
    fn open_snapshot(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch("BEGIN TRANSACTION")?;
        self.open = true;
        self.extra.keep_after(ingest_log::through(self.conn)?);
        Ok(())
    }

    /// Timestamps of the readings memory adds.
    fn extra(&self) -> &[i64] {
        &self.extra.ts
    }
}

/// Readings of one query's series and range that the ingest log acknowledged and
/// DuckDB may not hold yet.
#[derive(Default)]
struct Unapplied {
    /// Log sequence number of each reading's record.
    seq: Vec<u64>,
    sensor: Vec<i16>,
    ts: Vec<i64>,
    value: Vec<f64>,
}

impl Unapplied {
    fn of(shared: &Shared, device: DeviceId, sensors: &[SensorId], ranges: &[TimeRange]) -> Self {
        let mut u = Self::default();
        let device = device.0 as i32;
        let ranges: Vec<std::ops::Range<i64>> = ranges
            .iter()
            .map(|r| r.from.as_micros()..r.to.as_micros())
            .filter(|r| !r.is_empty())
            .collect();
        if ranges.is_empty() {
            return u;
        }
        for logged in shared.unapplied() {
            let r = &logged.rows;
            for i in 0..r.len() {
                if r.device[i] == device
                    && ranges.iter().any(|range| range.contains(&r.ts[i]))
                    && sensors.iter().any(|s| s.0 as i16 == r.sensor[i])
                {
                    u.seq.push(logged.seq);
                    u.sensor.push(r.sensor[i]);
                    u.ts.push(r.ts[i]);
                    u.value.push(r.value[i]);
                }
            }
        }
        u
    }

    fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }

    /// Keeps the readings of records after `through` (the snapshot holds the rest).
    fn keep_after(&mut self, through: u64) {
        let mut kept = 0;
        for i in 0..self.seq.len() {
            if self.seq[i] > through {
                self.seq[kept] = self.seq[i];
                self.sensor[kept] = self.sensor[i];
                self.ts[kept] = self.ts[i];
                self.value[kept] = self.value[i];
                kept += 1;
            }
        }
        self.seq.truncate(kept);
        self.sensor.truncate(kept);
        self.ts.truncate(kept);
        self.value.truncate(kept);
    }

    /// Into this connection's temp table `unapplied` (inside the query's
    /// transaction: other connections never see it).
    fn load(&self, c: &Connection, device: DeviceId) -> Result<(), StoreError> {
        c.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS unapplied (device_id INTEGER, sensor_id SMALLINT,
                 ts_ms BIGINT, ts_us SMALLINT, value DOUBLE);
             DELETE FROM temp.unapplied;",
        )?;
        let mut app = c.appender_to_catalog_and_db("unapplied", "temp", "main")?;
        for i in 0..self.ts.len() {
            app.append_row(duckdb::params![
                device.0 as i32,
                self.sensor[i],
                self.ts[i].div_euclid(1000),
                self.ts[i].rem_euclid(1000) as i16,
                self.value[i]
            ])?;
        }
        app.flush()?;
        Ok(())
    }
}

/// The first and the end (exclusive) slot start, in ms, of the rollup slots lying
/// wholly inside `range`; `first >= end` when there are none.
fn whole_slots(range: TimeRange) -> (i64, i64) {
    let from_ms = -(-range.from.as_micros()).div_euclid(1000); // rounded up
    let to_ms = range.to.as_micros().div_euclid(1000); // rounded down
    (
        rollup::slot_of(from_ms + SLOT_MS - 1),
        rollup::slot_of(to_ms),
    )
}

/// The start of the slot `range` starts in and the end of the slot it ends in (ms).
fn outer_slots(range: TimeRange) -> (i64, i64) {
    let from_ms = range.from.as_micros().div_euclid(1000);
    let last_ms = (range.to.as_micros() - 1).div_euclid(1000);
    (rollup::slot_of(from_ms), rollup::slot_of(last_ms) + SLOT_MS)
}

/// `range` widened to the bounds of the slots it starts and ends in where memory
/// holds that slot exactly (from `held_from` on) and its readings (`held`, one
/// snapshot) all lie inside `range` — none, or first at or after `range.from` for the
/// start, last before `range.to` for the end — and the slot lies inside the buckets
/// (`covered`): the widened range holds the same readings, and whole slots.
fn widen_into_held(
    range: TimeRange,
    covered: TimeRange,
    held_from: i64,
    held: &[HeldSlot],
) -> TimeRange {
    let (outer_from, outer_end) = outer_slots(range);
    let at = |ms: i64| Timestamp::from_micros(ms * 1000);
    let fits = |slot_ms: i64, inside: &dyn Fn(&HeldSlot) -> bool| {
        slot_ms >= held_from
            && held
                .iter()
                .find(|h| h.start_ms == slot_ms)
                .is_none_or(inside)
    };
    let mut wide = range;
    if at(outer_from) >= covered.from && fits(outer_from, &|h| h.first_us >= range.from.as_micros())
    {
        wide.from = at(outer_from);
    }
    let last_slot = outer_end - SLOT_MS;
    if at(outer_end) <= covered.to && fits(last_slot, &|h| h.last_us < range.to.as_micros()) {
        wide.to = at(outer_end);
    }
    wide
}

/// The `WHERE` condition of one device's readings in a time range, as parameters
/// (`$1` device, `$2`/`$3` the first and last millisecond, `$4`/`$5` the range in
/// µs: [`WindowParams`]); the sensors are the caller's.
const WINDOW_FILTER: &str = "device_id = $1 AND ts_ms BETWEEN $2 AND $3
     AND ts_ms * 1000 + ts_us >= $4 AND ts_ms * 1000 + ts_us < $5";

/// The parameters of [`WINDOW_FILTER`].
struct WindowParams([i64; 5]);

impl WindowParams {
    fn of(device: DeviceId, range: TimeRange) -> Self {
        let (from, to) = (range.from.as_micros(), range.to.as_micros());
        Self([
            i64::from(device.0),
            from.div_euclid(1000),
            (to - 1).div_euclid(1000),
            from,
            to,
        ])
    }

    fn params(&self) -> [&dyn duckdb::ToSql; 5] {
        let [a, b, c, d, e] = &self.0;
        [a, b, c, d, e]
    }
}

/// `sensors`' ids as a SQL list's elements.
fn sensor_list(sensors: &[SensorId]) -> String {
    let ids: Vec<String> = sensors.iter().map(|s| s.0.to_string()).collect();
    ids.join(", ")
}

/// `WHERE` clause for readings of `sensors` of `device` in `range`.
fn series_filter(device: DeviceId, sensors: &[SensorId], range: TimeRange) -> String {
    format!(
        "device_id = {} AND {}",
        device.0,
        range_filter(sensors, range)
    )
}

/// The `WHERE` condition of `sensors`' readings in `range` (any device).
fn range_filter(sensors: &[SensorId], range: TimeRange) -> String {
    let (from, to) = (range.from.as_micros(), range.to.as_micros());
    let mut sql = format!(
        "sensor_id IN ({}) AND ts_ms BETWEEN {} AND {}",
        sensor_list(sensors),
        from.div_euclid(1000),
        (to - 1).div_euclid(1000),
    );
    if from.rem_euclid(1000) != 0 {
        sql.push_str(&format!(" AND ts_ms * 1000 + ts_us >= {from}"));
    }
    if to.rem_euclid(1000) != 0 {
        sql.push_str(&format!(" AND ts_ms * 1000 + ts_us < {to}"));
    }
    sql
}

/// Column buffers reused across the record batches of a scan.
#[derive(Default)]
struct ScanBuffers {
    ts: Vec<i64>,
    values: Vec<f64>,
    sensors: Vec<SensorId>,
}

impl ScanBuffers {
    fn fill(&mut self, batch: &RecordBatch) -> Result<(), StoreError> {
        fn col<T: 'static>(batch: &RecordBatch, i: usize) -> Result<&T, StoreError> {
            batch
                .column(i)
                .as_any()
                .downcast_ref::<T>()
                .ok_or_else(|| StoreError::Internal(format!("unexpected type of scan column {i}")))
        }
        let ms = col::<Int64Array>(batch, 0)?;
        let us = col::<Int16Array>(batch, 1)?;
        let value = col::<Float64Array>(batch, 2)?;
        let sensor = col::<Int16Array>(batch, 3)?;
        self.ts.clear();
        self.ts.extend(
            ms.values()
                .iter()
                .zip(us.values().iter())
                .map(|(m, u)| m * 1000 + i64::from(*u)),
        );
        self.values.clear();
        self.values.extend_from_slice(value.values());
        self.sensors.clear();
        self.sensors
            .extend(sensor.values().iter().map(|s| SensorId(*s as u16)));
        debug_assert_eq!(ms.null_count(), 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(from_s: i64, to_s: i64) -> TimeRange {
        TimeRange::new(
            Timestamp::from_micros(from_s * 1_000_000),
            Timestamp::from_micros(to_s * 1_000_000),
        )
        .unwrap()
    }

    /// Whether a transaction is open on `c`: each statement outside one runs in a
    /// transaction of its own (duckdb-rs's `is_autocommit` always says yes).
    fn in_transaction(c: &Connection) -> bool {
        let id = || -> i64 {
            c.query_row("SELECT txid_current()", [], |r| r.get(0))
                .unwrap()
        };
        id() == id()
    }

    fn held(c: &Connection) -> Option<i64> {
        c.query_row("SELECT count(*) FROM temp.unapplied", [], |r| r.get(0))
            .ok()
    }

    /// A view of device 7 on `c` to which memory adds two readings, of records 1 (at
    /// 5 s) and 2 (just before 10 s), over a database that holds the log through
    /// `through`.
    fn listed(c: &Connection, through: u64) -> View<'_> {
        c.execute_batch("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")
            .unwrap();
        ingest_log::set_through(c, through).unwrap();
        View {
            conn: c,
            device: DeviceId(7),
            extra: Unapplied {
                seq: vec![1, 2],
                sensor: vec![1, 1],
                ts: vec![5_000_000, 9_999_999],
                value: vec![1.0, 2.0],
            },
            loaded: false,
            open: false,
        }
    }

    /// A window the unapplied readings miss reads `readings` alone and leaves the
    /// temp table alone; the first window that holds one fills it, once.
    #[test]
    fn a_view_adds_the_unapplied_readings_only_to_windows_that_hold_them() {
        let c = Connection::open_in_memory().unwrap();
        let mut view = listed(&c, 0);
        assert_eq!(view.source(range(0, 5)).unwrap(), "readings");
        assert_eq!(view.source(range(10, 20)).unwrap(), "readings");
        assert_eq!(held(&c), None, "no temp table before a window needs it");
        assert_eq!(view.source(range(5, 6)).unwrap(), WITH_UNAPPLIED);
        assert_eq!(held(&c), Some(2));
        assert_eq!(view.source(range(9, 10)).unwrap(), WITH_UNAPPLIED);
        assert_eq!(view.source(range(6, 9)).unwrap(), "readings");
        assert_eq!(held(&c), Some(2), "filled once");
        c.execute_batch("COMMIT").unwrap();
    }

    /// A view opens its snapshot at the first window holding a listed reading, and
    /// keeps only the readings of records after the applied-through number the
    /// snapshot holds.
    #[test]
    fn a_view_opens_its_snapshot_at_the_first_window_that_needs_it() {
        let c = Connection::open_in_memory().unwrap();
        let mut view = listed(&c, 1);
        assert_eq!(view.source(range(0, 5)).unwrap(), "readings");
        assert!(
            !in_transaction(&c),
            "no transaction for a window without them"
        );
        assert!(!view.open);
        // Record 1 is applied in the snapshot: its reading comes from DuckDB.
        assert_eq!(view.source(range(5, 6)).unwrap(), "readings");
        assert!(in_transaction(&c), "the snapshot is open");
        assert!(view.open);
        assert_eq!(view.extra().to_vec(), vec![9_999_999]);
        assert!(
            !view.loaded,
            "no temp table for a reading the snapshot holds"
        );
        assert_eq!(view.source(range(9, 10)).unwrap(), WITH_UNAPPLIED);
        assert_eq!(held(&c), Some(1));
        c.execute_batch("COMMIT").unwrap();
    }
}
