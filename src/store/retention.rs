//! Retention: deleting the readings of old days once their dumps are safe.
//!
//! The exporter decides which days qualify (every configured format dumped with the
//! day's current reading count) and sends them with those counts; the writer runs
//! [`retire`] between commits. Inside the transaction each day's count is checked
//! again, so a late reading that arrived after the dump keeps its day (it is not in
//! any dump yet): an undumped reading is never deleted.

use std::collections::{BTreeMap, HashMap};
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
/// in-memory series statistics up to date. `rollups_from` is the writer's live-slot
/// boundary: rollups are complete before it.
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
    let per_series = super::in_transaction(conn, || {
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
            return Ok((Vec::new(), HashMap::new(), None));
        }
        let any = ranges
            .iter()
            .map(|(_, _, r, _)| format!("({r})"))
            .collect::<Vec<_>>()
            .join(" OR ");
        let mut stmt = conn.prepare(&format!(
            "SELECT device_id, sensor_id, count(*) FROM readings WHERE {any} GROUP BY ALL"
        ))?;
        let per_series = stmt
            .query_map([], |r| {
                Ok((
                    (
                        DeviceId(r.get::<_, i32>(0)? as u32),
                        SensorId(r.get::<_, i16>(1)? as u16),
                    ),
                    r.get::<_, i64>(2)? as u64,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
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
        let firsts = first_readings(conn, rollups_from)?;
        let on_disk = refresh_on_disk(conn, shared, &per_series, &firsts)?;
        Ok::<_, StoreError>((per_series, firsts, on_disk))
    })?;
    let (per_series, firsts, on_disk) = per_series;
    if let Some((readings, newest)) = on_disk {
        shared.disk_series_changed(readings, newest);
    }
    if !per_series.is_empty() {
        refresh_resident(shared, &per_series, &firsts);
    }
    // Frees the deleted blocks now; if a dump's snapshot is open DuckDB refuses, and
    // the next automatic checkpoint does it instead.
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

/// Each series' first reading: from the rollups (complete before `rollups_from`) and
/// the readings from there on.
fn first_readings(
    conn: &Connection,
    rollups_from: i64,
) -> Result<HashMap<(DeviceId, SensorId), i64>, StoreError> {
    let mut firsts: HashMap<(DeviceId, SensorId), i64> = HashMap::new();
    let sql = format!(
        "SELECT device_id, sensor_id, min(first_us) FROM rollups WHERE slot_ms < {rollups_from}
         GROUP BY ALL
         UNION ALL
         SELECT device_id, sensor_id, min(ts_ms * 1000 + ts_us) FROM readings
         WHERE ts_ms >= {rollups_from} GROUP BY ALL"
    );
    let mut stmt = conn.prepare(&sql)?;
    for row in stmt.query_map([], |r| {
        Ok((
            DeviceId(r.get::<_, i32>(0)? as u32),
            SensorId(r.get::<_, i16>(1)? as u16),
            r.get::<_, i64>(2)?,
        ))
    })? {
        let (d, s, first) = row?;
        let e = firsts.entry((d, s)).or_insert(first);
        *e = (*e).min(first);
    }
    Ok(firsts)
}

/// The rows of devices whose statistics are on disk (see [`super::series`]), in the
/// retention's transaction: readings subtracted, new first reading, emptied series
/// deleted. Returns the readings subtracted and the table's newest reading after, if
/// any such device lost readings.
fn refresh_on_disk(
    conn: &Connection,
    shared: &Shared,
    deleted: &[((DeviceId, SensorId), u64)],
    firsts: &HashMap<(DeviceId, SensorId), i64>,
) -> Result<Option<(u64, Option<Timestamp>)>, StoreError> {
    let mine: Vec<_> = deleted
        .iter()
        .filter(|((d, _), _)| shared.series_on_disk(*d))
        .collect();
    if mine.is_empty() {
        return Ok(None);
    }
    conn.execute_batch(
        "CREATE OR REPLACE TEMP TABLE retired_series
             (device_id INTEGER, sensor_id SMALLINT, n BIGINT, first_us BIGINT)",
    )?;
    let mut app = conn.appender_to_catalog_and_db("retired_series", "temp", "main")?;
    let mut readings = 0;
    for &&(key, n) in &mine {
        readings += n;
        app.append_row(duckdb::params![
            key.0.0 as i32,
            key.1.0 as i16,
            n as i64,
            firsts.get(&key).copied()
        ])?;
    }
    app.flush()?;
    drop(app);
    conn.execute_batch(
        "UPDATE series SET readings = series.readings - r.n,
             first_ts = coalesce(make_timestamp(r.first_us), series.first_ts)
         FROM temp.retired_series r
         WHERE series.device_id = r.device_id AND series.sensor_id = r.sensor_id;
         DELETE FROM series WHERE readings <= 0;
         DROP TABLE temp.retired_series;",
    )?;
    let newest = super::series::table_totals(conn)?.2;
    Ok(Some((readings, newest)))
}

/// Subtracts the deleted readings from the resident devices' series statistics and
/// sets each remaining series' new first reading. Series with nothing left are
/// dropped.
fn refresh_resident(
    shared: &Shared,
    deleted: &[((DeviceId, SensorId), u64)],
    firsts: &HashMap<(DeviceId, SensorId), i64>,
) {
    let mut updated: Vec<SeriesEntry> = Vec::new();
    let mut emptied = Vec::new();
    for &(key, n) in deleted {
        let Some(mut stats) = shared.series(key.0, key.1) else {
            continue;
        };
        stats.readings = stats.readings.saturating_sub(n);
        match firsts.get(&key) {
            Some(&first) if stats.readings > 0 => {
                stats.first = Timestamp::from_micros(first);
                updated.push((key, stats));
            }
            _ => emptied.push(key),
        }
    }
    shared.set_series(&updated);
    shared.remove_series(&emptied);
}
