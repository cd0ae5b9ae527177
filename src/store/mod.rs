//! The only module that speaks SQL.
//!
//! [`Store::open`] takes the data directory's lock, opens the DuckDB file with
//! extensions built in and network auto-loading off, applies migrations, replays what
//! only the ingest log holds (`ingest_log.rs`), and loads the small tables (sensors,
//! devices, and the series statistics of the devices that sent last, within a budget;
//! `series.rs`) into memory. From it come the [`Writer`] — a front thread that
//! groups requests and acknowledges them through the ingest log (a syncer thread's
//! `fdatasync`) or DuckDB, and a flusher thread that moves the log into DuckDB; front
//! and flusher share the write connection under one lock (`writer/mod.rs`) — and
//! readers, the dump source and the alert
//! store, each with connections of its own. Everything outside sees typed functions.
//!
//! Readings arrive into `received_readings`; every reader reads the view `readings`
//! over it and `compacted_readings`. Besides the readings, the writer keeps 15-minute
//! rollups per series in the same transactions (`rollup.rs`), so statistics over
//! long ranges do not depend on how the readings happen to be ordered on disk; the
//! live quarter hours are aggregated in memory as readings are acknowledged
//! (`live.rs`), and queries add the readings the ingest log acknowledged that DuckDB
//! does not hold yet (`reader.rs`), so no read waits for the writer; compaction
//! (`compact.rs`) moves finished days into `compacted_readings`, sorted and with
//! values as decimal mantissas, for size and scan speed; with `--cluster-rows`,
//! the live day goes there sorted by device a chunk at a time before that
//! (`cluster.rs`, off by default), so that one device's reads skip the rest of the
//! fleet's. Each flush of the ingest log appends at least a row group sorted by
//! series (`writer/flusher.rs`), so even in arrival order a device's readings lie
//! together within each row group. [`diagnostics`] looks at a
//! stopped server's directory for `milepost recover` and the benchmark, and
//! `rewrite.rs` copies its database into a new file for `milepost compact --rewrite`.

mod alerts;
mod cluster;
mod columns;
mod compact;
mod data_dir;
pub mod diagnostics;
mod dump;
mod dump_files;
mod error;
mod forget;
mod ingest_log;
pub mod live;
mod migrations;
mod names;
mod owners;
mod pool;
mod reader;
mod recent;
mod retention;
mod rewrite;
mod rollup;
mod series;
pub mod sql;
mod state;
mod writer;

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use duckdb::arrow::record_batch::RecordBatch;
use duckdb::vtab::arrow::{ArrowBatchRegistration, ArrowVTab};
use duckdb::{Config, Connection};

pub use alerts::{AlertStore, AlertStoreError};
pub use cluster::DEFAULT_CHUNK_ROWS as DEFAULT_CLUSTER_ROWS;
pub use compact::Compaction;
pub use data_dir::DataDir;
pub use dump::{DaySnapshot, DumpRecord, DumpSource};
pub use error::StoreError;
pub use forget::DeletedDevice;
use ingest_log::IngestLog;
pub use reader::{DeviceSummary, ReadStore, Reader, ScanChunk, ScanSink, Totals};
pub use retention::Retired;
pub use rewrite::Rewrite;
pub use series::DEFAULT_BUDGET as DEFAULT_SERIES_MEMORY;
pub use state::{ApplyLag, SeriesEntry, SeriesStats, Shared};
pub use writer::{Clock, Committed, PendingCommit, WriteError, Writer, WriterConfig, WriterHandle};

use crate::domain::{Catalog, Device, DeviceId, Sensor, SensorId, SensorName};

/// DuckDB's memory limit unless `--memory-limit` says otherwise.
///
/// DuckDB keeps the blocks it writes and reads cached until its limit needs the
/// room, so a server that holds more data than the limit keeps DuckDB at the limit.
/// At 128 MB a bulk import of 100 M readings peaked at 217–222 MiB (DuckDB 121 MB,
/// the binary's code 40–46 MiB, the rest Milepost's buffers and DuckDB's table
/// metadata, which no limit counts); at 96 MB at 187–194, ingest, charts and
/// statistics as fast, an export of 20.8 M uncompacted readings 9–29 % slower (fewer
/// blocks cached; docs/performance.md, session 36). Statements that group many
/// devices size their slices to the limit (`device_ranges`).
pub const DEFAULT_MEMORY_LIMIT: &str = "96MB";

