//! The SQL side of daily dumps: a day of every device written to local files (gzip
//! NDJSON and zstd Parquet, from Arrow batches of bounded queries: `dump_files.rs`)
//! from one snapshot, each day's reading count (what decides whether a day is due),
//! and the bookkeeping tables `dumps` and `retired_days`. Uploading and scheduling
//! live in `export`.
//!
//! A [`DumpSource`] has its own connection: a dump reads a consistent snapshot while
//! the writer goes on committing, and never holds the writer up.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use chrono::NaiveDate;
use duckdb::Connection;
use duckdb::types::{TimeUnit, Value};

use super::rollup::SLOT_MS;
use super::{Shared, StoreError};
use crate::domain::{DumpFormat, NodeIdentity, Timestamp};

const DAY_MS: i64 = 86_400_000;

/// What one [`DumpSource::copy_day`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaySnapshot {
    /// Readings of the day (in every file written).
    pub readings: u64,
    /// Oldest reading of the day.
    pub min_ts: Option<Timestamp>,
    /// Newest reading of the day.
    pub max_ts: Option<Timestamp>,
}

/// One dumped object, as recorded in the database and listed in the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct DumpRecord {
    /// The blob store (its URL, without credentials) the object is in.
    pub store: String,
    /// The UTC day.
    pub day: NaiveDate,
    /// The format.
    pub format: DumpFormat,
    /// Object key relative to the store's prefix.
    pub key: String,
    /// Readings in the object.
    pub readings: u64,
    /// Object size.
    pub bytes: u64,
    /// SHA-256 of the object, lowercase hex.
    pub sha256: String,
    /// Oldest reading in the object.
    pub min_ts: Option<Timestamp>,
    /// Newest reading in the object.
    pub max_ts: Option<Timestamp>,
    /// When the object was written.
    pub generated_at: Timestamp,
}

/// Reads days for dumps and keeps their bookkeeping, on a connection of its own.
pub struct DumpSource {
    conn: Connection,
    shared: Arc<Shared>,
    instance: String,
    stop: Arc<AtomicBool>,
}

