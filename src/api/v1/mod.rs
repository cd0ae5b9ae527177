//! `/api/v1`: devices, the sensor catalog with statistics, bucketed statistics, raw
//! readings (paged or streamed) and the GPS track. Every read takes `?device=`
//! (default: the server's `--default-device`). The handlers are here, what they
//! answer in `types.rs`, the parameters they share with other endpoints in
//! `api::params`.

mod types;

use std::sync::Arc;

use chrono::Duration;
use poem::Request;
use poem::http::header;
use poem::web::Data;
use poem_openapi::OpenApi;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::types::Any;

use super::error::{ApiError, ErrorBody};
use super::params::{catalogued, device_param, range_param, tz_param};
use super::readings::{Cursor, DEFAULT_PAGE, ExportSink, Format, LineWriter, MAX_PAGE};
use super::stream::{BodySender, StreamedJson};
use super::track::{Downsampler, Pairer, Point};
use super::{AppState, Tag, blocking, walk_devices};
use crate::domain::{
    Aggregate, BucketWidth, Buckets, Device, DeviceId, Sensor, SensorId, TimeRange, Timestamp,
};
use crate::store::SeriesStats;

use types::DeviceListWriter;
pub use types::{
    BucketBody, DeviceInfo, DeviceList, DevicesResponse, Fill, ReadingBody, ReadingPage,
    ReadingsContent, ReadingsResponse, SensorInfo, SensorList, StatisticsBody, TrackResponse,
};

/// Most buckets one statistics request may produce.
pub const MAX_BUCKETS: usize = 10_000;
/// Most points of a track.
pub const MAX_TRACK_POINTS: u32 = 100_000;
/// Devices `GET /api/v1/devices` answers with one body of known length (~1 MB of
/// JSON at most); longer lists are streamed.
const SHORT_DEVICE_LIST: usize = 10_000;