/// How to open the database.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Directory holding the database file, its lock and the generated API key.
    pub data_dir: PathBuf,
    /// DuckDB `memory_limit`, e.g. `256MB`.
    pub memory_limit: String,
    /// DuckDB worker threads.
    pub threads: usize,
    /// Memory for the series statistics of active devices (`--series-memory`; see
    /// [`series`]).
    pub series_memory: usize,
    /// DuckDB `max_temp_directory_size`, e.g. `2GB`: what its spill files may take
    /// of the disk, so that no query (a user's above all) can fill it. `None`:
    /// DuckDB's default (90% of the free space).
    pub temp_limit: Option<String>,
}

/// An open database: lock held, schema current, small tables loaded.
pub struct Store {
    conn: Connection,
    shared: Arc<Shared>,
    log: IngestLog,
    path: PathBuf,
    instance: String,
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) the database in `cfg.data_dir`.
    #[tracing::instrument(skip_all, fields(data_dir = %cfg.data_dir.display()))]
    pub fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| StoreError::DataDir {
            path: cfg.data_dir.clone(),
            error: e,
        })?;
        let dir = DataDir::new(&cfg.data_dir);
        let lock = lock_data_dir(&dir)?;
        let instance = instance_id(&dir)?;
        let path = dir.database();
        let conn = open_duckdb(&path, cfg)?;
        // DuckDB opens a damaged file (truncated, overwritten) lazily: the first reads
        // fail. Those failures get the same guidance as a refused open.
        let damaged = |e: StoreError| match e {
            StoreError::Duckdb(e) => StoreError::Open {
                path: path.clone(),
                wal_present: path.with_extension("duckdb.wal").exists(),
                message: e.to_string(),
            },
            other => other,
        };
        migrations::apply(&conn, &path).map_err(damaged)?;
        // Readings acknowledged through the ingest log before a crash go into DuckDB
        // before anything reads it.
        let log = ingest_log::replay(&conn, &cfg.data_dir).map_err(damaged)?;
        let shared = Arc::new(load_shared(&conn, cfg.series_memory).map_err(damaged)?);
        tracing::info!(
            path = %path.display(),
            devices = shared.device_count(),
            "database open"
        );
        Ok(Self {
            conn,
            shared,
            log,
            path,
            instance,
            _lock: lock,
        })
    }

    /// The in-memory view shared by writer and readers.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Path of the DuckDB file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Compacts finished days (for `milepost compact`, with no server running).
    pub fn compact(&self) -> Result<Compaction, StoreError> {
        compact::compact_finished_days(&self.conn, chrono::Utc::now().date_naive())
    }

    /// Closes the database ready for a fast next start (series snapshot, checkpoint).
    /// Offline commands call this; a dropped store leaves the next start to recompute
    /// the series statistics.
    pub fn close(self) -> Result<(), StoreError> {
        close(&self.conn, &self.shared)
    }

    /// Closes the database (as [`Self::close`]) and replaces its file by a copy made
    /// with today's block size and without free blocks (see [`rewrite`]); `cfg` is
    /// what the store was opened with. The directory stays locked throughout.
    pub fn rewrite(self, cfg: &StoreConfig) -> Result<Rewrite, StoreError> {
        close(&self.conn, &self.shared)?;
        let Self {
            conn,
            shared,
            log,
            _lock,
            ..
        } = self;
        // DuckDB closes the file when its last connection goes.
        drop((conn, shared, log));
        rewrite::rewrite(&DataDir::new(&cfg.data_dir), &DuckSettings::of(cfg))
    }

    /// Bytes of the file that hold data: used blocks times block size. The file itself
    /// does not shrink; freed blocks are reused by later writes.
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row(
            "SELECT used_blocks * block_size FROM pragma_database_size()",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// A connection of its own for daily dumps (see [`DumpSource`]).
    pub fn dump_source(&self) -> Result<DumpSource, StoreError> {
        Ok(DumpSource::new(
            self.conn.try_clone()?,
            self.shared.clone(),
            self.instance.clone(),
        ))
    }

    /// The backend's tables (alerts, anomalies, …) on a connection of their own.
    pub fn alert_store(&self) -> Result<AlertStore, StoreError> {
        Ok(AlertStore::new(self.conn.try_clone()?, self.shared.clone()))
    }

    /// User SQL (see [`sql`]) on connections of its own.
    pub fn sql_engine(&self, limits: sql::SqlLimits) -> Result<sql::SqlEngine, StoreError> {
        sql::SqlEngine::new(self.conn.try_clone()?, self.shared.clone(), limits)
    }

    /// A reader with its own connections to the database.
    pub fn reader(&self) -> Result<Reader, StoreError> {
        Ok(Reader::new(self.conn.try_clone()?, self.shared.clone()))
    }

    /// Starts the writer thread; the store's lock moves with it and is released
    /// when the writer has checkpointed and stopped.
    pub fn start_writer(self, cfg: WriterConfig) -> Result<Writer, StoreError> {
        let Self {
            conn,
            shared,
            log,
            _lock: lock,
            ..
        } = self;
        Writer::start(conn, shared, cfg, log, lock)
    }
}

