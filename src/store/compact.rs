//! Daily compaction: rewrite each finished UTC day sorted by (device, sensor, ts).
//!
//! Readings arrive interleaved (sensors and devices mixed), which DuckDB's bitpacking
//! and ALP compress poorly: ~7 bytes per reading. Sorted, the same day takes ~4: each
//! series' timestamps and values sit together. A day is compacted once it is over;
//! if late uploads add readings to it afterwards, it is compacted again. Its rollups
//! are recomputed from the rewritten readings in the same transaction.

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

/// Finished days not compacted at their current size, oldest first. Counts every
/// stored reading by day: one scan of the whole table, so the writer keeps the
/// answer ([`DueDays`]) instead of asking again for every day.
pub(super) fn due_days(conn: &Connection, today: NaiveDate) -> Result<Vec<NaiveDate>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT strftime(d.day, '%Y-%m-%d') FROM (
             SELECT CAST(make_timestamp(ts_ms * 1000) AS DATE) AS day, count(*) AS n
             FROM readings GROUP BY 1
         ) d LEFT JOIN compacted_days c ON c.day = d.day
         WHERE d.day < CAST(? AS DATE) AND (c.readings IS NULL OR c.readings <> d.n)
         ORDER BY d.day",
    )?;
    let days = stmt
        .query_map([today.format("%Y-%m-%d").to_string()], |r| {
            r.get::<_, String>(0)
        })?
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

/// Rewrites each of `days` sorted by (device, sensor, time), one transaction per day,
/// then checkpoints so the space of the unsorted copies is reclaimed.
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
            let n: i64 = conn.query_row("SELECT count(*) FROM compact_day", [], |r| r.get(0))?;
            conn.execute_batch(&format!(
                "DELETE FROM readings WHERE {range};
                 INSERT INTO readings SELECT * FROM compact_day;
                 INSERT OR REPLACE INTO compacted_days VALUES (DATE '{day}', {n});"
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
