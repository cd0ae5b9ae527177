//! One lake, many appliances: which keys a node writes, whose an object is, and the
//! check at start that a node may publish under its name.
//!
//! Object stores have no locks, so ownership is in the keys and in the objects:
//!
//! - Every key a node writes holds its `--node-name` (`parquet/date=D/<node>.parquet`,
//!   `json/date=D/<node>.json.gz`, `manifests/<node>.json`), except the seed-named
//!   `D.json.gz` at the prefix root, which only a node without `--shared-lake` writes
//!   (one lone appliance, as the seed's dumper did).
//! - Every object names the node and the instance (data directory) that wrote it
//!   ([`NodeIdentity`]: gzip header comment, Parquet footer metadata, manifest
//!   fields). Before a node writes a key that holds an object, it reads who wrote it
//!   and refuses unless it was itself ([`ExportError::Foreign`]); a key that holds
//!   nothing is created conditionally where the store can (a second writer racing it
//!   is refused the same way).
//! - At start ([`claim`]) a node reads the manifests folder: its name held by another
//!   instance, or the root day files written by another node while this one is not in
//!   shared mode, stop the start with what to do. Otherwise it writes its manifest
//!   (which claims the name) and removes the manifests it wrote under an earlier name
//!   and the version-1 root `manifest.json` it wrote before.

use std::collections::BTreeSet;

use bytes::Bytes;
use chrono::NaiveDate;

use super::blob::{BlobStore, WriteMode};
use super::manifest::Manifest;
use super::{ExportError, LEGACY_MANIFEST_KEY, MANIFESTS_DIR};
use crate::domain::{DumpFormat, NodeIdentity};
use crate::store::DumpRecord;

/// Where one node's objects go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `--node-name`.
    pub node: String,
    /// `--shared-lake`: the day's NDJSON under the node's name, not the seed name.
    pub shared: bool,
}

impl Layout {
    /// Object key of a day's dump, relative to the prefix.
    pub fn key(&self, day: NaiveDate, format: DumpFormat) -> String {
        let date = day.format("%Y-%m-%d");
        match (format, self.shared) {
            (DumpFormat::Json, false) => format!("{date}.json.gz"),
            (DumpFormat::Json, true) => format!("json/date={date}/{}.json.gz", self.node),
            (DumpFormat::Parquet, _) => format!("parquet/date={date}/{}.parquet", self.node),
        }
    }

    /// Object key of this node's manifest.
    pub fn manifest_key(&self) -> String {
        manifest_key(&self.node)
    }
}

/// Object key of a node's manifest.
pub fn manifest_key(node: &str) -> String {
    format!("{MANIFESTS_DIR}/{node}.json")
}

/// What is at a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Found {
    /// Nothing.
    Absent,
    /// An object of `size` bytes, written by `by` when it says so.
    Object { size: u64, by: Option<NodeIdentity> },
}

/// Reads who wrote the object at `key` from the object itself: the gzip header of
/// `.json.gz`, the Parquet footer of `.parquet`, the fields of a manifest (`.json`).
/// Reads a few hundred bytes for the first two, the manifest whole.
pub(super) async fn inspect(blob: &BlobStore, key: &str) -> Result<Found, ExportError> {
    let Some(size) = blob.size(key).await? else {
        return Ok(Found::Absent);
    };
    let by = if size == 0 {
        None
    } else if key.ends_with(".json.gz") {
        let head = blob.read_range(key, 0..size.min(1024)).await?;
        flate2::bufread::GzDecoder::new(&head[..])
            .header()
            .and_then(|h| h.comment())
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(NodeIdentity::from_gzip_comment)
    } else if key.ends_with(".parquet") {
        parquet_writer(blob, key, size).await?
    } else if key.ends_with(".json") {
        match blob.read(key).await? {
            Some(body) => serde_json::from_slice::<Manifest>(&body)
                .ok()
                .and_then(|m| m.writer()),
            None => return Ok(Found::Absent),
        }
    } else {
        None
    };
    Ok(Found::Object { size, by })
}

