//! `POST /ingest`: authenticate, stream the body through the NDJSON parser, hand
//! batches to the writer, answer once everything accepted is committed.

use std::pin::Pin;
use std::sync::Arc;

use async_compression::tokio::bufread::GzipDecoder;
use poem::http::header;
use poem::{Body, Request, RequestBody};
use poem_openapi::payload::Json;
use poem_openapi::registry::{MetaMediaType, MetaRequest, MetaSchema, MetaSchemaRef, Registry};
use poem_openapi::{ApiExtractor, ApiExtractorType, ApiResponse, ExtractParamOptions, Object};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

use super::AppState;
use super::auth::{AuthError, Grant};
use super::error::ErrorBody;
use crate::domain::Catalog;
use crate::ingest::{IngestOptions, StreamParser};
use crate::metrics::{Metrics, StatusLabel, UNKNOWN_SENSOR};
use crate::store::{Committed, PendingCommit, WriteError};

/// Readings handed to the writer at a time for large bodies. One request of 5 M
/// readings: 1.36 M/s with 64 Ki-row batches and 256 KiB reads, 1.91 M/s with these
/// (DuckDB's own load of the same file 2.5–2.7 M/s on the same 2 cores).
const BATCH_ROWS: usize = 256 * 1024;
/// Most bytes read from the body per parse step (parsed on every core).
const READ_CHUNK: usize = 1024 * 1024;
/// First read of a body of unknown size (chunked or gzip).
const FIRST_CHUNK: usize = 64 * 1024;
/// Requests with at least this many readings are logged at `info`, smaller ones
/// (a device's live readings) at `debug`.
const LOGGED_READINGS: u64 = 10_000;

/// Media types `POST /ingest` accepts: all carry NDJSON.
pub const INGEST_CONTENT_TYPES: [&str; 3] = [
    "application/x-ndjson",
    "application/stream+json",
    "application/json",
];

/// One refused line.
#[derive(Debug, Clone, Object)]
pub struct LineErrorBody {
    /// 1-based line number in the (decompressed) body.
    pub line: u64,
    /// Why it was refused.
    pub error: String,
}

/// Outcome of an ingest request. `errors` lists the first 100 refused lines; the
/// counts are always exact.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct IngestSummary {
    /// Readings newly stored.
    pub accepted: u64,
    /// Readings whose (device, sensor, timestamp) was already stored; dropped.
    pub duplicates: u64,
    /// Lines refused.
    pub rejected: u64,
    /// The first refused lines with reasons.
    pub errors: Vec<LineErrorBody>,
    /// Set when the request as a whole failed part-way (body too large, broken gzip);
    /// the counts say what was committed before that.
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<String>,
}

impl IngestSummary {
    /// Nothing read: the request failed as a whole.
    fn failed(error: impl Into<String>) -> Self {
        Self {
            accepted: 0,
            duplicates: 0,
            rejected: 0,
            errors: Vec::new(),
            error: Some(error.into()),
        }
    }
}

impl poem_openapi::types::Example for IngestSummary {
    fn example() -> Self {
        Self {
            accepted: 2,
            duplicates: 1,
            rejected: 1,
            errors: vec![LineErrorBody {
                line: 3,
                error: "unknown sensor 'warp'".into(),
            }],
            error: None,
        }
    }
}

