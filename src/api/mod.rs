//! Public HTTP API (poem + poem-openapi). Thin: decode, call the store or writer,
//! encode. Errors become JSON in [`error`], once.

pub mod admission;
mod allow;
mod anomalies;
pub mod auth;
pub mod chart;
pub mod console;
mod dumps;
pub mod error;
mod etag;
pub mod ingest;
pub mod listener;
mod params;
mod readings;
pub mod seed;
pub mod slots;
mod sql;
pub mod stream;
mod trace;
mod track;
pub mod v1;

use std::path::PathBuf;
use std::sync::Arc;

use poem::endpoint::StaticFilesEndpoint;
use poem::http::{Method, header};
use poem::middleware::Cors;
use poem::web::Data;
use poem::{Endpoint, EndpointExt, IntoEndpoint, Request, Response, Route};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiResponse, Object, OpenApi, OpenApiService, Tags};

pub use auth::{ApiKeys, KeyRing};
use error::ApiError;
pub use ingest::release_body_buffers;
use ingest::{IngestBody, IngestResponse};
use seed::{LatestLocation, LatestStatistics, Statistic, Status};

use crate::domain::{Device, DeviceId};
use crate::metrics::Metrics;
use crate::store::{DeviceSummary, ReadStore, StoreError, WriterHandle};

/// Devices whose summaries a walk over every device reads at a time
/// ([`ReadStore::device_summaries`]): each page is one scan of the idle devices'
/// `series` rows, so pages are large (a million devices: 10 pages, ~1 s, vs 100
/// pages of 10,000 in 2.5 s), and ~9 MB each.
pub const DEVICE_PAGE: usize = 100_000;

/// Every device from `start` on with its summary, in pages of [`DEVICE_PAGE`], each
/// handed to `each` until it breaks (blocking: call from a blocking task). Memory
/// holds one page, however many devices there are.
pub(crate) fn walk_devices<B>(
    reads: &dyn ReadStore,
    mut start: DeviceId,
    mut each: impl FnMut(Vec<(DeviceId, Device, DeviceSummary)>) -> std::ops::ControlFlow<B>,
) -> Result<Option<B>, StoreError> {
    loop {
        let page = reads.device_summaries(start, DEVICE_PAGE)?;
        let Some(&(last, _, _)) = page.last() else {
            return Ok(None);
        };
        start = DeviceId(last.0 + 1);
        if let std::ops::ControlFlow::Break(b) = each(page) {
            return Ok(Some(b));
        }
    }
}

/// Request limits of `POST /ingest`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest (decompressed) body.
    pub max_body_bytes: u64,
    /// Longest line.
    pub max_line_bytes: usize,
    /// How far in the future a timestamp may be.
    pub max_future_skew: chrono::Duration,
    /// Threads one large body is parsed on (the machine's cores).
    pub parse_threads: usize,
    /// Longest pause in a body before the request is answered 408.
    pub body_read_timeout: std::time::Duration,
    /// `POST /ingest` requests in flight, per client address (429 over the cap).
    pub ingest_slots: Arc<slots::Slots>,
}

/// Everything handlers need, behind traits and handles (no DuckDB types).
pub struct AppState {
    /// Queries.
    pub reads: Arc<dyn ReadStore>,
    /// Anomalies step detection found (read-only here).
    pub alerts: Arc<crate::store::AlertStore>,
    /// Ingest.
    pub writer: WriterHandle,
    /// Counters and histograms behind `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The database file, for its size in `/metrics`.
    pub data_dir: crate::store::DataDir,
    /// Valid API keys (reloadable).
    pub keys: Arc<KeyRing>,
    /// Ingest limits.
    pub limits: Limits,
    /// Device of reads that name none (`--default-device`).
    pub default_device: Device,
    /// Daily dumps, when configured.
    pub dumps: Option<Arc<crate::export::Dumper>>,
    /// `--dump-public-url`: downloads redirect there.
    pub dump_public_url: Option<String>,
    /// Which new devices ingest lets in (`None`: all).
    pub admission: Option<Arc<admission::Admission>>,
    /// User SQL (`POST /api/v1/sql`), when the store offers it.
    pub sql: Option<Arc<crate::store::sql::SqlEngine>>,
    /// Who a bearer token is (its name), if it may run user SQL: the backend's
    /// tokens, wired in by the app.
    pub tokens: Option<TokenCheck>,
}

