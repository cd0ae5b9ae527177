//! The console's pages: what each shows (read through the same traits as the API)
//! and its markup.

use std::sync::Arc;

use chrono::Duration;
use maud::{DOCTYPE, Markup, html};
use poem::http::StatusCode;
use serde::Deserialize;

use super::today::{DayCounter, TodayCounts};
use super::{ConsoleSettings, Ctx, PageError, known_device};
use crate::api::AppState;
use crate::domain::{
    Anomaly, AnomalyFilter, Catalog, Day, Device, DeviceId, SensorId, Step, TimeRange, Timestamp,
    TriageStatus,
};
use crate::store::SeriesStats;

/// Devices per overview page.
const PAGE_SIZE: usize = 20;
/// A device whose newest reading is older than this is called silent (the seed
/// dashboard warns after an hour).
const SILENT_AFTER: Duration = Duration::hours(1);
/// How late a live reading may arrive after its timestamp and still only extend
/// the overview's kept count of the day (see `today`).
const IN_FLIGHT: Duration = Duration::minutes(10);
/// Sensors drawn as the track rather than as charts.
const POSITION: [&str; 2] = ["location_latitude", "location_longitude"];

fn layout(ctx: &Ctx, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Milepost" }
                link rel="stylesheet" href="assets/console.css";
                script src="assets/console.js" defer {}
            }
            body {
                header {
                    a.brand href=(ctx.href("", &[])) { "Milepost" }
                    nav {
                        a href=(ctx.href("", &[])) { "Devices" }
                        a href=(ctx.href("anomalies", &[])) { "Anomalies" }
                        a href=(ctx.href("dumps", &[])) { "Dumps" }
                        a href=(ctx.href("system", &[])) { "System" }
                    }
                    span.zone title="Times on these pages" { (ctx.zone_name()) }
                }
                main { (body) }
            }
        }
    }
}

/// The page for an error (404 for a device or sensor that does not exist).
pub fn error(ctx: &Ctx, status: StatusCode, message: &str) -> Markup {
    let title = if status == StatusCode::NOT_FOUND {
        "Not found"
    } else {
        status.canonical_reason().unwrap_or("Error")
    };
    layout(
        ctx,
        title,
        html! {
            h1 { (title) }
            p.error { (message) }
            p { a href=(ctx.href("", &[])) { "Back to the devices" } }
        },
    )
}

/// `12 s ago`, `5 min ago`, `3 h ago`, `2 d ago`.
fn age(t: Timestamp, now: Timestamp) -> String {
    let s = (now.as_micros() - t.as_micros()) / 1_000_000;
    match s {
        s if s < 0 => "in the future".to_owned(),
        s if s < 90 => format!("{s} s ago"),
        s if s < 90 * 60 => format!("{} min ago", s / 60),
        s if s < 48 * 3600 => format!("{} h ago", s / 3600),
        s => format!("{} d ago", s / 86_400),
    }
}

/// A value with as many decimals as its size needs, and its unit.
fn value(v: f64, unit: &str) -> String {
    let a = v.abs();
    let n = if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if unit.is_empty() {
        n
    } else {
        format!("{n} {unit}")
    }
}

/// Readings per hour as a small inline SVG (a bar an hour).
fn sparkline(hours: &[u64]) -> Markup {
    let max = hours.iter().copied().max().unwrap_or(0).max(1) as f64;
    let (h, bar) = (24.0, 5.0);
    let w = hours.len() as f64 * bar;
    html! {
        svg.spark xmlns="http://www.w3.org/2000/svg" width=(w) height=(h) viewBox=(format!("0 0 {w} {h}")) role="img"
            aria-label=(format!("readings per hour, last 24 hours: {}", hours.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))) {
            @for (i, n) in hours.iter().enumerate() {
                @let bh = (*n as f64 / max * (h - 2.0)).max(if *n > 0 { 1.0 } else { 0.0 });
                rect x=(i as f64 * bar) y=(h - bh) width=(bar - 1.0) height=(bh) fill="#1f77b4" {}
            }
        }
    }
}

/// Overview query: search, page.
#[derive(Debug, Default, Deserialize)]
pub struct OverviewQuery {
    q: Option<String>,
    page: Option<usize>,
}

#[derive(Clone)]
struct DeviceRow {
    device: Device,
    newest: Option<Timestamp>,
}

impl DeviceRow {
    /// The overview's order: most recently heard from first, never heard (no
    /// series) last, then by name.
    fn order(&self, other: &Self) -> std::cmp::Ordering {
        other
            .newest
            .cmp(&self.newest)
            .then_with(|| self.device.cmp(&other.device))
    }
}

/// A device of the overview's list without its name: its newest reading (µs;
/// `i64::MIN` for never) and id, 16 bytes. A million devices listed with their names
/// took the server from 229 to 303–309 MiB for one view of the page.
#[derive(Clone, Copy)]
struct Listed {
    newest: i64,
    id: DeviceId,
}

