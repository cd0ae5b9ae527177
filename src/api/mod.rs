//! Public HTTP API (poem + poem-openapi). Thin: decode, call the store or writer,
//! encode. Errors become JSON in [`error`], once.

pub mod auth;
pub mod error;
mod etag;
pub mod ingest;
pub mod seed;

use std::path::PathBuf;
use std::sync::Arc;

use poem::endpoint::StaticFilesEndpoint;
use poem::middleware::Tracing;
use poem::web::Data;
use poem::{Endpoint, EndpointExt, IntoEndpoint, Request, Response, Route};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, OpenApiService, Tags};

pub use auth::ApiKeys;
use error::ApiError;
use ingest::{IngestBody, IngestResponse};
use seed::{LatestLocation, LatestStatistics, Statistic, Status};

use crate::domain::Device;
use crate::store::{ReadStore, WriterHandle};

/// Request limits of `POST /ingest`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest (decompressed) body.
    pub max_body_bytes: u64,
    /// Longest line.
    pub max_line_bytes: usize,
    /// How far in the future a timestamp may be.
    pub max_future_skew: chrono::Duration,
}

/// Everything handlers need, behind traits and handles (no DuckDB types).
pub struct AppState {
    /// Queries.
    pub reads: Arc<dyn ReadStore>,
    /// Ingest.
    pub writer: WriterHandle,
    /// Valid API keys.
    pub keys: ApiKeys,
    /// Ingest limits.
    pub limits: Limits,
    /// Device of reads that name none (`--default-device`).
    pub default_device: Device,
}

#[derive(Tags)]
enum Tag {
    /// Sending readings.
    Ingest,
    /// Endpoints the cloud-lada dashboard polls (wire-compatible with the seed).
    Dashboard,
    /// Liveness and readiness.
    Operations,
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

type ApiResult<T> = Result<Json<T>, ApiError>;

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
        let device = seed::device_param(&state, device.0)?;
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
        let device = seed::device_param(&state, device.0)?;
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
        let device = seed::device_param(&state, device.0)?;
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
        let device = seed::device_param(&state, device.0)?;
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
}

fn service() -> OpenApiService<PublicApi, ()> {
    OpenApiService::new(PublicApi, "Milepost", env!("CARGO_PKG_VERSION"))
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

/// The complete HTTP application.
pub fn app(
    state: Arc<AppState>,
    dashboard_dir: Option<PathBuf>,
) -> impl Endpoint<Output = Response> {
    let service = service();
    let spec = service.spec_endpoint();
    let docs = service.swagger_ui();
    let api = Route::new()
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .nest("/", service)
        .around(etag::revalidate)
        .data(state)
        .catch_all_error(error::to_json)
        .map_to_response();
    let api = Arc::new(api);
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
        let api = api.clone();
        let dashboard = dashboard.clone();
        async move {
            let path = req.uri().path();
            let is_api = API_PREFIXES.iter().any(|p| {
                path == *p
                    || path
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with('/'))
            });
            match dashboard {
                Some(d) if !is_api => d.get_response(req).await,
                _ => api.get_response(req).await,
            }
        }
    })
    .with(Tracing)
    .into_endpoint()
}