impl DumpSource {
    pub(super) fn new(conn: Connection, shared: Arc<Shared>, instance: String) -> Self {
        Self {
            conn,
            shared,
            instance,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A flag that, once set, makes a running [`DumpSource::copy_day`] give up
    /// between two of its queries (within a second): shutdown must not wait for a
    /// whole day to be written, nor checkpoint while its snapshot is open.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Copies every reading of the UTC `day` into `json` (gzip NDJSON, time order)
    /// and/or `parquet` (zstd, ordered by device, sensor, timestamp), both from one
    /// snapshot so they hold exactly the same readings. Both files name `writer`
    /// (see [`NodeIdentity`]).
    pub fn copy_day(
        &self,
        day: NaiveDate,
        json: Option<&Path>,
        parquet: Option<&Path>,
        writer: &NodeIdentity,
    ) -> Result<DaySnapshot, StoreError> {
        let _span = tracing::info_span!("copy_day", %day).entered();
        let started = Instant::now();
        let start = day_start_ms(day);
        let range = format!("r.ts_ms >= {start} AND r.ts_ms < {}", start + DAY_MS);
        self.shared.await_visible();
        let snapshot = super::in_transaction(&self.conn, || {
            if let Some(path) = json {
                super::dump_files::write_json_day(&self.conn, start, path, writer, &self.stop)?;
            }
            if let Some(path) = parquet {
                super::dump_files::write_parquet_day(&self.conn, start, path, writer, &self.stop)?;
            }
            let (n, lo, hi) = self.conn.query_row(
                &format!(
                    "SELECT count(*), min(ts_ms * 1000 + ts_us), max(ts_ms * 1000 + ts_us)
                     FROM readings r WHERE {range}"
                ),
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                    ))
                },
            )?;
            Ok::<_, StoreError>(DaySnapshot {
                readings: n as u64,
                min_ts: lo.map(Timestamp::from_micros),
                max_ts: hi.map(Timestamp::from_micros),
            })
        })?;
        tracing::debug!(
            readings = snapshot.readings,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "day copied"
        );
        Ok(snapshot)
    }

    /// Stored readings per UTC day, for every day that has any. Whole quarter hours
    /// are counted from the rollups (a few hundred rows per series and day), the
    /// slots the writer still holds in memory from `readings`.
    pub fn day_counts(&self) -> Result<BTreeMap<NaiveDate, u64>, StoreError> {
        // Before the writer has started (`milepost dump`) this is the earliest
        // instant: everything is counted from `readings`.
        self.shared.await_visible();
        let boundary = self.shared.rollups_from();
        let sql = format!(
            "SELECT day, sum(n)::BIGINT FROM (
                 SELECT CAST(floor(slot_ms / {DAY_MS}.0) AS BIGINT) AS day, sum(readings) AS n
                 FROM rollups WHERE slot_ms < {boundary} GROUP BY 1
                 UNION ALL
                 SELECT CAST(floor(ts_ms / {DAY_MS}.0) AS BIGINT) AS day, count(*) AS n
                 FROM readings WHERE ts_ms >= {boundary} GROUP BY 1
             ) GROUP BY day ORDER BY day"
        );
        debug_assert_eq!(DAY_MS % SLOT_MS, 0);
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(d, n)| Ok((day_of_index(d)?, n as u64)))
            .collect()
    }

    /// Every dump recorded for `store`, by day and format.
    pub fn records(&self, store: &str) -> Result<Vec<DumpRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT strftime(day, '%Y-%m-%d'), format, object_key, readings, bytes, sha256,
                    epoch_us(min_ts), epoch_us(max_ts), epoch_us(generated_at)
             FROM dumps WHERE store = ? ORDER BY day, format",
        )?;
        let rows = stmt
            .query_map([store], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                    r.get::<_, Option<i64>>(7)?,
                    r.get::<_, i64>(8)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(day, format, key, n, bytes, sha256, lo, hi, at)| {
                Ok(DumpRecord {
                    store: store.to_owned(),
                    day: NaiveDate::parse_from_str(&day, "%Y-%m-%d")
                        .map_err(|e| StoreError::Corrupt(format!("dump day '{day}': {e}")))?,
                    format: DumpFormat::parse(&format)
                        .ok_or_else(|| StoreError::Corrupt(format!("dump format '{format}'")))?,
                    key,
                    readings: n as u64,
                    bytes: bytes as u64,
                    sha256,
                    min_ts: lo.map(Timestamp::from_micros),
                    max_ts: hi.map(Timestamp::from_micros),
                    generated_at: Timestamp::from_micros(at),
                })
            })
            .collect()
    }

    /// Records (or replaces) the dumps of one day, all in one transaction.
    pub fn record(&self, records: &[DumpRecord]) -> Result<(), StoreError> {
        let ts = |t: Option<Timestamp>| {
            t.map_or(Value::Null, |t| {
                Value::Timestamp(TimeUnit::Microsecond, t.as_micros())
            })
        };
        super::in_transaction(&self.conn, || {
            let mut stmt = self.conn.prepare(
                "INSERT OR REPLACE INTO dumps VALUES (?, CAST(? AS DATE), ?, ?, ?, ?, ?, ?, ?, ?)",
            )?;
            for r in records {
                stmt.execute(duckdb::params![
                    r.store,
                    r.day.format("%Y-%m-%d").to_string(),
                    r.format.as_str(),
                    r.key,
                    r.readings as i64,
                    r.bytes as i64,
                    r.sha256,
                    ts(r.min_ts),
                    ts(r.max_ts),
                    ts(Some(r.generated_at)),
                ])?;
            }
            Ok::<_, StoreError>(())
        })
    }

    /// The instance id of this data directory: random, made once and kept beside the
    /// database (`instance-id`), so it moves with a restored backup of the directory
    /// and differs on a new machine that reuses a node name. Lake objects carry it
    /// ([`NodeIdentity`]).
    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    /// Days whose readings retention has deleted, with the count they had.
    pub fn retired_days(&self) -> Result<BTreeMap<NaiveDate, u64>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT strftime(day, '%Y-%m-%d'), readings FROM retired_days ORDER BY day")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(d, n)| {
                let day = NaiveDate::parse_from_str(&d, "%Y-%m-%d")
                    .map_err(|e| StoreError::Corrupt(format!("retired day '{d}': {e}")))?;
                Ok((day, n as u64))
            })
            .collect()
    }
}

/// First instant of a UTC day, epoch ms.
pub(super) fn day_start_ms(day: NaiveDate) -> i64 {
    day.and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp_millis()
}

/// The UTC day with index `d` (days since 1970-01-01).
fn day_of_index(d: i64) -> Result<NaiveDate, StoreError> {
    chrono::DateTime::from_timestamp_millis(d.saturating_mul(DAY_MS))
        .map(|t| t.date_naive())
        .ok_or_else(|| StoreError::Corrupt(format!("day index {d}")))
}