/// The `/api/v1` endpoints.
pub struct V1Api;

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Readings")]
impl V1Api {
    /// Devices
    ///
    /// Every device that has sent readings, with reading count and first/last
    /// timestamp.
    #[oai(path = "/devices", method = "get")]
    async fn devices(&self, state: Data<&Arc<AppState>>) -> DevicesResponse {
        // Streamed a page of devices at a time: built whole, a million devices' answer
        // (102 MB of JSON) took the server to a 1.41 GB peak for one request. The
        // first page is read here, so a failing store is an error status; a failure
        // later breaks the transfer (never a silently short list). A list that fits
        // the first page goes out whole, with a length (and so an ETag to revalidate).
        let reads = state.reads.clone();
        let first = {
            let reads = reads.clone();
            match blocking(move || reads.device_summaries(DeviceId(0), SHORT_DEVICE_LIST)).await {
                Ok(first) => first,
                Err(_) => {
                    return DevicesResponse::Internal(Json(ErrorBody::new(
                        "cannot read the devices; see the server log",
                    )));
                }
            }
        };
        let mut out = DeviceListWriter::default();
        for (_, device, summary) in &first {
            out.push(device, summary);
        }
        let Some(&(last, _, _)) = first.last().filter(|_| first.len() == SHORT_DEVICE_LIST) else {
            return DevicesResponse::Ok(StreamedJson::new(poem::Body::from_bytes(out.finish())));
        };
        drop(first);
        let (body, mut tx) = BodySender::channel();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            let walked = walk_devices(&*reads, DeviceId(last.0 + 1), |page| {
                for (_, device, summary) in &page {
                    out.push(device, summary);
                    if out.is_full() && tx.send(out.take()).is_break() {
                        return std::ops::ControlFlow::Break(());
                    }
                }
                std::ops::ControlFlow::Continue(())
            });
            match walked {
                Ok(None) => {
                    let _ = tx.send(out.finish());
                }
                Ok(Some(())) => tracing::debug!("device list stopped: the client went away"),
                Err(e) => {
                    tracing::error!(error = %e, "device list failed part-way");
                    tx.fail("device list failed; see the server log");
                }
            }
        });
        DevicesResponse::Ok(StreamedJson::new(body))
    }

    /// Sensors
    ///
    /// The sensor catalog with unit, description and valid range, and for the
    /// device: reading count, first/last timestamp and last value. Served from the
    /// statistics the writer keeps in memory: no query per sensor.
    #[oai(path = "/sensors", method = "get")]
    async fn sensors(
        &self,
        state: Data<&Arc<AppState>>,
        /// Device (default: the server's `--default-device`).
        #[oai(example = "device_example")]
        device: Query<Option<String>>,
    ) -> Result<Json<SensorList>, ApiError> {
        let device = device_param(&state, device.0)?;
        let series = state.reads.series_of(&device);
        let sensors = state
            .reads
            .catalog()
            .iter()
            .map(|s| sensor_info(s, series.iter().find(|(id, _)| *id == s.id).map(|x| &x.1)))
            .collect();
        Ok(Json(SensorList {
            device: device.to_string(),
            sensors,
        }))
    }

    /// Statistics in time buckets
    ///
    /// Count, min, max, avg, first and last value per bucket. Sub-day buckets are
    /// fixed widths aligned to local midnight in `tz`; `1d` buckets are calendar days
    /// in `tz` (23 or 25 hours on daylight-saving days). The first and last bucket
    /// only count readings within `from`..`to`. At most 10000 buckets.
    #[oai(path = "/sensors/:sensor/statistics", method = "get")]
    #[allow(clippy::too_many_arguments)]
    async fn statistics(
        &self,
        state: Data<&Arc<AppState>>,
        /// Sensor name, e.g. `speed`.
        #[oai(example = "sensor_example")]
        sensor: Path<String>,
        /// Start, RFC 3339 (default: 24 hours before `to`).
        #[oai(example = "from_example")]
        from: Query<Option<String>>,
        /// End, exclusive, RFC 3339 (default: now).
        #[oai(example = "to_example")]
        to: Query<Option<String>>,
        /// Bucket width: 1m, 2m, 5m, 10m, 15m, 30m, 1h, 2h, 3h, 4h, 6h, 12h or 1d.
        #[oai(default = "default_bucket")]
        bucket: Query<String>,
        /// IANA time zone the buckets are aligned in, e.g. `Europe/Berlin` (default UTC).
        #[oai(example = "tz_example")]
        tz: Query<Option<String>>,
        // Optional rather than `#[oai(default)]`: a defaulted enum parameter is
        // published as `allOf: [$ref, {default}]`, which client generators reject.
        /// How empty buckets are reported (default `none`: left out).
        fill: Query<Option<Fill>>,
        /// Device (default: the server's `--default-device`).
        #[oai(example = "device_example")]
        device: Query<Option<String>>,
    ) -> Result<Json<StatisticsBody>, ApiError> {
        let device = device_param(&state, device.0)?;
        let sensor = catalogued(&state, &sensor.0)?;
        let range = range_param(from.0.as_deref(), to.0.as_deref(), Some(Duration::days(1)))?;
        let width =
            BucketWidth::parse(&bucket.0).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let zone = tz_param(tz.0.as_deref())?;
        let buckets = Arc::new(
            Buckets::new(range, width, zone, MAX_BUCKETS)
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
        );
        let reads = state.reads.clone();
        let (b, dev, id) = (buckets.clone(), device.clone(), sensor.id);
        let stats = blocking(move || reads.bucket_stats(&dev, id, &b)).await?;
        Ok(Json(StatisticsBody {
            device: device.to_string(),
            sensor: sensor.name.to_string(),
            bucket: width.to_string(),
            tz: zone.map_or_else(|| "UTC".to_owned(), |z| z.name().to_owned()),
            from: range.from.to_string(),
            to: range.to.to_string(),
            buckets: fill_buckets(&buckets, &stats, fill.0.unwrap_or_default()),
        }))
    }

    /// Raw readings
    ///
    /// Readings of one sensor in time order. As JSON (default) a page of `limit`
    /// readings (default 1000) with `next_cursor`; as NDJSON or CSV (`Accept:
    /// application/x-ndjson` / `text/csv`, or `?format=`) the whole range is streamed
    /// unless `limit` is given. Paging is by keyset: a cursor stays valid while new
    /// readings arrive, and every reading of the range is returned exactly once.
    #[oai(path = "/sensors/:sensor/readings", method = "get")]
    #[allow(clippy::too_many_arguments)]
    async fn readings(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        /// Sensor name, e.g. `speed`.
        #[oai(example = "sensor_example")]
        sensor: Path<String>,
        /// Start, RFC 3339 (default: the first reading).
        #[oai(example = "from_example")]
        from: Query<Option<String>>,
        /// End, exclusive, RFC 3339 (default: after the last reading).
        #[oai(example = "to_example")]
        to: Query<Option<String>>,
        /// Readings per page, 1 to 100000 (default 1000 for JSON; NDJSON and CSV
        /// stream everything without it).
        #[oai(example = "limit_example")]
        limit: Query<Option<u64>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// `json`, `ndjson` or `csv`; overrides `Accept`.
        #[oai(example = "format_example")]
        format: Query<Option<String>>,
        /// Device (default: the server's `--default-device`).
        #[oai(example = "device_example")]
        device: Query<Option<String>>,
    ) -> Result<ReadingsResponse, ApiError> {
        let device = device_param(&state, device.0)?;
        let sensor = catalogued(&state, &sensor.0)?;
        let accept = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        let format = Format::negotiate(format.0.as_deref(), accept)?;
        let mut range = range_param(from.0.as_deref(), to.0.as_deref(), None)?;
        if let Some(l) = limit.0
            && !(1..=MAX_PAGE).contains(&l)
        {
            return Err(ApiError::bad_request(format!(
                "limit must be between 1 and {MAX_PAGE}, got {l}"
            )));
        }
        if let Some(c) = cursor.0.as_deref() {
            let c = Cursor::decode(c, &device, &sensor.name)?;
            range.from = range.from.max(Timestamp::from_micros(
                c.after.as_micros().saturating_add(1),
            ));
        }
        let page = match (format, limit.0) {
            (Format::Json, l) => Some(l.unwrap_or(DEFAULT_PAGE)),
            (_, l) => l,
        };
        let Some(limit) = page else {
            return Ok(export(&state, device, &sensor, range, format));
        };

        // A page: read limit + 1 to know whether another page follows.
        let reads = state.reads.clone();
        let (dev, id) = (device.clone(), sensor.id);
        let mut rows = blocking(move || {
            let mut rows: Vec<(i64, f64)> = Vec::new();
            if range.from < range.to {
                reads.scan(&dev, &[id], range, Some(limit + 1), &mut |c| {
                    rows.extend(c.ts.iter().copied().zip(c.values.iter().copied()));
                    std::ops::ControlFlow::Continue(())
                })?;
            }
            Ok(rows)
        })
        .await?;
        let next = (rows.len() as u64 > limit).then(|| {
            rows.truncate(limit as usize);
            Cursor {
                device: device.clone(),
                sensor: sensor.name.clone(),
                after: Timestamp::from_micros(rows.last().expect("limit ≥ 1").0),
            }
            .encode()
        });
        let content = match format {
            Format::Json => ReadingsContent::Json(Json(ReadingPage {
                device: device.to_string(),
                sensor: sensor.name.to_string(),
                readings: rows
                    .iter()
                    .map(|(ts, value)| ReadingBody {
                        timestamp: Timestamp::from_micros(*ts).to_string(),
                        value: *value,
                    })
                    .collect(),
                next_cursor: next.clone(),
            })),
            f => {
                let mut w = LineWriter::new(f, &device, &sensor.name);
                for (ts, v) in &rows {
                    w.push(*ts, *v);
                }
                ReadingsContent::lines(f, poem::Body::from_bytes(w.take()))
            }
        };
        Ok(ReadingsResponse::Ok(content, next))
    }

    /// GPS track
    ///
    /// The route as GeoJSON: `location_latitude` and `location_longitude` readings
    /// paired by timestamp (at most `tolerance_ms` apart), thinned to at most
    /// `max_points` with largest-triangle-three-buckets, which keeps corners and
    /// ends.
    #[oai(path = "/location/track", method = "get")]
    async fn track(
        &self,
        state: Data<&Arc<AppState>>,
        /// Start, RFC 3339 (default: 24 hours before `to`).
        #[oai(example = "from_example")]
        from: Query<Option<String>>,
        /// End, exclusive, RFC 3339 (default: now).
        #[oai(example = "to_example")]
        to: Query<Option<String>>,
        /// Most points returned, 2 to 100000.
        #[oai(default = "default_max_points")]
        max_points: Query<u32>,
        /// Largest time difference between a latitude and the longitude it is paired
        /// with, in milliseconds (0 to 60000).
        #[oai(default = "default_tolerance")]
        tolerance_ms: Query<u32>,
        /// Device (default: the server's `--default-device`).
        #[oai(example = "device_example")]
        device: Query<Option<String>>,
    ) -> Result<TrackResponse, ApiError> {
        let device = device_param(&state, device.0)?;
        let range = range_param(from.0.as_deref(), to.0.as_deref(), Some(Duration::days(1)))?;
        if !(2..=MAX_TRACK_POINTS).contains(&max_points.0) {
            return Err(ApiError::bad_request(format!(
                "max_points must be between 2 and {MAX_TRACK_POINTS}, got {}",
                max_points.0
            )));
        }
        if tolerance_ms.0 > 60_000 {
            return Err(ApiError::bad_request(format!(
                "tolerance_ms must be between 0 and 60000, got {}",
                tolerance_ms.0
            )));
        }
        let (points, total) = track_points(
            &state,
            &device,
            range,
            max_points.0 as usize,
            i64::from(tolerance_ms.0) * 1000,
        )
        .await?;
        Ok(TrackResponse::Ok(Json(Any(geojson(
            &device, &points, total,
        )))))
    }
}

