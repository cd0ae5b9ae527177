//! The built-in console: server-rendered HTML (maud) over what the public API reads —
//! devices, live values, charts, the track, anomalies, dumps and the system's state —
//! with its CSS and a few lines of JavaScript embedded in the binary. Read-only.
//!
//! Every page renders without JavaScript; the script only sets `?tz=` from the
//! browser's zone and refreshes the live parts every 10 s. Links are relative and
//! every page lives at the console's root (`device?name=…`, not `devices/…`), so the
//! console works behind a reverse proxy under any prefix, and a device named `..`
//! is just a query value.

mod pages;
mod today;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use chrono_tz::Tz;
use poem::http::{StatusCode, header};
use poem::{Endpoint, IntoResponse, Request, Response};
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::params::tz_param;
use crate::domain::{Device, Timestamp};

/// Where the console lives and what its first-steps page says.
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    /// Its root path: `/`, or `/console/` when another dashboard takes `/`.
    pub base: &'static str,
    /// The API key file generated on first start, if keys were not configured.
    pub key_file: Option<PathBuf>,
    /// Whether the listener speaks TLS (for the copy-paste lines).
    pub tls: bool,
    /// When the server started (the system page's uptime).
    pub started: Instant,
}

/// The console's pages, below its root.
const PAGES: [&str; 6] = ["", "device", "anomalies", "dumps", "system", "spark.svg"];
const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// Whether `path` is the console's (its pages and assets).
pub fn serves(base: &str, path: &str) -> bool {
    if path == base.trim_end_matches('/') && base != "/" {
        return true;
    }
    path.strip_prefix(base)
        .is_some_and(|rest| PAGES.contains(&rest) || rest.starts_with("assets/"))
}

/// The console as an endpoint (only asked for paths [`serves`] accepts).
pub fn endpoint(
    state: Arc<AppState>,
    settings: ConsoleSettings,
) -> impl Endpoint<Output = Response> {
    let console = Arc::new(Console {
        settings,
        today: Arc::default(),
    });
    poem::endpoint::make(move |req: Request| {
        let (state, console) = (state.clone(), console.clone());
        async move { page(&state, &console, &req).await }
    })
}

/// The console's own state: its settings, and what it keeps between views.
struct Console {
    settings: ConsoleSettings,
    today: Arc<today::TodayCounts>,
}

/// A page that could not be shown, as an HTML page with this status.
#[derive(Debug)]
pub struct PageError {
    status: StatusCode,
    message: String,
}

impl PageError {
    fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "console: {what}");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("{what} failed; the server log says why"),
        }
    }
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        let (status, body) = match e {
            ApiError::BadRequest(b) => (StatusCode::BAD_REQUEST, b),
            ApiError::NotFound(b) => (StatusCode::NOT_FOUND, b),
            ApiError::NotAcceptable(b) => (StatusCode::NOT_ACCEPTABLE, b),
            ApiError::Internal(b) => (StatusCode::INTERNAL_SERVER_ERROR, b),
        };
        Self {
            status,
            message: body.0.error,
        }
    }
}

/// What every page needs to draw its links and times.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// `?tz=` as given (`None`: UTC).
    pub zone: Option<Tz>,
    /// From a page to the API's root (`""`, or `"../"` under `/console/`).
    pub api: &'static str,
    /// The server's address as the browser reached it, e.g. `http://host:8080`.
    pub origin: String,
}

impl Ctx {
    /// A console link to `page` with `params` and the time zone.
    pub fn href(&self, page: &str, params: &[(&str, &str)]) -> String {
        let page = if page.is_empty() { "./" } else { page };
        let tz = self.zone.map(|z| ("tz", z.name()));
        with_query(page, params.iter().copied().chain(tz))
    }

    /// An API link (relative to the page) with `params`.
    pub fn api_href(&self, path: &str, params: &[(&str, &str)]) -> String {
        let path = format!("{}{}", self.api, path.trim_start_matches('/'));
        with_query(&path, params.iter().copied())
    }

    /// A time in the page's zone.
    pub fn time(&self, t: Timestamp, fmt: &str) -> String {
        super::chart::render::local_time(t.as_micros() / 1000, self.zone, fmt)
    }