/// Responses of `POST /ingest`.
#[derive(ApiResponse)]
pub enum IngestResponse {
    /// Every line was stored or was a duplicate.
    #[oai(status = 200)]
    Ok(Json<IngestSummary>),
    /// Some lines were refused (see `errors`); all other lines were stored.
    #[oai(status = 400)]
    Rejected(Json<IngestSummary>),
    /// Missing or invalid API key.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>, #[oai(header = "WWW-Authenticate")] String),
    /// Body larger than the configured limit (lines before the limit were stored), or
    /// lines longer than the line limit (listed in `errors`; all other lines stored).
    #[oai(status = 413)]
    TooLarge(Json<IngestSummary>),
    /// The body stalled: no byte arrived for `--body-read-timeout`. Lines received
    /// before the pause were stored (see the counts); re-send the rest.
    #[oai(status = 408)]
    Timeout(Json<IngestSummary>),
    /// Content type or encoding not supported.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// Storage failed; nothing of the failed batch was stored. Retry the request.
    #[oai(status = 500)]
    StorageFailed(Json<ErrorBody>),
    /// The writer is saturated or shutting down. Retry the whole request after
    /// `Retry-After` seconds; readings already stored count as duplicates then.
    #[oai(status = 503)]
    Busy(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
    /// The disk holding the data directory is full: nothing of the failed batch was
    /// stored (earlier batches of a large body may have been). Retry the whole
    /// request after `Retry-After` seconds; the server accepts again once space is
    /// freed, without a restart.
    #[oai(status = 507)]
    InsufficientStorage(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
    /// This client address has `--max-ingest-per-client` requests in flight already
    /// (nothing was read: `error` says so), or the request named devices new to the
    /// server beyond its API key's `--max-new-devices-per-key` (those lines are in
    /// `errors`; all other lines were stored). Retry after `Retry-After` seconds;
    /// readings already stored count as duplicates then.
    #[oai(status = 429)]
    TooManyRequests(Json<IngestSummary>, #[oai(header = "Retry-After")] u64),
}

/// The raw request body of `POST /ingest`. Content type and encoding are checked by
/// the handler after authentication, so that an unauthenticated client learns nothing.
pub struct IngestBody(pub Body);

impl<'a> ApiExtractor<'a> for IngestBody {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(_registry: &mut Registry) {}

    fn request_meta() -> Option<MetaRequest> {
        let schema = MetaSchemaRef::Inline(Box::new(MetaSchema {
            format: Some("binary"),
            description: Some(
                "Newline-delimited JSON readings, e.g. \
                 {\"sensor\": \"speed\", \"value\": 55.5, \"timestamp\": \"2012-04-23T18:25:43.511Z\"}; \
                 optional \"device\". May be gzip-compressed (Content-Encoding: gzip).",
            ),
            ..MetaSchema::new("string")
        }));
        Some(MetaRequest {
            description: None,
            content: INGEST_CONTENT_TYPES
                .iter()
                .map(|ct| MetaMediaType {
                    content_type: ct,
                    schema: schema.clone(),
                })
                .collect(),
            required: true,
        })
    }

    async fn from_request(
        _request: &'a Request,
        body: &mut RequestBody,
        _opts: ExtractParamOptions<()>,
    ) -> poem::Result<Self> {
        Ok(Self(body.take()?))
    }
}

fn unauthorized(e: AuthError) -> IngestResponse {
    IngestResponse::Unauthorized(
        Json(ErrorBody::new(e.to_string())),
        "Basic realm=\"milepost\"".to_owned(),
    )
}

fn unsupported(msg: String) -> IngestResponse {
    IngestResponse::UnsupportedMediaType(Json(ErrorBody::new(msg)))
}

/// Whether `req` is a `POST /ingest`: the request span and the fleet's fast path
/// single it out.
pub(super) fn is_ingest(req: &Request) -> bool {
    req.method() == poem::http::Method::POST && req.uri().path() == "/ingest"
}

/// Handles one ingest request and records its outcome in the metrics.
pub async fn handle(state: &Arc<AppState>, req: &Request, body: Body) -> IngestResponse {
    let started = std::time::Instant::now();
    let response = respond(state, req, body).await;
    let m = &state.metrics;
    m.ingest_seconds.observe(started.elapsed().as_secs_f64());
    m.ingest_requests
        .get_or_create(&StatusLabel {
            status: response.status(),
        })
        .inc();
    response
}

/// Every status `POST /ingest` answers with (see [`IngestResponse::status`]):
/// `milepost_ingest_requests_total` exports each of them from start, at 0.
pub const STATUSES: [u16; 10] = [200, 400, 401, 408, 413, 415, 429, 500, 503, 507];

impl IngestResponse {
    /// The HTTP status this response is sent with.
    fn status(&self) -> u16 {
        match self {
            Self::Ok(_) => 200,
            Self::Rejected(_) => 400,
            Self::Unauthorized(..) => 401,
            Self::Timeout(_) => 408,
            Self::TooLarge(_) => 413,
            Self::UnsupportedMediaType(_) => 415,
            Self::StorageFailed(_) => 500,
            Self::Busy(..) => 503,
            Self::InsufficientStorage(..) => 507,
            Self::TooManyRequests(..) => 429,
        }
    }
}

impl IngestResponse {
    /// The response as `into_response` builds it, with the summaries encoded
    /// directly: poem-openapi goes through a `serde_json::Value` (a map with its keys
    /// as strings) and builds its headers from strings, ~10 allocations of the ~64 a
    /// fleet's 6-reading request cost (heaptrack, 2,000 devices over 64
    /// connections). The bytes are the same (unit test
    /// `direct_answers_equal_poem_openapis`).
    pub fn into_direct_response(self) -> poem::Response {
        use poem::http::{HeaderValue, StatusCode};
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::OK);
        let summary = match self {
            Self::Ok(Json(s))
            | Self::Rejected(Json(s))
            | Self::TooLarge(Json(s))
            | Self::Timeout(Json(s)) => s,
            other => return poem::IntoResponse::into_response(other),
        };
        // Written into a `BytesMut`, whose `freeze` makes the body without the
        // copy or the extra allocation a `Vec` with spare capacity takes.
        let mut body = bytes::BufMut::writer(bytes::BytesMut::with_capacity(96));
        match serde_json::to_writer(&mut body, &SummaryWire(&summary)) {
            Ok(()) => poem::Response::builder()
                .status(status)
                .header(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json; charset=utf-8"),
                )
                .body(body.into_inner().freeze()),
            // Not reached (counts and strings always encode); poem-openapi's own way
            // then says what went wrong, with the same status.
            Err(_) => {
                let mut r = poem::IntoResponse::into_response(Json(summary));
                r.set_status(status);
                r
            }
        }
    }
}

/// [`IngestSummary`] as JSON with its keys in the order poem-openapi writes them
/// (sorted), skipping `error` when there is none.
struct SummaryWire<'a>(&'a IngestSummary);

impl serde::Serialize for SummaryWire<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq as _, SerializeStruct as _};
        struct Lines<'a>(&'a [LineErrorBody]);
        impl serde::Serialize for Lines<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.len()))?;
                for l in self.0 {
                    seq.serialize_element(&Line(l))?;
                }
                seq.end()
            }
        }
        struct Line<'a>(&'a LineErrorBody);
        impl serde::Serialize for Line<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut st = s.serialize_struct("LineErrorBody", 2)?;
                st.serialize_field("error", &self.0.error)?;
                st.serialize_field("line", &self.0.line)?;
                st.end()
            }
        }
        let v = self.0;
        let mut st = s.serialize_struct("IngestSummary", 5)?;
        st.serialize_field("accepted", &v.accepted)?;
        st.serialize_field("duplicates", &v.duplicates)?;
        if let Some(e) = &v.error {
            st.serialize_field("error", e)?;
        }
        st.serialize_field("errors", &Lines(&v.errors))?;
        st.serialize_field("rejected", &v.rejected)?;
        st.end()
    }
}

