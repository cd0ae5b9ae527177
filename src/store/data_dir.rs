//! The data directory's files, named in one place: whoever needs one (the metrics of
//! the database's size, `recover`, the benchmarks) asks [`DataDir`] for it.

use std::path::{Path, PathBuf};

/// File name of the database inside the data directory.
const DB_FILE: &str = "milepost.duckdb";
const WAL_FILE: &str = "milepost.duckdb.wal";
const LOCK_FILE: &str = "milepost.lock";
/// Where `milepost compact --rewrite` builds the new database file.
const REWRITE_FILE: &str = "milepost.duckdb.rewrite";
const INSTANCE_FILE: &str = "instance-id";

/// A data directory (`--data-dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir(PathBuf);

impl DataDir {
    /// The data directory at `dir` (nothing is touched).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into())
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The DuckDB file.
    pub fn database(&self) -> PathBuf {
        self.0.join(DB_FILE)
    }

    /// DuckDB's write-ahead log beside it.
    pub fn wal(&self) -> PathBuf {
        self.0.join(WAL_FILE)
    }

    /// The database file `milepost compact --rewrite` builds before it replaces
    /// [`Self::database`] (left over only if a rewrite was interrupted).
    pub fn rewrite(&self) -> PathBuf {
        self.0.join(REWRITE_FILE)
    }

    /// The lock file a running process holds.
    pub fn lock_file(&self) -> PathBuf {
        self.0.join(LOCK_FILE)
    }

    /// The file of the instance id (see `DumpSource::instance_id`).
    pub fn instance_file(&self) -> PathBuf {
        self.0.join(INSTANCE_FILE)
    }

    /// Milepost's own ingest log (see `ingest_log.rs`).
    pub fn ingest_log(&self) -> PathBuf {
        self.0.join(super::ingest_log::LOG_DIR)
    }

    /// Bytes of the database file and its write-ahead log.
    pub fn database_bytes(&self) -> u64 {
        [self.database(), self.wal()]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Whether a process holds the directory's lock now (nothing is changed).
    pub fn in_use(&self) -> bool {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.lock_file())
            .is_ok_and(|f| f.try_lock().is_err())
    }
}
