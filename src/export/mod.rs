//! Daily dumps to blob storage: the seed's gzip NDJSON and a Hive-partitioned
//! Parquet lake.
//!
//! ```text
//! <prefix>/YYYY-MM-DD.json.gz                       seed-compatible, an ingest body (a lone node)
//! <prefix>/json/date=YYYY-MM-DD/<node>.json.gz      the same with --shared-lake
//! <prefix>/parquet/date=YYYY-MM-DD/<node>.parquet   the lake (one file per node)
//! <prefix>/manifests/<node>.json                    each node's dumps: key, rows, bytes, sha256…
//! ```
//!
//! Several appliances publish into one prefix without a lock: every key a node
//! writes is its own, and it never overwrites an object another one wrote
//! ([`lake`]).
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
pub mod lake;
mod manifest;

pub use blob::{BlobConfig, BlobStore, Retry, Uploaded, WriteMode};
pub use dumper::{DumpSettings, Dumper, RunSummary};
pub use lake::Layout;
pub use manifest::{Manifest, ManifestEntry};

use chrono::NaiveDate;

use crate::domain::DumpFormat;
use crate::store::StoreError;

/// Folder of the per-node manifests, relative to the prefix.
pub const MANIFESTS_DIR: &str = "manifests";

/// The version-1 manifest at the prefix root (one node per prefix), replaced by
/// `manifests/<node>.json` when its node starts.
pub const LEGACY_MANIFEST_KEY: &str = "manifest.json";

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
    /// A conditional create found an object already at the key.
    #[error("an object appeared at {key} while this node was writing it")]
    Exists {
        /// Object key.
        key: String,
    },
    /// An object this node is about to write was written by another appliance.
    #[error(
        "{key} in the lake was written by {owner}, not by this appliance (node '{node}'): \
         not overwritten. {hint}"
    )]
    Foreign {
        /// Object key.
        key: String,
        /// Who wrote it, as far as the object says.
        owner: String,
        /// This node's name.
        node: String,
        /// What to do about it.
        hint: String,
    },
    /// This node cannot publish into the lake as configured (checked at start).
    #[error("{0}")]
    Lake(String),
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