/// See [`AppState::tokens`].
pub type TokenCheck = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

#[derive(Tags)]
enum Tag {
    /// Sending readings.
    Ingest,
    /// Endpoints the cloud-lada dashboard polls (wire-compatible with the seed).
    Dashboard,
    /// Devices, sensors, statistics, raw readings and the GPS track.
    Readings,
    /// Daily dumps to blob storage (gzip NDJSON and the Parquet lake).
    Dumps,
    /// Liveness, readiness and metrics.
    Operations,
    /// Read-only SQL over the documented views.
    Sql,
}

/// The public API.
pub struct PublicApi;

/// Liveness / readiness answer.
#[derive(Debug, Clone, Object)]
pub struct Health {
    /// `ok`, or what is not ready.
    pub status: String,
}

#[derive(ApiResponse)]
enum ReadyResponse {
    /// Database open and writer running.
    #[oai(status = 200)]
    Ready(Json<Health>),
    /// Not ready to take traffic.
    #[oai(status = 503)]
    NotReady(Json<Health>),
}

#[derive(ApiResponse)]
enum MetricsResponse {
    /// Prometheus / OpenMetrics text exposition.
    #[oai(
        status = 200,
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    )]
    Ok(PlainText<String>),
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Runs a blocking store call off the async executor, inside the request's span.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let span = tracing::Span::current();
    match tokio::task::spawn_blocking(move || span.in_scope(f)).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => {
            tracing::error!(error = %e, "query task failed");
            Err(ApiError::internal())
        }
    }
}

#[OpenApi]
impl PublicApi {
    /// Ingest readings
    ///
    /// Streams NDJSON readings into the database. Authenticate with HTTP Basic where
    /// the username is an API key (`curl -u "$KEY:"`), or `Authorization: Bearer KEY`.
    /// Each line is judged on its own: bad lines are listed with their line number and
    /// all other lines are stored. The answer comes only after every accepted reading
    /// is committed. Re-sending readings is safe: a reading whose (device, sensor,
    /// timestamp) is already stored is counted as a duplicate and dropped.
    #[oai(path = "/ingest", method = "post", tag = "Tag::Ingest")]
    async fn ingest(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: IngestBody,
    ) -> IngestResponse {
        ingest::handle(&state, req, body.0).await
    }