/// What the overview shows of the device list.
struct Listing {
    total: usize,
    /// Devices silent for over [`SILENT_AFTER`], and the first five of them in the
    /// overview's order.
    silent: usize,
    first_silent: Vec<DeviceRow>,
    /// Devices whose name matches the search.
    matching: usize,
    page: usize,
    pages: usize,
    /// The page's devices, in order.
    shown: Vec<DeviceRow>,
}

/// Walks every device once, keeping names only for what the page shows: the
/// matching devices are sorted by newest reading and id, and only in the runs of
/// equal newest readings around the page do names decide.
fn list_devices(
    reads: &dyn crate::store::ReadStore,
    needle: &str,
    silent_since: Timestamp,
    page: Option<usize>,
) -> Result<Listing, crate::store::StoreError> {
    let (mut total, mut silent) = (0, 0);
    let mut first_silent: Vec<DeviceRow> = Vec::new();
    let mut matching: Vec<Listed> = Vec::new();
    crate::api::walk_devices(reads, DeviceId(0), |page| {
        for (id, device, s) in page {
            total += 1;
            if needle.is_empty() || device.as_str().to_lowercase().contains(needle) {
                let newest = s.last.map_or(i64::MIN, |t| t.as_micros());
                matching.push(Listed { newest, id });
            }
            if s.last.is_some_and(|t| t < silent_since) {
                silent += 1;
                first_silent.push(DeviceRow {
                    device,
                    newest: s.last,
                });
                if first_silent.len() > 5 {
                    first_silent.sort_by(DeviceRow::order);
                    first_silent.truncate(5);
                }
            }
        }
        std::ops::ControlFlow::<()>::Continue(())
    })?;
    first_silent.sort_by(DeviceRow::order);
    matching.sort_unstable_by(|a, b| b.newest.cmp(&a.newest).then(a.id.0.cmp(&b.id.0)));
    let pages = matching.len().div_ceil(PAGE_SIZE).max(1);
    let page = page.unwrap_or(1).clamp(1, pages);
    let (start, end) = (
        ((page - 1) * PAGE_SIZE).min(matching.len()),
        (page * PAGE_SIZE).min(matching.len()),
    );
    let shown = if start == end {
        Vec::new()
    } else {
        // Widened to the whole runs of equal newest readings at its ends, where
        // names decide.
        let (first, last) = (matching[start].newest, matching[end - 1].newest);
        let lo = matching.partition_point(|r| r.newest > first);
        let hi = matching.partition_point(|r| r.newest >= last);
        let run = matching[lo..hi].iter().map(|r| (r.newest, r.id)).collect();
        reads
            .rank_devices(run, start - lo..end - lo)
            .into_iter()
            .map(|(newest, device)| DeviceRow {
                device,
                newest: (newest != i64::MIN).then(|| Timestamp::from_micros(newest)),
            })
            .collect()
    };
    Ok(Listing {
        total,
        silent,
        first_silent,
        matching: matching.len(),
        page,
        pages,
        shown,
    })
}