/// The route of `device` in `range`: positions paired within `tolerance_us`, thinned
/// to at most `max` (LTTB); and how many pairs there were before thinning.
pub(super) async fn track_points(
    state: &Arc<AppState>,
    device: &Device,
    range: TimeRange,
    max: usize,
    tolerance_us: i64,
) -> Result<(Vec<Point>, u64), ApiError> {
    let catalog = state.reads.catalog();
    let (Some(lat), Some(lon)) = (
        catalog.get("location_latitude").map(|s| s.id),
        catalog.get("location_longitude").map(|s| s.id),
    ) else {
        return Err(ApiError::internal());
    };
    let reads = state.reads.clone();
    let dev = device.clone();
    blocking(move || {
        let expected = reads.count(&dev, &[lat], range)?;
        let mut thin = Downsampler::new(max, expected);
        let mut pairs = Pairer::new(lat, tolerance_us);
        reads.scan(&dev, &[lat, lon], range, None, &mut |c| {
            pairs.feed(&c, |p| thin.push(p));
            std::ops::ControlFlow::Continue(())
        })?;
        let total = thin.total();
        Ok((thin.finish(), total))
    })
    .await
}

fn from_example() -> Option<String> {
    Some("2026-05-01T00:00:00Z".to_owned())
}

fn to_example() -> Option<String> {
    Some("2026-05-02T00:00:00Z".to_owned())
}

