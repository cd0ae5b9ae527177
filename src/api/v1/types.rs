//! What `/api/v1` answers: its response bodies and content types, as the OpenAPI
//! document describes them.

use bytes::Bytes;
use poem_openapi::payload::{Binary, Json};
use poem_openapi::types::{Any, Example};
use poem_openapi::{ApiResponse, Enum, Object, ResponseContent};

use crate::api::error::ErrorBody;
use crate::api::readings::Format;
use crate::api::stream::StreamedJson;
use crate::domain::Device;
use crate::store::DeviceSummary;

/// A device and its readings.
#[derive(Debug, Clone, Object)]
pub struct DeviceInfo {
    /// Device name.
    pub device: String,
    /// Stored readings over all sensors.
    pub readings: u64,
    /// Oldest reading (RFC 3339 UTC).
    #[oai(nullable)]
    pub first: Option<String>,
    /// Newest reading (RFC 3339 UTC).
    #[oai(nullable)]
    pub last: Option<String>,
}

/// Every device.
#[derive(Debug, Clone, Object)]
pub struct DeviceList {
    /// Devices in the order they first sent data.
    pub devices: Vec<DeviceInfo>,
}

/// Answer of `GET /api/v1/devices`.
#[derive(ApiResponse)]
pub enum DevicesResponse {
    /// Every device, in the order they first sent data (streamed when there are many).
    #[oai(status = 200)]
    Ok(StreamedJson<DeviceList>),
    /// Storage failed; details are in the server log.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
}

/// Writes a [`DeviceList`] as JSON a chunk at a time (see `GET /api/v1/devices`).
#[derive(Default)]
pub(super) struct DeviceListWriter {
    buf: Vec<u8>,
    started: bool,
}

impl DeviceListWriter {
    /// Appends one device.
    pub(super) fn push(&mut self, device: &Device, s: &DeviceSummary) {
        self.buf.extend_from_slice(if self.started {
            b","
        } else {
            b"{\"devices\":["
        });
        self.started = true;
        self.buf.extend_from_slice(b"{\"device\":");
        serde_json::to_writer(&mut self.buf, device.as_str()).expect("writing to a vector");
        self.buf.extend_from_slice(b",\"readings\":");
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(s.readings).as_bytes());
        for (key, t) in [(&b",\"first\":"[..], s.first), (b",\"last\":", s.last)] {
            self.buf.extend_from_slice(key);
            match t {
                Some(t) => {
                    self.buf.push(b'"');
                    t.write_rfc3339(&mut self.buf);
                    self.buf.push(b'"');
                }
                None => self.buf.extend_from_slice(b"null"),
            }
        }
        self.buf.push(b'}');
    }

    /// Whether enough is written to send it.
    pub(super) fn is_full(&self) -> bool {
        self.buf.len() >= crate::api::readings::CHUNK_BYTES
    }

    /// Takes what is written so far.
    pub(super) fn take(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.buf))
    }

    /// Closes the document (an empty list if nothing was pushed).
    pub(super) fn finish(mut self) -> Bytes {
        if !self.started {
            self.buf.extend_from_slice(b"{\"devices\":[");
        }
        self.buf.extend_from_slice(b"]}");
        self.take()
    }
}

/// A catalogued sensor and its series for one device.
#[derive(Debug, Clone, Object)]
pub struct SensorInfo {
    /// Name readings use.
    pub name: String,
    /// Unit of the values.
    pub unit: String,
    /// What it measures.
    pub description: String,
    /// Lowest valid value, if bounded.
    #[oai(nullable)]
    pub min: Option<f64>,
    /// Highest valid value, if bounded.
    #[oai(nullable)]
    pub max: Option<f64>,
    /// Stored readings of the device.
    pub readings: u64,
    /// Oldest reading (RFC 3339 UTC).
    #[oai(nullable)]
    pub first: Option<String>,
    /// Newest reading (RFC 3339 UTC).
    #[oai(nullable)]
    pub last: Option<String>,
    /// Value of the newest reading, `null` when there is none.
    #[oai(nullable)]
    pub last_value: Option<f64>,
}

/// The catalog with one device's statistics.
#[derive(Debug, Clone, Object)]
pub struct SensorList {
    /// The device the counts are for.
    pub device: String,
    /// Every catalogued sensor.
    pub sensors: Vec<SensorInfo>,
}

/// How empty buckets are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Default)]
#[oai(rename_all = "lowercase")]
pub enum Fill {
    /// Leave empty buckets out.
    #[default]
    None,
    /// Include them with `count` 0 and `null` values.
    Null,
    /// Include them with `count` 0 and values 0.
    Zero,
    /// Include them with `count` 0 and the previous bucket's last value.
    Previous,
}