/// `/`: the devices (or the first steps on an empty server).
pub async fn overview(
    state: &Arc<AppState>,
    settings: &ConsoleSettings,
    today_counts: &Arc<TodayCounts>,
    ctx: &Ctx,
    query: OverviewQuery,
) -> Result<Markup, PageError> {
    let reads = state.reads.clone();
    let now = Timestamp::now();
    let silent_since =
        Timestamp::from_micros(now.as_micros() - SILENT_AFTER.num_microseconds().unwrap_or(0));
    let search = query.q.clone().unwrap_or_default();
    let needle = search.trim().to_lowercase();
    let listing = {
        let reads = reads.clone();
        let needle = needle.clone();
        crate::api::blocking(move || list_devices(&*reads, &needle, silent_since, query.page))
            .await?
    };
    if listing.total == 0 {
        return Ok(first_steps(settings, ctx));
    }
    let Listing {
        total: total_devices,
        silent,
        first_silent,
        matching,
        page,
        pages,
        shown,
    } = listing;

    // Readings today (since local midnight in the page's zone) of the shown devices
    // (kept and extended between views, see `today`), and open anomalies of every
    // device.
    let midnight = Day::containing(now, ctx.zone).start(ctx.zone);
    let end = Day::containing(now, ctx.zone).next().start(ctx.zone);
    let catalog = reads.catalog();
    let ids: Vec<SensorId> = catalog.iter().map(|s| s.id).collect();
    let devices: Vec<Device> = shown.iter().map(|r| r.device.clone()).collect();
    // Readings from before this are taken as settled: live ones still in flight
    // (timestamped a moment ago, stored a moment later) fall after it, so they
    // extend the kept count instead of forcing a recount.
    let settled = Timestamp::from_micros(
        (now.as_micros() - IN_FLIGHT.num_microseconds().unwrap_or(0)).max(midnight.as_micros()),
    );
    let (counts, shown_series) = {
        let (reads, today_counts) = (reads.clone(), today_counts.clone());
        crate::api::blocking(move || {
            // The shown devices' series (their latest values), and the totals just
            // before the counts: a reading stored in between makes `TodayCounts`
            // count that device afresh, so the gap is kept short.
            let series: Vec<Vec<(SensorId, SeriesStats)>> =
                devices.iter().map(|d| reads.series_of(d)).collect();
            let totals: Vec<(Device, u64)> = devices
                .into_iter()
                .zip(&series)
                .map(|(d, of)| (d, of.iter().map(|(_, s)| s.readings).sum()))
                .collect();
            let store = StoreDay {
                reads: reads.as_ref(),
                sensors: &ids,
            };
            let counts = today_counts.count_all(&totals, (midnight, end), settled, &store)?;
            Ok((counts, series))
        })
        .await?
    };
    let open = open_anomalies(state, None).await?;
    let hours = state.metrics.activity.per_hour();

    Ok(layout(
        ctx,
        "Devices",
        html! {
            h1 { "Devices" }
            section.summary #live-summary data-live {
                div { strong { (total_devices) } (if total_devices == 1 { " device" } else { " devices" }) }
                div { strong { (open.len()) } (if open.len() == 1 { " open anomaly" } else { " open anomalies" }) }
                div.sparkbox {
                    (sparkline(&hours))
                    span.muted { (hours.iter().sum::<u64>()) " readings stored in the last 24 h (since start)" }
                }
            }
            @if silent > 0 {
                div.banner.warn #live-silent data-live {
                    strong { (silent) " of " (total_devices) " devices" }
                    " have sent nothing for over an hour: "
                    @for (i, r) in first_silent.iter().enumerate() {
                        @if i > 0 { ", " }
                        a href=(ctx.href("device", &[("name", r.device.as_str())])) { (r.device.as_str()) }
                        @if let Some(t) = r.newest { " (" (age(t, now)) ")" }
                    }
                    @if silent > 5 { ", …" }
                }
            }
            form.search method="get" action="./" {
                @if let Some(z) = ctx.zone { input type="hidden" name="tz" value=(z.name()); }
                input type="search" name="q" value=(search) placeholder="Search devices by name" aria-label="Search devices by name";
                button type="submit" { "Search" }
            }
            @if shown.is_empty() {
                p.muted { "No device name contains “" (search) "”." }
            } @else {
                div.scroll {
                    table.devices #live-devices data-live {
                        thead { tr { th { "Device" } th { "Last reading" } th { "Latest values" } th { "Last 24 h" } th.num { "Today" } th.num { "Open anomalies" } } }
                        tbody {
                            @for ((r, today_count), series) in shown.iter().zip(&counts).zip(&shown_series) {
                                @let open_here = open.iter().filter(|a| a.device == r.device.as_str()).count();
                                tr.device-row data-device=(r.device.as_str()) {
                                    td { a href=(ctx.href("device", &[("name", r.device.as_str())])) { (r.device.as_str()) } }
                                    td {
                                        @if let Some(t) = r.newest {
                                            span class=(if t < silent_since { "silent" } else { "fresh" }) title=(ctx.time(t, "%Y-%m-%d %H:%M:%S")) { (age(t, now)) }
                                        } @else { "—" }
                                    }
                                    td {
                                        div.values {
                                            @for (sensor, st) in series {
                                                @if let Some(s) = catalog.by_id(*sensor) {
                                                    span.value data-sensor=(s.name.as_str()) { span.muted { (s.name.as_str()) } " " (value(st.last_value, &s.unit)) }
                                                }
                                            }
                                        }
                                    }
                                    td {
                                        // Drawn after the page (a day of a streaming
                                        // device's readings is counted for it).
                                        img.spark loading="lazy" width="125" height="24"
                                            src=(ctx.href("spark.svg", &[("name", r.device.as_str())]))
                                            alt=(format!("readings of {} per hour, last 24 hours", r.device.as_str()));
                                    }
                                    td.num { (today_count) }
                                    td.num { @if open_here > 0 { a.badge href=(ctx.href("anomalies", &[("device", r.device.as_str()), ("status", "untriaged")])) { (open_here) } } @else { "0" } }
                                }
                            }
                        }
                    }
                }
                @if pages > 1 {
                    nav.pager {
                        @if page > 1 { a href=(ctx.href("", &[("q", &search), ("page", &(page - 1).to_string())])) { "← newer" } }
                        span { "page " (page) " of " (pages) " (" (matching) " devices)" }
                        @if page < pages { a href=(ctx.href("", &[("q", &search), ("page", &(page + 1).to_string())])) { "older →" } }
                    }
                }
            }
        },
    ))
}