async fn respond(state: &Arc<AppState>, req: &Request, body: Body) -> IngestResponse {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let grant = match state.keys.authenticate(auth) {
        Ok(g) => g,
        Err(e) => return refuse_early(state, body, unauthorized(e)).await,
    };
    // Held until the answer: one client cannot hold every writer slot.
    let _slot = match req.remote_addr().as_socket_addr() {
        Some(peer) => match state.limits.ingest_slots.take(peer.ip()) {
            Some(slot) => Some(slot),
            None => {
                let refusal = IngestResponse::TooManyRequests(
                    Json(IngestSummary::failed(
                        "too many ingest requests in flight from this address; retry later",
                    )),
                    1,
                );
                return refuse_early(state, body, refusal).await;
            }
        },
        None => None,
    };

    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if !INGEST_CONTENT_TYPES.contains(&essence.as_str()) {
        let got = if content_type.is_empty() {
            "no Content-Type".to_owned()
        } else {
            format!("Content-Type '{content_type}'")
        };
        let refusal = unsupported(format!(
            "{got} is not supported: send NDJSON as {}",
            INGEST_CONTENT_TYPES.join(", ")
        ));
        return refuse_early(state, body, refusal).await;
    }
    let gzip = match req
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("identity") => false,
        Some("gzip") | Some("x-gzip") => true,
        Some(other) => {
            let refusal = unsupported(format!(
                "Content-Encoding '{other}' is not supported: use gzip or none"
            ));
            return refuse_early(state, body, refusal).await;
        }
    };
    let limits = &state.limits;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes) {
        return IngestResponse::TooLarge(Json(IngestSummary::failed(too_large(
            limits.max_body_bytes,
        ))));
    }

    let raw = body.into_async_read();
    let mut reader: Pin<Box<dyn AsyncRead + Send>> = if gzip {
        let mut d = GzipDecoder::new(BufReader::new(raw));
        d.multiple_members(true);
        Box::pin(d)
    } else {
        Box::pin(raw)
    };

    let owner = grant.key.0;
    let parser = StreamParser::new(state.reads.catalog(), options(state, grant));
    let run = Ingestion {
        state,
        owner,
        parser,
        total: Committed::default(),
        pending: None,
    };
    // A small body is read into a buffer of its size: zeroing a 256 KiB buffer per
    // request was a quarter of the server's CPU time under a fleet of small requests.
    // Bodies of unknown size start small and grow while they keep coming, so
    // that many slow uploads do not each hold a megabyte.
    let chunk = match declared {
        Some(n) if !gzip => (n as usize).clamp(1, READ_CHUNK),
        _ => FIRST_CHUNK,
    };
    run.drive(&mut reader, gzip, chunk).await
}

