//! Blob stores through `object_store`, chosen by URL.

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::stream::FuturesUnordered;
use futures_util::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt as _;
use url::Url;

use super::ExportError;

/// Where and how to reach the blob store.
#[derive(Debug, Clone)]
pub struct BlobConfig {
    /// `file:///path`, `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix`, `memory://`.
    pub url: String,
    /// Endpoint of an S3-compatible store (MinIO, Ceph, moto…): path-style requests,
    /// and plain HTTP allowed when the endpoint is `http://`.
    pub s3_endpoint: Option<String>,
    /// S3 region (else `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`).
    pub s3_region: Option<String>,
}

/// An object store and the prefix dumps go under.
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// The URL without credentials, for logs, the manifest and the database.
    display: String,
    retry: Retry,
    part_bytes: usize,
}

/// Whole-object retries on top of `object_store`'s own per-request retries.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts per object.
    pub attempts: u32,
    /// Wait before the second attempt; doubled each time.
    pub backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_secs(1),
        }
    }
}

/// Bytes buffered before an upload switches to multipart; also the part size.
const PART_BYTES: usize = 8 << 20;
/// Parts in flight per upload: bounds memory to a few parts.
const PARTS_IN_FLIGHT: usize = 2;

/// How a write treats an object already at its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Only if nothing is there: a conditional create where the store has one (local
    /// files, S3, GCS, Azure, memory), answered [`ExportError::Exists`] when another
    /// writer got there first. Multipart uploads and stores without conditional
    /// writes fall back to a plain write: the caller checked the key just before.
    Create,
    /// Replace what is there (the caller made sure it is its own).
    Replace,
}

/// What an upload wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// Object size.
    pub bytes: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

