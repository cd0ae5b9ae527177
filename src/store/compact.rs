//! Daily compaction: rewrite each finished UTC day sorted by (device, sensor, ts).
//!
//! Readings arrive interleaved (sensors and devices mixed), which DuckDB's bitpacking
//! and ALP compress poorly: ~7 bytes per reading. Sorted, the same day takes ~4: each
//! series' timestamps and values sit together. A day is compacted once it is over;
//! if late uploads add readings to it afterwards, it is compacted again.

use std::time::{Duration, Instant};

use chrono::NaiveDate;
use duckdb::Connection;

use super::StoreError;
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

/// Compacts up to `max_days` days before `today` that are not compacted at their
/// current size, then checkpoints so the space of the unsorted copies is reclaimed.
pub(super) fn compact_finished_days(
    conn: &Connection,
    today: NaiveDate,
    max_days: usize,
) -> Result<Compaction, StoreError> {
    let started = Instant::now();
    let mut stmt = conn.prepare(
        "SELECT strftime(d.day, '%Y-%m-%d'), d.n FROM (
             SELECT CAST(make_timestamp(ts_ms * 1000) AS DATE) AS day, count(*) AS n
             FROM readings GROUP BY 1
         ) d LEFT JOIN compacted_days c ON c.day = d.day
         WHERE d.day < CAST(? AS DATE) AND (c.readings IS NULL OR c.readings <> d.n)
         ORDER BY d.day",
    )?;
    let due = stmt
        .query_map([today.format("%Y-%m-%d").to_string()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut done = Compaction::default();
    for (day, n) in due.into_iter().take(max_days) {
        let _span = tracing::info_span!("compact_day", %day, readings = n).entered();
        let start = chrono::NaiveDate::parse_from_str(&day, "%Y-%m-%d")
            .map_err(|e| StoreError::Corrupt(format!("day '{day}': {e}")))?
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp_millis();
        let range = format!("ts_ms >= {start} AND ts_ms < {}", start + 86_400_000);
        conn.execute_batch("BEGIN TRANSACTION")?;
        let rewritten = conn.execute_batch(&format!(
            "CREATE OR REPLACE TEMP TABLE compact_day AS
                 SELECT * FROM readings WHERE {range} ORDER BY device_id, sensor_id, ts_ms, ts_us;
             DELETE FROM readings WHERE {range};
             INSERT INTO readings SELECT * FROM compact_day;
             INSERT OR REPLACE INTO compacted_days VALUES (DATE '{day}', {n});
             COMMIT;"
        ));
        if let Err(e) = rewritten {
            conn.execute_batch("ROLLBACK").ok();
            return Err(e.into());
        }
        conn.execute_batch("DROP TABLE IF EXISTS temp.compact_day")?;
        done.days += 1;
        done.readings += n as u64;
    }
    if done.days > 0 {
        conn.execute_batch("CHECKPOINT")?;
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