/// Aggregates of one bucket.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct BucketBody {
    /// Start of the bucket (RFC 3339 UTC).
    pub start: String,
    /// End of the bucket, exclusive.
    pub end: String,
    /// Readings in the bucket (within `from`..`to`).
    pub count: u64,
    /// Smallest value; `null` in an empty bucket.
    #[oai(nullable)]
    pub min: Option<f64>,
    /// Largest value; `null` in an empty bucket.
    #[oai(nullable)]
    pub max: Option<f64>,
    /// Average value; `null` in an empty bucket.
    #[oai(nullable)]
    pub avg: Option<f64>,
    /// Value of the oldest reading; `null` in an empty bucket.
    #[oai(nullable)]
    pub first: Option<f64>,
    /// Value of the newest reading; `null` in an empty bucket.
    #[oai(nullable)]
    pub last: Option<f64>,
}

/// Bucketed statistics of one sensor.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct StatisticsBody {
    /// Device.
    pub device: String,
    /// Sensor.
    pub sensor: String,
    /// Bucket width as requested.
    pub bucket: String,
    /// Time zone buckets are aligned in.
    pub tz: String,
    /// Start of the range (RFC 3339 UTC).
    pub from: String,
    /// End of the range, exclusive.
    pub to: String,
    /// The buckets, oldest first.
    pub buckets: Vec<BucketBody>,
}

impl Example for StatisticsBody {
    fn example() -> Self {
        Self {
            device: "default".into(),
            sensor: "speed".into(),
            bucket: "1h".into(),
            tz: "UTC".into(),
            from: "2026-05-01T00:00:00Z".into(),
            to: "2026-05-02T00:00:00Z".into(),
            buckets: vec![BucketBody {
                start: "2026-05-01T07:00:00Z".into(),
                end: "2026-05-01T08:00:00Z".into(),
                count: 3600,
                min: Some(0.0),
                max: Some(92.5),
                avg: Some(48.2),
                first: Some(0.0),
                last: Some(61.0),
            }],
        }
    }
}

/// One raw reading.
#[derive(Debug, Clone, Object)]
pub struct ReadingBody {
    /// RFC 3339 UTC, with the precision it was sent with (up to µs).
    pub timestamp: String,
    /// Value.
    pub value: f64,
}

/// A page of raw readings.
#[derive(Debug, Clone, Object)]
pub struct ReadingPage {
    /// Device.
    pub device: String,
    /// Sensor.
    pub sensor: String,
    /// Readings in time order.
    pub readings: Vec<ReadingBody>,
    /// Pass as `cursor` (with the same `from`/`to`) for the next page; `null` when
    /// this page reaches the end of the range.
    #[oai(nullable)]
    pub next_cursor: Option<String>,
}

/// Raw readings in the negotiated format.
#[derive(ResponseContent)]
pub enum ReadingsContent {
    /// A page as JSON.
    Json(Json<ReadingPage>),
    /// One reading per line, in the shape `POST /ingest` takes (so an export can be
    /// re-imported as it is).
    #[oai(content_type = "application/x-ndjson")]
    Ndjson(Binary<poem::Body>),
    /// `timestamp,value` with a header row.
    #[oai(content_type = "text/csv; charset=utf-8")]
    Csv(Binary<poem::Body>),
}

impl ReadingsContent {
    /// A body of NDJSON or CSV lines, labelled as `format`.
    pub(super) fn lines(format: Format, body: poem::Body) -> Self {
        if format == Format::Csv {
            Self::Csv(Binary(body))
        } else {
            Self::Ndjson(Binary(body))
        }
    }
}

/// Answer of the raw readings endpoint.
#[derive(ApiResponse)]
pub enum ReadingsResponse {
    /// The readings. `X-Next-Cursor` is set when a page stops before the end of the
    /// range.
    #[oai(status = 200)]
    Ok(
        ReadingsContent,
        #[oai(header = "X-Next-Cursor")] Option<String>,
    ),
}

/// GeoJSON of the route.
#[derive(ApiResponse)]
pub enum TrackResponse {
    /// A FeatureCollection: one `LineString` feature (or a `Point` when there is a
    /// single position, none when there is no position). `properties.timestamps`
    /// holds the time of each coordinate.
    #[oai(status = 200, content_type = "application/geo+json")]
    Ok(Json<Any<serde_json::Value>>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Timestamp;

    fn written(devices: &[(&str, DeviceSummary)]) -> serde_json::Value {
        let mut w = DeviceListWriter::default();
        let mut bytes = Vec::new();
        for (name, s) in devices {
            w.push(&Device::parse(name).unwrap(), s);
            bytes.extend_from_slice(&w.take());
        }
        bytes.extend_from_slice(&w.finish());
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn the_streamed_device_list_is_the_documented_json() {
        assert_eq!(written(&[]), serde_json::json!({"devices": []}));
        let seen = DeviceSummary {
            readings: 12,
            first: Some(Timestamp::from_micros(1_335_205_543_511_000)),
            last: Some(Timestamp::from_micros(1_335_205_544_000_001)),
        };
        assert_eq!(
            written(&[("truck-7", seen), ("new", DeviceSummary::default())]),
            serde_json::json!({"devices": [
                {"device": "truck-7", "readings": 12,
                 "first": "2012-04-23T18:25:43.511Z", "last": "2012-04-23T18:25:44.000001Z"},
                {"device": "new", "readings": 0, "first": null, "last": null},
            ]})
        );
    }
}
