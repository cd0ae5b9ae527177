//! Charts as pictures: `GET /api/v1/sensors/{sensor}/chart.svg` and
//! `GET /api/v1/location/track.svg`, drawn on the server (see `render`), so that a
//! chart embeds in the console, a README, a wiki or an e-mail with no script.

pub mod render;

use std::sync::Arc;

use chrono::Duration;
use chrono_tz::Tz;
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Binary;
use poem_openapi::{ApiResponse, OpenApi};

use super::error::ApiError;
use super::params::{catalogued, device_param, range_param, tz_param};
use super::{AppState, Tag, blocking};
use crate::domain::{
    AnomalyFilter, BucketWidth, Buckets, Device, Sensor, Step, TimeRange, Timestamp,
};
use render::{BucketPoint, Marker, SeriesChart};

/// Most buckets one chart draws (a 4000-pixel chart at two pixels a bucket).
pub const MAX_CHART_BUCKETS: usize = 2_000;
/// Chart sizes accepted, pixels.
pub const WIDTHS: std::ops::RangeInclusive<u32> = 200..=4000;
/// See [`WIDTHS`].
pub const HEIGHTS: std::ops::RangeInclusive<u32> = 100..=2000;
/// Most positions a track picture draws.
const TRACK_POINTS: usize = 2_000;
/// Latitude and longitude further apart in time than this are not paired.
const TRACK_TOLERANCE_US: i64 = 1_000_000;

/// The chart endpoints.
pub struct ChartsApi;

/// An SVG picture.
#[derive(ApiResponse)]
pub enum SvgResponse {
    /// The chart (`image/svg+xml`).
    #[oai(status = 200, content_type = "image/svg+xml")]
    Ok(Binary<Vec<u8>>, #[oai(header = "Cache-Control")] String),
}

impl SvgResponse {
    fn svg(text: String) -> Self {
        // A chart of a range that includes now changes with every reading.
        Self::Ok(Binary(text.into_bytes()), "no-cache".to_owned())
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Readings")]
impl ChartsApi {
    /// Chart of a sensor (SVG)
    ///
    /// The sensor's statistics over `from`..`to` as a picture: the average per
    /// bucket as a line with a point per bucket that has readings, the min–max band
    /// around it, the steps alerts found marked where they are, time labels in `tz`
    /// and the unit from the catalog. Without `bucket`, the narrowest width that
    /// gives at most one bucket per four pixels. At most 2000 buckets.
    #[oai(path = "/sensors/:sensor/chart.svg", method = "get")]
    #[allow(clippy::too_many_arguments)]
    async fn chart(
        &self,
        state: Data<&Arc<AppState>>,
        /// Sensor name, e.g. `speed`.
        sensor: Path<String>,
        /// Start, RFC 3339 (default: 24 hours before `to`).
        from: Query<Option<String>>,
        /// End, exclusive, RFC 3339 (default: now).
        to: Query<Option<String>>,
        /// Bucket width (1m … 1d, as for statistics); chosen to fit when absent.
        bucket: Query<Option<String>>,
        /// IANA time zone of the time axis, e.g. `Europe/Berlin` (default UTC).
        tz: Query<Option<String>>,
        /// Width in pixels, 200 to 4000.
        #[oai(
            default = "default_width",
            validator(minimum(value = "200"), maximum(value = "4000"))
        )]
        width: Query<u32>,
        /// Height in pixels, 100 to 2000.
        #[oai(
            default = "default_height",
            validator(minimum(value = "100"), maximum(value = "2000"))
        )]
        height: Query<u32>,
        /// Device (default: the server's `--default-device`).
        device: Query<Option<String>>,
    ) -> Result<SvgResponse, ApiError> {
        let device = device_param(&state, device.0)?;
        let sensor = catalogued(&state, &sensor.0)?;
        let range = range_param(from.0.as_deref(), to.0.as_deref(), Some(Duration::days(1)))?;
        let zone = tz_param(tz.0.as_deref())?;
        let chart = series_chart(
            &state,
            &device,
            &sensor,
            range,
            bucket.0.as_deref(),
            zone,
            (width.0, height.0),
        )
        .await?;
        let svg = render::series_svg(&chart).map_err(|e| {
            tracing::error!(error = %e, "chart");
            ApiError::internal()
        })?;
        Ok(SvgResponse::svg(svg))
    }

    /// Route of a device (SVG)
    ///
    /// The GPS track over `from`..`to` as a picture (latitude and longitude paired
    /// by timestamp, thinned to 2000 positions), start (green) and end (red) marked,
    /// proportions of the ground kept; no map tiles, so it works offline.
    #[oai(path = "/location/track.svg", method = "get")]
    #[allow(clippy::too_many_arguments)]
    async fn track(
        &self,
        state: Data<&Arc<AppState>>,
        /// Start, RFC 3339 (default: 24 hours before `to`).
        from: Query<Option<String>>,
        /// End, exclusive, RFC 3339 (default: now).
        to: Query<Option<String>>,
        /// IANA time zone of the caption's times (default UTC).
        tz: Query<Option<String>>,
        /// Width in pixels, 200 to 4000.
        #[oai(
            default = "default_track_size",
            validator(minimum(value = "200"), maximum(value = "4000"))
        )]
        width: Query<u32>,
        /// Height in pixels, 100 to 2000.
        #[oai(
            default = "default_track_size",
            validator(minimum(value = "100"), maximum(value = "2000"))
        )]
        height: Query<u32>,
        /// Device (default: the server's `--default-device`).
        device: Query<Option<String>>,
    ) -> Result<SvgResponse, ApiError> {
        let device = device_param(&state, device.0)?;
        let range = range_param(from.0.as_deref(), to.0.as_deref(), Some(Duration::days(1)))?;
        let zone = tz_param(tz.0.as_deref())?;
        let (points, _) =
            super::v1::track_points(&state, &device, range, TRACK_POINTS, TRACK_TOLERANCE_US)
                .await?;
        let positions: Vec<(f64, f64)> = points.iter().map(|p| (p.lat, p.lon)).collect();
        let at = |t| render::local_time(ms(t), zone, "%Y-%m-%d %H:%M");
        let title = format!("{device} — {} to {}", at(range.from), at(range.to));
        let svg = render::track_svg(&title, &positions, width.0, height.0).map_err(|e| {
            tracing::error!(error = %e, "track chart");
            ApiError::internal()
        })?;
        Ok(SvgResponse::svg(svg))
    }
}