    /// Latest sensor values
    ///
    /// The value of the newest reading of each car sensor, 0 where there is none.
    #[oai(
        path = "/api/statistics/latest",
        method = "get",
        tag = "Tag::Dashboard"
    )]
    async fn statistics_latest(
        &self,
        state: Data<&Arc<AppState>>,
        /// Device to read (default: the server's `--default-device`).
        device: Query<Option<String>>,
    ) -> ApiResult<LatestStatistics> {
        let device = params::device_param(&state, device.0)?;
        Ok(Json(seed::latest(&state, &device)))
    }

    /// Latest location
    ///
    /// The newest latitude and longitude readings, 0 where there is none.
    #[oai(path = "/api/location/latest", method = "get", tag = "Tag::Dashboard")]
    async fn location_latest(
        &self,
        state: Data<&Arc<AppState>>,
        /// Device to read (default: the server's `--default-device`).
        device: Query<Option<String>>,
    ) -> ApiResult<LatestLocation> {
        let device = params::device_param(&state, device.0)?;
        Ok(Json(seed::location(&state, &device)))
    }

    /// One day of a sensor in 15-minute averages
    ///
    /// 96 buckets of the UTC day `date` (or of the local day in `tz`: 92 or 100 on
    /// daylight-saving days), each the average of its readings, 0 when empty. Future
    /// dates are valid and all zeros.
    #[oai(
        path = "/api/statistics/sensor/:sensor/date/:date",
        method = "get",
        tag = "Tag::Dashboard"
    )]
    async fn statistics_day(
        &self,
        state: Data<&Arc<AppState>>,
        /// Sensor name, e.g. `speed`.
        sensor: Path<String>,
        /// Day, `YYYY-MM-DD`.
        date: Path<String>,
        /// IANA time zone of the day, e.g. `Europe/Berlin` (default UTC).
        tz: Query<Option<String>>,
        /// Device to read (default: the server's `--default-device`).
        device: Query<Option<String>>,
    ) -> ApiResult<Vec<Statistic>> {
        let device = params::device_param(&state, device.0)?;
        let stats = seed::day_chart(&state, device, &sensor.0, &date.0, tz.0.as_deref()).await?;
        Ok(Json(stats))
    }

    /// Ingest status
    ///
    /// Timestamp of the newest stored reading, `null` on an empty database.
    #[oai(path = "/api/status", method = "get", tag = "Tag::Dashboard")]
    async fn status(
        &self,
        state: Data<&Arc<AppState>>,
        /// Device to read (default: the server's `--default-device`).
        device: Query<Option<String>>,
    ) -> ApiResult<Status> {
        let device = params::device_param(&state, device.0)?;
        Ok(Json(seed::status(&state, &device)))
    }

    /// Liveness
    ///
    /// 200 while the process runs.
    #[oai(path = "/healthz", method = "get", tag = "Tag::Operations")]
    async fn healthz(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
        })
    }

    /// Readiness
    ///
    /// 200 when the database is open and the writer runs.
    #[oai(path = "/readyz", method = "get", tag = "Tag::Operations")]
    async fn readyz(&self, state: Data<&Arc<AppState>>) -> ReadyResponse {
        if state.writer.is_running() {
            ReadyResponse::Ready(Json(Health {
                status: "ok".into(),
            }))
        } else {
            ReadyResponse::NotReady(Json(Health {
                status: "writer stopped".into(),
            }))
        }
    }

    /// Prometheus metrics
    ///
    /// Readings accepted, duplicate and rejected per sensor, ingest requests and
    /// latency, group commit time, write queue depth, database size, stored readings.
    #[oai(path = "/metrics", method = "get", tag = "Tag::Operations")]
    async fn metrics(&self, state: Data<&Arc<AppState>>) -> MetricsResponse {
        let m = &state.metrics;
        m.queue_depth.set(state.writer.queue_depth() as i64);
        let lag = state.writer.apply_lag();
        m.unapplied_readings.set(lag.readings as i64);
        m.apply_lag_seconds.set(lag.seconds);
        m.database_bytes.set(state.data_dir.database_bytes() as i64);
        let totals = state.reads.totals();
        m.stored_readings.set(totals.readings as i64);
        m.devices.set(totals.devices as i64);
        m.live_slots_devices.set(totals.live_devices as i64);
        m.live_slots_bytes.set(totals.live_bytes as i64);
        m.series_bytes.set(totals.series_bytes as i64);
        m.series_devices_on_disk
            .set(totals.series_devices_on_disk as i64);
        if let Some(t) = totals.newest {
            m.last_reading_seconds.set(t.as_micros() as f64 / 1e6);
        }
        MetricsResponse::Ok(PlainText(m.render()))
    }
}

fn service() -> OpenApiService<
    (
        PublicApi,
        v1::V1Api,
        dumps::DumpsApi,
        anomalies::AnomaliesApi,
        chart::ChartsApi,
        sql::SqlApi,
    ),
    (),
> {
    OpenApiService::new(
        (
            PublicApi,
            v1::V1Api,
            dumps::DumpsApi,
            anomalies::AnomaliesApi,
            chart::ChartsApi,
            sql::SqlApi,
        ),
        "Milepost",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Self-hosted telemetry: NDJSON sensor readings into an embedded DuckDB, \
             statistics over HTTP. Wire-compatible with the cloud-lada devices and dashboard.",
    )
    .server("/")
}

/// The OpenAPI document the server serves at `/openapi.json`.
pub fn openapi_json() -> String {
    service().spec()
}

/// Paths that belong to the API and never to the dashboard's fallback.
const API_PREFIXES: [&str; 7] = [
    "/api",
    "/ingest",
    "/docs",
    "/openapi.json",
    "/metrics",
    "/healthz",
    "/readyz",
];

