//! The live day clustered by device, a chunk at a time (`--cluster-rows`, off by
//! default).
//!
//! Readings arrive into `received_readings` in arrival order: each flush is sorted by
//! series, but holds every device that sent, so every row group of the live day
//! holds every device and DuckDB's zone maps cannot skip any for one device. A page
//! of one device's readings then scans the whole fleet's readings of its time
//! window: 11 of 54 row groups for 100 readings, 6.5–7.0 ms on the idle file of a
//! minute of 2,000 devices streaming, and ~3× that beside the fleet. (Since session
//! 42 a flush fills at least a row group, so a device's readings lie together in
//! each: the same page 3.2–3.6 ms. The figures below are from before.)
//!
//! With `--cluster-rows N`, once N of today's readings have arrived the flusher moves
//! the oldest N, in one transaction, into `compacted_readings` sorted by (device,
//! sensor, time), as plain values (`mant` and `div` NULL: the view reads `value`
//! first), a range of devices per sort ([`SORT_ROWS`]). Each chunk's row groups then
//! hold a range of devices, and the same page reads 2 of 56 row groups: 3.2–3.3 ms
//! at 1 Mi rows a chunk (256 Ki: 4.3; 3 M: 2.7). A chunk of 1 Mi rows took
//! 305–345 ms to move on one DuckDB thread, ~3 % of a core at the fleet's
//! 90 k readings/s.
//!
//! Why it is off by default (docs/performance.md, session 38): beside 2,000 devices
//! streaming at 64 connections, 1 Mi rows a chunk took the readings page's p50 from
//! 26–27 ms to 20–21 but not its tail (p99 65–91 against 74–80), and the server's
//! peak RSS up by ~45 MiB (169–175 against 117–129; 100,000 devices for 15 s: 250–261
//! against 208–209): DuckDB keeps a record of every deleted row, outside its memory
//! limit, until a checkpoint drops the row groups they emptied. A checkpoint after
//! every chunk of 256 Ki rows kept that to +12–16 MiB but stalled reads behind it
//! (page p99 250 ms) — the readers' applied-through look-up waiting for the
//! checkpoint's vacuum lock, which no read takes since session 41; measured again
//! then (2,000 devices, 60 s, one run each): no stall, page p99 44 ms at 256 Ki and
//! 51 at 128 Ki against 40–59 off, peak RSS 175 and 146 MiB against 122–134 off.
//! Worth it where pages of a device's live day are read much and memory is to spare.
//!
//! Only today's readings move (and later days'): readings of finished days go on
//! waiting in `received_readings` for their day's compaction, which is due soon. A
//! day whose readings moved is listed in `uncompacted_days` (schema version 7), so
//! that it is compacted once over even if `received_readings` holds none of it; its
//! compaction rewrites the sorted chunks with the rest, as mantissas.

use std::time::{Duration, Instant};

use duckdb::Connection;

use super::StoreError;
use super::compact::today_start;

/// `--cluster-rows`' default: 0, the live day stays in arrival order (see the
/// module docs for what sorting it costs and gives). 1 Mi rows a chunk is what was
/// measured.
pub const DEFAULT_CHUNK_ROWS: u64 = 0;

/// How long the flusher waits before trying again after a chunk failed to move (it
/// stays where it was: nothing is lost, pages are only slower).
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// What one move did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Moved {
    /// Readings moved.
    pub rows: u64,
    /// Today's readings left in `received_readings`.
    pub left: u64,
}

/// The writer's account of today's readings not clustered yet.
pub(super) struct Clustering {
    /// Readings a chunk moves; 0: never.
    chunk_rows: u64,
    /// Readings appended since the last count of today's readings in
    /// `received_readings`, plus that count: an upper bound of them (appends to
    /// finished days count too, and are found out by the next count).
    pending: u64,
    /// No move before this (after a failed one).
    retry_at: Instant,
}

impl Clustering {
    /// Counts today's readings in `received_readings` (those an earlier run left),
    /// unless chunks are off: then start-up does not scan the table for nothing.
    pub(super) fn new(conn: &Connection, chunk_rows: u64) -> Result<Self, StoreError> {
        let pending = if chunk_rows > 0 {
            today_in_received(conn)?.1
        } else {
            0
        };
        Ok(Self {
            chunk_rows,
            pending,
            retry_at: Instant::now(),
        })
    }