/// Most body bytes read and dropped before an early refusal is answered.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

/// Reads and drops the body of a request refused before its body was needed (no or a
/// wrong key, a wrong content type), then answers. Answering first and closing the
/// connection with the body unread makes the kernel reset it, and a client still
/// sending loses the answer: it saw "connection reset" or "broken pipe" instead of
/// 401. Draining keeps the connection usable too. Bodies over [`DRAIN_LIMIT`], or
/// that stall, are not waited for (the connection is then closed after the answer).
async fn refuse_early(state: &AppState, body: Body, refusal: IngestResponse) -> IngestResponse {
    let limit = DRAIN_LIMIT.min(state.limits.max_body_bytes);
    let mut reader = body.into_async_read();
    let mut scratch = vec![0u8; 16 * 1024];
    let mut read = 0u64;
    while read <= limit {
        match tokio::time::timeout(state.limits.body_read_timeout, reader.read(&mut scratch)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => read += n as u64,
        }
    }
    refusal
}

/// Refused lines per sensor; lines that named no catalogued sensor count as `unknown`.
fn count_rejected(metrics: &Metrics, catalog: &Catalog, parser: &StreamParser) {
    if parser.rejected() > 0 {
        // A few reasons a request for the console's system page.
        metrics
            .recent_errors
            .record(parser.errors().iter().take(3).map(|e| e.error.as_str()));
    }
    let mut named = 0;
    for (id, n) in parser.rejected_by_sensor() {
        named += n;
        let name = catalog
            .by_id(*id)
            .map_or(UNKNOWN_SENSOR, |s| s.name.as_str());
        Metrics::add(&metrics.readings_rejected, name, *n);
    }
    Metrics::add(
        &metrics.readings_rejected,
        UNKNOWN_SENSOR,
        parser.rejected() - named,
    );
}

fn options(state: &AppState, grant: Grant) -> IngestOptions {
    IngestOptions {
        latest: crate::domain::Timestamp::now().plus(state.limits.max_future_skew),
        max_line_bytes: state.limits.max_line_bytes,
        bound_device: grant.device,
        gate: state.admission.as_ref().map(|a| a.gate(grant.key)),
    }
}

fn too_large(limit: u64) -> String {
    format!("request body exceeds the limit of {limit} bytes; split it into smaller requests")
}

fn summary(p: &StreamParser, c: Committed, error: Option<String>) -> IngestSummary {
    IngestSummary {
        accepted: c.accepted,
        duplicates: c.duplicates,
        rejected: p.rejected(),
        errors: p
            .errors()
            .iter()
            .map(|e| LineErrorBody {
                line: e.line,
                error: e.error.clone(),
            })
            .collect(),
        error,
    }
}

/// Read buffers of [`READ_CHUNK`] bytes kept for the next large body, at most
/// [`KEPT_BUFFERS`], dropped by [`release_body_buffers`] every few seconds.
///
/// Why: a buffer this large is a fresh `mmap` for glibc's malloc once its mmap
/// threshold is fixed (see [`crate::jobs::configure_malloc`]), and filling it
/// faulted in its 256 pages for every 10,000-line request: half the page faults of
/// a bulk load, which ran ~15 % slower (10 M readings: 4.24 against 5.0 M
/// readings/s); with the buffers kept, 4.8–5.0 (docs/performance.md, session 28).
static BODY_BUFFERS: BufferPool = BufferPool::new();
/// Large bodies read at once that keep their buffers: more large bodies at once
/// still work, with buffers of their own.
const KEPT_BUFFERS: usize = 4;
/// Buffers at least this large come from [`BODY_BUFFERS`] (smaller ones are cheap
/// to allocate: they come from malloc's arenas).
const POOLED_FROM: usize = crate::jobs::MMAP_THRESHOLD;

