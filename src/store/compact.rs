//! Daily compaction: move each finished UTC day from `received_readings` into
//! `compacted_readings`, sorted by (device, sensor, ts).
//!
//! Readings arrive interleaved (sensors and devices mixed), which DuckDB's bitpacking
//! and ALP compress poorly: ~5.6 bytes per reading. Sorted, each series' timestamps
//! and values sit together, and each value is stored as an integer mantissa over a
//! power of ten (one per sensor and day) wherever that gives it back bit for bit
//! (schema version 6 says why): the mantissas are bit-packed as deltas, ~2.6 bytes
//! per reading in all (in 128 KiB blocks: the store's `NEW_FILE_BLOCK_SIZE`). A day
//! is compacted once it is over; if late uploads add readings to it afterwards
//! (into `received_readings`), it is compacted again. Its rollups are recomputed
//! from the rewritten readings.

use std::time::{Duration, Instant};

use chrono::NaiveDate;
use duckdb::Connection;

use super::{StoreError, rollup};
use crate::domain::Timestamp;

/// The first instant of the current UTC day: readings before it belong to finished
/// days.
pub(super) fn today_start() -> Timestamp {
    let midnight = chrono::Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists");
    Timestamp::from_micros(midnight.and_utc().timestamp_micros())
}

/// What one compaction pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compaction {
    /// Days rewritten.
    pub days: usize,
    /// Readings rewritten.
    pub readings: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// Finished days with readings not compacted yet (in `received_readings`, or listed
/// in `uncompacted_days`), oldest first. One scan of that table, which holds little
/// more than today (its last chunk, with `--cluster-rows`) once the finished days are
/// compacted; the writer keeps the answer ([`DueDays`]) instead of asking again for
/// every day.
pub(super) fn due_days(conn: &Connection, today: NaiveDate) -> Result<Vec<NaiveDate>, StoreError> {
    let today_ms = today
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp_millis();
    // Days whose readings the live day's sorting moved (`cluster.rs`) are listed
    // apart: `received_readings` may hold none of them.
    let mut stmt = conn.prepare(
        "SELECT strftime(day, '%Y-%m-%d') AS day FROM (
             SELECT DISTINCT CAST(make_timestamp(ts_ms * 1000) AS DATE) AS day
             FROM received_readings WHERE ts_ms < ?
             UNION
             SELECT day FROM uncompacted_days WHERE day < CAST(make_timestamp(? * 1000) AS DATE))
         ORDER BY day",
    )?;
    let days = stmt
        .query_map([today_ms, today_ms], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    days.iter()
        .map(|d| {
            NaiveDate::parse_from_str(d, "%Y-%m-%d")
                .map_err(|e| StoreError::Corrupt(format!("day '{d}': {e}")))
        })
        .collect()
}

/// The writer's list of days due for compaction, computed once per UTC day and again
/// only after readings were written into finished days.
#[derive(Default)]
pub(super) struct DueDays {
    /// `(today, days due before it)` when known.
    known: Option<(NaiveDate, Vec<NaiveDate>)>,
}

impl DueDays {
    /// Readings went into finished days: the list must be computed again.
    pub(super) fn invalidate(&mut self) {
        self.known = None;
    }

    /// Compacts the oldest due day, if any.
    pub(super) fn compact_next(
        &mut self,
        conn: &Connection,
        today: NaiveDate,
    ) -> Result<Compaction, StoreError> {
        let mut days = match self.known.take() {
            Some((known_today, days)) if known_today == today => days,
            _ => due_days(conn, today)?,
        };
        let next = (!days.is_empty()).then(|| days.remove(0));
        let done = compact_days(conn, next)?;
        self.known = Some((today, days));
        Ok(done)
    }
}

/// Compacts every day before `today` that is not compacted at its current size (for
/// `milepost compact`, with no server running).
pub(super) fn compact_finished_days(
    conn: &Connection,
    today: NaiveDate,
) -> Result<Compaction, StoreError> {
    compact_days(conn, due_days(conn, today)?)
}

/// The largest number of decimals a compacted value is stored with as a mantissa;
/// values that need more keep their `DOUBLE`.
const MAX_DECIMALS: u32 = 9;

/// `value * div` must stay below 2^53 for the mantissa to convert to a `DOUBLE`
/// exactly.
const EXACT_INTEGERS: &str = "9007199254740992";

/// `10^k` as a DuckDB `DOUBLE` literal.
fn power_of_ten(k: u32) -> String {
    format!("1e{k}::DOUBLE")
}