fn sensor_example() -> String {
    "speed".to_owned()
}

fn tz_example() -> Option<String> {
    Some("Europe/Berlin".to_owned())
}

fn device_example() -> Option<String> {
    Some("default".to_owned())
}

fn limit_example() -> Option<u64> {
    Some(1000)
}

fn format_example() -> Option<String> {
    Some("ndjson".to_owned())
}

fn default_bucket() -> String {
    "1h".to_owned()
}

fn default_max_points() -> u32 {
    1000
}

fn default_tolerance() -> u32 {
    1000
}

fn sensor_info(s: &Sensor, stats: Option<&SeriesStats>) -> SensorInfo {
    SensorInfo {
        name: s.name.to_string(),
        unit: s.unit.clone(),
        description: s.description.clone(),
        min: s.min,
        max: s.max,
        readings: stats.map_or(0, |st| st.readings),
        first: stats.map(|st| st.first.to_string()),
        last: stats.map(|st| st.last.to_string()),
        last_value: stats.map(|st| st.last_value),
    }
}

/// The response buckets, with empty ones handled as `fill` says.
fn fill_buckets(buckets: &Buckets, stats: &[Aggregate], fill: Fill) -> Vec<BucketBody> {
    let mut previous: Option<f64> = None;
    let mut out = Vec::new();
    for (i, agg) in stats.iter().enumerate() {
        let [min, max, avg, first, last] = if agg.count > 0 {
            previous = Some(agg.last);
            [
                Some(agg.min),
                Some(agg.max),
                agg.avg(),
                Some(agg.first),
                Some(agg.last),
            ]
        } else {
            let empty = match fill {
                Fill::None => continue,
                Fill::Null => None,
                Fill::Zero => Some(0.0),
                Fill::Previous => previous,
            };
            [empty; 5]
        };
        out.push(BucketBody {
            start: buckets.start(i).to_string(),
            end: buckets.end(i).to_string(),
            count: agg.count,
            min,
            max,
            avg,
            first,
            last,
        });
    }
    out
}

