//! `manifests/<node>.json`: every dump of one node in this store, for people and for
//! tools. One per node, so no two nodes ever write the same manifest; the lake's
//! index is the folder.
//!
//! ```json
//! {
//!   "version": 2,
//!   "node": "appliance-1",
//!   "instance": "5f0c…",
//!   "root_day_files": true,
//!   "generated_at": "2026-12-02T06:00:03.120Z",
//!   "dumps": [
//!     {"date": "2026-11-30", "format": "json", "key": "2026-11-30.json.gz",
//!      "rows": 518400, "bytes": 4012345, "sha256": "…",
//!      "min_timestamp": "2026-11-30T00:00:00.000Z",
//!      "max_timestamp": "2026-11-30T23:59:59.000Z",
//!      "generated_at": "2026-12-01T06:00:01.512Z"}
//!   ]
//! }
//! ```

use serde::{Deserialize, Serialize};

use super::lake::Layout;
use crate::domain::NodeIdentity;
use crate::store::DumpRecord;

/// Version of the manifest layout: 2 added `instance` and `root_day_files`, and
/// moved the manifest from the root `manifest.json` to `manifests/<node>.json`.
pub const MANIFEST_VERSION: u32 = 2;

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version (1).
    pub version: u32,
    /// `--node-name` of the appliance that wrote it.
    pub node: String,
    /// Instance id of the data directory that wrote it (absent in version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Whether this node writes the seed-named `YYYY-MM-DD.json.gz` at the prefix
    /// root (no `--shared-lake`). Version 1 had no field: its node did.
    #[serde(default = "version_1_wrote_root_files")]
    pub root_day_files: bool,
    /// When it was written (RFC 3339 UTC).
    pub generated_at: String,
    /// Every dump, by date then format.
    pub dumps: Vec<ManifestEntry>,
}

/// One dumped object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// UTC day, `YYYY-MM-DD`.
    pub date: String,
    /// `json` or `parquet`.
    pub format: String,
    /// Object key relative to the store's prefix.
    pub key: String,
    /// Readings in the object.
    pub rows: u64,
    /// Object size in bytes.
    pub bytes: u64,
    /// SHA-256 of the object, lowercase hex.
    pub sha256: String,
    /// Oldest reading (RFC 3339 UTC), absent for an empty day.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_timestamp: Option<String>,
    /// Newest reading (RFC 3339 UTC), absent for an empty day.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_timestamp: Option<String>,
    /// When the object was written (RFC 3339 UTC).
    pub generated_at: String,
}

impl ManifestEntry {
    /// The manifest's view of a recorded dump.
    pub fn of(r: &DumpRecord) -> Self {
        Self {
            date: r.day.format("%Y-%m-%d").to_string(),
            format: r.format.as_str().to_owned(),
            key: r.key.clone(),
            rows: r.readings,
            bytes: r.bytes,
            sha256: r.sha256.clone(),
            min_timestamp: r.min_ts.map(|t| t.to_string()),
            max_timestamp: r.max_ts.map(|t| t.to_string()),
            generated_at: r.generated_at.to_string(),
        }
    }
}

fn version_1_wrote_root_files() -> bool {
    true
}

impl Manifest {
    /// The manifest of `records`, written by `me` with `layout`.
    pub fn of(me: &NodeIdentity, layout: &Layout, records: &[DumpRecord]) -> Self {
        Self {
            version: MANIFEST_VERSION,
            node: me.node.clone(),
            instance: Some(me.instance.clone()),
            root_day_files: !layout.shared,
            generated_at: crate::domain::Timestamp::now().to_string(),
            dumps: records.iter().map(ManifestEntry::of).collect(),
        }
    }

    /// Who wrote it, when it says (version 2).
    pub fn writer(&self) -> Option<NodeIdentity> {
        self.instance.as_ref().map(|instance| NodeIdentity {
            node: self.node.clone(),
            instance: instance.clone(),
        })
    }
}
