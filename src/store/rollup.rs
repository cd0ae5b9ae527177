//! 15-minute rollups: count, extremes, sum, first and last value of every series per
//! UTC quarter hour, kept in `rollups` by the writer.
//!
//! Statistics whose buckets are whole quarter hours (15m and wider, aligned to local
//! midnight in any zone whose offset is a multiple of 15 minutes — all of today's)
//! read the rollups for the whole slots of their range and raw readings only for the
//! partial slots at its ends. A 30-day hourly chart then reads ~3 000 rollup rows
//! instead of filtering ~60 M readings, whatever the physical order of the readings
//! (arrival order before compaction mixes every series into every row group, so zone
//! maps cannot skip any of them).
//!
//! Every commit appends, in its own transaction, one row per (series, slot) it
//! stored readings in — a *partial* — computed from the rows it appends (only
//! readings that were stored, so duplicates never count); live slots wait, below.
//! Several partials of one slot are combined at query time and consolidated into one row by [`merge`] once enough have accumulated, and when
//! compaction rewrites a day its rollups are recomputed from the sorted readings.
//! Anything that deletes readings must delete or recompute their slots' rollups too.
//!
//! ## Live slots
//! Writing a second table costs every transaction about as much again as a live
//! device's few readings do, so no partials are written for the *live* slots — the
//! current and the previous quarter hour, and any later one. When a live slot ends,
//! the first commit after that computes its rollups from its readings
//! ([`rebuild`], in the commit's transaction, after its own rows): one grouped scan of
//! the last quarter hour's row groups, which arrival order keeps together. Nothing
//! is held for them meanwhile (the writer held a partial per live series and slot
//! until session 14: ~100 bytes each, 1.2 M of them with 100,000 devices streaming,
//! the same aggregates `store::live` holds for readers). Readers take slots from
//! [`Shared::rollups_from`](super::Shared) on from `readings` or from memory. That
//! boundary is also kept in `meta` (`rollups_from`); start-up recomputes the rollups
//! from it on, and a clean shutdown computes them so the file's rollups are whole.

use duckdb::arrow::array::{Array, Float64Array, Int16Array, Int32Array, Int64Array};
use duckdb::arrow::record_batch::RecordBatch;
use duckdb::{Connection, OptionalExt};

use super::StoreError;
use crate::domain::Aggregate;

/// Length of one slot.
pub(super) const SLOT_MS: i64 = 15 * 60 * 1000;

/// Start of the slot holding `ts_ms`.
pub(super) fn slot_of(ts_ms: i64) -> i64 {
    ts_ms - ts_ms.rem_euclid(SLOT_MS)
}

/// SQL for the start of the slot of `ts_ms` (floored, also before 1970).
pub(super) const SLOT_SQL: &str = "ts_ms - ((ts_ms % 900000) + 900000) % 900000";

/// The aggregate of one series in one slot, over some of its readings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Partial {
    device: i32,
    sensor: i16,
    slot_ms: i64,
    readings: i64,
    min: f64,
    max: f64,
    sum: f64,
    first_us: i64,
    first: f64,
    last_us: i64,
    last: f64,
}

/// The partials of the rows a commit appends.
#[derive(Debug, Default)]
pub(super) struct Partials {
    rows: Vec<Partial>,
}

impl Partials {
    /// Partials of an append batch in table order (`device_id, sensor_id, ts_ms,
    /// ts_us, value`) whose rows are grouped by series and ascending in time within
    /// each, as the writer appends them: one pass, a row per run of one slot.
    pub(super) fn of_sorted(batch: &RecordBatch) -> Result<Self, StoreError> {
        Self::of_sorted_below(batch, i64::MAX)
    }

    /// [`Self::of_sorted`] of the rows in slots before `skip_from` only: a live
    /// fleet's readings lie in the live slots, whose partials [`Self::drop_live`]
    /// drops. Built and then dropped, they were one a series for 100,000 devices
    /// streaming — ~180,000 of 80 bytes (and as much again of the vector's spare
    /// room) a flush.
    pub(super) fn of_sorted_below(batch: &RecordBatch, skip_from: i64) -> Result<Self, StoreError> {
        fn col<T: 'static>(batch: &RecordBatch, i: usize) -> Result<&T, StoreError> {
            batch
                .column(i)
                .as_any()
                .downcast_ref::<T>()
                .ok_or_else(|| StoreError::Internal("unexpected append column type".into()))
        }
        let device = col::<Int32Array>(batch, 0)?.values();
        let sensor = col::<Int16Array>(batch, 1)?.values();
        let ts_ms = col::<Int64Array>(batch, 2)?.values();
        let ts_us = col::<Int16Array>(batch, 3)?.values();
        let value = col::<Float64Array>(batch, 4)?.values();
        let mut rows: Vec<Partial> = Vec::new();
        for i in 0..batch.num_rows() {
            let (v, us) = (value[i], ts_ms[i] * 1000 + i64::from(ts_us[i]));
            let slot_ms = slot_of(ts_ms[i]);
            if slot_ms >= skip_from {
                continue;
            }
            match rows.last_mut() {
                Some(p)
                    if p.device == device[i] && p.sensor == sensor[i] && p.slot_ms == slot_ms =>
                {
                    debug_assert!(us > p.last_us, "rows ascend in time per series");
                    p.readings += 1;
                    p.min = p.min.min(v);
                    p.max = p.max.max(v);
                    p.sum += v;
                    p.last_us = us;
                    p.last = v;
                }
                _ => rows.push(Partial {
                    device: device[i],
                    sensor: sensor[i],
                    slot_ms,
                    readings: 1,
                    min: v,
                    max: v,
                    sum: v,
                    first_us: us,
                    first: v,
                    last_us: us,
                    last: v,
                }),
            }
        }
        Ok(Self { rows })
    }

    /// Rows these partials add to `rollups`.
    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }

    /// The earliest and latest slot touched.
    pub(super) fn slot_span(&self) -> Option<(i64, i64)> {
        let lo = self.rows.iter().map(|p| p.slot_ms).min()?;
        let hi = self.rows.iter().map(|p| p.slot_ms).max()?;
        Some((lo, hi))
    }

    /// Drops the partials of slots from `slot_ms` on: live slots, whose rollups are
    /// computed from their readings when they end. While the ended slots before
    /// `rebuilt.0` are being computed, those of devices below `rebuilt.1` are kept:
    /// theirs are computed already (see [`Rebuild`]).
    pub(super) fn drop_live(&mut self, slot_ms: i64, rebuilt: Option<(i64, u64)>) {
        self.rows.retain(|p| {
            p.slot_ms < slot_ms
                || rebuilt.is_some_and(|(to, below)| {
                    p.slot_ms < to && u64::try_from(p.device).is_ok_and(|d| d < below)
                })
        });
    }

    /// Appends the partials to `rollups` (inside the caller's transaction).
    pub(super) fn append(&self, conn: &Connection) -> Result<(), StoreError> {
        append_rows(conn, &self.rows)
    }
}