/// Devices' readings over all sensors, for [`TodayCounts`].
struct StoreDay<'a> {
    reads: &'a dyn crate::store::ReadStore,
    sensors: &'a [SensorId],
}

impl DayCounter for StoreDay<'_> {
    fn counts(
        &self,
        queries: &[(Device, Timestamp, Timestamp)],
    ) -> Result<Vec<u64>, crate::store::StoreError> {
        let ranges: Vec<(Device, TimeRange)> = queries
            .iter()
            .map(|(d, from, to)| {
                // An empty range (`now` past the day's end) counts nothing.
                let to = (*to).max(*from);
                (d.clone(), TimeRange { from: *from, to })
            })
            .collect();
        self.reads.count_each(self.sensors, &ranges)
    }
}

/// `spark.svg?name=…`: a device's readings per hour over the last 24 hours (hours of
/// the page's zone), all sensors together, as the overview's row picture.
pub async fn device_sparkline(
    state: &Arc<AppState>,
    ctx: &Ctx,
    q: SparkQuery,
) -> Result<Markup, PageError> {
    let device = known_device(state, &q.name)?;
    let now = Timestamp::now();
    let hours = crate::domain::Buckets::new(
        TimeRange {
            from: Timestamp::from_micros(now.as_micros() - 24 * 3_600_000_000),
            to: now,
        },
        crate::domain::BucketWidth::Minutes(60),
        ctx.zone,
        30,
    )
    .map_err(|e| PageError::internal("hourly buckets", e))?;
    let ids: Vec<SensorId> = state.reads.catalog().iter().map(|s| s.id).collect();
    let reads = state.reads.clone();
    let counts = crate::api::blocking(move || reads.bucket_counts(&device, &ids, &hours)).await?;
    Ok(sparkline(&counts))
}

/// `spark.svg` query.
#[derive(Debug, Deserialize)]
pub struct SparkQuery {
    name: String,
}

/// Untriaged anomalies (of one device, or all).
async fn open_anomalies(
    state: &Arc<AppState>,
    device: Option<&Device>,
) -> Result<Vec<Anomaly>, PageError> {
    list_anomalies(
        state,
        AnomalyFilter {
            alert_id: None,
            device: device.map(|d| d.to_string()),
            sensor: None,
            from: None,
            to: None,
            status: Some(TriageStatus::Untriaged),
            limit: 10_000,
        },
    )
    .await
}

async fn list_anomalies(
    state: &Arc<AppState>,
    filter: AnomalyFilter,
) -> Result<Vec<Anomaly>, PageError> {
    let alerts = state.alerts.clone();
    tokio::task::spawn_blocking(move || alerts.anomalies(&filter))
        .await
        .map_err(|e| PageError::internal("listing anomalies", e))?
        .map_err(|e| PageError::internal("listing anomalies", e))
}

/// The empty server's page: where the key is and how to send the first readings.
fn first_steps(settings: &ConsoleSettings, ctx: &Ctx) -> Markup {
    let url = &ctx.origin;
    let key_file = settings.key_file.as_ref().map(|p| p.display().to_string());
    let key_arg = match &key_file {
        Some(f) => format!("--api-key-file {f}"),
        None => "--api-key YOUR_KEY".to_owned(),
    };
    let key_var = match &key_file {
        Some(f) => format!("KEY=$(grep -v '^#' {f} | head -n1)"),
        None => "KEY=YOUR_KEY".to_owned(),
    };
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
    layout(
        ctx,
        "First steps",
        html! {
            h1 { "Welcome to Milepost" }
            p.lead { "No readings yet. Send some, and this page becomes the list of your devices." }
            h2 { "1. The API key" }
            @if let Some(f) = &key_file {
                p { "A key was generated on first start into " code { (f) } " (readable only by the server's user). Devices send it as the HTTP Basic user name." }
            } @else {
                p { "This server takes the keys given with " code { "--api-key" } " or " code { "--api-key-file" } "." }
            }
            h2 { "2. Send readings" }
            p { "From a file or a device's offline buffer, with the same binary:" }
            pre.copy { code { "milepost push ./readings.ndjson --url " (url) " " (key_arg) } }
            p { "Or with curl, one reading:" }
            pre.copy { code {
                (key_var) "\n"
                "echo '{\"device\": \"car-1\", \"sensor\": \"speed\", \"value\": 42.5, \"timestamp\": \"" (now) "\"}' |\n"
                "  curl -u \"$KEY:\" -H 'Content-Type: application/x-ndjson' --data-binary @- " (url) "/ingest"
            } }
            p { "Or try it with a simulated car: " code { "milepost demo" } "." }
            h2 { "3. Then" }
            ul {
                li { "The API is documented at " a href=(ctx.api_href("docs", &[])) { "/docs" } " (" a href=(ctx.api_href("openapi.json", &[])) { "openapi.json" } ")." }
                li { "Prometheus metrics are at " a href=(ctx.api_href("metrics", &[])) { "/metrics" } "." }
                li { "Alerts (step detection) are managed with " code { "milepost alert" } " on the server." }
            }
        },
    )
}

