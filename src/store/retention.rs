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
/// series statistics of resident devices up to date in memory; the `series` rows of
/// the others are brought up to date afterwards, by the [`DiskRefresh`] returned.
/// `rollups_from` is the writer's live-slot boundary: rollups are complete before it.
///
/// Every statement that groups the retired series runs a range of devices at a time
/// (see [`super::device_ranges`]) into temp tables, and their rows stream through
/// here without being collected: a million devices' day (5.9 M series) took the
/// server to 506 MB and failed with "Out of Memory" at a 128 MB limit (then the default) when
/// each step grouped everything at once and the results were held in maps.
pub(super) fn retire(
    conn: &Connection,
    shared: &Shared,
    days: &BTreeMap<NaiveDate, u64>,
    rollups_from: i64,
) -> Result<(Retired, Option<DiskRefresh>), StoreError> {
    retire_in_steps_of(conn, shared, days, rollups_from, REFRESH_STEP_ROWS)
}

/// [`retire`], the [`DiskRefresh`] updating at most `step_rows` retired readings'
/// rows a step.
fn retire_in_steps_of(
    conn: &Connection,
    shared: &Shared,
    days: &BTreeMap<NaiveDate, u64>,
    rollups_from: i64,
    step_rows: u64,
) -> Result<(Retired, Option<DiskRefresh>), StoreError> {
    let _span = tracing::info_span!("retention", days = days.len()).entered();
    let started = Instant::now();
    let mut done = Retired::default();
    if days.is_empty() {
        return Ok((done, None));
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
                "DELETE FROM received_readings WHERE {range};
                 DELETE FROM compacted_readings WHERE {range};
                 DELETE FROM rollups WHERE {slots};
                 DELETE FROM compacted_days WHERE day = DATE '{day}';
                 DELETE FROM uncompacted_days WHERE day = DATE '{day}';
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
        let (resident, on_disk) = retired_series(conn, shared, &devices, done.readings)?;
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
    // Frees what the deleted rows held in DuckDB's memory before the series table's
    // update; fails while readers hold transactions, and the next one does it.
    if let Err(e) = conn.execute_batch("CHECKPOINT") {
        tracing::debug!(error = %e, "checkpoint after retention deferred");
    }
    tracing::info!(
        days = done.days.len(),
        readings = done.readings,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "deleted the readings of dumped days"
    );
    let refresh = match on_disk {
        Some(readings) => {
            let plan = (done.readings, per_device, step_rows);
            DiskRefresh::start(conn, shared, readings, plan)
        }
        None => {
            drop_work_tables(conn)?;
            None
        }
    };
    Ok((done, refresh))
}

fn drop_work_tables(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "DROP TABLE IF EXISTS temp.retired_counts;
         DROP TABLE IF EXISTS temp.retired_firsts;
         DROP TABLE IF EXISTS temp.retired_resident;",
    )?;
    Ok(())
}

/// A retired series: what it lost, and its first reading left (`None`: nothing left).
type RetiredSeries = ((DeviceId, SensorId), u64, Option<i64>);