/// The instance id of the data directory `dir`: read from its file, or made (random,
/// 128 bits, hex) and written durably on first use. A file rather than a database
/// row, so that `milepost recover --move-wal`, which may drop the database's last
/// writes, never changes it.
fn instance_id(dir: &DataDir) -> Result<String, StoreError> {
    let path = dir.instance_file();
    let io = |error| StoreError::DataDir {
        path: path.clone(),
        error,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let id = hex::encode(rand::random::<[u8; 16]>());
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io)?;
    writeln!(f, "{id}").map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    File::open(dir.path())
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(id)
}

/// Small settings for a store in `dir`, for tests.
#[cfg(test)]
pub(crate) fn config_for_tests(dir: &Path) -> StoreConfig {
    StoreConfig {
        data_dir: dir.to_owned(),
        memory_limit: "128MB".into(),
        threads: 1,
        series_memory: crate::store::DEFAULT_SERIES_MEMORY,
        temp_limit: None,
    }
}

/// A store in `dir` with small settings, for tests.
#[cfg(test)]
pub(crate) fn open_for_tests(dir: &Path) -> Store {
    Store::open(&config_for_tests(dir)).expect("test store opens")
}

/// Runs `f` in one transaction: committed when it returns `Ok`, rolled back when it
/// or the commit fails.
fn in_transaction<T, E: From<duckdb::Error>>(
    conn: &Connection,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    conn.execute_batch("BEGIN TRANSACTION")?;
    let done = f().and_then(|v| {
        conn.execute_batch("COMMIT")?;
        Ok(v)
    });
    if done.is_err() {
        conn.execute_batch("ROLLBACK").ok();
    }
    done
}

/// Leaves the database ready for a fast start: writes the resident devices' series
/// statistics into the table (the rows of devices on disk are current already),
/// marks it valid and checkpoints. Called by the writer at shutdown and by offline
/// commands when they are done.
fn close(conn: &Connection, shared: &Shared) -> Result<(), StoreError> {
    let _span = tracing::info_span!("checkpoint").entered();
    in_transaction(conn, || {
        shared.write_resident_series(conn)?;
        // Valid unless something marked it for a recompute (`series::distrust`).
        conn.execute_batch(
            "INSERT OR REPLACE INTO meta SELECT 'series_snapshot', 'valid'
             WHERE NOT EXISTS (SELECT 1 FROM meta
                               WHERE key = 'series_snapshot' AND value = 'recompute')",
        )?;
        Ok::<_, StoreError>(())
    })?;
    conn.execute_batch("CHECKPOINT")?;
    Ok(())
}