/// Device page query.
#[derive(Debug, Deserialize)]
pub struct DeviceQuery {
    name: String,
    /// `1h`, `24h`, `7d` or `30d` (default 24h), unless `from` is given.
    range: Option<String>,
    /// Custom range start and end, `YYYY-MM-DDTHH:MM` in the page's zone (or RFC 3339).
    from: Option<String>,
    to: Option<String>,
    /// Only this sensor's chart, larger.
    sensor: Option<String>,
}

/// The ranges offered as links.
const RANGES: [(&str, &str, i64); 4] = [
    ("1h", "last hour", 3600),
    ("24h", "last day", 86_400),
    ("7d", "last week", 7 * 86_400),
    ("30d", "last 30 days", 30 * 86_400),
];

/// A custom range bound: RFC 3339, or the `datetime-local` form's
/// `YYYY-MM-DDTHH:MM` in `zone`.
fn parse_local(s: &str, ctx: &Ctx) -> Result<Timestamp, PageError> {
    if let Ok(t) = Timestamp::parse_rfc3339(s) {
        return Ok(t);
    }
    let naive = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M")
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S"))
        .map_err(|_| {
            PageError::bad_request(format!("'{s}' is not a time like 2026-12-01T08:00"))
        })?;
    let utc = match ctx.zone {
        Some(z) => naive
            .and_local_timezone(z)
            .earliest()
            .map(|t| t.naive_utc())
            .ok_or_else(|| PageError::bad_request(format!("{s} does not exist in {}", z.name())))?,
        None => naive,
    };
    Ok(Timestamp::from_micros(utc.and_utc().timestamp_micros()))
}