/// The retired series of resident devices (`retired_counts` and `retired_firsts`,
/// a range of devices at a time; bounded by `--series-memory`), and the readings
/// devices whose statistics are on disk (see [`super::series`]) lost, if any did:
/// `retired` less what the resident ones lost. Every resident device is listed in
/// `temp.retired_resident` first: reading back every retired series to look each
/// device up in memory took 0.42 s of the writer's time for a million devices' day.
fn retired_series(
    conn: &Connection,
    shared: &Shared,
    devices: &[super::DeviceRange],
    retired: u64,
) -> Result<(Vec<RetiredSeries>, Option<u64>), StoreError> {
    conn.execute_batch("CREATE OR REPLACE TEMP TABLE retired_resident (device_id INTEGER);")?;
    let mut app = conn.appender_to_catalog_and_db("retired_resident", "temp", "main")?;
    for device in shared.resident_series_devices() {
        app.append_row([device.0 as i32])?;
    }
    app.flush()?;
    drop(app);
    let mut resident = Vec::new();
    let mut lost = 0;
    for d in devices {
        let mut stmt = conn.prepare(&format!(
            "SELECT c.device_id, c.sensor_id, c.n, f.first_us
             FROM (SELECT * FROM retired_counts WHERE true {d}
                   AND device_id IN (SELECT device_id FROM temp.retired_resident)) c
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
            lost += n;
            resident.push((key, n, r.get(3)?));
        }
    }
    let on_disk = retired.saturating_sub(lost);
    Ok((resident, (on_disk > 0).then_some(on_disk)))
}

/// Retired readings whose series rows one step of a [`DiskRefresh`] updates at
/// most: ~0.1 s of DuckDB's `UPDATE` here (it updated ~450,000 rows a second), the
/// longest the flusher then holds the database between two commits.
const REFRESH_STEP_ROWS: u64 = 50_000;

/// Brings the `series` table's rows of devices on disk up to date after a
/// retention: readings subtracted, new first reading, emptied series deleted. A
/// range of devices per transaction, run by the flusher between its commits (see
/// `writer::db`): done at once, under the retention's lock, it held the writer for
/// 12.7 s after a million devices' day was deleted (5.7 M rows), and every request
/// waited.
///
/// Each device's row is corrected once: by its range's step, or, if the device
/// comes back into memory before that, by [`take_corrected_rows`]. Devices whose
/// rows must not be corrected — resident at the retention (memory has them right),
/// or come back early (and perhaps written again when they leave) — are listed in
/// `temp.retired_resident`, which the steps skip. (Taking their rows out of
/// `temp.retired_counts` instead ran out of DuckDB's memory at 64 MB: the table of a
/// million devices' day is larger than that.) Readers that read a device on disk
/// meanwhile see its old counts until its range ran.
///
/// The table is only trusted after a clean shutdown (a crash recomputes it from the
/// readings), and a shutdown runs the remaining steps first; so a crash in between
/// loses nothing.
///
/// The readings are already gone when this runs, so it must not simply fail: a
/// range that runs out of memory is run again in halves, and if the update still
/// fails the table is recomputed from the readings (a failed range's transaction
/// changed nothing, but earlier ranges' did). At a 16 MB limit one update of 5,000
/// devices' rows ran out of memory about one time in six, leaving every device on
/// disk with the retired readings still counted, for good: a clean shutdown then
/// marked the table valid.
pub(super) struct DiskRefresh {
    steps: super::RangeSteps,
    /// Readings the devices on disk at the retention lost.
    readings: u64,
    started: Instant,
}

impl DiskRefresh {
    /// Plans the steps, which skip the rows of the devices in
    /// `temp.retired_resident`. `(retired, per_device, step_rows)`: readings
    /// retired in all, sensors a device may have, most retired readings a step. On
    /// failure the table is recomputed at once instead, and nothing is left to do.
    fn start(
        conn: &Connection,
        shared: &Shared,
        readings: u64,
        (retired, per_device, step_rows): (u64, u64, u64),
    ) -> Option<Self> {
        let planned = super::RangeSteps::at_most(conn, retired, per_device, step_rows);
        match planned {
            Ok(steps) => Some(Self {
                steps,
                readings,
                started: Instant::now(),
            }),
            Err(e) => {
                recompute_instead(conn, &e);
                finish(conn, shared, readings);
                None
            }
        }
    }

    /// The lowest device id whose row the steps have not reached (`None`: done).
    fn pending_from(&self) -> Option<u64> {
        self.steps.next().map(|r| if r.open_lo { 0 } else { r.lo })
    }

    /// Updates the rows of the next range of devices; true when every range has run
    /// (then the totals over devices on disk are brought up to date).
    pub(super) fn step(&mut self, conn: &Connection, shared: &Shared) -> bool {
        let _span = tracing::debug_span!("series_refresh_step").entered();
        let ran = self.steps.step(conn, |d| {
            super::in_transaction(conn, || {
                conn.execute_batch(&format!(
                    "UPDATE series SET readings = series.readings - r.n,
                         first_ts = coalesce(make_timestamp(r.first_us), series.first_ts)
                     FROM (SELECT c.device_id, c.sensor_id, c.n, f.first_us
                           FROM (SELECT * FROM temp.retired_counts WHERE true {d}
                                 AND device_id NOT IN
                                     (SELECT device_id FROM temp.retired_resident)) c
                           LEFT JOIN (SELECT * FROM temp.retired_firsts WHERE true {d}) f
                             USING (device_id, sensor_id)) r
                     WHERE series.device_id = r.device_id AND series.sensor_id = r.sensor_id;
                     DELETE FROM series WHERE readings <= 0 {d};"
                ))
            })?;
            Ok(())
        });
        match ran {
            Ok(Some(_)) => return false,
            Ok(None) => {}
            Err(e) => recompute_instead(conn, &e),
        }
        finish(conn, shared, self.readings);
        tracing::info!(
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "updated the series statistics of devices on disk after a retention"
        );
        true
    }
}

/// After the series rows could not be updated: recomputes the table from the
/// readings, or, failing that too, has the next start recompute it (left as it is,
/// the table would be trusted then).
fn recompute_instead(conn: &Connection, e: &StoreError) {
    tracing::warn!(error = %e, "updating the series of devices on disk after a retention failed; recomputing them from the readings");
    if let Err(e) = super::series::recompute_in_place(conn) {
        tracing::error!(error = %e, "recomputing the series table failed");
        if let Err(e) = super::series::distrust(conn) {
            tracing::error!(error = %e, "marking the series table for recomputation failed");
        }
    }
}

/// The series rows are up to date: the totals over devices on disk follow, the work
/// tables go.
fn finish(conn: &Connection, shared: &Shared, readings: u64) {
    let newest = super::series::table_totals(conn).map_or_else(
        |e| {
            tracing::warn!(error = %e, "reading the series table's newest reading failed");
            None
        },
        |t| t.2,
    );
    shared.disk_series_changed(readings, newest);
    if let Err(e) = drop_work_tables(conn) {
        tracing::debug!(error = %e, "dropping the retention's work tables failed");
    }
}

/// The rows of these devices (on disk, coming back into memory) while a
/// [`DiskRefresh`] runs, with the corrections its steps have not made yet applied;
/// the devices are skipped by the steps from then on. On the write connection,
/// which holds the corrections.
pub(super) fn take_corrected_rows(
    conn: &Connection,
    refresh: &DiskRefresh,
    devices: &[DeviceId],
) -> Result<Vec<SeriesEntry>, StoreError> {
    let Some(from) = refresh.pending_from() else {
        return super::series::read_devices(conn, devices);
    };
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    let ids = super::series::id_list(devices);
    let rows = super::series::query(
        conn,
        &format!(
            "WITH wanted AS (SELECT unnest([{ids}]) AS device_id),
             r AS (SELECT c.device_id, c.sensor_id, c.n, f.first_us
                   FROM temp.retired_counts c
                   LEFT JOIN temp.retired_firsts f USING (device_id, sensor_id)
                   WHERE c.device_id >= {from}
                     AND c.device_id IN (SELECT device_id FROM wanted)
                     AND c.device_id NOT IN (SELECT device_id FROM temp.retired_resident))
             SELECT {} FROM (
                 SELECT s.device_id, s.sensor_id, s.readings - coalesce(r.n, 0) AS readings,
                        coalesce(make_timestamp(r.first_us), s.first_ts) AS first_ts,
                        s.last_ts, s.last_value
                 FROM series s LEFT JOIN r USING (device_id, sensor_id)
                 WHERE s.device_id IN (SELECT device_id FROM wanted))
             WHERE readings > 0
             ORDER BY 1, 2",
            super::series::COLUMNS
        ),
    )?;
    conn.execute_batch(&format!(
        "INSERT INTO temp.retired_resident SELECT unnest([{ids}])"
    ))?;
    Ok(rows)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreConfig, series};

    fn open(dir: &std::path::Path, series_memory: usize) -> Store {
        Store::open(&StoreConfig {
            series_memory,
            ..crate::store::config_for_tests(dir)
        })
        .unwrap()
    }

    fn rows_of(conn: &Connection, device: u32) -> Vec<(u64, i64)> {
        series::read_devices(conn, &[DeviceId(device)])
            .unwrap()
            .into_iter()
            .map(|(_, s)| (s.readings, s.first.as_micros()))
            .collect()
    }

    /// Devices on disk whose rows a retention's steps have not reached yet come
    /// back with their rows corrected, and the steps leave their rows alone from
    /// then on (they may have been written again since); a device whose range ran
    /// comes back as its row says. Every row ends up corrected exactly once.
    #[test]
    fn a_device_back_before_its_step_is_corrected_once() {
        let dir = tempfile::tempdir().unwrap();
        let old = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        let kept_ms = day_start_ms(NaiveDate::from_ymd_opt(2026, 11, 3).unwrap());
        {
            // Device 0: 4 readings of the old day and 2 kept; device 1: 4 and 3;
            // device 2: 4 old ones only.
            let store = open(dir.path(), crate::store::DEFAULT_SERIES_MEMORY);
            let mut sql =
                String::from("INSERT INTO devices VALUES (0, 'd0'), (1, 'd1'), (2, 'd2');");
            for (device, kept) in [(0, 2), (1, 3), (2, 0)] {
                for i in 0..4 {
                    let ts = day_start_ms(old) + 1000 * (device * 10 + i);
                    sql += &format!(
                        "INSERT INTO received_readings VALUES ({device}, 1, {ts}, 0, 1.0);"
                    );
                }
                for i in 0..kept {
                    let ts = kept_ms + 1000 * (device * 10 + i);
                    sql += &format!(
                        "INSERT INTO received_readings VALUES ({device}, 1, {ts}, 0, 1.0);"
                    );
                }
            }
            store.conn.execute_batch(&sql).unwrap();
            series::recompute(&store.conn).unwrap();
            store.close().unwrap();
        }
        let store = open(dir.path(), 0);
        let (conn, shared) = (&store.conn, &*store.shared);
        assert!((0..3).all(|d| shared.series_on_disk(DeviceId(d))));
        let days = BTreeMap::from([(old, 12)]);
        // One device id a step.
        let (done, refresh) = retire_in_steps_of(conn, shared, &days, 0, 4).unwrap();
        assert_eq!(done.days, vec![old]);
        let mut refresh = refresh.expect("devices on disk lost readings");
        assert!(!refresh.step(conn, shared), "device 0's range");
        let back = take_corrected_rows(conn, &refresh, &[DeviceId(0), DeviceId(1)]).unwrap();
        let got: Vec<_> = back
            .iter()
            .map(|((d, _), s)| (d.0, s.readings, s.first.as_micros()))
            .collect();
        assert_eq!(
            got,
            vec![(0, 2, kept_ms * 1000), (1, 3, (kept_ms + 10_000) * 1000)]
        );
        // Device 1 takes one more reading and goes back to disk before its step.
        let mut stats = back[1].1;
        stats.readings += 1;
        series::write_devices(conn, [(DeviceId(1), [(back[1].0.1, stats)])].into_iter()).unwrap();
        while !refresh.step(conn, shared) {}
        assert_eq!(rows_of(conn, 0), vec![(2, kept_ms * 1000)]);
        assert_eq!(rows_of(conn, 1), vec![(4, (kept_ms + 10_000) * 1000)]);
        assert_eq!(rows_of(conn, 2), vec![]);
    }
}
