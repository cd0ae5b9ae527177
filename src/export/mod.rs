//! Daily dumps to blob storage: the seed's gzip NDJSON and a Hive-partitioned
//! Parquet lake.
//!
//! ```text
//! <prefix>/YYYY-MM-DD.json.gz                       seed-compatible, an ingest body
//! <prefix>/parquet/date=YYYY-MM-DD/<node>.parquet   the lake (one file per node)
//! <prefix>/manifest.json                            every dump: key, rows, bytes, sha256…
//! ```
//!
//! A day is written into local files from Arrow batches of DuckDB queries
//! (`store::DumpSource`, one snapshot for both formats), uploaded through
//! `object_store` (multipart when
//! large, so no reader ever sees half an object under its final name), recorded in
//! the database, and only then listed in a newly written manifest.
//!
//! Which days are due is decided from the database alone: every finished UTC day
//! from the first reading on that has no dump in this store, or whose reading count
//! differs from the count its dump holds. Readings are never changed once stored
//! (first write wins), so a changed count means late readings arrived: the day is
//! dumped again, exactly once per change. [`crate::jobs`] runs this on a schedule.

mod blob;
mod dumper;
mod manifest;

pub use blob::{BlobConfig, BlobStore, Retry, Uploaded};
pub use dumper::{DumpSettings, Dumper, RunSummary};
pub use manifest::{Manifest, ManifestEntry};

use chrono::NaiveDate;

use crate::domain::DumpFormat;
use crate::store::StoreError;

/// Object key of the manifest, relative to the prefix.
pub const MANIFEST_KEY: &str = "manifest.json";

/// Object key of a day's dump, relative to the prefix.
pub fn object_key(day: NaiveDate, format: DumpFormat, node: &str) -> String {
    match format {
        DumpFormat::Json => format!("{}.json.gz", day.format("%Y-%m-%d")),
        DumpFormat::Parquet => format!("parquet/date={}/{node}.parquet", day.format("%Y-%m-%d")),
    }
}

/// The name `GET /api/v1/dumps/{name}` serves a dump under (keys contain `/`).
pub fn download_name(day: NaiveDate, format: DumpFormat) -> String {
    match format {
        DumpFormat::Json => format!("{}.json.gz", day.format("%Y-%m-%d")),
        DumpFormat::Parquet => format!("{}.parquet", day.format("%Y-%m-%d")),
    }
}

/// Why a dump or the blob store failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The blob store URL cannot be used as given.
    #[error("invalid blob store URL '{url}': {why}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The store did not accept a probe write and delete.
    #[error(
        "the blob store {url} is not usable (a test write and delete under its prefix failed): {source}"
    )]
    Unusable {
        /// The URL, without credentials.
        url: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// Another store operation failed.
    #[error("blob store operation on {key} failed: {source}")]
    Store {
        /// Object key.
        key: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// A local temporary file could not be written or read.
    #[error("local dump file: {0}")]
    Io(std::io::Error),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] StoreError),
    /// A blocking task died.
    #[error("dump task failed: {0}")]
    Task(String),
}