/// Drops the kept read buffers (the memory job, every few seconds: a server that
/// took one bulk load does not hold them while idle).
pub fn release_body_buffers() {
    BODY_BUFFERS.clear();
}

/// Buffers of [`READ_CHUNK`] bytes for reuse.
struct BufferPool(std::sync::Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    const fn new() -> Self {
        Self(std::sync::Mutex::new(Vec::new()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self) -> Vec<u8> {
        let kept = self.lock().pop();
        kept.unwrap_or_else(|| vec![0; READ_CHUNK])
    }

    fn give(&self, buf: Vec<u8>) {
        if buf.len() == READ_CHUNK {
            let mut kept = self.lock();
            if kept.len() < KEPT_BUFFERS {
                kept.push(buf);
            }
        }
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

/// A body's read buffer: `len` bytes of `buf` are in use. Large ones come from, and
/// go back to, a [`BufferPool`].
struct ReadBuf {
    buf: Vec<u8>,
    len: usize,
    pool: &'static BufferPool,
}

impl ReadBuf {
    fn new(len: usize, pool: &'static BufferPool) -> Self {
        let mut b = Self {
            buf: Vec::new(),
            len: 0,
            pool,
        };
        b.resize(len);
        b
    }

    /// Makes `len` (at most [`READ_CHUNK`]) bytes usable; what they hold is not
    /// kept (each read fills the buffer anew).
    fn resize(&mut self, len: usize) {
        debug_assert!(len <= READ_CHUNK);
        if len > self.buf.len() {
            if len >= POOLED_FROM {
                let old = std::mem::replace(&mut self.buf, self.pool.take());
                self.pool.give(old);
            } else {
                self.buf.resize(len, 0);
            }
        }
        self.len = len;
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for ReadBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

/// Reads until `buf` is full or the body ends (or fails: the error comes with the
/// bytes read before it). Whatever sizes the body arrives in — HTTP frames, or
/// inflate's output — parse steps and hops to the blocking pool stay few and large.
async fn fill(
    reader: &mut Pin<Box<dyn AsyncRead + Send>>,
    buf: &mut [u8],
    stall: std::time::Duration,
) -> (usize, Option<std::io::Error>) {
    let mut filled = 0;
    while filled < buf.len() {
        match tokio::time::timeout(stall, reader.read(&mut buf[filled..])).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => filled += n,
            Ok(Err(e)) => return (filled, Some(e)),
            Err(_) => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no body data for {} s (--body-read-timeout)",
                        stall.as_secs_f64()
                    ),
                );
                return (filled, Some(e));
            }
        }
    }
    (filled, None)
}

/// Why a body was not read to its end.
enum Failure {
    /// Past `--max-body-bytes`.
    TooLarge,
    /// Broken gzip or a failed read.
    Broken,
    /// No data for `--body-read-timeout`.
    Stalled,
}

/// One request's progress: at most one batch in the writer while the next is parsed.
struct Ingestion<'a> {
    state: &'a Arc<AppState>,
    /// The request's API key (its id): it owns the devices the request brings in.
    owner: u64,
    parser: StreamParser,
    total: Committed,
    pending: Option<PendingCommit>,
}

impl Ingestion<'_> {
    async fn drive(
        mut self,
        reader: &mut Pin<Box<dyn AsyncRead + Send>>,
        gzip: bool,
        chunk: usize,
    ) -> IngestResponse {
        let max_body = self.state.limits.max_body_bytes;
        let mut read = 0u64;
        let mut buf = ReadBuf::new(chunk, &BODY_BUFFERS);
        let mut failure: Option<(Failure, String)> = None;
        loop {
            let (filled, error) = fill(reader, &mut buf, self.state.limits.body_read_timeout).await;
            read += filled as u64;
            // Lines wholly before the limit are still stored.
            let over = read.saturating_sub(max_body) as usize;
            let n = filled - over.min(filled);
            if n >= 16 * 1024 {
                // Big chunks are parsed off the async executor, on every core.
                let mut parser = self.parser;
                let span = tracing::Span::current();
                let parts = self.state.limits.parse_threads;
                let (p, b) = tokio::task::spawn_blocking(move || {
                    span.in_scope(|| parser.feed_parallel(&buf[..n], parts));
                    (parser, buf)
                })
                .await
                .expect("parser does not panic");
                self.parser = p;
                buf = b;
            } else {
                self.parser.feed(&buf[..n]);
            }
            if self.parser.pending() >= BATCH_ROWS
                && let Err(r) = self.flush().await
            {
                return self.answer(r);
            }
            if over > 0 {
                failure = Some((Failure::TooLarge, too_large(max_body)));
                break;
            }
            if let Some(e) = error {
                failure = Some(if e.kind() == std::io::ErrorKind::TimedOut {
                    (Failure::Stalled, format!("request body stalled: {e}"))
                } else if gzip {
                    (
                        Failure::Broken,
                        format!("request body is not valid gzip: {e}"),
                    )
                } else {
                    (Failure::Broken, format!("error reading request body: {e}"))
                });
                break;
            }
            if filled < buf.len() {
                break; // end of body
            }
            if buf.len() < READ_CHUNK {
                buf.resize((buf.len() * 4).min(READ_CHUNK));
            }
        }
        if failure.is_none() {
            self.parser.finish();
        }
        if let Err(r) = self.flush().await {
            return self.answer(r);
        }
        if let Err(r) = self.settle().await {
            return self.answer(r);
        }
        let done = summary(
            &self.parser,
            self.total,
            failure.as_ref().map(|f| f.1.clone()),
        );
        // A fleet sends tens of thousands of small requests a second: one log line
        // each was 200 MB of log in 40 s and ~10 % of the server's CPU (formatting and
        // a write per line). Small clean requests are logged at `debug`; a request
        // with refused lines, or a large upload, at `info`.
        if done.rejected > 0 || done.accepted + done.duplicates >= LOGGED_READINGS {
            tracing::info!(
                accepted = done.accepted,
                duplicates = done.duplicates,
                rejected = done.rejected,
                "ingest request done"
            );
        } else {
            tracing::debug!(
                accepted = done.accepted,
                duplicates = done.duplicates,
                "ingest request done"
            );
        }
        let rate_limited = self.parser.rate_limited();
        let response = match failure {
            Some((Failure::TooLarge, _)) => IngestResponse::TooLarge(Json(done)),
            Some((Failure::Broken, _)) => IngestResponse::Rejected(Json(done)),
            Some((Failure::Stalled, _)) => IngestResponse::Timeout(Json(done)),
            None if self.parser.oversize_lines() > 0 => IngestResponse::TooLarge(Json(done)),
            None if rate_limited.is_some() => {
                IngestResponse::TooManyRequests(Json(done), rate_limited.unwrap_or(1))
            }
            None if done.rejected > 0 => IngestResponse::Rejected(Json(done)),
            None => IngestResponse::Ok(Json(done)),
        };
        self.answer(response)
    }

    /// Every way out of [`Self::drive`]: counts the refused lines, then answers.
    fn answer(&self, response: IngestResponse) -> IngestResponse {
        count_rejected(
            &self.state.metrics,
            &self.state.reads.catalog(),
            &self.parser,
        );
        response
    }

    /// Hands the parsed readings to the writer, after the previous batch committed.
    async fn flush(&mut self) -> Result<(), IngestResponse> {
        let batch = self.parser.take_batch();
        if batch.is_empty() {
            return Ok(());
        }
        self.settle().await?;
        match self
            .state
            .writer
            .submit_owned(batch, Some(self.owner))
            .await
        {
            Ok(p) => {
                self.pending = Some(p);
                Ok(())
            }
            Err(e) => Err(write_failed(e)),
        }
    }

    /// Waits for the batch in flight.
    async fn settle(&mut self) -> Result<(), IngestResponse> {
        if let Some(p) = self.pending.take() {
            match p.wait().await {
                Ok(c) => {
                    self.total.accepted += c.accepted;
                    self.total.duplicates += c.duplicates;
                }
                Err(e) => return Err(write_failed(e)),
            }
        }
        Ok(())
    }
}