/// The writer a Parquet file's footer names.
async fn parquet_writer(
    blob: &BlobStore,
    key: &str,
    size: u64,
) -> Result<Option<NodeIdentity>, ExportError> {
    use parquet::file::metadata::{FooterTail, ParquetMetaDataReader};
    if size < 12 {
        return Ok(None);
    }
    let tail = blob.read_range(key, size - 8..size).await?;
    let Ok(tail) = FooterTail::try_new(&tail[..].try_into().expect("8 bytes")) else {
        return Ok(None);
    };
    let len = tail.metadata_length() as u64;
    if len + 8 > size {
        return Ok(None);
    }
    let meta = blob.read_range(key, size - 8 - len..size - 8).await?;
    let Ok(meta) = ParquetMetaDataReader::decode_metadata(&meta) else {
        return Ok(None);
    };
    let kv = meta.file_metadata().key_value_metadata();
    let get = |k: &str| {
        kv.and_then(|kv| kv.iter().find(|e| e.key == k))
            .and_then(|e| e.value.clone())
    };
    Ok(
        match (
            get(NodeIdentity::PARQUET_NODE),
            get(NodeIdentity::PARQUET_INSTANCE),
        ) {
            (Some(node), Some(instance)) => Some(NodeIdentity { node, instance }),
            _ => None,
        },
    )
}

/// How this node may write `key`, judged from what is there: create it when there is
/// nothing; replace it when this instance wrote it, or when it carries no writer
/// (dumps of Milepost before 2026-12) and this node's own record of the key has its
/// size; otherwise [`ExportError::Foreign`].
pub(super) async fn write_mode(
    blob: &BlobStore,
    key: &str,
    me: &NodeIdentity,
    recorded: Option<&DumpRecord>,
) -> Result<WriteMode, ExportError> {
    match inspect(blob, key).await? {
        Found::Absent => Ok(WriteMode::Create),
        Found::Object { by: Some(by), .. } if by.instance == me.instance => Ok(WriteMode::Replace),
        Found::Object { by: None, size }
            if recorded.is_some_and(|r| r.key == key && r.bytes == size) =>
        {
            Ok(WriteMode::Replace)
        }
        Found::Object { by, .. } => Err(foreign(key, by.as_ref(), me)),
    }
}

/// The refusal to overwrite `key`.
pub(super) fn foreign(key: &str, by: Option<&NodeIdentity>, me: &NodeIdentity) -> ExportError {
    let (owner, hint) = match by {
        Some(by) if by.node == me.node => (
            format!(
                "another appliance named '{}' (instance {})",
                by.node, by.instance
            ),
            "Two appliances use one --node-name: give each its own (see docs/dumps.md, \
             'Moving a node')."
                .to_owned(),
        ),
        Some(by) => (
            format!("node '{}' (instance {})", by.node, by.instance),
            if key.contains('/') {
                "Another node wrote under this node's keys; check --node-name.".to_owned()
            } else {
                format!(
                    "Several appliances share this prefix: start every one of them with \
                     --shared-lake (node '{}' too), or give each its own prefix.",
                    by.node
                )
            },
        ),
        None => (
            "something else (it names no Milepost node)".to_owned(),
            "Move it away if it is not needed, or give this node another prefix.".to_owned(),
        ),
    };
    ExportError::Foreign {
        key: key.to_owned(),
        owner,
        node: me.node.clone(),
        hint,
    }
}