/// Key in `meta` of the first slot whose rollups may be incomplete after a crash.
pub(super) const META_FROM: &str = "rollups_from";

/// Appends partials to `rollups` (inside the caller's transaction).
pub(super) fn append_rows(conn: &Connection, rows: &[Partial]) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    super::insert_batch(conn, "rollups", partials_batch(rows)?)
}

/// Partials as one Arrow batch in the table's column order: appended row by row
/// (eleven parameters boxed per row) they were 8 % of the front's samples in a
/// bulk import, and a live fleet's flush appends one per series and quarter hour.
fn partials_batch(rows: &[Partial]) -> Result<RecordBatch, StoreError> {
    use duckdb::arrow::array::ArrayRef;
    use duckdb::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    let i64s = |f: fn(&Partial) -> i64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(rows.iter().map(f)))
    };
    let f64s = |f: fn(&Partial) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(rows.iter().map(f)))
    };
    let columns: [(&str, DataType, ArrayRef); 11] = [
        (
            "device_id",
            DataType::Int32,
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|p| p.device))),
        ),
        (
            "sensor_id",
            DataType::Int16,
            Arc::new(Int16Array::from_iter_values(rows.iter().map(|p| p.sensor))),
        ),
        ("slot_ms", DataType::Int64, i64s(|p| p.slot_ms)),
        ("readings", DataType::Int64, i64s(|p| p.readings)),
        ("min_value", DataType::Float64, f64s(|p| p.min)),
        ("max_value", DataType::Float64, f64s(|p| p.max)),
        ("sum_value", DataType::Float64, f64s(|p| p.sum)),
        ("first_us", DataType::Int64, i64s(|p| p.first_us)),
        ("first_value", DataType::Float64, f64s(|p| p.first)),
        ("last_us", DataType::Int64, i64s(|p| p.last_us)),
        ("last_value", DataType::Float64, f64s(|p| p.last)),
    ];
    let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) = columns
        .into_iter()
        .map(|(name, ty, a)| (Field::new(name, ty, false), a))
        .unzip();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
        .map_err(|e| StoreError::Internal(format!("building the rollups' append batch: {e}")))
}

/// The columns of one row combining a slot's partial rows (`GROUP BY device_id,
/// sensor_id, slot_ms` over `rollups`), in the table's order after the key.
pub(super) const COMBINED: &str = "CAST(sum(readings) AS BIGINT) AS readings,
    min(min_value) AS min_value, max(max_value) AS max_value, sum(sum_value) AS sum_value,
    min(first_us) AS first_us, arg_min(first_value, first_us) AS first_value,
    max(last_us) AS last_us, arg_max(last_value, last_us) AS last_value";

/// What a [`merge`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Merged {
    /// Partial rows replaced by combined ones.
    pub(super) replaced: u64,
    /// Rows the span holds now.
    pub(super) rows: u64,
}

/// Combines the partials of each slot in `[lo_slot, hi_slot]` into one row, a range
/// of devices at a time (see [`super::device_ranges`]), each in its own transaction:
/// a backlog of an earlier day from a million devices leaves millions of partials
/// in the span, which one statement could not group within a 64 MB limit (it failed
/// at every try, and the partials stayed).
pub(super) fn merge(conn: &Connection, lo_slot: i64, hi_slot: i64) -> Result<Merged, StoreError> {
    let _span = tracing::debug_span!("rollup_merge", lo_slot, hi_slot).entered();
    let range = format!("slot_ms BETWEEN {lo_slot} AND {hi_slot}");
    let rows: i64 = conn.query_row(
        &format!("SELECT count(*) FROM rollups WHERE {range}"),
        [],
        |r| r.get(0),
    )?;
    let mut done = Merged {
        replaced: 0,
        rows: rows as u64,
    };
    super::run_in_device_ranges(conn, rows as u64, u64::MAX, |devices| {
        let (replaced, combined) = super::in_transaction(conn, || {
            conn.execute_batch(&format!(
                "CREATE OR REPLACE TEMP TABLE rollup_merge AS
                     SELECT device_id, sensor_id, slot_ms, {COMBINED}
                     FROM rollups WHERE {range} {devices}
                     GROUP BY device_id, sensor_id, slot_ms HAVING count(*) > 1"
            ))?;
            let replaced = conn.execute(
                &format!(
                    "DELETE FROM rollups USING rollup_merge m
                     WHERE rollups.{range} AND rollups.device_id = m.device_id
                       AND rollups.sensor_id = m.sensor_id AND rollups.slot_ms = m.slot_ms"
                ),
                [],
            )?;
            let combined = conn.execute(
                "INSERT INTO rollups SELECT * FROM rollup_merge
                     ORDER BY device_id, sensor_id, slot_ms",
                [],
            )?;
            conn.execute_batch("DROP TABLE temp.rollup_merge")?;
            Ok::<_, StoreError>((replaced as u64, combined as u64))
        })?;
        done.replaced += replaced;
        done.rows = done.rows - replaced + combined;
        Ok(())
    })?;
    Ok(done)
}

