//! Looking at a data directory from outside a running server: whether its database
//! opens (`milepost recover`), and the references the benchmark measures the server
//! against — DuckDB loading and copying the same data natively, and fingerprints that
//! prove two databases hold the same readings. Here so that SQL stays in `store`:
//! callers get typed answers, never a connection.
//!
//! Every function opens its own connection on a stopped server's directory (a running
//! server holds DuckDB's file lock, so they would fail, not interfere).

use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::NaiveDate;
use duckdb::Connection;

use super::rollup::SLOT_SQL;
use super::{DataDir, DuckSettings, Store, StoreConfig, StoreError, open_connection};

/// Whether the database of `dir` opens and answers a query; DuckDB's message if not
/// (a write-ahead log it cannot replay, a damaged file). Opens read-only: nothing is
/// written, not even a checkpoint.
pub fn check_opens(dir: &DataDir) -> Result<(), String> {
    let conn = connect(dir, "128MB", true).map_err(|e| match e {
        StoreError::Open { message, .. } => message,
        other => other.to_string(),
    })?;
    conn.query_row("SELECT count(*) FROM duckdb_tables()", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// One series as stored: its readings, first and last instant (µs), and a sum of
/// hashes of every `(timestamp, value)`. Two databases with equal fingerprints hold
/// the same readings (up to a hash collision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesFingerprint {
    /// Device name.
    pub device: String,
    /// Sensor id (ids are assigned in catalog order, the same in every database).
    pub sensor_id: i16,
    /// Readings.
    pub readings: i64,
    /// First instant, µs since the epoch.
    pub first_us: i64,
    /// Last instant, µs since the epoch.
    pub last_us: i64,
    /// Sum of the hashes of every reading's timestamp and value.
    pub hash: String,
}

/// The DuckDB load the benchmark calls the limit: a new data directory `dir` with the
/// server's schema (created by the same migrations), `devices` registered in order, and
/// the NDJSON `files` read by DuckDB's own `read_json` straight into `readings`.
/// Returns the readings stored and the seconds the load (and its checkpoint) took.
pub fn load_natively(
    dir: &Path,
    memory_limit: &str,
    devices: &[&str],
    files: &[PathBuf],
) -> Result<(u64, f64), StoreError> {
    drop(Store::open(&StoreConfig {
        data_dir: dir.to_owned(),
        memory_limit: memory_limit.to_owned(),
        threads: 2,
        series_memory: crate::store::DEFAULT_SERIES_MEMORY,
        temp_limit: None,
    })?);
    let conn = connect(&DataDir::new(dir), memory_limit, false)?;
    for (i, device) in devices.iter().enumerate() {
        conn.execute(
            "INSERT INTO devices VALUES (?, ?)",
            duckdb::params![i as i32 + 1, device],
        )?;
    }
    let list: Vec<String> = files
        .iter()
        .map(|f| format!("'{}'", f.display().to_string().replace('\'', "''")))
        .collect();
    let sql = format!(
        "INSERT INTO received_readings
         SELECT d.id, s.id, epoch_ms(CAST(r.timestamp AS TIMESTAMP)),
                CAST(epoch_us(CAST(r.timestamp AS TIMESTAMP)) % 1000 AS SMALLINT), r.value
         FROM read_json([{}], format = 'newline_delimited',
              columns = {{sensor: 'VARCHAR', value: 'DOUBLE', timestamp: 'VARCHAR', device: 'VARCHAR'}}) r
         JOIN sensors s ON s.name = r.sensor
         JOIN devices d ON d.name = r.device",
        list.join(", ")
    );
    let started = Instant::now();
    let n = conn.execute(&sql, [])?;
    conn.execute_batch("CHECKPOINT")?;
    Ok((n as u64, started.elapsed().as_secs_f64()))
}

/// Every series of `dir`'s database, fingerprinted, in device and sensor order.
pub fn fingerprints(dir: &Path, memory_limit: &str) -> Result<Vec<SeriesFingerprint>, StoreError> {
    let conn = connect(&DataDir::new(dir), memory_limit, true)?;
    let mut stmt = conn.prepare(
        "SELECT d.name, r.sensor_id, count(*), min(ts_ms * 1000 + ts_us),
                max(ts_ms * 1000 + ts_us), CAST(sum(hash(ts_ms, ts_us, value)) AS VARCHAR)
         FROM readings r JOIN devices d ON d.id = r.device_id
         GROUP BY ALL ORDER BY ALL",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(SeriesFingerprint {
            device: r.get(0)?,
            sensor_id: r.get(1)?,
            readings: r.get(2)?,
            first_us: r.get(3)?,
            last_us: r.get(4)?,
            hash: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Rollup slots of `dir`'s database whose count, extremes, first or last instant
/// differ from the readings stored in them: 0 when the writer kept them right.
pub fn rollup_mismatches(dir: &Path, memory_limit: &str) -> Result<i64, StoreError> {
    let conn = connect(&DataDir::new(dir), memory_limit, true)?;
    Ok(conn.query_row(
        &format!(
            "WITH r AS (
                 SELECT device_id, sensor_id, {SLOT_SQL} AS slot_ms,
                        count(*) AS n, min(value) AS lo, max(value) AS hi,
                        min(ts_ms * 1000 + ts_us) AS a, max(ts_ms * 1000 + ts_us) AS b
                 FROM readings GROUP BY ALL
             ), u AS (
                 SELECT device_id, sensor_id, slot_ms, sum(readings) AS n, min(min_value) AS lo,
                        max(max_value) AS hi, min(first_us) AS a, max(last_us) AS b
                 FROM rollups GROUP BY ALL
             )
             SELECT count(*) FROM r FULL JOIN u USING (device_id, sensor_id, slot_ms)
             WHERE r.n IS DISTINCT FROM u.n OR r.lo IS DISTINCT FROM u.lo
                OR r.hi IS DISTINCT FROM u.hi OR r.a IS DISTINCT FROM u.a
                OR r.b IS DISTINCT FROM u.b"
        ),
        [],
        |r| r.get(0),
    )?)
}

/// DuckDB's own `COPY` of `day` (UTC) from `dir`'s database into `out`: `day.parquet`
/// and `day.json.gz`, with the same rows, names and order as a dump, written by
/// DuckDB's writers. Returns the seconds the copies took and the day's readings.
pub fn copy_day_natively(
    dir: &Path,
    memory_limit: &str,
    day: NaiveDate,
    out: &Path,
) -> Result<(f64, u64), StoreError> {
    std::fs::create_dir_all(out).map_err(|e| StoreError::DataDir {
        path: out.to_owned(),
        error: e,
    })?;
    let conn = connect(&DataDir::new(dir), memory_limit, true)?;
    let from = format!(
        "FROM readings r JOIN devices d ON d.id = r.device_id JOIN sensors s ON s.id = r.sensor_id
         WHERE r.ts_ms >= epoch_ms(DATE '{day}') AND r.ts_ms < epoch_ms(DATE '{day}' + 1)"
    );
    let started = Instant::now();
    conn.execute_batch(&format!(
        "COPY (SELECT d.name AS device, s.name AS sensor,
                      make_timestamp(r.ts_ms * 1000 + r.ts_us) AS timestamp, r.value AS value
               {from} ORDER BY d.name, s.name, r.ts_ms, r.ts_us)
         TO '{}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 1048576);
         COPY (SELECT s.name AS sensor, r.value AS value,
                      make_timestamp(r.ts_ms * 1000 + r.ts_us) AS timestamp, d.name AS device
               {from} ORDER BY r.ts_ms, r.ts_us, d.name, s.name)
         TO '{}' (FORMAT json, COMPRESSION gzip);",
        out.join("day.parquet").display(),
        out.join("day.json.gz").display()
    ))?;
    let secs = started.elapsed().as_secs_f64();
    let n: i64 = conn.query_row(&format!("SELECT count(*) {from}"), [], |r| r.get(0))?;
    Ok((secs, n as u64))
}

/// Hourly means: (hour start in epoch seconds, mean), in time order.
pub type HourlyMeans = Vec<(f64, f64)>;

/// A panel's question on the internal tables through DuckDB's own API, the
/// reference for users' SQL: `device`'s `sensor`, averaged per hour from `from_us`
/// to `to_us` (UTC µs, both included), `runs` times. Each run plans its statement
/// anew, its values in the text, as a dashboard's query arrives (its time range
/// moves with every refresh). Returns each run's milliseconds and the answer's
/// rows (hour start in epoch seconds, mean).
pub fn hourly_means_natively(
    dir: &Path,
    memory_limit: &str,
    (device, sensor): (&str, &str),
    (from_us, to_us): (i64, i64),
    runs: usize,
) -> Result<(Vec<f64>, HourlyMeans), StoreError> {
    let conn = connect(&DataDir::new(dir), memory_limit, true)?;
    let quote = |s: &str| s.replace('\'', "''");
    let sql = format!(
        "SELECT floor(r.ts_ms / 3600000) * 3600 AS hour, avg(r.value) AS mean
         FROM readings r
         WHERE r.device_id = (SELECT id FROM devices WHERE name = '{}')
           AND r.sensor_id = (SELECT id FROM sensors WHERE name = '{}')
           AND r.ts_ms * 1000 + r.ts_us BETWEEN {from_us} AND {to_us}
         GROUP BY 1 ORDER BY 1",
        quote(device),
        quote(sensor)
    );
    let mut times = Vec::with_capacity(runs);
    let mut answer = Vec::new();
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        let mut stmt = conn.prepare(&sql)?;
        answer = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok((times, answer))
}

/// A connection to `dir`'s database with Milepost's settings and two threads.
fn connect(dir: &DataDir, memory_limit: &str, read_only: bool) -> Result<Connection, StoreError> {
    open_connection(
        &dir.database(),
        &DuckSettings {
            memory_limit: memory_limit.to_owned(),
            threads: 2,
            read_only,
            temp_limit: None,
        },
    )
}
