//! Retention: deleting the readings of old days once their dumps are safe.
//!
//! The exporter decides which days qualify (every configured format dumped with the
//! day's current reading count) and sends them with those counts; the writer runs
//! [`retire`] between commits. Inside the transaction each day's count is checked
//! again, so a late reading that arrived after the dump keeps its day (it is not in
//! any dump yet): an undumped reading is never deleted.

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::NaiveDate;
use duckdb::Connection;

use super::dump::day_start_ms;
use super::{SeriesEntry, Shared, StoreError};
use crate::domain::{DeviceId, SensorId, Timestamp};

const DAY_MS: i64 = 86_400_000;

/// What one retention pass deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retired {
    /// Days whose readings were deleted.
    pub days: Vec<NaiveDate>,
    /// Readings deleted.
    pub readings: u64,
    /// Days skipped because their count changed since they were dumped.
    pub changed: Vec<NaiveDate>,
}

/// Deletes the readings and rollups of each day in `days` whose stored count still
/// equals the given (dumped) count, records it in `retired_days`, and brings the
/// series statistics up to date (in memory for resident devices, in the `series`
/// table for the others). `rollups_from` is the writer's live-slot boundary: rollups
/// are complete before it.
///
/// Every statement that groups the retired series runs a range of devices at a time
/// (see [`super::device_ranges`]) into temp tables, and their rows stream through
/// here without being collected: a million devices' day (5.9 M series) took the
/// server to 506 MB and failed with "Out of Memory" at the default 128 MB limit when
/// each step grouped everything at once and the results were held in maps.
pub(super) fn retire(
    conn: &Connection,
    shared: &Shared,
    days: &BTreeMap<NaiveDate, u64>,
    rollups_from: i64,
) -> Result<Retired, StoreError> {
    let _span = tracing::info_span!("retention", days = days.len()).entered();
    let started = Instant::now();
    let mut done = Retired::default();
    if days.is_empty() {
        return Ok(done);
    }
    let per_device = super::sensor_count(conn)?;
    let (resident, on_disk) = super::in_transaction(conn, || {
        let mut ranges = Vec::new();
        for (&day, &expected) in days {
            let lo = day_start_ms(day);
            let range = format!("ts_ms >= {lo} AND ts_ms < {}", lo + DAY_MS);
            let n: i64 = conn.query_row(
                &format!("SELECT count(*) FROM readings WHERE {range}"),
                [],
                |r| r.get(0),
            )?;
            if n as u64 != expected {
                done.changed.push(day);
                continue;
            }
            done.days.push(day);
            done.readings += n as u64;
            ranges.push((day, lo, range, n));
        }
        if ranges.is_empty() {
            return Ok((Vec::new(), None));
        }
        let any = ranges
            .iter()
            .map(|(_, _, r, _)| format!("({r})"))
            .collect::<Vec<_>>()
            .join(" OR ");
        // 1. What each series loses.
        conn.execute_batch(
            "CREATE OR REPLACE TEMP TABLE retired_counts
                 (device_id INTEGER, sensor_id SMALLINT, n BIGINT);
             CREATE OR REPLACE TEMP TABLE retired_firsts
                 (device_id INTEGER, sensor_id SMALLINT, first_us BIGINT);",
        )?;
        let devices = super::device_ranges(conn, done.readings, per_device)?;
        for d in &devices {
            conn.execute_batch(&format!(
                "INSERT INTO retired_counts
                     SELECT device_id, sensor_id, count(*) FROM readings
                     WHERE ({any}) {d} GROUP BY ALL"
            ))?;
        }
        tracing::debug!(slices = devices.len(), "counted the retired series");
        // 2. The deletion.
        let now = Timestamp::now().as_micros();
        for (day, lo, range, n) in &ranges {
            let slots = format!("slot_ms >= {lo} AND slot_ms < {}", lo + DAY_MS);
            conn.execute_batch(&format!(
                "DELETE FROM readings WHERE {range};
                 DELETE FROM rollups WHERE {slots};
                 DELETE FROM compacted_days WHERE day = DATE '{day}';
                 INSERT OR REPLACE INTO retired_days
                     VALUES (DATE '{day}', {n}, make_timestamp({now}::BIGINT));"
            ))?;
        }
        tracing::debug!("deleted the retired days");
        // 3. The first reading each series has left, from the rollups of ended slots
        //    and the readings of live ones.
        for d in &devices {
            conn.execute_batch(&format!(
                "INSERT INTO retired_firsts
                     SELECT device_id, sensor_id, min(f) FROM (
                         SELECT device_id, sensor_id, first_us AS f FROM rollups
                         WHERE slot_ms < {rollups_from} {d}
                         UNION ALL
                         SELECT device_id, sensor_id, ts_ms * 1000 + ts_us FROM readings
                         WHERE ts_ms >= {rollups_from} {d})
                     WHERE (device_id, sensor_id) IN
                         (SELECT device_id, sensor_id FROM retired_counts WHERE true {d})
                     GROUP BY ALL"
            ))?;
        }
        tracing::debug!("found the first readings left");
        // 4. What resident devices lose, applied in memory after the commit; and
        //    what devices on disk lose in all.
        let (resident, on_disk) = retired_series(conn, shared, &devices)?;
        tracing::debug!(
            resident = resident.len(),
            on_disk,
            "read the retired series"
        );
        Ok::<_, StoreError>((resident, on_disk))
    })?;
    if !resident.is_empty() {
        refresh_resident(shared, &resident);
    }
    if let Some(readings) = on_disk {
        let newest = refresh_on_disk(conn, done.readings, per_device)?;
        tracing::debug!("updated the series on disk");
        shared.disk_series_changed(readings, newest);
    }
    conn.execute_batch(
        "DROP TABLE IF EXISTS temp.retired_counts; DROP TABLE IF EXISTS temp.retired_firsts;",
    )?;
    if let Err(e) = conn.execute_batch("CHECKPOINT") {
        tracing::debug!(error = %e, "checkpoint after retention deferred");
    }
    tracing::info!(
        days = done.days.len(),
        readings = done.readings,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "deleted the readings of dumped days"
    );
    Ok(done)
}

