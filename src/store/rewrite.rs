//! `milepost compact --rewrite`: the database copied into a new file, which then
//! replaces the old one.
//!
//! DuckDB never shrinks a database file: blocks freed by compaction or retention are
//! reused by later writes, but the file keeps its largest size (100 M readings
//! compacted: 250 MiB of data in a 527 MiB file). And a file keeps the block size it
//! was created with, so files made before session 31 hold compacted days in 256 KiB
//! blocks, ~15 % larger than in today's 128 KiB ones ([`super::NEW_FILE_BLOCK_SIZE`]).
//! A copy fixes both: DuckDB's `COPY FROM DATABASE` creates every table, view, macro
//! and sequence (at its current value) in a new file made with today's settings and
//! inserts each table's rows in their stored order, so compacted days stay sorted.
//!
//! Safe against a crash or a failure at any step: the copy is built beside the
//! database (`milepost.duckdb.rewrite`), every table's row count is compared with the
//! original, the copy is synced, and only then renamed over the original (one atomic
//! step; the directory is synced after it). Until the rename the original is
//! untouched; an interrupted rewrite leaves a file the next rewrite removes.

use std::path::Path;
use std::time::{Duration, Instant};

use duckdb::Connection;

use super::{DataDir, DuckSettings, StoreError, duck_config};

/// What a rewrite did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// The file's size before and after, bytes.
    pub bytes_before: u64,
    /// See `bytes_before`.
    pub bytes_after: u64,
    /// The block size of the old file and of the new one.
    pub block_size_before: u64,
    /// See `block_size_before`.
    pub block_size_after: u64,
    /// Rows copied over every table.
    pub rows: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// Copies the (checkpointed, closed) database of `dir` into a new file and puts it in
/// its place. The caller holds the directory's lock and no connection to the file.
pub(super) fn rewrite(dir: &DataDir, settings: &DuckSettings) -> Result<Rewrite, StoreError> {
    let _span = tracing::info_span!("rewrite", dir = %dir.path().display()).entered();
    let started = Instant::now();
    let (old, new) = (dir.database(), dir.rewrite());
    if dir.wal().exists() {
        // A closed store leaves none; one here would be replayed onto the new file.
        return Err(StoreError::Internal(format!(
            "{} exists after the checkpoint: not rewriting",
            dir.wal().display()
        )));
    }
    let new_wal = wal_of(&new);
    for leftover in [&new, &new_wal] {
        remove_if_exists(leftover)?;
    }
    let bytes_before = file_len(&old)?;
    let temp = dir.path().join(".rewrite.tmp");
    // Spills, if any, beside the database rather than in the working directory; rows
    // in their stored order (DuckDB's default, relied on: compacted days stay sorted).
    let cfg = duck_config(settings)?
        .with("temp_directory", temp.to_string_lossy().as_ref())
        .and_then(|c| c.with("preserve_insertion_order", "true"))
        .map_err(|e| StoreError::Config(e.to_string()))?;
    let conn = Connection::open_in_memory_with_flags(cfg)?;
    let copied = copy(&conn, &old, &new);
    drop(conn);
    let _ = std::fs::remove_dir_all(&temp);
    let (rows, block_size_before, block_size_after) = match copied {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&new);
            let _ = std::fs::remove_file(&new_wal);
            return Err(e);
        }
    };
    if new_wal.exists() {
        let _ = std::fs::remove_file(&new);
        return Err(StoreError::Internal(
            "the copy left a write-ahead log after its checkpoint: not replacing".into(),
        ));
    }
    std::fs::File::open(&new)
        .and_then(|f| f.sync_all())
        .map_err(data_dir(&new))?;
    std::fs::rename(&new, &old).map_err(data_dir(&old))?;
    std::fs::File::open(dir.path())
        .and_then(|d| d.sync_all())
        .map_err(data_dir(dir.path()))?;
    let done = Rewrite {
        bytes_before,
        bytes_after: file_len(&old)?,
        block_size_before,
        block_size_after,
        rows,
        elapsed: started.elapsed(),
    };
    tracing::info!(?done, "database rewritten");
    Ok(done)
}

/// Copies `old` into a new file `new` on `conn` (in memory) and checks every table's
/// row count; returns the rows copied and the two block sizes.
fn copy(conn: &Connection, old: &Path, new: &Path) -> Result<(u64, u64, u64), StoreError> {
    conn.execute_batch(&format!(
        "ATTACH {} AS old (READ_ONLY); ATTACH {} AS new;
         COPY FROM DATABASE old TO new;
         CHECKPOINT new;",
        quote(old),
        quote(new),
    ))?;
    let table_names = |db: &str| -> Result<Vec<String>, StoreError> {
        Ok(conn
            .prepare(&format!(
                "SELECT table_name FROM duckdb_tables()
                 WHERE database_name = '{db}' AND NOT temporary ORDER BY table_name"
            ))?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?)
    };
    let (tables, copied) = (table_names("old")?, table_names("new")?);
    if tables != copied {
        return Err(StoreError::Internal(format!(
            "the copy has tables {copied:?}, the database {tables:?}"
        )));
    }
    let mut rows = 0u64;
    for table in &tables {
        let count = |db: &str| -> Result<i64, StoreError> {
            Ok(conn.query_row(
                &format!(
                    "SELECT count(*) FROM {db}.main.\"{}\"",
                    table.replace('"', "\"\"")
                ),
                [],
                |r| r.get(0),
            )?)
        };
        let (a, b) = (count("old")?, count("new")?);
        if a != b {
            return Err(StoreError::Internal(format!(
                "table {table}: {b} rows copied of {a}"
            )));
        }
        rows += a as u64;
    }
    let block_size = |db: &str| -> Result<i64, StoreError> {
        Ok(conn.query_row(
            &format!("SELECT block_size FROM pragma_database_size() WHERE database_name = '{db}'"),
            [],
            |r| r.get(0),
        )?)
    };
    let sizes = (block_size("old")? as u64, block_size("new")? as u64);
    conn.execute_batch("DETACH new; DETACH old;")?;
    Ok((rows, sizes.0, sizes.1))
}

/// `path` as an SQL string literal.
fn quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', "''"))
}

fn wal_of(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".wal");
    p.into()
}

/// An I/O failure on `path` (with the hints for a full or a read-only disk).
fn data_dir(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |error| StoreError::DataDir {
        path: path.to_owned(),
        error,
    }
}

fn file_len(path: &Path) -> Result<u64, StoreError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(data_dir(path))
}

fn remove_if_exists(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(data_dir(path)(e)),
        _ => Ok(()),
    }
}