    /// `rows` readings were appended to `received_readings`.
    pub(super) fn appended(&mut self, rows: u64) {
        self.pending = self.pending.saturating_add(rows);
    }

    /// Whether a chunk may be ready to move.
    pub(super) fn due(&self) -> bool {
        self.chunk_rows > 0 && self.pending >= self.chunk_rows && Instant::now() >= self.retry_at
    }

    /// Moves the oldest chunk of today's readings, if there is a whole one. On
    /// failure nothing moved, and no move is tried for [`RETRY_AFTER`].
    pub(super) fn step(&mut self, conn: &Connection) -> Moved {
        let _span = tracing::debug_span!("cluster_chunk", rows = self.chunk_rows).entered();
        let started = Instant::now();
        match move_chunk(conn, self.chunk_rows) {
            Ok(moved) => {
                self.pending = moved.left;
                if moved.rows > 0 {
                    tracing::debug!(
                        rows = moved.rows,
                        left = moved.left,
                        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                        "sorted a chunk of today's readings by device"
                    );
                }
                moved
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "sorting a chunk of today's readings by device failed; retried in 30 s"
                );
                self.retry_at = Instant::now() + RETRY_AFTER;
                Moved::default()
            }
        }
    }
}

/// The first row id of today's readings in `received_readings` and their count.
fn today_in_received(conn: &Connection) -> Result<(Option<i64>, u64), StoreError> {
    let today_ms = today_start().as_micros().div_euclid(1000);
    let (first, n): (Option<i64>, i64) = conn.query_row(
        "SELECT min(rowid), count(*) FROM received_readings WHERE ts_ms >= ?",
        [today_ms],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((first, u64::try_from(n).unwrap_or(0)))
}

/// Moves the oldest `chunk_rows` of today's readings (by row id, which follows
/// arrival: rows are only ever appended) from `received_readings` into
/// `compacted_readings`, sorted by (device, sensor, time), and lists their days for
/// compaction, in one transaction; nothing when fewer are there. Row ids are stable
/// within the transaction (a checkpoint may renumber them between two).
fn move_chunk(conn: &Connection, chunk_rows: u64) -> Result<Moved, StoreError> {
    super::in_transaction(conn, || {
        let (first, today) = today_in_received(conn)?;
        let Some(first) = first.filter(|_| chunk_rows > 0 && today >= chunk_rows) else {
            return Ok(Moved {
                rows: 0,
                left: today,
            });
        };
        tracing::debug!(today, "sorting a chunk of today's readings by device");
        let today_ms = today_start().as_micros().div_euclid(1000);
        let end = first.saturating_add(i64::try_from(chunk_rows).unwrap_or(i64::MAX));
        let chunk = format!("ts_ms >= {today_ms} AND rowid >= {first} AND rowid < {end}");
        conn.execute_batch(&format!(
            "INSERT OR IGNORE INTO uncompacted_days
                 SELECT DISTINCT CAST(make_timestamp(ts_ms * 1000) AS DATE)
                 FROM received_readings WHERE {chunk}"
        ))?;
        let mut rows = 0;
        for devices in device_ranges(conn, &chunk, chunk_rows)? {
            rows += conn.execute(
                &format!(
                    "INSERT INTO compacted_readings (device_id, sensor_id, ts_ms, ts_us, value)
                     SELECT device_id, sensor_id, ts_ms, ts_us, value FROM received_readings
                     WHERE {chunk} {devices} ORDER BY device_id, sensor_id, ts_ms, ts_us"
                ),
                [],
            )?;
        }
        let deleted = conn.execute(&format!("DELETE FROM received_readings WHERE {chunk}"), [])?;
        if deleted != rows {
            return Err(StoreError::Corrupt(format!(
                "sorting today's readings: {rows} copied but {deleted} deleted"
            )));
        }
        Ok(Moved {
            rows: rows as u64,
            left: today - rows as u64,
        })
    })
}

/// Readings one sort takes at most, about: a chunk is sorted a range of devices at
/// a time, the ranges in order, so that it comes out sorted whole while a sort holds
/// only this many rows in DuckDB's memory, whatever `--cluster-rows` says. (The
/// peak RSS a move adds did not come from the sort: 250–253 MiB in ranges against
/// 234–241 whole, 100,000 devices streaming.)
const SORT_ROWS: u64 = 128 << 10;

/// `AND device_id …` conditions that split the chunk (`WHERE {chunk}`) of `rows`
/// readings into ranges of devices of about [`SORT_ROWS`] readings, in device order;
/// the first and last open-ended, so that together they hold every row. From
/// DuckDB's approximate quantiles: an uneven split only makes a sort bigger.
fn device_ranges(conn: &Connection, chunk: &str, rows: u64) -> Result<Vec<String>, StoreError> {
    let parts = rows.div_ceil(SORT_ROWS);
    if parts <= 1 {
        return Ok(vec![String::new()]);
    }
    let quantiles: Vec<String> = (1..parts)
        .map(|i| format!("{}", i as f64 / parts as f64))
        .collect();
    let mut stmt = conn.prepare(&format!(
        "SELECT unnest(approx_quantile(device_id, [{}]))::BIGINT
         FROM received_readings WHERE {chunk}",
        quantiles.join(", ")
    ))?;
    let mut bounds = stmt
        .query_map([], |r| r.get::<_, Option<i64>>(0))?
        .filter_map(Result::transpose)
        .collect::<Result<Vec<i64>, _>>()?;
    bounds.sort_unstable();
    bounds.dedup();
    let mut ranges = Vec::with_capacity(bounds.len() + 1);
    let mut lower: Option<i64> = None;
    for b in bounds {
        ranges.push(match lower {
            None => format!("AND device_id < {b}"),
            Some(a) => format!("AND device_id >= {a} AND device_id < {b}"),
        });
        lower = Some(b);
    }
    ranges.push(lower.map_or_else(String::new, |a| format!("AND device_id >= {a}")));
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE received_readings (device_id INTEGER, sensor_id SMALLINT,
                 ts_ms BIGINT, ts_us SMALLINT, value DOUBLE);
             CREATE TABLE compacted_readings (device_id INTEGER, sensor_id SMALLINT,
                 ts_ms BIGINT, ts_us SMALLINT, mant BIGINT, div DOUBLE, value DOUBLE);
             CREATE TABLE uncompacted_days (day DATE PRIMARY KEY);
             CREATE VIEW readings AS
                 SELECT device_id, sensor_id, ts_ms, ts_us, value FROM received_readings
                 UNION ALL
                 SELECT device_id, sensor_id, ts_ms, ts_us, coalesce(value, mant / div)
                 FROM compacted_readings;",
        )
        .unwrap();
        c
    }

    fn all(c: &Connection) -> Vec<(i32, i16, i64, i16, u64)> {
        let mut stmt = c.prepare("SELECT * FROM readings ORDER BY ALL").unwrap();
        stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get::<_, f64>(4)?.to_bits(),
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    fn count(c: &Connection, sql: &str) -> i64 {
        c.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn chunks_of_today_move_sorted_and_whole_and_nothing_else_moves() {
        let c = conn();
        let today = today_start().as_micros() / 1000;
        // Yesterday's late readings, then today's from four devices interleaved as
        // they arrive, newest device first.
        c.execute_batch(&format!(
            "INSERT INTO received_readings
                 SELECT i % 4, 1, {today} - 1000 - i, 0, i FROM range(10) t(i);
             INSERT INTO received_readings
                 SELECT 4 - i % 4, 1 + i % 2, {today} + i * 10, (i % 3)::SMALLINT, i / 7
                 FROM range(2500) t(i);"
        ))
        .unwrap();
        let before = all(&c);
        let mut clustering = Clustering::new(&c, 1000).unwrap();
        assert_eq!(clustering.pending, 2500);
        assert!(clustering.due());
        assert_eq!(
            clustering.step(&c),
            Moved {
                rows: 1000,
                left: 1500
            }
        );
        assert_eq!(
            clustering.step(&c),
            Moved {
                rows: 1000,
                left: 500
            }
        );
        assert!(!clustering.due(), "half a chunk waits");
        assert_eq!(clustering.step(&c), Moved { rows: 0, left: 500 });

        // Nothing lost or changed, yesterday's readings stay where they were.
        assert_eq!(all(&c), before);
        assert_eq!(
            count(
                &c,
                &format!("SELECT count(*) FROM received_readings WHERE ts_ms < {today}")
            ),
            10
        );
        assert_eq!(count(&c, "SELECT count(*) FROM received_readings"), 510);
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM compacted_readings WHERE mant IS NULL AND div IS NULL"
            ),
            2000
        );
        // The oldest arrivals moved, each chunk sorted by device, sensor and time.
        assert_eq!(
            count(&c, "SELECT max(ts_ms) FROM compacted_readings"),
            today + 1999 * 10
        );
        let keys: Vec<(i32, i16, i64, i16)> = c
            .prepare("SELECT device_id, sensor_id, ts_ms, ts_us FROM compacted_readings")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for chunk in keys.chunks(1000) {
            assert!(chunk.is_sorted(), "a chunk in key order");
        }
        assert!(!keys.is_sorted(), "two chunks, each sorted on its own");
        // Today is listed for its compaction.
        assert_eq!(
            count(
                &c,
                &format!(
                    "SELECT count(*) FROM uncompacted_days WHERE day = CAST(make_timestamp({today} * 1000) AS DATE)"
                )
            ),
            1
        );
        assert_eq!(count(&c, "SELECT count(*) FROM uncompacted_days"), 1);
    }

    /// A chunk of more than [`SORT_ROWS`] readings is sorted a range of devices at a
    /// time and still comes out sorted whole, every reading once.
    #[test]
    fn a_big_chunk_is_sorted_by_device_ranges_into_one_order() {
        let c = conn();
        let today = today_start().as_micros() / 1000;
        let n = SORT_ROWS * 3 + 1000;
        c.execute_batch(&format!(
            "INSERT INTO received_readings
                 SELECT (i * 7919) % 5003, 1 + i % 3, {today} + i // 500, 0, i
                 FROM range({n}) t(i);"
        ))
        .unwrap();
        let before = all(&c);
        assert_eq!(device_ranges(&c, "true", n).unwrap().len(), 4);
        assert_eq!(move_chunk(&c, n).unwrap(), Moved { rows: n, left: 0 });
        assert_eq!(all(&c), before);
        let keys: Vec<(i32, i16, i64)> = c
            .prepare("SELECT device_id, sensor_id, ts_ms FROM compacted_readings")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(keys.len() as u64, n);
        assert!(keys.is_sorted(), "one order across the ranges");
    }

    #[test]
    fn appends_make_a_chunk_due_and_zero_rows_never_moves() {
        let c = conn();
        let mut off = Clustering::new(&c, 0).unwrap();
        off.appended(1 << 30);
        assert!(!off.due());
        let mut on = Clustering::new(&c, 100).unwrap();
        assert!(!on.due());
        on.appended(100);
        assert!(on.due());
        // The appended rows were of a finished day: the count finds no chunk.
        assert_eq!(on.step(&c), Moved { rows: 0, left: 0 });
        assert!(!on.due());
    }

    #[test]
    fn a_failed_move_changes_nothing_and_waits() {
        let c = conn();
        let today = today_start().as_micros() / 1000;
        c.execute_batch(&format!(
            "INSERT INTO received_readings SELECT i, 1, {today} + i, 0, i FROM range(200) t(i);
             DROP TABLE uncompacted_days;"
        ))
        .unwrap();
        let mut clustering = Clustering::new(&c, 100).unwrap();
        assert!(clustering.due());
        assert_eq!(clustering.step(&c), Moved::default());
        assert!(!clustering.due(), "not again at once");
        assert_eq!(count(&c, "SELECT count(*) FROM received_readings"), 200);
        assert_eq!(count(&c, "SELECT count(*) FROM compacted_readings"), 0);
    }
}