    /// The zone's name as shown.
    pub fn zone_name(&self) -> &'static str {
        self.zone.map_or("UTC", |z| z.name())
    }
}

/// `path?k=v&…`, empty values left out.
fn with_query<'a>(path: &str, params: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params.filter(|(_, v)| !v.is_empty()) {
        q.append_pair(k, v);
    }
    let q = q.finish();
    if q.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{q}")
    }
}

#[derive(Debug, Deserialize, Default)]
struct CommonQuery {
    tz: Option<String>,
}

async fn page(state: &Arc<AppState>, console: &Console, req: &Request) -> Response {
    let settings = &console.settings;
    let path = req.uri().path();
    if path == settings.base.trim_end_matches('/') && settings.base != "/" {
        let to = match req.uri().query() {
            Some(q) => format!("{}?{q}", settings.base),
            None => settings.base.to_owned(),
        };
        return poem::web::Redirect::permanent(to).into_response();
    }
    let rest = path
        .strip_prefix(settings.base)
        .unwrap_or_default()
        .to_owned();
    match rest.as_str() {
        "assets/console.css" => return asset(CSS, "text/css; charset=utf-8"),
        "assets/console.js" => return asset(JS, "text/javascript; charset=utf-8"),
        _ => {}
    }
    let common: CommonQuery = req.params().unwrap_or_default();
    let ctx = match tz_param(common.tz.as_deref()) {
        Ok(zone) => Ctx {
            zone,
            api: if settings.base == "/" { "" } else { "../" },
            origin: origin(req, settings.tls),
        },
        Err(e) => {
            let ctx = Ctx {
                zone: None,
                api: "",
                origin: String::new(),
            };
            return error_page(&ctx, PageError::from(e));
        }
    };
    if rest == "spark.svg" {
        return match req.params() {
            Ok(q) => match pages::device_sparkline(state, &ctx, q).await {
                Ok(svg) => Response::builder()
                    .content_type("image/svg+xml")
                    .header(header::CACHE_CONTROL, "no-cache")
                    .body(svg.into_string()),
                Err(e) => error_page(&ctx, e),
            },
            Err(e) => error_page(&ctx, PageError::bad_request(e.to_string())),
        };
    }
    let done = match rest.as_str() {
        "" => {
            let query = req.params().unwrap_or_default();
            pages::overview(state, settings, &console.today, &ctx, query).await
        }
        "device" => match req.params() {
            Ok(q) => pages::device(state, &ctx, q).await,
            Err(e) => Err(PageError::bad_request(e.to_string())),
        },
        "anomalies" => pages::anomalies(state, &ctx, req.params().unwrap_or_default()).await,
        "dumps" => pages::dumps(state, &ctx).await,
        "system" => pages::system(state, settings, &ctx).await,
        _ => Err(PageError::not_found(format!("no page {path}"))),
    };
    match done {
        Ok(html) => html_response(StatusCode::OK, html.into_string()),
        Err(e) => error_page(&ctx, e),
    }
}

fn error_page(ctx: &Ctx, e: PageError) -> Response {
    html_response(
        e.status,
        pages::error(ctx, e.status, &e.message).into_string(),
    )
}

fn html_response(status: StatusCode, body: String) -> Response {
    Response::builder()
        .status(status)
        .content_type("text/html; charset=utf-8")
        // Pages show live data; the browser must not reuse them.
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
}

fn asset(body: &'static str, content_type: &str) -> Response {
    Response::builder()
        .content_type(content_type)
        .header(header::CACHE_CONTROL, "public, max-age=3600")
        .body(body)
}

/// `scheme://host` as the browser reached the server (behind a proxy, as the proxy
/// says in `X-Forwarded-Proto`).
fn origin(req: &Request, tls: bool) -> String {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost:8080");
    let proto = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .unwrap_or(if tls { "https" } else { "http" });
    format!("{proto}://{host}")
}

/// A device named in a query: 404 page when it is not a valid name or never sent.
fn known_device(state: &AppState, name: &str) -> Result<Device, PageError> {
    let device =
        Device::parse(name).map_err(|_| PageError::not_found(format!("no device '{name}'")))?;
    if state.reads.device_id(&device).is_none() {
        return Err(PageError::not_found(format!(
            "no device '{name}' has sent readings"
        )));
    }
    Ok(device)
}