/// Takes an exclusive lock on the data directory so that a second process is refused
/// before it touches the database.
fn lock_data_dir(dir: &DataDir) -> Result<File, StoreError> {
    let path = dir.lock_file();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::DataDir {
            path: path.clone(),
            error: e,
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(StoreError::Locked {
                dir: dir.path().to_owned(),
                holder: holder.trim().to_owned(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(StoreError::DataDir { path, error: e });
        }
    }
    file.set_len(0).ok();
    let _ = writeln!(file, "pid {}", std::process::id());
    Ok(file)
}

/// DuckDB memory one group may take in a statement that groups many devices'
/// readings (rollup rebuilds, the series recompute, the live slots' load), beyond
/// [`STATEMENT_BYTES`], to size the slices [`device_ranges`] cuts. DuckDB's memory
/// limit is per instance and such a statement does not spill far enough:
/// rebuilding 100,000 devices' two live slots (1.2 M groups of 27 M readings) failed
/// with "Out of Memory" at a 64 MB limit — the INSERT of the result; the SELECT alone
/// fit — and so did every later start. Measured limits of one statement (rollup
/// rebuild of 20,000 devices × 6 sensors × 2 slots): 8 MB fits 5 k groups and not
/// 20 k, 16 MB 60 k and not 120 k, 32 MB 240 k; 64 MB 600 k of the real data and not
/// 1.2 M: ~6 MiB plus ~80 bytes a group. Twice that per group, for room.
const GROUP_BYTES: u64 = 160;
/// DuckDB memory one row read may take in such a statement: groups of many readings
/// cost more than [`GROUP_BYTES`] says. 100,000 devices' 115 M readings in one
/// quarter hour (192 per series) at 64 MB: the rollup rebuild of 15,000 devices
/// (17 M rows, 90 k groups) took 0.8 s, of 20,000 (23 M rows) 6.6 s, of 25,000
/// (29 M rows) ran out of memory; the series recompute of 25,000 fit and of 50,000
/// did not (threads=1: 50,000 fit): ~2.3 bytes a row at the edge, and slow near it
/// (DuckDB spills). 8 bytes (7 M rows at 64 MB): that start's recovery took 4 s in 17
/// statements at 64 MB, and 4.5 s in 8 at 128 MB — 20 s in 4 with 4 bytes a row.
/// [`run_in_device_ranges`] halves what still fails.
const ROW_BYTES: u64 = 8;
/// What a statement takes whatever its groups (see [`GROUP_BYTES`]), with room.
const STATEMENT_BYTES: u64 = 8 << 20;
/// Fewest groups a slice is allowed, however small the memory limit.
const MIN_GROUPS_PER_STATEMENT: u64 = 2_000;

#[cfg(test)]
thread_local! {
    /// Groups per statement for a test on this thread, instead of the memory
    /// limit's (and no limit on rows).
    static GROUPS_PER_STATEMENT: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// What one grouping statement may hold under a memory limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatementBudget {
    /// Groups it may build.
    groups: u64,
    /// Rows it may read.
    rows: u64,
}

/// What one statement may hold under this connection's memory limit.
fn statement_budget(conn: &Connection) -> Result<StatementBudget, duckdb::Error> {
    #[cfg(test)]
    if let Some(n) = GROUPS_PER_STATEMENT.get() {
        return Ok(StatementBudget {
            groups: n,
            rows: u64::MAX,
        });
    }
    let limit: String =
        conn.query_row("SELECT current_setting('memory_limit')", [], |r| r.get(0))?;
    // Unreadable (a format this code does not know): as if the limit were 64 MB.
    let room = duck_size(&limit)
        .unwrap_or(64 << 20)
        .saturating_sub(STATEMENT_BYTES);
    Ok(StatementBudget {
        groups: (room / GROUP_BYTES).max(MIN_GROUPS_PER_STATEMENT),
        rows: (room / ROW_BYTES).max(MIN_GROUPS_PER_STATEMENT * 64),
    })
}

/// Bytes of a size as DuckDB shows settings: `61.0 MiB`, `1.8 GiB`, `512 bytes`.
fn duck_size(s: &str) -> Option<u64> {
    let (number, unit) = s.trim().split_once(' ')?;
    let number: f64 = number.parse().ok()?;
    let scale: u64 = match unit.trim() {
        "bytes" | "byte" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    Some((number * scale as f64) as u64)
}

/// Known sensors: the most any device has.
fn sensor_count(conn: &Connection) -> Result<u64, duckdb::Error> {
    conn.query_row("SELECT count(*) FROM sensors", [], |r| r.get::<_, i64>(0))
        .map(|n| n.max(1) as u64)
}

/// Statements a query over `rows` rows of `devices` devices needs, with at most
/// `per_device` groups each, to stay within [`statement_budget`].
fn slices_for(
    conn: &Connection,
    rows: u64,
    devices: u64,
    per_device: u64,
) -> Result<u64, duckdb::Error> {
    let budget = statement_budget(conn)?;
    let groups = rows.min(devices.saturating_mul(per_device));
    Ok(groups
        .div_ceil(budget.groups)
        .max(rows.div_ceil(budget.rows))
        .max(1))
}

/// The device ids one statement covers: `[lo, hi)`, or unbounded below (`open_lo`)
/// or above (`open_hi`). Shown as the SQL condition that selects them (`AND
/// device_id …`; empty when both ends are open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeviceRange {
    lo: u64,
    hi: u64,
    open_lo: bool,
    open_hi: bool,
}

impl DeviceRange {
    /// Every id below this is covered by this range or one before it (ranges run in
    /// order of ids, the first open below): `hi`, or every id when open above.
    fn done_below(&self) -> u64 {
        if self.open_hi { u64::MAX } else { self.hi }
    }

    /// Ids `[lo, hi)` count for the halving; the open ends stay open.
    fn width(&self) -> u64 {
        self.hi.saturating_sub(self.lo)
    }

    /// The two halves, or none when the range holds one id.
    fn halves(&self) -> Option<(Self, Self)> {
        (self.width() >= 2).then(|| {
            let mid = self.lo + self.width() / 2;
            (
                Self {
                    hi: mid,
                    open_hi: false,
                    ..*self
                },
                Self {
                    lo: mid,
                    open_lo: false,
                    ..*self
                },
            )
        })
    }
}

impl std::fmt::Display for DeviceRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.open_lo, self.open_hi) {
            (true, true) => Ok(()),
            (true, false) => write!(f, "AND device_id < {}", self.hi),
            (false, true) => write!(f, "AND device_id >= {}", self.lo),
            (false, false) => write!(f, "AND device_id BETWEEN {} AND {}", self.lo, self.hi - 1),
        }
    }
}