/// Streams a whole range as NDJSON or CSV.
fn export(
    state: &Arc<AppState>,
    device: Device,
    sensor: &Sensor,
    range: TimeRange,
    format: Format,
) -> ReadingsResponse {
    let (body, mut sink) = ExportSink::new(LineWriter::new(format, &device, &sensor.name));
    let reads = state.reads.clone();
    let id: SensorId = sensor.id;
    let span = tracing::info_span!("export", %device, sensor = %sensor.name, ?format);
    tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        let scanned = if range.from < range.to {
            reads.scan(&device, &[id], range, None, &mut |c| sink.chunk(c))
        } else {
            Ok(0)
        };
        match scanned {
            Ok(n) if sink.hung_up() => {
                tracing::debug!(readings = n, "export stopped: the client went away");
            }
            Ok(n) => {
                tracing::debug!(readings = n, "export done");
                sink.finish();
            }
            Err(e) => {
                tracing::error!(error = %e, "export failed part-way");
                sink.fail("export failed; see the server log");
            }
        }
    });
    ReadingsResponse::Ok(ReadingsContent::lines(format, body), None)
}

/// The GeoJSON FeatureCollection of a thinned track.
fn geojson(device: &Device, points: &[Point], source_points: u64) -> serde_json::Value {
    use serde_json::json;
    let coords: Vec<serde_json::Value> = points.iter().map(|p| json!([p.lon, p.lat])).collect();
    let times: Vec<String> = points
        .iter()
        .map(|p| Timestamp::from_micros(p.ts).to_string())
        .collect();
    let geometry = match coords.len() {
        0 => return json!({"type": "FeatureCollection", "features": []}),
        1 => json!({"type": "Point", "coordinates": coords[0]}),
        _ => json!({"type": "LineString", "coordinates": coords}),
    };
    json!({
        "type": "FeatureCollection",
        "features": [{
            "type": "Feature",
            "geometry": geometry,
            "properties": {
                "device": device.as_str(),
                "timestamps": times,
                "points": points.len(),
                "source_points": source_points,
            }
        }]
    })
}