/// The complete HTTP application. `cors_origins` are the browser origins allowed to
/// call it cross-origin (`*` for any); empty means no CORS headers at all.
pub fn app(
    state: Arc<AppState>,
    dashboard_dir: Option<PathBuf>,
    cors_origins: Vec<String>,
    console: Option<console::ConsoleSettings>,
) -> impl Endpoint<Output = Response> {
    let console = console.map(|c| {
        (
            c.base,
            Arc::new(console::endpoint(state.clone(), c).boxed()),
        )
    });
    let service = service();
    let allow = Arc::new(allow::AllowedMethods::from_spec(
        &serde_json::from_str(&service.spec()).unwrap_or_default(),
    ));
    let spec = service.spec_endpoint();
    // Swagger UI, built when asked for. poem-openapi's own endpoint keeps the page
    // (its script and style with the spec inlined: 3.2 MB) for the life of the
    // process, measured with heaptrack; built per view it costs a few milliseconds
    // of a page people open rarely, and a small VM keeps the memory.
    let docs = Route::new().at(
        "/",
        poem::endpoint::make_sync(|_| poem::web::Html(self::service().swagger_ui_html())),
    );
    let ingest_state = state.clone();
    let api = Route::new()
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .nest("/", service)
        .around(etag::revalidate)
        .data(state)
        .catch_all_error(error::to_json)
        .map_to_response()
        .boxed();
    let api = Arc::new(api);
    // Requests from origins that are not allowed get no CORS headers (the browser then
    // withholds the answer) rather than an error: same-origin pages keep working.
    let allowed = cors_origins;
    let with_cors = (!allowed.is_empty())
        .then(|| Arc::new(api.clone().with(cors(&allowed)).map_to_response().boxed()));
    let dashboard = dashboard_dir.map(|dir| {
        Arc::new(
            StaticFilesEndpoint::new(dir)
                .index_file("index.html")
                .fallback_to_index()
                .catch_all_error(error::to_json)
                .map_to_response(),
        )
    });
    poem::endpoint::make(move |req: Request| {
        let origin_allowed = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .is_some_and(|o| allowed.iter().any(|a| a == "*" || a == o));
        let api = match &with_cors {
            Some(c) if origin_allowed => c.clone(),
            _ => api.clone(),
        };
        let dashboard = dashboard.clone();
        let console = console.clone();
        let state = ingest_state.clone();
        let allow = allow.clone();
        async move {
            // A fleet's small requests skip the routing and response layers of the
            // rest of the API (cross-origin ones keep them, for the CORS headers):
            // poem's nested routes, the ETag layer and the OpenAPI extractors were
            // several percent of a 6-reading request's CPU time. The handler and its
            // answers are the same as through `PublicApi::ingest`.
            if ingest::is_ingest(&req) && !origin_allowed {
                let (req, mut body) = req.split();
                let body = body.take().unwrap_or_default();
                return ingest::handle(&state, &req, body)
                    .await
                    .into_direct_response();
            }
            let path = req.uri().path();
            let is_api = API_PREFIXES.iter().any(|p| {
                path == *p
                    || path
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with('/'))
            });
            if let Some((base, console)) = console
                && !is_api
                && console::serves(base, path)
            {
                return console.get_response(req).await;
            }
            let path = path.to_owned();
            let resp = match dashboard {
                Some(d) if !is_api => d.get_response(req).await,
                _ => api.get_response(req).await,
            };
            allow.complete(&path, resp)
        }
    })
    .around(trace::request)
    .into_endpoint()
}

/// CORS for other browser clients: GETs of the read API and `POST /ingest`, with the
/// headers they need to send and the ones they may read (`ETag` for revalidation,
/// `X-Next-Cursor` for paging).
fn cors(origins: &[String]) -> Cors {
    let any = origins.iter().any(|o| o == "*");
    let cors = Cors::new()
        .allow_methods([Method::GET, Method::HEAD, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
            header::IF_NONE_MATCH,
            header::ACCEPT,
        ])
        .expose_headers([
            header::ETAG,
            header::RETRY_AFTER,
            header::HeaderName::from_static("x-next-cursor"),
        ])
        .max_age(3600);
    if any {
        cors
    } else {
        cors.allow_origins(origins.iter().map(String::as_str))
    }
}