/// Joins the lake at start; see the module documentation. `records` are this node's
/// dumps in this store as its database has them.
pub(super) async fn claim(
    blob: &BlobStore,
    layout: &Layout,
    me: &NodeIdentity,
    records: &[DumpRecord],
) -> Result<(), ExportError> {
    // A lone node reads every manifest (is another node writing the root files?);
    // a node in shared mode only its own and those of names it wrote under before
    // (its records' keys say which), so a fleet's start costs no fleet-sized reads.
    let keys: BTreeSet<String> = if layout.shared {
        records
            .iter()
            .filter_map(|r| node_of_key(&r.key))
            .map(manifest_key)
            .chain([layout.manifest_key()])
            .collect()
    } else {
        blob.list(MANIFESTS_DIR)
            .await?
            .into_iter()
            .filter(|k| k.ends_with(".json"))
            .collect()
    };
    let mut others = Vec::new();
    let mut mine = None;
    for key in keys {
        let Some(body) = blob.read(&key).await? else {
            continue;
        };
        match serde_json::from_slice::<Manifest>(&body) {
            Ok(m) if key == layout.manifest_key() => mine = Some(m),
            Ok(m) => others.push((key, m)),
            Err(e) => tracing::warn!(key, error = %e, "an unreadable manifest in the lake"),
        }
    }
    let legacy = match blob.read(LEGACY_MANIFEST_KEY).await? {
        Some(body) => serde_json::from_slice::<Manifest>(&body).ok(),
        None => None,
    };

    // The name: held by this instance, or by nobody.
    if let Some(m) = &mine
        && m.instance.as_deref() != Some(me.instance.as_str())
    {
        return Err(name_taken(layout, m, blob));
    }
    let legacy_mine = legacy.as_ref().is_some_and(|l| l.node == me.node);
    if legacy_mine && mine.is_none() && records.is_empty() {
        let l = legacy.as_ref().expect("checked");
        return Err(name_taken(layout, l, blob));
    }

    // The seed-named root files: one writer at most.
    let root_writers: Vec<String> = others
        .iter()
        .filter(|(_, m)| m.root_day_files && m.instance.as_deref() != Some(&me.instance))
        .map(|(_, m)| m.node.clone())
        .chain(
            legacy
                .as_ref()
                .filter(|l| !legacy_mine && !others.iter().any(|(_, m)| m.node == l.node))
                .map(|l| l.node.clone()),
        )
        .collect();
    if !layout.shared && !root_writers.is_empty() {
        return Err(ExportError::Lake(format!(
            "the blob store {} is shared: node '{}' already writes the seed-named day files \
             (YYYY-MM-DD.json.gz) at its root, and this node ('{}') would write the same keys. \
             Start every appliance that publishes into this prefix with --shared-lake \
             (MILEPOST_SHARED_LAKE=true): each then writes json/date=YYYY-MM-DD/<node>.json.gz. \
             Or give this one a prefix of its own. Nothing was written.",
            blob.display(),
            root_writers.join("', '"),
            me.node,
        )));
    }

    // Claim the name: the manifest, created only if nobody did in the meantime.
    let manifest = Manifest::of(me, layout, records);
    let body = Bytes::from(serde_json::to_vec_pretty(&manifest).expect("manifest serializes"));
    let mode = if mine.is_some() {
        WriteMode::Replace
    } else {
        WriteMode::Create
    };
    match blob.put(&layout.manifest_key(), body, mode).await {
        Err(ExportError::Exists { .. }) => {
            return Err(ExportError::Lake(format!(
                "another appliance claimed the node name '{}' in {} at the same moment; \
                 give each appliance its own --node-name",
                me.node,
                blob.display()
            )));
        }
        r => r?,
    }

    // What this instance wrote under earlier names is listed by the new manifest now.
    for (key, m) in &others {
        if m.instance.as_deref() == Some(&me.instance) {
            tracing::info!(
                old = m.node,
                new = me.node,
                "node renamed: its manifest moves to the new name"
            );
            blob.delete(key).await?;
        }
    }
    if legacy_mine {
        tracing::info!(
            manifest = layout.manifest_key(),
            "the version-1 manifest.json at the prefix root is replaced by this node's manifest"
        );
        blob.delete(LEGACY_MANIFEST_KEY).await?;
    }
    Ok(())
}

/// The node name in a day's key (`parquet/date=D/<node>.parquet`,
/// `json/date=D/<node>.json.gz`); `None` for the seed-named root files.
fn node_of_key(key: &str) -> Option<&str> {
    let file = key.rsplit_once('/')?.1;
    file.strip_suffix(".parquet")
        .or_else(|| file.strip_suffix(".json.gz"))
}

fn name_taken(layout: &Layout, held: &Manifest, blob: &BlobStore) -> ExportError {
    ExportError::Lake(format!(
        "the node name '{}' in {} belongs to another appliance (instance {}, manifest written \
         {}): this data directory did not write it. If two appliances run, give this one its \
         own --node-name. If this machine replaces that one, restore that one's data \
         directory here to carry on under the same name, or start with a new --node-name \
         (the old name's dumps stay in the lake, listed by {}). Nothing was written.",
        layout.node,
        blob.display(),
        held.instance
            .as_deref()
            .unwrap_or("unknown: a version-1 manifest"),
        held.generated_at,
        if held.instance.is_some() {
            layout.manifest_key()
        } else {
            LEGACY_MANIFEST_KEY.to_owned()
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_but_the_seed_day_file_names_the_node() {
        let day = NaiveDate::from_ymd_opt(2026, 11, 30).unwrap();
        let lone = Layout {
            node: "car-1".into(),
            shared: false,
        };
        let shared = Layout {
            shared: true,
            ..lone.clone()
        };
        assert_eq!(lone.key(day, DumpFormat::Json), "2026-11-30.json.gz");
        assert_eq!(
            shared.key(day, DumpFormat::Json),
            "json/date=2026-11-30/car-1.json.gz"
        );
        for l in [&lone, &shared] {
            assert_eq!(
                l.key(day, DumpFormat::Parquet),
                "parquet/date=2026-11-30/car-1.parquet"
            );
            assert_eq!(l.manifest_key(), "manifests/car-1.json");
            for f in DumpFormat::ALL {
                let key = l.key(day, f);
                assert_eq!(
                    node_of_key(&key),
                    (l.shared || f == DumpFormat::Parquet).then_some("car-1")
                );
            }
        }
    }
}