/// A retired series: what it lost, and its first reading left (`None`: nothing left).
type RetiredSeries = ((DeviceId, SensorId), u64, Option<i64>);

/// Streams the retired series (`retired_counts` and `retired_firsts`, a range of
/// devices at a time): those of resident devices are returned (bounded by
/// `--series-memory`), with the readings devices whose statistics are on disk (see
/// [`super::series`]) lost, if any did.
fn retired_series(
    conn: &Connection,
    shared: &Shared,
    devices: &[super::DeviceRange],
) -> Result<(Vec<RetiredSeries>, Option<u64>), StoreError> {
    let mut resident = Vec::new();
    let mut on_disk = None;
    for d in devices {
        let mut stmt = conn.prepare(&format!(
            "SELECT c.device_id, c.sensor_id, c.n, f.first_us
             FROM (SELECT * FROM retired_counts WHERE true {d}) c
             LEFT JOIN (SELECT * FROM retired_firsts WHERE true {d}) f
               USING (device_id, sensor_id)"
        ))?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let key = (
                DeviceId(r.get::<_, i32>(0)? as u32),
                SensorId(r.get::<_, i16>(1)? as u16),
            );
            let n = r.get::<_, i64>(2)? as u64;
            if shared.series_on_disk(key.0) {
                *on_disk.get_or_insert(0) += n;
            } else {
                resident.push((key, n, r.get(3)?));
            }
        }
    }
    Ok((resident, on_disk))
}

/// Brings the `series` table's rows up to date after a retention: readings
/// subtracted, new first reading, emptied series deleted; returns the table's newest
/// reading after. A range of devices per transaction, after the retention's own: a
/// million devices' rows changed in that one ran out of memory. The table is only
/// trusted after a clean shutdown (a crash recomputes it from the readings), so a
/// crash in between loses nothing; readers may see devices on disk with their old
/// counts for the seconds this takes. Rows of resident devices are stale copies,
/// rewritten before they are read again; changing them too is harmless.
///
/// The readings are already gone when this runs, so it must not simply fail: a
/// range that runs out of memory is run again in halves, and if the update still
/// fails the table is recomputed from the readings (a failed range's transaction
/// changed nothing, but earlier ranges' did). At a 16 MB limit one update of 5,000
/// devices' rows ran out of memory about one time in six, leaving every device on
/// disk with the retired readings still counted, for good: a clean shutdown then
/// marked the table valid.
fn refresh_on_disk(
    conn: &Connection,
    retired: u64,
    per_device: u64,
) -> Result<Option<Timestamp>, StoreError> {
    let updated = super::run_in_device_ranges(conn, retired, per_device, |d| {
        super::in_transaction(conn, || {
            conn.execute_batch(&format!(
                "UPDATE series SET readings = series.readings - r.n,
                     first_ts = coalesce(make_timestamp(r.first_us), series.first_ts)
                 FROM (SELECT c.device_id, c.sensor_id, c.n, f.first_us
                       FROM (SELECT * FROM temp.retired_counts WHERE true {d}) c
                       LEFT JOIN (SELECT * FROM temp.retired_firsts WHERE true {d}) f
                         USING (device_id, sensor_id)) r
                 WHERE series.device_id = r.device_id AND series.sensor_id = r.sensor_id;
                 DELETE FROM series WHERE readings <= 0 {d};"
            ))
        })?;
        Ok(())
    });
    if let Err(e) = updated {
        tracing::warn!(error = %e, "updating the series of devices on disk after a retention failed; recomputing them from the readings");
        if let Err(e) = super::series::recompute_in_place(conn) {
            // Left as it is, the table would be trusted at the next start: have it
            // recomputed then.
            super::series::distrust(conn)?;
            return Err(e);
        }
    }
    Ok(super::series::table_totals(conn)?.2)
}

/// Subtracts the deleted readings from the resident devices' series statistics and
/// sets each remaining series' new first reading. Series with nothing left are
/// dropped.
fn refresh_resident(shared: &Shared, retired: &[RetiredSeries]) {
    let mut updated: Vec<SeriesEntry> = Vec::new();
    let mut emptied = Vec::new();
    for &(key, n, first) in retired {
        let Some(mut stats) = shared.series(key.0, key.1) else {
            continue;
        };
        stats.readings = stats.readings.saturating_sub(n);
        match first {
            Some(first) if stats.readings > 0 => {
                stats.first = Timestamp::from_micros(first);
                updated.push((key, stats));
            }
            _ => emptied.push(key),
        }
    }
    shared.set_series(&updated);
    shared.remove_series(&emptied);
}
