//! `/api/v1/dumps`: the daily dumps of the manifest, and downloads of them.

use std::sync::Arc;

use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::{Binary, Json};
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::error::ApiError;
use super::{AppState, Tag};
use crate::export::{Dumper, ManifestEntry, download_name};

/// The `/api/v1/dumps` endpoints.
pub struct DumpsApi;

/// One dumped object.
#[derive(Debug, Clone, Object)]
pub struct DumpInfo {
    /// UTC day, `YYYY-MM-DD`.
    pub date: String,
    /// `json` (gzip NDJSON, an ingest body) or `parquet` (zstd, Hive-partitioned lake).
    pub format: String,
    /// Object key under the blob store's prefix.
    pub key: String,
    /// Name to download it under from `/api/v1/dumps/{name}`.
    pub name: String,
    /// Where to download it (this server, or `--dump-public-url`).
    pub url: String,
    /// Readings in the object.
    pub rows: u64,
    /// Object size in bytes.
    pub bytes: u64,
    /// SHA-256 of the object, lowercase hex.
    pub sha256: String,
    /// Oldest reading (RFC 3339 UTC), absent for an empty day.
    #[oai(skip_serializing_if_is_none)]
    pub min_timestamp: Option<String>,
    /// Newest reading (RFC 3339 UTC), absent for an empty day.
    #[oai(skip_serializing_if_is_none)]
    pub max_timestamp: Option<String>,
    /// When the object was written (RFC 3339 UTC).
    pub generated_at: String,
}

/// The manifest.
#[derive(Debug, Clone, Object)]
pub struct DumpList {
    /// The blob store (URL without credentials).
    pub store: String,
    /// This appliance's name in the lake (every key it writes holds it, but for the
    /// seed-named day files of a lone appliance).
    pub node: String,
    /// Key of this appliance's manifest in the store (`manifests/<node>.json`).
    pub manifest: String,
    /// Every dump, by date then format.
    pub dumps: Vec<DumpInfo>,
}

/// A dump object.
#[derive(ApiResponse)]
pub enum DumpDownload {
    /// The object's bytes (gzip NDJSON or Parquet).
    #[oai(status = 200)]
    Ok(
        Binary<poem::Body>,
        #[oai(header = "Content-Disposition")] String,
        #[oai(header = "ETag")] String,
    ),
    /// The object is served from `--dump-public-url`.
    #[oai(status = 302)]
    Found(#[oai(header = "Location")] String),
}

fn dumper(state: &AppState) -> Result<&Arc<Dumper>, ApiError> {
    state
        .dumps
        .as_ref()
        .ok_or_else(|| ApiError::not_found("dumps are not configured on this server"))
}

pub(super) fn public_url(state: &AppState, key: &str) -> Option<String> {
    state
        .dump_public_url
        .as_ref()
        .map(|base| format!("{}/{key}", base.trim_end_matches('/')))
}

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Dumps")]
impl DumpsApi {
    /// Daily dumps
    ///
    /// Every dump in the blob store's manifest: per finished UTC day, the gzip NDJSON
    /// file (re-ingestable as it is) and the Parquet file of the lake, with rows,
    /// bytes and SHA-256.
    #[oai(path = "/dumps", method = "get")]
    async fn list(&self, state: Data<&Arc<AppState>>) -> Result<Json<DumpList>, ApiError> {
        let d = dumper(&state)?;
        let dumps = d
            .records()
            .iter()
            .map(|r| {
                let m = ManifestEntry::of(r);
                let name = download_name(r.day, r.format);
                DumpInfo {
                    url: public_url(&state, &m.key)
                        .unwrap_or_else(|| format!("/api/v1/dumps/{name}")),
                    name,
                    date: m.date,
                    format: m.format,
                    key: m.key,
                    rows: m.rows,
                    bytes: m.bytes,
                    sha256: m.sha256,
                    min_timestamp: m.min_timestamp,
                    max_timestamp: m.max_timestamp,
                    generated_at: m.generated_at,
                }
            })
            .collect();
        Ok(Json(DumpList {
            store: d.blob().display().to_owned(),
            node: d.settings().layout.node.clone(),
            manifest: d.settings().layout.manifest_key(),
            dumps,
        }))
    }

    /// Download a dump
    ///
    /// Streams one dump object by its `name` from the list (`2026-11-30.json.gz`,
    /// `2026-11-30.parquet`), or redirects to it when the server has a public URL
    /// for the store.
    #[oai(path = "/dumps/:name", method = "get")]
    async fn download(
        &self,
        state: Data<&Arc<AppState>>,
        /// Dump name, e.g. `2026-11-30.json.gz` or `2026-11-30.parquet`.
        name: Path<String>,
    ) -> Result<DumpDownload, ApiError> {
        let d = dumper(&state)?;
        let Some(record) = d.by_download_name(&name.0) else {
            return Err(ApiError::not_found(format!("no dump named '{}'", name.0)));
        };
        if let Some(url) = public_url(&state, &record.key) {
            return Ok(DumpDownload::Found(url));
        }
        match d.blob().get(&record.key).await {
            Ok(Some((_, stream))) => Ok(DumpDownload::Ok(
                Binary(poem::Body::from_bytes_stream(stream)),
                format!("attachment; filename=\"{}\"", name.0),
                format!("\"{}\"", record.sha256),
            )),
            Ok(None) => Err(ApiError::not_found(format!(
                "dump '{}' is listed but its object {} is missing from the store",
                name.0, record.key
            ))),
            Err(e) => {
                tracing::error!(error = %e, key = record.key, "reading a dump failed");
                Err(ApiError::internal())
            }
        }
    }
}