impl BlobStore {
    /// Opens the store a URL names. Credentials of S3, GCS and Azure come from their
    /// usual environment variables (`AWS_ACCESS_KEY_ID`, `GOOGLE_SERVICE_ACCOUNT`,
    /// `AZURE_STORAGE_ACCOUNT_NAME`, …).
    pub fn open(cfg: &BlobConfig) -> Result<Self, ExportError> {
        let bad = |why: String| ExportError::BadUrl {
            url: cfg.url.clone(),
            why,
        };
        let url = Url::parse(&cfg.url).map_err(|e| bad(e.to_string()))?;
        let display = redact(&url);
        let prefix =
            |url: &Url| Path::parse(url.path().trim_matches('/')).map_err(|e| bad(e.to_string()));
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = match url.scheme() {
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|()| bad("not an absolute local path".into()))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(e.to_string()))?
                    .with_automatic_cleanup(true);
                (Arc::new(fs), Path::default())
            }
            "memory" => (
                Arc::new(object_store::memory::InMemory::new()),
                prefix(&url)?,
            ),
            "s3" | "s3a" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url.as_str())
                    .with_retry(retry_config());
                if let Some(region) = &cfg.s3_region {
                    b = b.with_region(region);
                } else if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none()
                {
                    b = b.with_region("us-east-1");
                }
                if let Some(ep) = &cfg.s3_endpoint {
                    b = b
                        .with_endpoint(ep)
                        .with_allow_http(ep.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                (
                    Arc::new(b.build().map_err(|e| bad(e.to_string()))?),
                    prefix(&url)?,
                )
            }
            "gs" => {
                let b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url.as_str())
                    .with_retry(retry_config());
                (
                    Arc::new(b.build().map_err(|e| bad(e.to_string()))?),
                    prefix(&url)?,
                )
            }
            "az" | "azure" | "abfs" | "abfss" => {
                let b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url.as_str())
                    .with_retry(retry_config());
                (
                    Arc::new(b.build().map_err(|e| bad(e.to_string()))?),
                    prefix(&url)?,
                )
            }
            other => {
                return Err(bad(format!(
                    "unsupported scheme '{other}': use file://, s3://, gs://, az:// or memory://"
                )));
            }
        };
        Ok(Self {
            store,
            prefix,
            display,
            retry: Retry::default(),
            part_bytes: PART_BYTES,
        })
    }

    /// A store built elsewhere (tests wrap a real store to inject faults).
    pub fn from_parts(store: Arc<dyn ObjectStore>, prefix: &str, display: &str) -> Self {
        Self {
            store,
            prefix: Path::from(prefix),
            display: display.to_owned(),
            retry: Retry::default(),
            part_bytes: PART_BYTES,
        }
    }

    /// Sets the size from which uploads go multipart, and their part size (S3 needs
    /// at least 5 MiB; tests use less to exercise multipart on small days).
    pub fn with_part_bytes(mut self, n: usize) -> Self {
        self.part_bytes = n.max(1);
        self
    }

    /// Sets the whole-object retries.
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// The URL without credentials.
    pub fn display(&self) -> &str {
        &self.display
    }

    fn path(&self, key: &str) -> Path {
        key.split('/')
            .fold(self.prefix.clone(), |p, part| p.child(part))
    }

    /// Writes and deletes a small object under the prefix, so that a wrong URL,
    /// missing credentials or an unreachable endpoint show up at start, not at the
    /// first scheduled dump.
    pub async fn probe(&self, node: &str) -> Result<(), ExportError> {
        let key = format!(".milepost-probe-{node}-{}", rand::random::<u32>());
        let path = self.path(&key);
        let fail = |e: object_store::Error| ExportError::Unusable {
            url: self.display.clone(),
            source: e,
        };
        self.store
            .put(&path, PutPayload::from_static(b"probe"))
            .await
            .map_err(fail)?;
        self.store.delete(&path).await.map_err(fail)?;
        Ok(())
    }

    /// Uploads a local file to `key`, hashing it on the way. Small files are one
    /// PUT, large ones a multipart upload; either way the object appears under its
    /// name only once complete, and a failed multipart upload is aborted. Retried
    /// with backoff; [`ExportError::Exists`] is final (a retry after an attempt whose
    /// answer was lost may see the object that attempt wrote: the caller checks whose
    /// it is).
    pub async fn upload_file(
        &self,
        file: &FsPath,
        key: &str,
        mode: WriteMode,
    ) -> Result<Uploaded, ExportError> {
        let mut wait = self.retry.backoff;
        let mut attempt = 1;
        loop {
            match self.upload_once(file, key, mode).await {
                Ok(u) => return Ok(u),
                Err(e @ ExportError::Exists { .. }) => return Err(e),
                Err(e) if attempt < self.retry.attempts => {
                    tracing::warn!(key, attempt, error = %e, "upload failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn upload_once(
        &self,
        file: &FsPath,
        key: &str,
        mode: WriteMode,
    ) -> Result<Uploaded, ExportError> {
        let mut src = tokio::fs::File::open(file).await.map_err(ExportError::Io)?;
        let size = src.metadata().await.map_err(ExportError::Io)?.len();
        let path = self.path(key);
        let fail = |e: object_store::Error| ExportError::Store {
            key: key.to_owned(),
            source: e,
        };
        let mut hash = Sha256::new();
        if size <= self.part_bytes as u64 {
            let mut body = Vec::with_capacity(size as usize);
            src.read_to_end(&mut body).await.map_err(ExportError::Io)?;
            hash.update(&body);
            let bytes = body.len() as u64;
            self.put_mode(key, PutPayload::from(body), mode).await?;
            return Ok(Uploaded {
                bytes,
                sha256: hex::encode(hash.finalize()),
            });
        }
        // Multipart: parts of `part_bytes`, at most PARTS_IN_FLIGHT of them buffered
        // or in flight. The object exists under its name only once the upload is
        // completed; on any failure it is aborted, which discards the parts sent.
        let mut upload = self.store.put_multipart(&path).await.map_err(fail)?;
        let mut in_flight: FuturesUnordered<object_store::UploadPart> = FuturesUnordered::new();
        let mut bytes = 0u64;
        let sent: Result<(), ExportError> = async {
            loop {
                let mut part = Vec::with_capacity(self.part_bytes);
                while part.len() < self.part_bytes {
                    let n = (&mut src)
                        .take((self.part_bytes - part.len()) as u64)
                        .read_to_end(&mut part)
                        .await
                        .map_err(ExportError::Io)?;
                    if n == 0 {
                        break;
                    }
                }
                if part.is_empty() {
                    break;
                }
                hash.update(&part);
                bytes += part.len() as u64;
                while in_flight.len() >= PARTS_IN_FLIGHT {
                    in_flight.next().await.expect("non-empty").map_err(fail)?;
                }
                in_flight.push(upload.put_part(PutPayload::from(part)));
            }
            while let Some(done) = in_flight.next().await {
                done.map_err(fail)?;
            }
            upload.complete().await.map(|_| ()).map_err(fail)
        }
        .await;
        if let Err(e) = sent {
            drop(in_flight);
            if let Err(abort) = upload.abort().await {
                tracing::warn!(key, error = %abort, "aborting a failed multipart upload failed");
            }
            return Err(e);
        }
        Ok(Uploaded {
            bytes,
            sha256: hex::encode(hash.finalize()),
        })
    }

    /// Writes a small object in one PUT (atomic on every store).
    pub async fn put(&self, key: &str, body: Bytes, mode: WriteMode) -> Result<(), ExportError> {
        self.put_mode(key, PutPayload::from_bytes(body), mode).await
    }

    async fn put_mode(
        &self,
        key: &str,
        body: PutPayload,
        mode: WriteMode,
    ) -> Result<(), ExportError> {
        let path = self.path(key);
        let fail = |e: object_store::Error| ExportError::Store {
            key: key.to_owned(),
            source: e,
        };
        if mode == WriteMode::Create {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match self.store.put_opts(&path, body.clone(), opts).await {
                Ok(_) => return Ok(()),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    return Err(ExportError::Exists {
                        key: key.to_owned(),
                    });
                }
                // No conditional writes here (an S3-compatible store without
                // If-None-Match, `AWS_CONDITIONAL_PUT=disabled`): a plain write.
                Err(object_store::Error::NotImplemented) => {}
                Err(e) => return Err(fail(e)),
            }
        }
        self.store.put(&path, body).await.map(|_| ()).map_err(fail)
    }

    /// Size of the object at `key`; `None` when there is none.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, ExportError> {
        match self.store.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(ExportError::Store {
                key: key.to_owned(),
                source: e,
            }),
        }
    }

    /// Bytes `range` of the object at `key`.
    pub async fn read_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, ExportError> {
        self.store
            .get_range(&self.path(key), range)
            .await
            .map_err(|e| ExportError::Store {
                key: key.to_owned(),
                source: e,
            })
    }

    /// Keys (relative to the prefix) of every object under `folder`.
    pub async fn list(&self, folder: &str) -> Result<Vec<String>, ExportError> {
        let base = self.path(folder);
        let fail = |e: object_store::Error| ExportError::Store {
            key: format!("{folder}/"),
            source: e,
        };
        let metas: Vec<_> = self
            .store
            .list(Some(&base))
            .try_collect()
            .await
            .map_err(fail)?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let rest: Vec<_> = m.location.prefix_match(&self.prefix)?.collect();
                Some(
                    rest.iter()
                        .map(|p| p.as_ref())
                        .collect::<Vec<_>>()
                        .join("/"),
                )
            })
            .collect())
    }

    /// Deletes the object at `key`; one that is not there is fine.
    pub async fn delete(&self, key: &str) -> Result<(), ExportError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(ExportError::Store {
                key: key.to_owned(),
                source: e,
            }),
        }
    }

    /// Streams an object; `None` when it does not exist.
    pub async fn get(
        &self,
        key: &str,
    ) -> Result<Option<(u64, BoxStream<'static, std::io::Result<Bytes>>)>, ExportError> {
        match self.store.get(&self.path(key)).await {
            Ok(r) => {
                let size = r.meta.size;
                let stream = r.into_stream().map_err(std::io::Error::other).boxed();
                Ok(Some((size, stream)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(ExportError::Store {
                key: key.to_owned(),
                source: e,
            }),
        }
    }

    /// Reads a whole (small) object; `None` when it does not exist.
    pub async fn read(&self, key: &str) -> Result<Option<Bytes>, ExportError> {
        match self.store.get(&self.path(key)).await {
            Ok(r) => r.bytes().await.map(Some),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
        .map_err(|e| ExportError::Store {
            key: key.to_owned(),
            source: e,
        })
    }
}

fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig::default(),
        max_retries: 5,
        retry_timeout: Duration::from_secs(120),
    }
}

/// The URL as it may appear in logs: no user, password or query.
fn redact(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.to_string()
}