/// `/device?name=…`: live values, track, charts, anomalies and downloads.
pub async fn device(state: &Arc<AppState>, ctx: &Ctx, q: DeviceQuery) -> Result<Markup, PageError> {
    let device = known_device(state, &q.name)?;
    let catalog: Arc<Catalog> = state.reads.catalog();
    let focus = match &q.sensor {
        Some(s) if !s.is_empty() => Some(
            catalog
                .get(s)
                .cloned()
                .ok_or_else(|| PageError::not_found(format!("no sensor '{s}' in the catalog")))?,
        ),
        _ => None,
    };
    let now = Timestamp::now();
    let (range, range_key) = match (&q.from, &q.range) {
        (Some(f), _) if !f.is_empty() => {
            let from = parse_local(f, ctx)?;
            let to = match &q.to {
                Some(t) if !t.is_empty() => parse_local(t, ctx)?,
                _ => now,
            };
            let r = TimeRange::new(from, to).map_err(|e| PageError::bad_request(e.to_string()))?;
            (r, "custom")
        }
        (_, r) => {
            let key = r.as_deref().unwrap_or("24h");
            let (key, _, secs) = RANGES.iter().find(|(k, ..)| *k == key).ok_or_else(|| {
                PageError::bad_request(format!("unknown range '{key}': use 1h, 24h, 7d or 30d"))
            })?;
            let from = Timestamp::from_micros(now.as_micros() - secs * 1_000_000);
            (TimeRange { from, to: now }, *key)
        }
    };
    let series = state.reads.series_of(&device);
    let has = |name: &str| {
        catalog
            .get(name)
            .is_some_and(|s| series.iter().any(|(id, _)| *id == s.id))
    };
    let has_track = POSITION.iter().all(|p| has(p));
    let charted: Vec<_> = catalog
        .iter()
        .filter(|s| !POSITION.contains(&s.name.as_str()))
        .filter(|s| series.iter().any(|(id, _)| *id == s.id))
        .filter(|s| focus.as_ref().is_none_or(|f| f.id == s.id))
        .cloned()
        .collect();
    let anomalies = list_anomalies(
        state,
        AnomalyFilter {
            alert_id: None,
            device: Some(device.to_string()),
            sensor: focus.as_ref().map(|s| s.name.to_string()),
            from: Some(range.from),
            to: Some(range.to),
            status: None,
            limit: 200,
        },
    )
    .await?;
    let dumps: Vec<crate::store::DumpRecord> = state
        .dumps
        .as_ref()
        .map(|d| d.records())
        .unwrap_or_default();
    let first_day = Day::containing(range.from, None).date();
    let last_day = Day::containing(range.to, None).date();
    let mut days: Vec<_> = dumps
        .iter()
        .filter(|r| (first_day..=last_day).contains(&r.day))
        .collect();
    if days.is_empty() {
        // None in the range: the latest week's, so the links are never missing.
        let mut all: Vec<_> = dumps.iter().collect();
        all.sort_by_key(|r| std::cmp::Reverse(r.day));
        days = all.into_iter().take(14).collect();
    }
    days.sort_by(|a, b| {
        b.day
            .cmp(&a.day)
            .then(a.format.as_str().cmp(b.format.as_str()))
    });

    let iso = |t: Timestamp| t.to_string();
    let (from_s, to_s) = (iso(range.from), iso(range.to));
    let tz = ctx.zone_name();
    let name = device.as_str();
    let (chart_w, chart_h) = if focus.is_some() {
        ("1200", "480")
    } else {
        ("900", "260")
    };
    let local_input = |t: Timestamp| ctx.time(t, "%Y-%m-%dT%H:%M");
    Ok(layout(
        ctx,
        name,
        html! {
            h1 { (name) }
            section #live-values data-live {
                h2 { "Live values" }
                div.cards {
                    @for (sensor, st) in &series {
                        @if let Some(s) = catalog.by_id(*sensor) {
                            div.card data-sensor=(s.name.as_str()) {
                                div.muted { (s.name.as_str()) }
                                div.big { (value(st.last_value, &s.unit)) }
                                div.muted title=(ctx.time(st.last, "%Y-%m-%d %H:%M:%S")) { (age(st.last, now)) " · " (st.readings) " readings" }
                            }
                        }
                    }
                }
            }
            nav.ranges {
                @for (key, label, _) in RANGES {
                    @let params = [("name", name), ("range", key), ("sensor", focus.as_ref().map_or("", |s| s.name.as_str()))];
                    @if key == range_key { strong { (label) } } @else { a href=(ctx.href("device", &params)) { (label) } }
                }
                form.custom method="get" action="device" {
                    input type="hidden" name="name" value=(name);
                    @if let Some(z) = ctx.zone { input type="hidden" name="tz" value=(z.name()); }
                    @if let Some(f) = &focus { input type="hidden" name="sensor" value=(f.name.as_str()); }
                    label { "from " input type="datetime-local" name="from" value=(local_input(range.from)); }
                    label { "to " input type="datetime-local" name="to" value=(local_input(range.to)); }
                    button type="submit" { "Show" }
                }
            }
            p.muted { (ctx.time(range.from, "%Y-%m-%d %H:%M")) " – " (ctx.time(range.to, "%Y-%m-%d %H:%M")) " (" (tz) ")"
                @if let Some(f) = &focus { " · only " (f.name.as_str()) ", " a href=(ctx.href("device", &[("name", name), ("from", &from_s), ("to", &to_s)])) { "all sensors" } } }
            @if has_track && focus.is_none() {
                section {
                    h2 { "Track" }
                    img.track #track data-live-img src=(ctx.api_href("api/v1/location/track.svg", &[("device", name), ("from", &from_s), ("to", &to_s), ("tz", tz), ("width", "600"), ("height", "420")]))
                        alt=(format!("GPS track of {name}")) width="600" height="420";
                }
            }
            section {
                h2 { "Charts" }
                @if charted.is_empty() { p.muted { "No sensor of this device has readings to chart." } }
                @for s in &charted {
                    figure.chart data-sensor=(s.name.as_str()) {
                        a href=(ctx.href("device", &[("name", name), ("sensor", s.name.as_str()), ("from", &from_s), ("to", &to_s)])) {
                            img id=(format!("chart-{}", s.name.as_str())) data-live-img src=(ctx.api_href(&format!("api/v1/sensors/{}/chart.svg", s.name.as_str()), &[("device", name), ("from", &from_s), ("to", &to_s), ("tz", tz), ("width", chart_w), ("height", chart_h)]))
                                alt=(format!("{} of {name}, average with min–max band", s.name.as_str())) width=(chart_w) height=(chart_h);
                        }
                        figcaption { (s.name.as_str()) " (" (s.unit) ") — " (s.description) }
                    }
                }
            }
            section {
                h2 { "Anomalies in this range" }
                (anomaly_table(ctx, &anomalies, false))
            }
            section {
                h2 { "Downloads" }
                p { "This device's readings in the range shown:" }
                ul.downloads {
                    @for s in catalog.iter().filter(|s| series.iter().any(|(id, _)| *id == s.id)) {
                        li { (s.name.as_str()) ": "
                            a href=(ctx.api_href(&format!("api/v1/sensors/{}/readings", s.name.as_str()), &[("device", name), ("from", &from_s), ("to", &to_s), ("format", "csv")])) download { "CSV" } " · "
                            a href=(ctx.api_href(&format!("api/v1/sensors/{}/readings", s.name.as_str()), &[("device", name), ("from", &from_s), ("to", &to_s), ("format", "ndjson")])) download { "NDJSON" } }
                    }
                }
                p { "Daily dumps (UTC days). " strong { "Each dump file holds every device's readings of its day" } ", not only " (name) "'s:" }
                @if days.is_empty() { p.muted { "No day has been dumped yet." } }
                @else {
                    ul.downloads {
                        @for r in &days {
                            @let file = crate::export::download_name(r.day, r.format);
                            li { a href=(dump_href(state, ctx, r, &file)) { (file) } span.muted { " · " (r.readings) " readings, " (human_bytes(r.bytes)) } }
                        }
                    }
                }
            }
        },
    ))
}