/// Replaces the rollups of the slots in `[from_ms, to_ms)` (whole slots) with ones
/// computed from the readings of that span in `source`, a table shaped like
/// `readings` (itself, or compaction's sorted copy of a day). Runs in the caller's
/// transaction (if any), one statement per range of devices (see
/// [`super::run_in_device_ranges`]): a slot's groups are each series', so many
/// devices take several.
pub(super) fn rebuild(
    conn: &Connection,
    source: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<(), StoreError> {
    let mut rebuild = Rebuild::start(conn, source, from_ms, to_ms)?;
    while !rebuild.step(conn)? {}
    Ok(())
}

/// [`rebuild`] a range of devices at a time, for the writer, which moves the ingest
/// log into DuckDB between ranges: a quarter hour of 100,000 devices streaming (148 M
/// readings at a 64 MB limit, 21 ranges) took ~10 s in one go, while the log's
/// unapplied readings grew to a million and the server's memory by 90 MiB.
///
/// While it runs, rollup rows appended for `[from_ms, to_ms)` are right only for the
/// devices already rebuilt ([`Self::done_below`]): the others' readings are counted
/// when their range runs. Nothing else may write those slots' rollups meanwhile.
pub(super) struct Rebuild {
    source: String,
    from_ms: i64,
    to_ms: i64,
    /// `None` when the span holds no readings.
    steps: Option<super::RangeSteps>,
    done_below: u64,
}

impl Rebuild {
    /// Deletes the span's rollups and plans the ranges (committed at once when no
    /// transaction is open: readers do not read rollups of live slots).
    pub(super) fn start(
        conn: &Connection,
        source: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Self, StoreError> {
        debug_assert!(from_ms.rem_euclid(SLOT_MS) == 0);
        conn.execute_batch(&format!(
            "DELETE FROM rollups WHERE slot_ms >= {from_ms} AND slot_ms < {to_ms};"
        ))?;
        let (rows, newest): (i64, i64) = conn.query_row(
            &format!(
                "SELECT count(*), coalesce(max(ts_ms), {from_ms}) FROM {source}
                 WHERE ts_ms >= {from_ms} AND ts_ms < {to_ms}"
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let steps = if rows == 0 {
            None
        } else {
            let slots = ((newest - from_ms) / SLOT_MS + 1) as u64;
            let per_device = super::sensor_count(conn)?.saturating_mul(slots);
            tracing::debug!(rows, "rebuilding rollups");
            Some(super::RangeSteps::new(conn, rows as u64, per_device)?)
        };
        Ok(Self {
            source: source.to_owned(),
            from_ms,
            to_ms,
            done_below: if steps.is_none() { u64::MAX } else { 0 },
            steps,
        })
    }

    /// Rebuilds the next range of devices; true once every range is done.
    pub(super) fn step(&mut self, conn: &Connection) -> Result<bool, StoreError> {
        let Some(steps) = &mut self.steps else {
            return Ok(true);
        };
        let (source, from_ms, to_ms) = (&self.source, self.from_ms, self.to_ms);
        match steps.step(conn, |devices| {
            conn.execute_batch(&insert_rebuilt(source, from_ms, to_ms, devices))?;
            Ok(())
        })? {
            Some(range) => {
                self.done_below = range.done_below();
                Ok(self.done_below == u64::MAX)
            }
            None => {
                self.done_below = u64::MAX;
                Ok(true)
            }
        }
    }

    /// Devices with an id below this have their rollups in the span rebuilt.
    pub(super) fn done_below(&self) -> u64 {
        self.done_below
    }

    /// The span's end (exclusive).
    pub(super) fn to_ms(&self) -> i64 {
        self.to_ms
    }
}

/// The statement [`rebuild`] runs for one range of devices.
fn insert_rebuilt(source: &str, from_ms: i64, to_ms: i64, devices: &super::DeviceRange) -> String {
    format!(
        "INSERT INTO rollups
             SELECT device_id, sensor_id, {SLOT_SQL} AS slot_ms, count(*),
                    min(value), max(value), sum(value),
                    min(ts_ms * 1000 + ts_us), arg_min(value, ts_ms * 1000 + ts_us),
                    max(ts_ms * 1000 + ts_us), arg_max(value, ts_ms * 1000 + ts_us)
             FROM {source} WHERE ts_ms >= {from_ms} AND ts_ms < {to_ms} {devices}
             GROUP BY device_id, sensor_id, slot_ms
             ORDER BY device_id, sensor_id, slot_ms;"
    )
}

/// Rebuilds the rollups of every slot from `from_ms` on, outside any transaction:
/// the old ones are deleted and checkpointed first (a DELETE keeps ~8 bytes per row
/// in DuckDB's memory until a checkpoint, and two million devices' live rollups are
/// twelve million rows; inside one transaction with the inserts, 100,000 devices'
/// ran out of a 64 MB limit), then inserted a range of devices at a time, each
/// committed on its own. The caller keeps the boundary in `meta` until this
/// returns, so that a crash in between makes the next start do it again.
pub(super) fn rebuild_from(conn: &Connection, from_ms: i64) -> Result<(), StoreError> {
    conn.execute_batch(&format!("DELETE FROM rollups WHERE slot_ms >= {from_ms}"))?;
    if let Err(e) = conn.execute_batch("CHECKPOINT") {
        tracing::warn!(error = %e, "cannot checkpoint before rebuilding the rollups");
    }
    rebuild(conn, "readings", from_ms, i64::MAX)
}

/// At writer start: recomputes the rollups from the boundary a previous run left in
/// `meta` on (the partials it held in memory may be lost; a clean shutdown writes
/// them and removes the boundary), then records `from`, the new boundary. Returns the boundary it recomputed from, if there was one.
pub(super) fn recover(conn: &Connection, from: i64) -> Result<Option<i64>, StoreError> {
    let _span = tracing::info_span!("rollup_recover").entered();
    let stored: Option<String> = conn
        .query_row(
            &format!("SELECT value FROM meta WHERE key = '{META_FROM}'"),
            [],
            |r| r.get(0),
        )
        .optional()?;
    let previous = match stored {
        Some(v) => Some(
            v.parse::<i64>()
                .map_err(|e| StoreError::Corrupt(format!("meta {META_FROM} '{v}': {e}")))?,
        ),
        None => None,
    };
    if let Some(p) = previous {
        rebuild_from(conn, p)?;
    }
    conn.execute_batch(&format!(
        "INSERT OR REPLACE INTO meta VALUES ('{META_FROM}', '{from}')"
    ))?;
    Ok(previous)
}

/// Per-group aggregates of one series over the slots in `[from_ms, to_ms)` (both slot
/// bounds), grouped by `(slot - origin_ms) // grain_ms` and in group order: calls
/// `part(group, aggregate)`. `origin_ms` must not be after `from_ms`.
pub(super) fn bucket_parts(
    conn: &Connection,
    device: u32,
    sensor: i16,
    (from_ms, to_ms): (i64, i64),
    (origin_ms, grain_ms): (i64, i64),
    part: &mut dyn FnMut(i64, Aggregate),
) -> Result<(), StoreError> {
    const SQL: &str = "SELECT (slot_ms - $1) // $2 AS g, CAST(sum(readings) AS BIGINT),
                min(min_value), max(max_value), sum(sum_value),
                arg_min(first_value, first_us), arg_max(last_value, last_us)
         FROM rollups
         WHERE device_id = $3 AND sensor_id = $4 AND slot_ms >= $5 AND slot_ms < $6
         GROUP BY g ORDER BY g";
    let params: [&dyn duckdb::ToSql; 6] =
        [&origin_ms, &grain_ms, &device, &sensor, &from_ms, &to_ms];
    aggregate_rows(conn, SQL, &params, part)
}

/// Runs a query whose rows are `(group, count, min, max, sum, first, last)`, with
/// `params` bound to its `$n`.
///
/// Prepared once per connection and SQL text (`prepare_cached`). This DuckDB binds
/// and plans a prepared statement that reads a table again at every execution (its
/// optimizer sets `always_require_rebind`), so what the cache saves is the parse:
/// ~0.6 ms of a small query's ~1.2 here, a day chart's server CPU 5.4–6.0 → 3.8–4.0
/// ms, its p50 beside a streaming fleet 17 → 10 ms (docs/performance.md, session
/// 40). Hence parameters, not literals: each text is one cache entry.
pub(super) fn aggregate_rows(
    conn: &Connection,
    sql: &str,
    params: &[&dyn duckdb::ToSql],
    part: &mut dyn FnMut(i64, Aggregate),
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    while let Some(r) = rows.next()? {
        part(
            r.get(0)?,
            Aggregate {
                count: r.get::<_, i64>(1)? as u64,
                min: r.get(2)?,
                max: r.get(3)?,
                sum: r.get(4)?,
                first: r.get(5)?,
                last: r.get(6)?,
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        Batch, BucketWidth, Buckets, Device, Row, SensorId, TimeRange, Timestamp, parse_tz,
    };
    use crate::store::{Clock, Reader, Store, WriterConfig, WriterHandle};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    /// 2024-03-30T00:00:00Z: the history spans the spring daylight-saving change in
    /// Europe.
    const BASE_US: i64 = 1_711_756_800_000_000;
    const SPAN_US: i64 = 3 * 86_400_000_000;
    const DEVICES: [&str; 2] = ["a", "b"];

    fn open(dir: &std::path::Path) -> Store {
        crate::store::open_for_tests(dir)
    }

    /// Values are multiples of 1/4, so every sum is exact in any order and the two
    /// paths must agree bit for bit.
    fn row(rng: &mut fastrand::Rng, device: u16, ts: i64) -> Row {
        Row {
            device,
            sensor: SensorId(rng.u16(1..=2)),
            ts: Timestamp::from_micros(ts),
            value: f64::from(rng.i32(-4000..4000)) / 4.0,
        }
    }

    fn batch(rows: Vec<Row>) -> Batch {
        Batch {
            devices: DEVICES.iter().map(|d| Device::parse(d).unwrap()).collect(),
            rows,
        }
    }

    /// Out-of-order history in many commits (readings of one slot spread over many
    /// of them), re-sent readings with other values, in-batch duplicates, then a live
    /// tail of tiny commits while the clock moves on (held partials, released as
    /// their slots end).
    async fn write_history(h: &WriterHandle, rng: &mut fastrand::Rng, clock: &AtomicI64) {
        // "Now" is the end of the history: its last quarter hours are live.
        clock.store((BASE_US + SPAN_US) / 1000, Ordering::SeqCst);
        let mut sent: Vec<Row> = Vec::new();
        for _ in 0..40 {
            let mut rows = Vec::new();
            for _ in 0..rng.usize(1..1500) {
                let mut ts = BASE_US + rng.i64(0..SPAN_US);
                if rng.bool() {
                    ts -= ts.rem_euclid(1000);
                }
                let device = rng.u16(0..2);
                rows.push(row(rng, device, ts));
            }
            for _ in 0..rng.usize(0..200.min(sent.len() + 1)) {
                let again = sent[rng.usize(0..sent.len())];
                rows.push(Row {
                    value: again.value + 1.0,
                    ..again
                });
            }
            let dup = rows[rng.usize(0..rows.len())];
            rows.push(dup);
            sent.extend(&rows);
            h.append(batch(rows)).await.unwrap();
        }
        for i in 0..300 {
            let ts = BASE_US + SPAN_US + i * 7_000_123;
            clock.store(ts / 1000 + 1_000, Ordering::SeqCst);
            let rows = (0..rng.usize(1..4))
                .map(|d| row(rng, (d % 2) as u16, ts + d as i64))
                .collect();
            h.append(batch(rows)).await.unwrap();
        }
    }

    /// Statistics through the rollups equal statistics from raw readings, for aligned
    /// widths and zones (rollups used) and unaligned ones (raw on both sides).
    fn assert_same_as_raw(reader: &Reader, rng: &mut fastrand::Rng, when: &str) {
        let widths = ["1m", "15m", "30m", "1h", "2h", "1d"];
        let zones = [
            None,
            Some("Europe/Berlin"),
            Some("Asia/Kolkata"),
            Some("Asia/Kathmandu"),
            Some("America/St_Johns"),
        ];
        let mut compared = 0;
        for device in ["a", "b", "nobody"] {
            let device = Device::parse(device).unwrap();
            for sensor in [SensorId(1), SensorId(2)] {
                for width in widths {
                    for zone in zones {
                        // The history and the live tail after it; every other
                        // range starts in the live tail (inside a slot memory holds,
                        // before or after its first reading).
                        let from = if rng.bool() {
                            BASE_US - 3_600_000_000 + rng.i64(0..SPAN_US)
                        } else {
                            BASE_US + SPAN_US + rng.i64(0..2_100_000_000)
                        };
                        let to = from + rng.i64(1..SPAN_US + 2 * 3_600_000_000);
                        let range = TimeRange::new(
                            Timestamp::from_micros(from),
                            Timestamp::from_micros(to),
                        )
                        .unwrap();
                        let tz = zone.map(|z| parse_tz(z).unwrap());
                        let width = BucketWidth::parse(width).unwrap();
                        let buckets = Buckets::new(range, width, tz, 10_000).unwrap();
                        let auto = reader.aggregate(&device, sensor, &buckets, true).unwrap();
                        let raw = reader.aggregate(&device, sensor, &buckets, false).unwrap();
                        assert_eq!(
                            auto, raw,
                            "{when}: {device} sensor {} {width} {zone:?} {range:?}",
                            sensor.0
                        );
                        compared += auto.iter().filter(|a| a.count > 0).count();
                    }
                }
            }
        }
        assert!(compared > 1000, "{when}: only {compared} non-empty buckets");
    }

    #[tokio::test]
    async fn statistics_from_rollups_equal_statistics_from_readings() {
        // Partials left as they are, and consolidated after every commit.
        for (seed, merge_at) in [(1, usize::MAX), (2, 1)] {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path());
            let reader = store.reader().unwrap();
            let clock = Arc::new(AtomicI64::new(0));
            let c = clock.clone();
            let writer = store
                .start_writer(WriterConfig {
                    rollup_merge_rows: merge_at,
                    clock: Clock::from_fn(move || c.load(Ordering::SeqCst)),
                    ..WriterConfig::default()
                })
                .unwrap();
            let h = writer.handle();
            let mut rng = fastrand::Rng::with_seed(seed);
            write_history(&h, &mut rng, &clock).await;
            assert_same_as_raw(&reader, &mut rng, "as written");
            while h.compact().await.unwrap().days > 0 {}
            assert_same_as_raw(&reader, &mut rng, "compacted");
            writer.shutdown().await.unwrap();
            drop(reader);
            // Reopened: the live slots were recomputed from their readings.
            let store = open(dir.path());
            let reader = store.reader().unwrap();
            let writer = store.start_writer(WriterConfig::default()).unwrap();
            assert_same_as_raw(&reader, &mut rng, "reopened");
            writer.shutdown().await.unwrap();
        }
    }

    #[test]
    fn partials_follow_runs_of_series_and_slots() {
        use duckdb::arrow::array::ArrayRef;
        use duckdb::arrow::datatypes::{DataType, Field, Schema};
        use std::sync::Arc;
        // device 1 sensor 1: two readings in one slot, one in the next (before 1970,
        // where slots still start on multiples of 15 minutes); device 1 sensor 2: one.
        let rows: [(i32, i16, i64, i16, f64); 4] = [
            (1, 1, -900_000, 5, 2.0),
            (1, 1, -1, 999, -3.0),
            (1, 1, 0, 0, 7.0),
            (1, 2, -1, 0, 1.5),
        ];
        let fields = ["device_id", "sensor_id", "ts_ms", "ts_us", "value"];
        let types = [
            DataType::Int32,
            DataType::Int16,
            DataType::Int64,
            DataType::Int16,
            DataType::Float64,
        ];
        let schema = Schema::new(
            fields
                .iter()
                .zip(types)
                .map(|(n, t)| Field::new(*n, t, false))
                .collect::<Vec<_>>(),
        );
        let arrays: Vec<ArrayRef> = vec![
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Int16Array::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            Arc::new(Int16Array::from_iter_values(rows.iter().map(|r| r.3))),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.4))),
        ];
        let batch = RecordBatch::try_new(Arc::new(schema), arrays).unwrap();
        let p = Partials::of_sorted(&batch).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p.slot_span(), Some((-900_000, 0)));
        let first = p.rows[0];
        assert_eq!((first.slot_ms, first.readings), (-900_000, 2));
        assert_eq!((first.min, first.max, first.sum), (-3.0, 2.0, -1.0));
        assert_eq!((first.first_us, first.first), (-899_999_995, 2.0));
        assert_eq!((first.last_us, first.last), (-1, -3.0));
        assert_eq!((p.rows[1].slot_ms, p.rows[1].readings), (0, 1));
        assert_eq!((p.rows[2].sensor, p.rows[2].slot_ms), (2, -900_000));
        // Below the live slots only: the same partials of the earlier slot, none of
        // slot 0.
        let below = Partials::of_sorted_below(&batch, 0).unwrap();
        assert_eq!(below.len(), 2);
        assert_eq!(below.rows[0].readings, 2);
        assert!(below.rows.iter().all(|r| r.slot_ms < 0));
    }

    /// A database in `dir` with the readings and rollups tables.
    fn schema_in(dir: &std::path::Path) -> duckdb::Connection {
        let conn = duckdb::Connection::open(dir.join("x.duckdb")).unwrap();
        crate::store::register_arrow_scan(&conn).unwrap();
        conn.execute_batch(include_str!("../../schema/migrations/0001_init.sql"))
            .unwrap();
        conn.execute_batch(include_str!("../../schema/migrations/0002_rollups.sql"))
            .unwrap();
        conn
    }

    /// Partials of many devices are combined a range of devices at a time: one row
    /// per slot, the same aggregates, and the counts the writer paces itself by.
    #[test]
    fn merge_combines_partials_in_device_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let conn = schema_in(dir.path());
        let t0 = 1_711_756_800_000i64;
        conn.execute_batch("INSERT INTO devices SELECT d, 'd' || d FROM range(100) t(d)")
            .unwrap();
        // Three partial rows for each even device's slot, one for each odd one's.
        conn.execute_batch(&format!(
            "INSERT INTO rollups
                 SELECT d::INTEGER, 1::SMALLINT, {t0}, 2, p, p + 1, 2 * p + 1,
                        {t0} * 1000 + p, p, {t0} * 1000 + p + 1, p + 1
                 FROM range(100) a(d), range(3) b(p) WHERE d % 2 = 0 OR p = 0"
        ))
        .unwrap();
        let before: (i64, f64) = conn
            .query_row(
                "SELECT sum(readings)::BIGINT, sum(sum_value) FROM rollups",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        super::super::GROUPS_PER_STATEMENT.set(Some(40));
        let merged = merge(&conn, t0, t0).unwrap();
        assert_eq!(
            merged,
            Merged {
                replaced: 150,
                rows: 100
            }
        );
        let after: (i64, f64) = conn
            .query_row(
                "SELECT sum(readings)::BIGINT, sum(sum_value) FROM rollups",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(after, before);
        let row: (i64, f64, f64, f64, f64) = conn
            .query_row(
                "SELECT readings, min_value, max_value, first_value, last_value
                 FROM rollups WHERE device_id = 42",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .unwrap();
        assert_eq!(row, (6, 0.0, 3.0, 0.0, 3.0));
        // Nothing left to combine: the next pass replaces nothing.
        assert_eq!(merge(&conn, t0, t0).unwrap().replaced, 0);
    }

    /// The quarter hour's rollups computed a range of devices at a time while the
    /// writer appends in between, as it does at a slot's end: late readings of the
    /// ended slot keep their partials for devices already rebuilt and drop them for
    /// the others (counted when their range runs), so the result equals the
    /// readings; with the rule reversed it would not.
    #[test]
    fn a_rebuild_in_steps_with_appends_between_equals_the_readings() {
        let dir = tempfile::tempdir().unwrap();
        let conn = schema_in(dir.path());
        let t0 = 1_711_756_800_000i64;
        assert_eq!(t0 % SLOT_MS, 0);
        conn.execute_batch(&format!(
            "INSERT INTO devices SELECT d, 'd' || d FROM range(100) t(d);
             INSERT INTO readings
                 SELECT d::INTEGER, s::SMALLINT, {t0} + k * 1000, 0, d * 10 + k
                 FROM range(100) a(d), range(1, 3) b(s), range(10) c(k)"
        ))
        .unwrap();
        super::super::GROUPS_PER_STATEMENT.set(Some(40));
        let mut rebuild = Rebuild::start(&conn, "readings", t0, t0 + SLOT_MS).unwrap();
        let mut appends = 0i64;
        loop {
            // Late readings of the ended slot (every 7th device, a different few each
            // time) and live ones after it, appended with their partials.
            let late = format!(
                "SELECT d::INTEGER AS device_id, 1::SMALLINT AS sensor_id,
                        ({t0} + 600000 + {appends})::BIGINT AS ts_ms, 0::SMALLINT AS ts_us,
                        (-d)::DOUBLE AS value
                 FROM range(100) t(d) WHERE d % 7 = {appends} % 7
                 UNION ALL
                 SELECT 3::INTEGER, 2::SMALLINT, ({t0} + {SLOT_MS} + {appends})::BIGINT,
                        0::SMALLINT, 5.0::DOUBLE
                 ORDER BY device_id, sensor_id, ts_ms, ts_us"
            );
            conn.execute_batch(&format!("INSERT INTO readings {late}"))
                .unwrap();
            let batches: Vec<RecordBatch> = conn
                .prepare(&late)
                .unwrap()
                .query_arrow([])
                .unwrap()
                .collect();
            for batch in &batches {
                let mut p = Partials::of_sorted(batch).unwrap();
                p.drop_live(t0, Some((t0 + SLOT_MS, rebuild.done_below())));
                p.append(&conn).unwrap();
            }
            appends += 1;
            if rebuild.step(&conn).unwrap() {
                break;
            }
        }
        assert!(appends >= 4, "{appends} ranges");
        assert_eq!(rebuild.done_below(), u64::MAX);
        let of = |sql: &str| -> Vec<(i32, i16, i64, f64, f64, f64)> {
            conn.prepare(sql)
                .unwrap()
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let rolled = of(&format!(
            "SELECT device_id, sensor_id, sum(readings)::BIGINT, min(min_value),
                    max(max_value), sum(sum_value)
             FROM rollups WHERE slot_ms = {t0} GROUP BY ALL ORDER BY ALL"
        ));
        let raw = of(&format!(
            "SELECT device_id, sensor_id, count(*), min(value), max(value), sum(value)
             FROM readings WHERE ts_ms >= {t0} AND ts_ms < {t0} + {SLOT_MS}
             GROUP BY ALL ORDER BY ALL"
        ));
        assert_eq!(rolled.len(), 200);
        assert_eq!(rolled, raw);
        // The live slot's partials were dropped: the live slots hold them.
        let live: i64 = conn
            .query_row(
                &format!("SELECT count(*) FROM rollups WHERE slot_ms >= {t0} + {SLOT_MS}"),
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(live, 0);
    }

    /// What a crash leaves: readings committed whose partials were held in memory.
    #[test]
    fn recovery_recomputes_the_slots_a_crashed_run_held() {
        let dir = tempfile::tempdir().unwrap();
        let conn = schema_in(dir.path());
        let t0 = 1_711_756_800_000; // ms, on a slot bound
        // Four slots of one reading per second; rollups stored for the first two only,
        // the boundary the crashed run recorded at the third.
        let mut app = conn.appender("readings").unwrap();
        for s in 0..3_600 {
            app.append_row(duckdb::params![1, 1i16, t0 + s * 1000, 0i16, s as f64])
                .unwrap();
        }
        app.flush().unwrap();
        drop(app);
        rebuild(&conn, "readings", t0, t0 + 2 * SLOT_MS).unwrap();
        conn.execute_batch(&format!(
            "INSERT INTO meta VALUES ('{META_FROM}', '{}')",
            t0 + 2 * SLOT_MS
        ))
        .unwrap();
        let slots = |conn: &duckdb::Connection| -> Vec<(i64, i64, f64)> {
            let mut stmt = conn
                .prepare("SELECT slot_ms, readings, last_value FROM rollups ORDER BY slot_ms")
                .unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        assert_eq!(slots(&conn).len(), 2);
        let now_from = t0 + 10 * SLOT_MS;
        assert_eq!(recover(&conn, now_from).unwrap(), Some(t0 + 2 * SLOT_MS));
        let expected: Vec<(i64, i64, f64)> = (0..4)
            .map(|i| (t0 + i * SLOT_MS, 900, (i * 900 + 899) as f64))
            .collect();
        assert_eq!(slots(&conn), expected);
        let recorded: String = conn
            .query_row(
                &format!("SELECT value FROM meta WHERE key = '{META_FROM}'"),
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(recorded, now_from.to_string());
        // Running it again changes nothing.
        recover(&conn, now_from).unwrap();
        assert_eq!(slots(&conn), expected);
    }

    /// When the groups exceed what one statement may hold, rebuilds and the series
    /// recompute run a statement per range of ids: devices at every range's edges
    /// and beyond the last known id are all counted.
    #[test]
    fn rebuilds_and_recomputes_by_device_range_cover_every_device() {
        let dir = tempfile::tempdir().unwrap();
        let conn = schema_in(dir.path());
        let t0 = 1_711_756_800_000i64;
        // 400,001 ids known; 28 readings (28 groups) in statements of at most 10: three
        // ranges of 133,334 ids.
        super::super::GROUPS_PER_STATEMENT.set(Some(10));
        conn.execute("INSERT INTO devices VALUES (400000, 'last')", [])
            .unwrap();
        let w = 133_334;
        let devices = [1i32, w - 1, w, 2 * w - 1, 2 * w, 400_000, 650_000];
        let ranges = |rows, per_device| -> Vec<String> {
            super::super::device_ranges(&conn, rows, per_device)
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            ranges(28, 1),
            [
                format!("AND device_id < {w}"),
                format!("AND device_id BETWEEN {w} AND {}", 2 * w - 1),
                format!("AND device_id >= {}", 2 * w),
            ]
        );
        // What fits stays one statement.
        assert_eq!(ranges(10, 1), [""]);
        assert_eq!(ranges(28, 0), [""]);
        let mut app = conn.appender("readings").unwrap();
        for (i, d) in devices.iter().enumerate() {
            for s in 0..=i as i64 {
                app.append_row(duckdb::params![d, 1i16, t0 + s * 1000, 0i16, s as f64])
                    .unwrap();
            }
        }
        app.flush().unwrap();
        drop(app);
        rebuild(&conn, "readings", t0, i64::MAX).unwrap();
        crate::store::series::recompute(&conn).unwrap();
        let counts = |sql: &str| -> Vec<(i32, i64)> {
            let mut stmt = conn.prepare(sql).unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let want: Vec<(i32, i64)> = devices
            .iter()
            .enumerate()
            .map(|(i, d)| (*d, i as i64 + 1))
            .collect();
        let grouped = |table: &str| {
            format!("SELECT device_id, sum(readings)::BIGINT FROM {table} GROUP BY 1 ORDER BY 1")
        };
        assert_eq!(counts(&grouped("rollups")), want);
        assert_eq!(counts(&grouped("series")), want);
    }

    /// Many devices' live slots rebuilt at a small memory limit: whole, in slices.
    /// (At 100,000 devices and 64 MB, one statement ran out of memory and the server
    /// could not start again; this is that case scaled down to 16 MB, where one
    /// statement of its 240,000 groups runs out of memory too.)
    /// Devices, readings per series and slot, and the first slot of [`fleet_at_16mb`].
    const FLEET: (i64, i64, i64) = (20_000, 10, 1_711_756_800_000);

    /// 20,000 devices × 6 sensors × 2 slots of 10 readings (240,000 groups) in
    /// arrival order — every device in every row group, as a fleet writes them — at
    /// a 16 MB limit, where one statement grouping them all runs out of memory.
    fn fleet_at_16mb(dir: &std::path::Path) -> duckdb::Connection {
        let conn = schema_in(dir);
        let (devices, per_slot, t0) = FLEET;
        conn.execute_batch(&format!(
            "INSERT INTO devices SELECT d, 'd' || d FROM range({devices}) t(d);
             INSERT INTO readings
                 SELECT d::INTEGER, s::SMALLINT, {t0} + k * {step}, 0::SMALLINT, k
                 FROM range(2 * {per_slot}) a(k), range({devices}) b(d), range(6) c(s);
             CHECKPOINT;
             SET threads = 2;
             SET memory_limit = '16MB';",
            step = SLOT_MS / per_slot
        ))
        .unwrap();
        conn
    }

    /// Every series' two slots are in the rollups, with every reading.
    fn assert_fleet_rolled_up(conn: &duckdb::Connection) {
        let (devices, per_slot, _) = FLEET;
        let (groups, readings): (i64, i64) = conn
            .query_row(
                "SELECT count(*), sum(readings)::BIGINT FROM rollups",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(groups, devices * 6 * 2);
        assert_eq!(readings, devices * 6 * 2 * per_slot);
    }

    #[test]
    fn many_devices_are_rebuilt_within_a_small_memory_limit() {
        let dir = tempfile::tempdir().unwrap();
        let conn = fleet_at_16mb(dir.path());
        rebuild_from(&conn, FLEET.2).unwrap();
        assert_fleet_rolled_up(&conn);
    }

    /// A slice the estimate got wrong is halved until it fits: the same 240,000
    /// groups at 16 MB, sliced as if one statement could hold them all.
    #[test]
    fn a_statement_out_of_memory_is_run_again_in_halves() {
        let dir = tempfile::tempdir().unwrap();
        let conn = fleet_at_16mb(dir.path());
        let t0 = FLEET.2;
        super::super::GROUPS_PER_STATEMENT.set(Some(u64::MAX));
        // One statement: what the rebuild would run, and fails.
        let whole = super::super::run_in_device_ranges(&conn, u64::MAX, 1, |_| {
            Err(StoreError::Duckdb(duckdb::Error::DuckDBFailure(
                duckdb::ffi::Error::new(1),
                Some("Out of Memory Error: could not allocate".into()),
            )))
        });
        assert!(
            whole.unwrap_err().is_out_of_memory(),
            "one id cannot be halved"
        );
        let all = super::super::device_ranges(&conn, 1, 1).unwrap();
        let one = conn.execute_batch(&insert_rebuilt("readings", t0, i64::MAX, &all[0]));
        assert!(
            StoreError::from(one.unwrap_err()).is_out_of_memory(),
            "the case must not fit one statement"
        );
        rebuild_from(&conn, t0).unwrap();
        assert_fleet_rolled_up(&conn);
        // Inside a transaction a failed statement aborts it: no second try.
        conn.execute_batch("DELETE FROM rollups; CHECKPOINT; BEGIN TRANSACTION")
            .unwrap();
        let e = rebuild(&conn, "readings", t0, i64::MAX).unwrap_err();
        assert!(e.is_out_of_memory(), "{e}");
        conn.execute_batch("ROLLBACK").unwrap();
    }

    #[tokio::test]
    async fn a_database_from_before_rollups_gets_them_when_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = fastrand::Rng::with_seed(3);
        {
            // Version 1 as an older binary left it, with readings.
            let conn = duckdb::Connection::open(crate::store::DataDir::new(dir.path()).database())
                .unwrap();
            conn.execute_batch(include_str!("../../schema/migrations/0001_init.sql"))
                .unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY,
                     name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL);
                 INSERT INTO schema_migrations VALUES (1, 'init', make_timestamp(0::BIGINT));
                 INSERT INTO devices VALUES (1, 'a');
                 UPDATE meta SET value = 'stale' WHERE key = 'series_snapshot';",
            )
            .unwrap();
            let mut app = conn.appender("readings").unwrap();
            for _ in 0..20_000 {
                let ts = BASE_US + rng.i64(0..SPAN_US);
                let r = row(&mut rng, 0, ts);
                let ts = r.ts.as_micros();
                app.append_row(duckdb::params![
                    1,
                    r.sensor.0 as i16,
                    ts.div_euclid(1000),
                    ts.rem_euclid(1000) as i16,
                    r.value
                ])
                .unwrap();
            }
            app.flush().unwrap();
        }
        let store = open(dir.path());
        let reader = store.reader().unwrap();
        let device = Device::parse("a").unwrap();
        let range = TimeRange::new(
            Timestamp::from_micros(BASE_US),
            Timestamp::from_micros(BASE_US + SPAN_US),
        )
        .unwrap();
        for width in ["15m", "1h", "1d"] {
            let buckets =
                Buckets::new(range, BucketWidth::parse(width).unwrap(), None, 10_000).unwrap();
            for sensor in [SensorId(1), SensorId(2)] {
                let auto = reader.aggregate(&device, sensor, &buckets, true).unwrap();
                let raw = reader.aggregate(&device, sensor, &buckets, false).unwrap();
                assert_eq!(auto, raw, "{width} sensor {}", sensor.0);
                assert!(auto.iter().map(|a| a.count).sum::<u64>() > 9_000);
            }
        }
    }
}