/// Ranges that slice every device id given so far into ranges of equal width, each
/// statement holding at most what the memory limit allows ([`statement_budget`]);
/// one range with both ends open when the whole fits. A statement's groups are
/// bounded by `rows`, the rows it reads, and by `per_device` for each device id. The
/// first and the last range are open, so that no row is left out whatever its id.
fn device_ranges(
    conn: &Connection,
    rows: u64,
    per_device: u64,
) -> Result<Vec<DeviceRange>, duckdb::Error> {
    device_ranges_of(conn, rows, per_device, u64::MAX)
}

/// [`device_ranges`], with at least as many ranges as it takes for each to read at
/// most `most_rows` of the `rows` (for work done a step at a time, each step short).
fn device_ranges_of(
    conn: &Connection,
    rows: u64,
    per_device: u64,
    most_rows: u64,
) -> Result<Vec<DeviceRange>, duckdb::Error> {
    let max: i64 = conn.query_row("SELECT coalesce(max(id), 0) FROM devices", [], |r| r.get(0))?;
    let ids = max.max(0) as u64 + 1;
    let slices = slices_for(conn, rows, ids, per_device)?
        .max(rows.div_ceil(most_rows.max(1)))
        .min(ids);
    let width = ids.div_ceil(slices);
    let last = ids.div_ceil(width) - 1;
    Ok((0..=last)
        .map(|i| DeviceRange {
            lo: i * width,
            hi: if i == last { ids } else { (i + 1) * width },
            open_lo: i == 0,
            open_hi: i == last,
        })
        .collect())
}

/// Runs `statement` once per range of [`device_ranges`], in order of ids, and
/// returns how many ran. A statement that runs out of DuckDB's memory is run again
/// on each half of its range, and so is every later range as wide — the budget is
/// an estimate from measurements, and a too-large slice must not make a start or a
/// quarter hour's rollups fail for good — as long as no transaction is open (a
/// failed statement aborts it) and the range holds more than one id. `statement`
/// must leave nothing behind when it fails (one statement, or its own transaction).
fn run_in_device_ranges(
    conn: &Connection,
    rows: u64,
    per_device: u64,
    mut statement: impl FnMut(&DeviceRange) -> Result<(), StoreError>,
) -> Result<usize, StoreError> {
    let mut steps = RangeSteps::new(conn, rows, per_device)?;
    while steps.step(conn, &mut statement)?.is_some() {}
    Ok(steps.ran)
}

/// [`run_in_device_ranges`] one range at a time, for a caller that does other work
/// between ranges (the quarter hour's rollups, see `writer::db`).
struct RangeSteps {
    /// Ranges still to run, the next one last.
    pending: Vec<DeviceRange>,
    /// The widest range run since a halving.
    widest: u64,
    /// Statements run.
    ran: usize,
}

impl RangeSteps {
    fn new(conn: &Connection, rows: u64, per_device: u64) -> Result<Self, StoreError> {
        Self::at_most(conn, rows, per_device, u64::MAX)
    }

    /// [`Self::new`], each range reading at most `most_rows` of the `rows` (as far as
    /// the ids spread them evenly).
    fn at_most(
        conn: &Connection,
        rows: u64,
        per_device: u64,
        most_rows: u64,
    ) -> Result<Self, StoreError> {
        let mut pending = device_ranges_of(conn, rows, per_device, most_rows)?;
        pending.reverse();
        Ok(Self {
            pending,
            widest: u64::MAX,
            ran: 0,
        })
    }

    /// The range [`Self::step`] runs next.
    fn next(&self) -> Option<&DeviceRange> {
        self.pending.last()
    }