fn dump_href(state: &AppState, ctx: &Ctx, r: &crate::store::DumpRecord, file: &str) -> String {
    crate::api::dumps::public_url(state, &r.key)
        .unwrap_or_else(|| ctx.api_href(&format!("api/v1/dumps/{file}"), &[]))
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn anomaly_table(ctx: &Ctx, list: &[Anomaly], with_device: bool) -> Markup {
    html! {
        @if list.is_empty() { p.muted { "None." } }
        @else {
            div.scroll {
                table.anomalies {
                    thead { tr {
                        th { "Step at" }
                        @if with_device { th { "Device" } }
                        th { "Sensor" } th { "Change" } th { "Status" } th { "" }
                    } }
                    tbody {
                        @for a in list {
                            @let at = a.found.at;
                            @let around_from = Timestamp::from_micros(at.as_micros() - 12 * 3_600_000_000);
                            @let around_to = Timestamp::from_micros(at.as_micros() + 12 * 3_600_000_000);
                            tr.anomaly data-anomaly=(a.id) {
                                td { (ctx.time(at, "%Y-%m-%d %H:%M")) }
                                @if with_device { td { a href=(ctx.href("device", &[("name", &a.device)])) { (a.device) } } }
                                td { (a.sensor) }
                                td {
                                    span class=(if a.found.step == Step::Up { "up" } else { "down" }) { (if a.found.step == Step::Up { "▲" } else { "▼" }) }
                                    " " (format!("{:.1} → {:.1}", a.found.before_mean, a.found.after_mean))
                                    @if let Some(p) = a.found.percent_change() { span.muted { " (" (format!("{p:+.0}")) "%)" } }
                                }
                                td { (a.status.as_str()) @if !a.message.is_empty() { span.muted { " — " (a.message) } } }
                                td { a href=(ctx.href("device", &[("name", &a.device), ("sensor", &a.sensor), ("from", &around_from.to_string()), ("to", &around_to.to_string())])) { "chart" } }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Anomalies page filters.
#[derive(Debug, Default, Deserialize)]
pub struct AnomalyQuery {
    device: Option<String>,
    sensor: Option<String>,
    status: Option<String>,
}

/// `/anomalies`: what the alerts found, filtered.
pub async fn anomalies(
    state: &Arc<AppState>,
    ctx: &Ctx,
    q: AnomalyQuery,
) -> Result<Markup, PageError> {
    let nonempty = |s: &Option<String>| {
        s.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let (device, sensor, status) = (
        nonempty(&q.device),
        nonempty(&q.sensor),
        nonempty(&q.status),
    );
    let parsed_status = status
        .as_deref()
        .map(str::parse::<TriageStatus>)
        .transpose()
        .map_err(|e| PageError::bad_request(e.to_string()))?;
    let list = list_anomalies(
        state,
        AnomalyFilter {
            alert_id: None,
            device: device.clone(),
            sensor: sensor.clone(),
            from: None,
            to: None,
            status: parsed_status,
            limit: 500,
        },
    )
    .await?;
    let catalog = state.reads.catalog();
    Ok(layout(
        ctx,
        "Anomalies",
        html! {
            h1 { "Anomalies" }
            p.muted { "Steps the alerts found (triage them with " code { "milepost anomaly" } " on the server). Newest first, at most 500." }
            form.filters method="get" action="anomalies" {
                @if let Some(z) = ctx.zone { input type="hidden" name="tz" value=(z.name()); }
                label { "Device " input type="text" name="device" value=(device.clone().unwrap_or_default()); }
                label { "Sensor "
                    select name="sensor" {
                        option value="" { "any" }
                        @for s in catalog.iter() {
                            option value=(s.name.as_str()) selected[sensor.as_deref() == Some(s.name.as_str())] { (s.name.as_str()) }
                        }
                    }
                }
                label { "Status "
                    select name="status" {
                        option value="" { "any" }
                        @for st in ["untriaged", "positive", "negative", "ignored"] {
                            option value=(st) selected[status.as_deref() == Some(st)] { (st) }
                        }
                    }
                }
                button type="submit" { "Filter" }
            }
            div #live-anomalies data-live { (anomaly_table(ctx, &list, true)) }
        },
    ))
}

/// `/dumps`: the manifest.
pub async fn dumps(state: &Arc<AppState>, ctx: &Ctx) -> Result<Markup, PageError> {
    let Some(d) = state.dumps.as_ref() else {
        return Ok(layout(
            ctx,
            "Dumps",
            html! { h1 { "Dumps" } p { "Dumps are not configured on this server." } },
        ));
    };
    let mut records = d.records();
    records.sort_by(|a, b| {
        b.day
            .cmp(&a.day)
            .then(a.format.as_str().cmp(b.format.as_str()))
    });
    Ok(layout(
        ctx,
        "Dumps",
        html! {
            h1 { "Dumps" }
            p.muted { "Every finished UTC day, as gzip NDJSON (re-ingestable with " code { "milepost push" } ") and as Parquet (the lake), in " code { (d.blob().display()) } ". Each file holds every device's readings of its day." }
            @if records.is_empty() { p.muted { "No day has been dumped yet (the schedule is " code { "--dump-schedule" } ")." } }
            @else {
                div.scroll {
                    table.dumps {
                        thead { tr { th { "Day" } th { "Format" } th.num { "Rows" } th.num { "Bytes" } th { "SHA-256" } th { "" } } }
                        tbody {
                            @for r in &records {
                                @let file = crate::export::download_name(r.day, r.format);
                                tr.dump {
                                    td { (r.day.format("%Y-%m-%d")) }
                                    td { (r.format.as_str()) }
                                    td.num { (r.readings) }
                                    td.num title=(format!("{} bytes", r.bytes)) { (human_bytes(r.bytes)) }
                                    td { code.hash title=(r.sha256) { (r.sha256.get(..16).unwrap_or(&r.sha256)) "…" } }
                                    td { a href=(dump_href(state, ctx, r, &file)) { "download" } }
                                }
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// `/system`: version, uptime, storage, ingest and dumps.
pub async fn system(
    state: &Arc<AppState>,
    settings: &ConsoleSettings,
    ctx: &Ctx,
) -> Result<Markup, PageError> {
    let totals = state.reads.totals();
    let db_bytes = {
        let dir = state.data_dir.clone();
        tokio::task::spawn_blocking(move || dir.database_bytes())
            .await
            .map_err(|e| PageError::internal("database size", e))?
    };
    let lag = state.writer.apply_lag();
    let uptime = settings.started.elapsed().as_secs();
    let errors = state.metrics.recent_errors.list();
    let pending = state.metrics.dump_days_pending.get();
    let last_dump = state
        .dumps
        .as_ref()
        .and_then(|d| d.records().iter().map(|r| r.generated_at).max());
    let now = Timestamp::now();
    Ok(layout(
        ctx,
        "System",
        html! {
            h1 { "System" }
            div #live-system data-live {
                table.kv {
                    tr { th { "Version" } td { "milepost " (env!("CARGO_PKG_VERSION")) } }
                    tr { th { "Up for" } td { (format!("{}d {:02}:{:02}:{:02}", uptime / 86_400, uptime / 3600 % 24, uptime / 60 % 60, uptime % 60)) } }
                    tr { th { "Database" } td { (human_bytes(db_bytes)) " (file and write-ahead log)" } }
                    tr { th { "Readings stored" } td { (totals.readings) } }
                    tr { th { "Devices" } td { (totals.devices) } }
                    tr { th { "Newest reading" } td { @if let Some(t) = totals.newest { (ctx.time(t, "%Y-%m-%d %H:%M:%S")) " (" (age(t, now)) ")" } @else { "—" } } }
                    tr { th { "Write queue" } td { (state.writer.queue_depth()) " batches waiting" } }
                    tr { th { "Apply lag" } td { (lag.readings) " readings acknowledged, not yet in DuckDB (" (format!("{:.1}", lag.seconds)) " s)" } }
                    tr { th { "Dumps" } td {
                        @if let Some(t) = last_dump { "last written " (ctx.time(t, "%Y-%m-%d %H:%M")) " (" (age(t, now)) ")" } @else { "none written yet" }
                        "; " (pending) " finished days waiting"
                    } }
                }
                h2 { "Recently refused lines" }
                @if errors.is_empty() { p.muted { "None since the server started." } }
                @else {
                    table.errors {
                        thead { tr { th { "When" } th { "Why" } } }
                        tbody { @for (t, why) in &errors { tr { td { (ctx.time(Timestamp::from_micros(t.timestamp_micros()), "%H:%M:%S")) } td { (why) } } } }
                    }
                }
            }
            h2 { "For machines" }
            ul {
                li { a href=(ctx.api_href("docs", &[])) { "API documentation" } " (Swagger UI)" }
                li { a href=(ctx.api_href("openapi.json", &[])) { "openapi.json" } }
                li { a href=(ctx.api_href("metrics", &[])) { "metrics" } " (Prometheus)" }
            }
        },
    ))
}