fn default_width() -> u32 {
    800
}

fn default_height() -> u32 {
    300
}

fn default_track_size() -> u32 {
    500
}

/// The narrowest bucket width giving at most `max` buckets over `range`.
pub fn fitting_width(range: TimeRange, max: usize) -> BucketWidth {
    let span_minutes = (range.to.as_micros() - range.from.as_micros()) as f64 / 60e6;
    BucketWidth::NAMES
        .iter()
        .filter_map(|n| BucketWidth::parse(n).ok())
        .find(|w| {
            let minutes = match w {
                BucketWidth::Minutes(m) => f64::from(*m),
                BucketWidth::Day => 1440.0,
            };
            // +1: the first bucket is aligned before `from`.
            span_minutes / minutes + 1.0 <= max as f64
        })
        .unwrap_or(BucketWidth::Day)
}

/// Everything a sensor's chart shows: its buckets over `range` and the steps found
/// in it. Shared with the console.
pub(super) async fn series_chart(
    state: &Arc<AppState>,
    device: &Device,
    sensor: &Sensor,
    range: TimeRange,
    bucket: Option<&str>,
    zone: Option<Tz>,
    (width, height): (u32, u32),
) -> Result<SeriesChart, ApiError> {
    let width_px = width.clamp(*WIDTHS.start(), *WIDTHS.end());
    let bucket_width = match bucket {
        Some(b) => BucketWidth::parse(b).map_err(|e| ApiError::bad_request(e.to_string()))?,
        None => fitting_width(range, (width_px as usize / 4).max(12)),
    };
    let buckets = Arc::new(
        Buckets::new(range, bucket_width, zone, MAX_CHART_BUCKETS)
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
    );
    let reads = state.reads.clone();
    let (b, dev, id) = (buckets.clone(), device.clone(), sensor.id);
    let stats = blocking(move || reads.bucket_stats(&dev, id, &b)).await?;
    let points = stats
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            Some(BucketPoint {
                start_ms: ms(buckets.start(i)),
                end_ms: ms(buckets.end(i)),
                min: a.min,
                max: a.max,
                avg: a.avg()?,
            })
        })
        .collect();
    let markers = steps(state, device, sensor.name.as_str(), range).await?;
    Ok(SeriesChart {
        title: format!("{} — {device}", sensor.name),
        unit: sensor.unit.clone(),
        from_ms: ms(range.from),
        to_ms: ms(range.to),
        points,
        markers,
        zone,
        width: width_px,
        height: height.clamp(*HEIGHTS.start(), *HEIGHTS.end()),
    })
}

/// The steps alerts found in `device`'s `sensor` within `range`.
async fn steps(
    state: &Arc<AppState>,
    device: &Device,
    sensor: &str,
    range: TimeRange,
) -> Result<Vec<Marker>, ApiError> {
    let filter = AnomalyFilter {
        alert_id: None,
        device: Some(device.to_string()),
        sensor: Some(sensor.to_owned()),
        from: Some(range.from),
        to: Some(range.to),
        status: None,
        limit: 500,
    };
    let alerts = state.alerts.clone();
    let found = tokio::task::spawn_blocking(move || alerts.anomalies(&filter))
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(|e| {
            tracing::error!(error = %e, "anomalies of a chart");
            ApiError::internal()
        })?;
    Ok(found
        .iter()
        .map(|a| Marker {
            at_ms: ms(a.found.at),
            up: a.found.step == Step::Up,
        })
        .collect())
}

/// A time as ms since the epoch.
fn ms(t: Timestamp) -> i64 {
    t.as_micros() / 1000
}