/// Seconds a client is asked to wait after a 507: freeing disk space takes a person.
const DISK_FULL_RETRY_AFTER: u64 = 30;

fn write_failed(e: WriteError) -> IngestResponse {
    match e {
        WriteError::Overloaded => IngestResponse::Busy(Json(ErrorBody::new(e.to_string())), 1),
        WriteError::Stopped => IngestResponse::Busy(Json(ErrorBody::new(e.to_string())), 5),
        // The writer logs it (throttled): a full disk must not also fill the log.
        WriteError::DiskFull => IngestResponse::InsufficientStorage(
            Json(ErrorBody::new(format!("{e}; retry later"))),
            DISK_FULL_RETRY_AFTER,
        ),
        WriteError::Failed(_) => {
            tracing::error!(error = %e, "ingest commit failed");
            IngestResponse::StorageFailed(Json(ErrorBody::new(
                "storing the readings failed; nothing of this batch was stored, retry the request",
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large read buffers are reused, at most [`KEPT_BUFFERS`] of them, and dropped
    /// by a release; small ones are the body's size and never kept.
    #[test]
    fn large_read_buffers_are_reused_within_a_bound() {
        let pool: &'static BufferPool = Box::leak(Box::new(BufferPool::new()));
        let small = ReadBuf::new(600, pool);
        assert_eq!((small.len(), small.buf.len()), (600, 600));
        drop(small);
        assert!(pool.lock().is_empty());

        let mut first = ReadBuf::new(POOLED_FROM, pool);
        assert_eq!((first.len(), first.buf.len()), (POOLED_FROM, READ_CHUNK));
        first[POOLED_FROM - 1] = 7;
        let at = first.buf.as_ptr();
        drop(first);
        let mut again = ReadBuf::new(64 * 1024, pool);
        assert_eq!(again.len(), 64 * 1024, "small: not from the pool");
        again.resize(4 * 64 * 1024);
        assert_eq!(
            again.buf.as_ptr(),
            at,
            "grown past the threshold: the kept one"
        );
        assert_eq!(again.len(), 256 * 1024);

        let many: Vec<ReadBuf> = (0..KEPT_BUFFERS + 2)
            .map(|_| ReadBuf::new(READ_CHUNK, pool))
            .collect();
        drop(many);
        drop(again);
        assert_eq!(pool.lock().len(), KEPT_BUFFERS);
        pool.clear();
        assert!(pool.lock().is_empty());
    }

    fn summary(errors: usize, error: Option<&str>) -> IngestSummary {
        IngestSummary {
            accepted: 6,
            duplicates: 2,
            rejected: errors as u64,
            errors: (0..errors)
                .map(|i| LineErrorBody {
                    line: i as u64 + 3,
                    error: format!("unknown sensor \"w\\arp{i}\" ü"),
                })
                .collect(),
            error: error.map(str::to_owned),
        }
    }

    async fn parts(r: poem::Response) -> (u16, Option<String>, Vec<u8>) {
        let ct = r
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let status = r.status().as_u16();
        (status, ct, r.into_body().into_vec().await.unwrap())
    }

    /// The direct encoding is byte for byte poem-openapi's, for every summary status.
    #[tokio::test]
    async fn direct_answers_equal_poem_openapis() {
        let cases = [
            summary(0, None),
            summary(2, None),
            summary(1, Some("body larger than 1 MiB")),
            summary(0, Some("the body stalled")),
        ];
        for s in cases {
            let make: [fn(IngestSummary) -> IngestResponse; 4] = [
                |s| IngestResponse::Ok(Json(s)),
                |s| IngestResponse::Rejected(Json(s)),
                |s| IngestResponse::TooLarge(Json(s)),
                |s| IngestResponse::Timeout(Json(s)),
            ];
            for m in make {
                let direct = parts(m(s.clone()).into_direct_response()).await;
                let poem = parts(poem::IntoResponse::into_response(m(s.clone()))).await;
                assert_eq!(
                    String::from_utf8_lossy(&direct.2),
                    String::from_utf8_lossy(&poem.2)
                );
                assert_eq!(direct, poem);
            }
        }
        // Responses with headers of their own go poem-openapi's way.
        let busy = IngestResponse::Busy(Json(ErrorBody::new("busy")), 3).into_direct_response();
        assert_eq!(busy.status().as_u16(), 503);
        assert_eq!(busy.headers().get(header::RETRY_AFTER).unwrap(), "3");
    }
}