    /// Runs the statement of the next range (halving it as [`run_in_device_ranges`]
    /// says) and returns that range, or `None` when every range has run.
    fn step(
        &mut self,
        conn: &Connection,
        mut statement: impl FnMut(&DeviceRange) -> Result<(), StoreError>,
    ) -> Result<Option<DeviceRange>, StoreError> {
        while let Some(range) = self.pending.pop() {
            if range.width() > self.widest
                && let Some((left, right)) = range.halves()
            {
                self.pending.extend([right, left]);
                continue;
            }
            match statement(&range) {
                Ok(()) => {
                    self.ran += 1;
                    return Ok(Some(range));
                }
                Err(e) if e.is_out_of_memory() && !transaction_open(conn) => {
                    let Some((left, right)) = range.halves() else {
                        return Err(e);
                    };
                    tracing::info!(
                        range = %range, error = %e,
                        "a statement ran out of DuckDB's memory; running it in halves"
                    );
                    self.widest = left.width();
                    self.pending.extend([right, left]);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

/// Whether a transaction is open on `conn` (perhaps aborted by a failed statement).
/// duckdb-rs's `is_autocommit` always answers true; DuckDB refuses to begin a
/// transaction inside one, which changes nothing there.
fn transaction_open(conn: &Connection) -> bool {
    conn.execute_batch("BEGIN TRANSACTION; COMMIT").is_err()
}

fn open_duckdb(path: &Path, cfg: &StoreConfig) -> Result<Connection, StoreError> {
    open_connection(path, &DuckSettings::of(cfg))
}

/// How DuckDB is opened: by the store, and by [`diagnostics`] on a stopped server's
/// directory.
#[derive(Debug, Clone)]
struct DuckSettings {
    /// DuckDB `memory_limit`, e.g. `128MB`.
    memory_limit: String,
    /// DuckDB worker threads.
    threads: usize,
    /// Open read-only (never writes, not even a checkpoint).
    read_only: bool,
    /// `max_temp_directory_size`, if not DuckDB's default.
    temp_limit: Option<String>,
}

impl DuckSettings {
    /// The store's settings, read-write.
    fn of(cfg: &StoreConfig) -> Self {
        Self {
            memory_limit: cfg.memory_limit.clone(),
            threads: cfg.threads,
            read_only: false,
            temp_limit: cfg.temp_limit.clone(),
        }
    }
}

/// The block size of database files created from now on (an existing file keeps the
/// one it was created with). DuckDB's default is 256 KiB.
///
/// A compacted day's column segments come out at ~125–135 KiB per row group, and
/// DuckDB packs a block with segments only while they fit whole: two rarely fit one
/// 256 KiB block, so most blocks stayed half empty. In 128 KiB blocks a segment
/// fills blocks whole and its rest shares a block with others. Measured (session
/// 31, alternated with the build before): 100 M readings compacted take 2.62 bytes
/// each instead of 3.03, uncompacted 5.48 instead of 5.60; ingest unchanged,
/// compaction 17–20 % slower, 30-day statistics on compacted days 7–15 % slower,
/// charts unchanged (docs/performance.md, session 31). Copies of 10 M compacted
/// readings: 24.1 MiB in 128 KiB blocks, 24.2 in 64 KiB, 28.5 in 256 KiB, 153 in
/// 16 KiB (every segment split).
const NEW_FILE_BLOCK_SIZE: u32 = 128 << 10;

/// Opens a DuckDB file with Milepost's settings: the memory limit and threads given,
/// and the built-in extensions only (nothing is ever fetched or loaded from the
/// network). The one place a DuckDB connection is configured.
fn open_connection(path: &Path, s: &DuckSettings) -> Result<Connection, StoreError> {
    let conn =
        Connection::open_with_flags(path, duck_config(s)?).map_err(|e| StoreError::Open {
            path: path.to_owned(),
            wal_present: path.with_extension("duckdb.wal").exists(),
            message: e.to_string(),
        })?;
    register_arrow_scan(&conn)?;
    Ok(conn)
}

/// Makes [`insert_batch`] work on `conn`'s database: registered in the instance's
/// system catalog, so every connection cloned from `conn` has it too. Users' SQL
/// cannot call it (the sandbox allows no table function).
fn register_arrow_scan(conn: &Connection) -> Result<(), StoreError> {
    conn.register_table_function::<ArrowVTab>(ARROW_SCAN)?;
    Ok(())
}

/// The name [`open_connection`] gives duckdb-rs's Arrow table function, through
/// which [`insert_batch`] reads its batches.
const ARROW_SCAN: &str = "milepost_arrow";

/// Inserts `batch` into `table`, its columns matched by name (inside the caller's
/// transaction).
///
/// Not through DuckDB's `Appender`: its flush runs the rows as a parallel batch
/// insert, which on two threads splits 190,000 rows into two halves of 95,000,
/// each below a row group (122,880), so DuckDB copies both again into one
/// collection at the end, while the calling thread spins waiting for the other's
/// half (~40 % of the flusher's samples, session 34). The Arrow table function is
/// a source of one task, which the calling thread runs itself, appending straight
/// into the transaction's storage. In alternated 10 M runs, flushes were up to 25 %
/// faster and the server's CPU a reading 0–24 % lower (docs/performance.md, session
/// 34); `MILEPOST_THREADS=1`, which avoids the same waste for every query, gave 17 %.
pub(super) fn insert_batch(
    conn: &Connection,
    table: &str,
    batch: RecordBatch,
) -> Result<(), StoreError> {
    let batch = ArrowBatchRegistration::new(batch);
    conn.prepare_cached(&format!(
        "INSERT INTO {table} BY NAME SELECT * FROM {ARROW_SCAN}(?)"
    ))?
    .execute([&batch])?;
    Ok(())
}

/// [`open_connection`]'s settings.
fn duck_config(s: &DuckSettings) -> Result<Config, StoreError> {
    let mode = if s.read_only {
        duckdb::AccessMode::ReadOnly
    } else {
        duckdb::AccessMode::ReadWrite
    };
    Config::default()
        .max_memory(&s.memory_limit)
        .and_then(|c| c.threads(s.threads.max(1) as i64))
        .and_then(|c| c.access_mode(mode))
        // Extensions are compiled in; never fetch or load anything from the network.
        .and_then(|c| c.with("autoinstall_known_extensions", "false"))
        .and_then(|c| c.with("autoload_known_extensions", "false"))
        .and_then(|c| c.with("allow_community_extensions", "false"))
        .and_then(|c| c.with("default_block_size", NEW_FILE_BLOCK_SIZE.to_string()))
        .and_then(|c| match &s.temp_limit {
            Some(limit) => c.with("max_temp_directory_size", limit),
            None => Ok(c),
        })
        .map_err(|e| StoreError::Config(e.to_string()))
}

/// Per-series statistics: the `series` table is exact after a clean shutdown; after
/// a crash it is recomputed from `readings` (one columnar scan). Memory starts with
/// the devices that sent last, as many as fit three quarters of the budget; the others stay on
/// disk (see [`series`]). The snapshot is then marked stale until the next clean
/// shutdown: resident devices' rows are not kept in step.
fn load_series(
    conn: &Connection,
    budget: usize,
) -> Result<(Vec<SeriesEntry>, series::DiskTotals), StoreError> {
    let valid: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'series_snapshot'",
            [],
            |r| r.get(0),
        )
        .ok();
    let started = std::time::Instant::now();
    if valid.as_deref() != Some("valid") {
        tracing::warn!(
            "the last shutdown was not clean: recomputing series statistics from readings"
        );
        series::recompute(conn)?;
    }
    let (rows, readings, newest) = series::table_totals(conn)?;
    let resident = series::read_recent(conn, rows, budget)?;
    let resident_readings: u64 = resident.iter().map(|(_, s)| s.readings).sum();
    tracing::debug!(
        series = rows,
        resident = resident.len(),
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "series statistics loaded"
    );
    conn.execute_batch("INSERT OR REPLACE INTO meta VALUES ('series_snapshot', 'stale')")?;
    Ok((
        resident,
        series::DiskTotals {
            readings: readings - resident_readings,
            newest,
        },
    ))
}

fn load_shared(conn: &Connection, series_memory: usize) -> Result<Shared, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, name, unit, description, min_value, max_value FROM sensors ORDER BY id",
    )?;
    let sensors = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i16>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<f64>>(4)?,
                r.get::<_, Option<f64>>(5)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|(id, name, unit, description, min, max)| {
            Ok(Sensor {
                id: SensorId(id as u16),
                name: SensorName::parse(&name)
                    .map_err(|_| StoreError::Corrupt(format!("sensor name '{name}'")))?,
                unit,
                description,
                min,
                max,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;

    // Streamed into the names' store: collected first (twice: as read, then
    // parsed), a million devices' names took ~100 MB at start-up.
    let (count, text): (i64, i64) = conn.query_row(
        "SELECT count(*), coalesce(sum(strlen(name)), 0)::BIGINT FROM devices",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut devices = names::DeviceNames::with_capacity(count as usize, text as usize);
    let mut stmt = conn.prepare("SELECT id, name FROM devices ORDER BY id")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (id, name) = (r.get::<_, i32>(0)?, r.get_ref(1)?);
        let name = name
            .as_str()
            .map_err(|e| StoreError::Corrupt(format!("device name: {e}")))?;
        let device = Device::parse(name)
            .map_err(|_| StoreError::Corrupt(format!("device name '{name}'")))?;
        devices.insert(DeviceId(id as u32), &device);
    }

    let (series, disk) = load_series(conn, series_memory)?;
    let shared = Shared::new(Catalog::new(sensors), devices, series, disk, series_memory);
    let mut stmt = conn.prepare("SELECT device_id, key_id FROM device_owners")?;
    let owners = stmt
        .query_map([], |r| {
            Ok((
                DeviceId(r.get::<_, i32>(0)? as u32),
                r.get::<_, i64>(1)? as u64,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    shared.add_owners(&owners);
    Ok(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Statements are sliced by the memory limit DuckDB reports, in its own format.
    #[test]
    fn slices_follow_the_memory_limit() {
        assert_eq!(duck_size("61.0 MiB"), Some(61 << 20));
        assert_eq!(duck_size("1.5 GiB"), Some(3 << 29));
        assert_eq!(duck_size("512 bytes"), Some(512));
        assert_eq!(duck_size("64MB"), None);
        let dir = tempfile::tempdir().unwrap();
        let conn = open_duckdb(
            &dir.path().join("x.duckdb"),
            &StoreConfig {
                memory_limit: "64MB".into(),
                ..cfg(dir.path())
            },
        )
        .unwrap();
        let budget = statement_budget(&conn).unwrap();
        // DuckDB keeps ~95% of the limit for its buffers: 61 MiB of 64 MB.
        let room = (61 << 20) - STATEMENT_BYTES;
        assert_eq!(
            budget,
            StatementBudget {
                groups: room / GROUP_BYTES,
                rows: room / ROW_BYTES
            }
        );
    }

    fn cfg(dir: &Path) -> StoreConfig {
        super::config_for_tests(dir)
    }

    #[test]
    fn migrations_seed_the_builtin_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&cfg(dir.path())).unwrap();
        let db: Vec<Sensor> = store.shared().catalog().iter().cloned().collect();
        assert_eq!(db, Catalog::builtin());
    }

    /// The block size of the store's database file.
    fn block_size(conn: &Connection) -> u64 {
        conn.query_row("SELECT block_size FROM pragma_database_size()", [], |r| {
            r.get(0)
        })
        .unwrap()
    }

    #[test]
    fn new_files_get_small_blocks_and_old_files_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&cfg(dir.path())).unwrap();
        assert_eq!(block_size(&store.conn), u64::from(NEW_FILE_BLOCK_SIZE));
        drop(store);

        // A file made with DuckDB's default blocks, as every version before this
        // one made them, opens with its own and takes writes.
        let old = tempfile::tempdir().unwrap();
        let path = DataDir::new(old.path()).database();
        drop(Connection::open(&path).unwrap());
        let store = Store::open(&cfg(old.path())).unwrap();
        assert_eq!(block_size(&store.conn), 256 << 10);
        store
            .conn
            .execute_batch(
                "INSERT INTO devices VALUES (1, 'car');
                 INSERT INTO received_readings SELECT 1, 1, i * 1000, 0, i / 10 FROM range(300000) t(i);
                 CHECKPOINT;",
            )
            .unwrap();
        let n: i64 = store
            .conn
            .query_row("SELECT count(*) FROM readings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 300_000);
    }

    #[test]
    fn a_second_open_of_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(&cfg(dir.path())).unwrap();
        let err = Store::open(&cfg(dir.path())).err().unwrap();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("another milepost"), "{err}");
    }

    #[test]
    fn reopening_keeps_schema_and_refuses_newer_versions() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(&cfg(dir.path())).unwrap());
        let store = Store::open(&cfg(dir.path())).unwrap();
        store
            .conn
            .execute_batch(
                "INSERT INTO schema_migrations VALUES (9999, 'from the future', make_timestamp(0::BIGINT))",
            )
            .unwrap();
        drop(store);
        let err = Store::open(&cfg(dir.path())).err().unwrap();
        assert!(
            matches!(err, StoreError::TooNew { found: 9999, .. }),
            "{err}"
        );
    }
}