/// Per sensor in `temp.compact_day`, the power of ten its day's values are stored
/// over: the fewest decimals that write every value of the sensor exactly (those
/// with none within [`MAX_DECIMALS`] are left out). Indexed by sensor id; `None`
/// where a sensor has no such values (or no readings). Also the day's readings,
/// counted in the same scan.
fn divisors(conn: &Connection) -> Result<(Vec<Option<u32>>, i64), duckdb::Error> {
    let decimals = (0..=MAX_DECIMALS)
        .map(|k| {
            let d = power_of_ten(k);
            format!(
                "WHEN abs(value * {d}) < {EXACT_INTEGERS} AND round(value * {d}) / {d} = value \
                 THEN {k}"
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    let mut stmt = conn.prepare(&format!(
        "SELECT sensor_id, max(CASE {decimals} END), count(*) FROM compact_day GROUP BY sensor_id"
    ))?;
    let (mut divisors, mut readings) = (Vec::new(), 0);
    for row in stmt.query_map([], |r| {
        Ok((
            r.get::<_, i16>(0)?,
            r.get::<_, Option<i32>>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })? {
        let (sensor, k, n) = row?;
        readings += n;
        let k = k.and_then(|k| u32::try_from(k).ok());
        let Ok(at) = usize::try_from(sensor) else {
            continue;
        };
        if divisors.len() <= at {
            divisors.resize(at + 1, None);
        }
        divisors[at] = k;
    }
    Ok((divisors, readings))
}

/// A `SELECT` of `temp.compact_day` (in its order) as `compacted_readings`' columns: each
/// value as `mant` and `div` where `mant / div` (the `readings` view's expression)
/// gives it back bit for bit, and as `value` otherwise. `divisors` is
/// [`divisors`]' answer. `-0.0` keeps its `DOUBLE` (its mantissa would read back
/// as `0.0`).
fn as_mantissas(divisors: &[Option<u32>]) -> String {
    let list = divisors
        .iter()
        .map(|k| k.map_or_else(|| "NULL::DOUBLE".to_owned(), power_of_ten))
        .collect::<Vec<_>>()
        .join(", ");
    // A list of no elements has no type to index with; no sensor has a divisor.
    let div = if divisors.iter().any(Option::is_some) {
        format!("[{list}][sensor_id + 1]")
    } else {
        "NULL::DOUBLE".to_owned()
    };
    format!(
        "SELECT device_id, sensor_id, ts_ms, ts_us,
                CASE WHEN exact THEN mant END,
                CASE WHEN exact THEN div END,
                CASE WHEN exact THEN NULL ELSE value END
         FROM (
             SELECT *, coalesce(mant / div = value AND NOT (value = 0 AND signbit(value)), false)
                 AS exact
             FROM (
                 SELECT *, CASE WHEN abs(value * div) < {EXACT_INTEGERS}
                                THEN round(value * div)::BIGINT END AS mant
                 FROM (SELECT *, {div} AS div FROM compact_day)
             )
         )"
    )
}

/// Moves each of `days` into `compacted_readings` sorted by (device, sensor, time),
/// one transaction per day, then checkpoints so the space of the unsorted copies is
/// reclaimed.
fn compact_days(
    conn: &Connection,
    days: impl IntoIterator<Item = NaiveDate>,
) -> Result<Compaction, StoreError> {
    let started = Instant::now();
    let mut done = Compaction::default();
    for day in days {
        let _span = tracing::info_span!("compact_day", %day).entered();
        tracing::debug!("compacting day");
        let start = day
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp_millis();
        let range = format!("ts_ms >= {start} AND ts_ms < {}", start + 86_400_000);
        let n = super::in_transaction(conn, || {
            conn.execute_batch(&format!(
                "CREATE OR REPLACE TEMP TABLE compact_day AS
                     SELECT * FROM readings WHERE {range}
                     ORDER BY device_id, sensor_id, ts_ms, ts_us"
            ))?;
            let (divisors, n) = divisors(conn)?;
            conn.execute_batch(&format!(
                "DELETE FROM received_readings WHERE {range};
                 DELETE FROM compacted_readings WHERE {range};
                 DELETE FROM uncompacted_days WHERE day = DATE '{day}';
                 INSERT INTO compacted_readings {};
                 INSERT OR REPLACE INTO compacted_days VALUES (DATE '{day}', {n});",
                as_mantissas(&divisors)
            ))?;
            Ok::<_, duckdb::Error>(n)
        })?;
        conn.execute_batch("DROP TABLE IF EXISTS temp.compact_day")?;
        // The day's rollups consolidated, recomputed from the readings just written
        // (sorted by device: each range of devices reads only its own row groups).
        // In a transaction of its own, after the sorted copy is gone: beside it, a
        // million devices' day ran out of a 64 MB limit. The rollups' values do not
        // depend on the readings' order, so a failure here costs nothing but the
        // consolidation (partials are combined when read).
        let (from, to) = (start, start + 86_400_000);
        if let Err(e) = super::in_transaction(conn, || rollup::rebuild(conn, "readings", from, to))
        {
            tracing::warn!(error = %e, %day, "consolidating the compacted day's rollups failed");
        }
        done.days += 1;
        done.readings += n as u64;
    }
    if done.days > 0 {
        // Reclaims the unsorted copies now; DuckDB refuses while another connection
        // (a dump's snapshot) has a transaction open, and a later checkpoint does it.
        if let Err(e) = conn.execute_batch("CHECKPOINT") {
            tracing::debug!(error = %e, "checkpoint after compaction deferred");
        }
    }
    done.elapsed = started.elapsed();
    if done.days > 0 {
        tracing::info!(
            days = done.days,
            readings = done.readings,
            elapsed_ms = done.elapsed.as_millis() as u64,
            "compacted finished days"
        );
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2025-05-01, a finished day.
    const DAY_MS: i64 = 1_746_057_600_000;

    /// `(device, sensor, ts_ms, value)` of every stored reading, in key order, with
    /// the value's bits (so that `-0.0` differs from `0.0`).
    fn stored(conn: &Connection) -> Vec<(i32, i16, i64, u64)> {
        let mut stmt = conn
            .prepare("SELECT device_id, sensor_id, ts_ms, value FROM readings ORDER BY 1, 2, 3")
            .unwrap();
        stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get::<_, f64>(3)?.to_bits(),
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    /// Per sensor in `compacted_readings`: `(sensor, rows stored as mantissas,
    /// distinct divisors, rows kept as DOUBLE)`.
    fn forms(conn: &Connection) -> Vec<(i16, i64, i64, i64)> {
        let mut stmt = conn
            .prepare(
                "SELECT sensor_id, count(mant), count(DISTINCT div), count(value)
                 FROM compacted_readings GROUP BY 1 ORDER BY 1",
            )
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn insert(conn: &Connection, rows: &[(i16, i64, f64)]) {
        let mut app = conn.appender("received_readings").unwrap();
        for &(sensor, ts_ms, value) in rows {
            app.append_row(duckdb::params![1, sensor, ts_ms, 0i16, value])
                .unwrap();
        }
        app.flush().unwrap();
    }

    #[test]
    fn compacted_values_read_back_bit_for_bit_and_decimals_become_mantissas() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open_for_tests(dir.path());
        let conn = &store.conn;
        conn.execute_batch("INSERT INTO devices VALUES (1, 'car')")
            .unwrap();
        // Sensor 1: a four-decimal random walk, some values with trailing zeros
        // (fewer decimals written), in reverse time order.
        let mut rows: Vec<(i16, i64, f64)> = (0..3000i64)
            .rev()
            .map(|i| {
                (
                    1,
                    DAY_MS + i * 1000,
                    60.0 + ((i * 7919) % 2001 - 1000) as f64 / 10_000.0,
                )
            })
            .collect();
        rows.extend([
            (1, DAY_MS + 5_000_000, 60.12),
            (1, DAY_MS + 5_001_000, 61.0),
        ]);
        // Sensor 2: values with no decimal form within nine decimals, beside
        // values that have one, and the edges of the exact range.
        let odd = [
            0.1 + 0.2,
            1e300,
            -1e-12,
            5e-324,
            123_456_789.123_456_79, // 17 significant digits: over 2^53 at nine decimals
            9_007_199_254_740_993.0,
            f64::MAX,
            -0.0,
            0.0,
            -7.25,
            0.1,
            1e15,
        ];
        rows.extend(
            odd.iter()
                .enumerate()
                .map(|(i, &v)| (2, DAY_MS + i as i64, v)),
        );
        // Sensor 3: integers.
        rows.extend((0..100).map(|i| (3, DAY_MS + i * 10, (2000 + i * 37) as f64)));
        insert(conn, &rows);
        let before = stored(conn);

        let done = compact_finished_days(conn, chrono::Utc::now().date_naive()).unwrap();
        assert_eq!((done.days, done.readings), (1, rows.len() as u64));
        assert_eq!(stored(conn), before, "every value reads back bit for bit");
        let received: i64 = conn
            .query_row("SELECT count(*) FROM received_readings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(received, 0, "the day moved");
        let got = forms(conn);
        assert_eq!(got[0], (1, 3002, 1, 0), "one divisor for the walk: {got:?}");
        assert_eq!(got[2], (3, 100, 1, 0), "{got:?}");
        // The sensor's divisor is 100 (-7.25 needs two decimals). As mantissas:
        // -7.25, 0.1 and 0.0; not -0.0, nor 1e15 (1e17 is over 2^53), nor the
        // values with no decimal form within nine decimals.
        let (_, mantissas, _, doubles) = got[1];
        assert_eq!((mantissas, doubles), (3, 9), "{got:?}");

        // A late reading makes the day due again; the second pass starts from the
        // mantissas and keeps every value.
        insert(conn, &[(1, DAY_MS + 6_000_000, 59.9999)]);
        let before = stored(conn);
        let done = compact_finished_days(conn, chrono::Utc::now().date_naive()).unwrap();
        assert_eq!(done.days, 1);
        assert_eq!(stored(conn), before);
        assert_eq!(forms(conn)[0], (1, 3003, 1, 0));
    }

    /// A day whose readings the live day's sorting moved whole into
    /// `compacted_readings` (as plain values) is due once over, though
    /// `received_readings` holds none of it, and its compaction lists it no more.
    #[test]
    fn a_day_sorted_while_live_is_compacted_once_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open_for_tests(dir.path());
        let conn = &store.conn;
        conn.execute_batch(&format!(
            "INSERT INTO devices VALUES (1, 'car');
             INSERT INTO compacted_readings (device_id, sensor_id, ts_ms, ts_us, value)
                 SELECT 1, 1, {DAY_MS} + i * 1000, 0, 60 + i / 100 FROM range(500) t(i);
             INSERT INTO uncompacted_days VALUES (DATE '2025-05-01');"
        ))
        .unwrap();
        let before = stored(conn);
        let today = chrono::Utc::now().date_naive();
        let day = NaiveDate::from_ymd_opt(2025, 5, 1).unwrap();
        assert_eq!(due_days(conn, today).unwrap(), [day]);
        assert_eq!(due_days(conn, day).unwrap(), [], "not before it is over");
        let done = compact_finished_days(conn, today).unwrap();
        assert_eq!((done.days, done.readings), (1, 500));
        assert_eq!(stored(conn), before);
        assert_eq!(forms(conn), [(1, 500, 1, 0)], "as mantissas now");
        assert_eq!(due_days(conn, today).unwrap(), []);
    }

    #[test]
    fn a_day_without_decimal_values_keeps_its_doubles() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open_for_tests(dir.path());
        let conn = &store.conn;
        insert(conn, &[(1, DAY_MS, 0.1 + 0.2), (4, DAY_MS, 1e-30)]);
        let before = stored(conn);
        compact_finished_days(conn, chrono::Utc::now().date_naive()).unwrap();
        assert_eq!(stored(conn), before);
        assert_eq!(forms(conn), [(1, 0, 0, 1), (4, 0, 0, 1)]);
    }
}

#[cfg(test)]
mod upgrade_tests {
    use super::*;

    /// A database of schema version 5, whose compacted days hold sorted DOUBLEs in
    /// `readings`, gets its readings back unchanged through the view, and its old
    /// compacted days are due again and move into `compacted_readings`.
    #[test]
    fn days_compacted_before_version_6_are_compacted_again() {
        let dir = tempfile::tempdir().unwrap();
        let day_ms = 1_746_057_600_000i64;
        {
            let conn = Connection::open(crate::store::DataDir::new(dir.path()).database()).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY,
                     name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL);",
            )
            .unwrap();
            for (v, sql) in super::super::migrations::MIGRATIONS
                .iter()
                .map(|m| (m.0, m.2))
            {
                if v <= 5 {
                    conn.execute_batch(sql).unwrap();
                    conn.execute(
                        "INSERT INTO schema_migrations VALUES (?, 'old', make_timestamp(0::BIGINT))",
                        [v],
                    )
                    .unwrap();
                }
            }
            conn.execute_batch(&format!(
                "INSERT INTO devices VALUES (1, 'car');
                 INSERT INTO readings SELECT 1, 1, {day_ms} + i * 1000, 0, 60 + i / 100
                     FROM range(500) t(i);
                 INSERT INTO compacted_days VALUES (DATE '2025-05-01', 500);"
            ))
            .unwrap();
        }
        let store = crate::store::open_for_tests(dir.path());
        let conn = &store.conn;
        // Count and a hash of every (time, value), bits included.
        let sum = |conn: &Connection| -> (i64, u64) {
            conn.query_row(
                "SELECT count(*), bit_xor(hash(ts_ms, value)) FROM readings",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
        };
        let before = sum(conn);
        assert_eq!(before.0, 500);
        let today = chrono::Utc::now().date_naive();
        assert_eq!(
            due_days(conn, today).unwrap(),
            [NaiveDate::from_ymd_opt(2025, 5, 1).unwrap()]
        );
        assert_eq!(compact_finished_days(conn, today).unwrap().days, 1);
        assert_eq!(sum(conn), before);
        let moved: i64 = conn
            .query_row("SELECT count(mant) FROM compacted_readings", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(moved, 500);
    }
}
