//! Raw readings: content negotiation, the opaque keyset cursor, and fast writers for
//! JSON, NDJSON and CSV.
//!
//! A *page* (`limit` given, or JSON) is read in full — at most [`MAX_PAGE`] readings —
//! so its continuation cursor can go in a header before the body. An *export* (NDJSON
//! or CSV without `limit`) streams the whole range from a blocking scan through a
//! small channel: memory stays bounded however long the range, and a client that
//! hangs up stops the scan.

use std::ops::ControlFlow;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use poem::Body;

use super::error::ApiError;
use super::stream::BodySender;
use crate::domain::{Device, SensorName, TimeRange, Timestamp};
use crate::store::ScanChunk;

/// Largest page; also the default page size is [`DEFAULT_PAGE`].
pub const MAX_PAGE: u64 = 100_000;
/// Readings per page when `limit` is not given (JSON).
pub const DEFAULT_PAGE: u64 = 1000;
/// Bytes gathered before a chunk of a streamed answer is sent: under malloc's mmap
/// threshold ([`crate::jobs::MMAP_THRESHOLD`]), so that each chunk's copy reuses
/// freed memory instead of faulting in a fresh mapping. An export of 20.8 M
/// readings ran at 6.1 M readings/s with 256 KiB chunks once the threshold was
/// fixed, 7.0–7.4 with these (7.6–7.7 before; the rest is DuckDB's sort buffers).
pub(crate) const CHUNK_BYTES: usize = crate::jobs::MMAP_THRESHOLD / 2;

/// Representation of raw readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON document with a `readings` array and `next_cursor`.
    Json,
    /// One reading per line, in the shape `POST /ingest` accepts.
    Ndjson,
    /// `timestamp,value` with a header row.
    Csv,
}

impl Format {
    /// Picks the format from `?format=` if given, else from `Accept` (in order of
    /// preference, `q` honoured); JSON when the client accepts anything.
    pub fn negotiate(format: Option<&str>, accept: Option<&str>) -> Result<Self, ApiError> {
        if let Some(f) = format {
            return match f {
                "json" => Ok(Self::Json),
                "ndjson" => Ok(Self::Ndjson),
                "csv" => Ok(Self::Csv),
                other => Err(ApiError::bad_request(format!(
                    "unknown format '{other}': use json, ndjson or csv"
                ))),
            };
        }
        let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
            return Ok(Self::Json);
        };
        for media in preferred(accept) {
            if let Some(f) = Self::of_media(media) {
                return Ok(f);
            }
        }
        Err(ApiError::not_acceptable(format!(
            "cannot produce any of '{accept}': use application/json, application/x-ndjson \
             or text/csv"
        )))
    }

    /// The format a media type (or range) asks for.
    pub fn of_media(media: &str) -> Option<Self> {
        match media.to_ascii_lowercase().as_str() {
            "application/json" | "application/*" | "*/*" => Some(Self::Json),
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
                Some(Self::Ndjson)
            }
            "text/csv" | "text/*" => Some(Self::Csv),
            _ => None,
        }
    }
}

/// The media ranges of an `Accept` header, most preferred first (`q` honoured,
/// ties in the order given; `q=0` left out).
pub fn preferred(accept: &str) -> Vec<&str> {
    let mut ranges: Vec<(f32, usize, &str)> = accept
        .split(',')
        .enumerate()
        .filter_map(|(i, part)| {
            let mut it = part.split(';');
            let media = it.next()?.trim();
            let q = it
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (q > 0.0).then_some((q, i, media))
        })
        .collect();
    ranges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    ranges.into_iter().map(|(_, _, media)| media).collect()
}

/// Where a page ended: the readings after `after` come next. Bound to one device
/// and sensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Device it was issued for.
    pub device: Device,
    /// Sensor it was issued for.
    pub sensor: SensorName,
    /// Timestamp of the last reading returned.
    pub after: Timestamp,
}

const CURSOR_VERSION: &str = "c1";

impl Cursor {
    /// The opaque text form.
    pub fn encode(&self) -> String {
        let raw = format!(
            "{CURSOR_VERSION}:{}:{}:{}",
            self.device,
            self.sensor,
            self.after.as_micros()
        );
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Parses a cursor and checks it belongs to `device` and `sensor`.
    pub fn decode(s: &str, device: &Device, sensor: &SensorName) -> Result<Self, ApiError> {
        let bad = || {
            ApiError::bad_request("invalid cursor: pass next_cursor of a previous page unchanged")
        };
        let raw = URL_SAFE_NO_PAD.decode(s.trim()).map_err(|_| bad())?;
        let raw = String::from_utf8(raw).map_err(|_| bad())?;
        let mut parts = raw.split(':');
        let (Some(CURSOR_VERSION), Some(d), Some(n), Some(t), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let cursor = Self {
            device: Device::parse(d).map_err(|_| bad())?,
            sensor: SensorName::parse(n).map_err(|_| bad())?,
            after: Timestamp::from_micros(t.parse().map_err(|_| bad())?),
        };
        if !TimeRange::ALL.contains(cursor.after) {
            return Err(bad());
        }
        if &cursor.device != device || &cursor.sensor != sensor {
            return Err(ApiError::bad_request(format!(
                "the cursor belongs to sensor '{}' of device '{}', not to this request",
                cursor.sensor, cursor.device
            )));
        }
        Ok(cursor)
    }
}

/// Formats readings of one series as NDJSON or CSV lines.
pub struct LineWriter {
    format: Format,
    /// `{"sensor":"speed","value":`
    head: Vec<u8>,
    /// `,"device":"truck"}` or `}` for the default device.
    tail: Vec<u8>,
    buf: Vec<u8>,
    floats: ryu::Buffer,
}

impl LineWriter {
    /// A writer for `format` (NDJSON or CSV) of `sensor` of `device`.
    pub fn new(format: Format, device: &Device, sensor: &SensorName) -> Self {
        let head = format!("{{\"sensor\":\"{sensor}\",\"value\":").into_bytes();
        // Names are restricted to characters that need no JSON escaping.
        let tail = if device.as_str() == "default" {
            b"}\n".to_vec()
        } else {
            format!(",\"device\":\"{device}\"}}\n").into_bytes()
        };
        let mut buf = Vec::with_capacity(CHUNK_BYTES + 1024);
        if format == Format::Csv {
            buf.extend_from_slice(b"timestamp,value\n");
        }
        Self {
            format,
            head,
            tail,
            buf,
            floats: ryu::Buffer::new(),
        }
    }

    /// Appends one reading.
    pub fn push(&mut self, ts: i64, value: f64) {
        let t = Timestamp::from_micros(ts);
        match self.format {
            Format::Csv => {
                t.write_rfc3339(&mut self.buf);
                self.buf.push(b',');
                self.buf
                    .extend_from_slice(self.floats.format_finite(value).as_bytes());
                self.buf.push(b'\n');
            }
            _ => {
                self.buf.extend_from_slice(&self.head);
                self.buf
                    .extend_from_slice(self.floats.format_finite(value).as_bytes());
                self.buf.extend_from_slice(b",\"timestamp\":\"");
                t.write_rfc3339(&mut self.buf);
                self.buf.push(b'"');
                self.buf.extend_from_slice(&self.tail);
            }
        }
    }

    /// Whether enough is buffered to send a chunk.
    pub fn is_full(&self) -> bool {
        self.buf.len() >= CHUNK_BYTES
    }

    /// Takes what is buffered.
    pub fn take(&mut self) -> Bytes {
        let out = Bytes::copy_from_slice(&self.buf);
        self.buf.clear();
        out
    }
}

/// The sending half of a streamed export, fed by the blocking scan.
pub struct ExportSink {
    writer: LineWriter,
    body: BodySender,
}

impl ExportSink {
    /// A response body and the sink that fills it.
    pub fn new(writer: LineWriter) -> (Body, Self) {
        let (stream, body) = BodySender::channel();
        (stream, Self { writer, body })
    }

    /// Formats a chunk of the scan; `Break` once the client has hung up.
    pub fn chunk(&mut self, c: ScanChunk<'_>) -> ControlFlow<()> {
        for (ts, v) in c.ts.iter().zip(c.values) {
            self.writer.push(*ts, *v);
        }
        if self.writer.is_full() {
            self.body.send(self.writer.take())
        } else {
            ControlFlow::Continue(())
        }
    }

    /// Whether the client went away before the end.
    pub fn hung_up(&self) -> bool {
        self.body.hung_up()
    }

    /// Sends the rest; the body ends when the sink is dropped.
    pub fn finish(mut self) {
        let _ = self.body.send(self.writer.take());
    }

    /// Aborts the body, so the client sees a broken transfer, not a short file.
    pub fn fail(self, error: &str) {
        self.body.fail(error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(s: &str) -> Device {
        Device::parse(s).unwrap()
    }

    fn sensor(s: &str) -> SensorName {
        SensorName::parse(s).unwrap()
    }

    #[test]
    fn accept_headers_pick_a_format() {
        let n = |a: &str| Format::negotiate(None, Some(a)).map_err(|_| ());
        assert_eq!(Format::negotiate(None, None).ok(), Some(Format::Json));
        assert_eq!(n("application/x-ndjson"), Ok(Format::Ndjson));
        assert_eq!(n("text/csv; charset=utf-8"), Ok(Format::Csv));
        assert_eq!(
            n("text/html,application/xhtml+xml,*/*;q=0.8"),
            Ok(Format::Json)
        );
        assert_eq!(n("application/json;q=0.5, text/csv"), Ok(Format::Csv));
        assert_eq!(n("image/png"), Err(()));
        assert_eq!(
            Format::negotiate(Some("csv"), Some("application/json")).ok(),
            Some(Format::Csv)
        );
        assert!(Format::negotiate(Some("xml"), None).is_err());
    }

    #[test]
    fn cursors_round_trip_and_stay_bound_to_their_series() {
        let c = Cursor {
            device: device("truck"),
            sensor: sensor("speed"),
            after: Timestamp::from_micros(1_767_225_600_123_456),
        };
        let text = c.encode();
        assert_eq!(
            Cursor::decode(&text, &device("truck"), &sensor("speed")).unwrap(),
            c
        );
        assert!(Cursor::decode(&text, &device("truck"), &sensor("fuel")).is_err());
        assert!(Cursor::decode(&text, &device("car"), &sensor("speed")).is_err());
        for bad in [
            "",
            "!!",
            "YWJj",
            &URL_SAFE_NO_PAD.encode("c1:truck:speed:x"),
        ] {
            assert!(
                Cursor::decode(bad, &device("truck"), &sensor("speed")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn lines_are_ingestable_ndjson_and_plain_csv() {
        let mut w = LineWriter::new(Format::Ndjson, &device("truck"), &sensor("speed"));
        w.push(1_335_205_543_511_000, 55.5);
        w.push(1_335_205_544_000_001, 3.0);
        let text = String::from_utf8(w.take().to_vec()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"sensor": "speed", "value": 55.5,
                "timestamp": "2012-04-23T18:25:43.511Z", "device": "truck"})
        );
        assert_eq!(lines[1]["timestamp"], "2012-04-23T18:25:44.000001Z");
        let mut c = LineWriter::new(Format::Csv, &device("default"), &sensor("speed"));
        c.push(1_335_205_543_511_000, -1.25);
        assert_eq!(
            c.take(),
            Bytes::from("timestamp,value\n2012-04-23T18:25:43.511Z,-1.25\n")
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Export → ingest is the identity: every reading an NDJSON export writes comes
        /// back from the ingest parser with the same device, sensor, µs and value bits.
        #[test]
        fn exported_lines_ingest_to_the_same_readings(
            rows in proptest::collection::vec(
                (946_684_800_000_000i64..4_102_444_800_000_000, -1e9f64..1e9),
                1..200,
            ),
            named in proptest::bool::ANY,
        ) {
            use crate::ingest::{IngestOptions, StreamParser};
            let catalog = std::sync::Arc::new(crate::domain::Catalog::new(crate::domain::Catalog::builtin()));
            let dev = device(if named { "truck-7" } else { "default" });
            let mut w = LineWriter::new(Format::Ndjson, &dev, &sensor("speed"));
            for &(ts, value) in &rows {
                w.push(ts, value);
            }
            let mut p = StreamParser::new(catalog.clone(), IngestOptions {
                latest: crate::domain::Timestamp::from_micros(i64::MAX / 2),
                max_line_bytes: 1024,
                bound_device: None,
                gate: None,
            });
            p.feed(&w.take());
            p.finish();
            proptest::prop_assert_eq!(p.rejected(), 0, "{:?}", p.errors());
            let batch = p.take_batch();
            let speed = catalog.get("speed").unwrap().id;
            let got: Vec<_> = batch.rows.iter().map(|r| {
                (batch.devices[r.device as usize].as_str().to_owned(), r.sensor, r.ts.as_micros(), r.value.to_bits())
            }).collect();
            let want: Vec<_> = rows.iter().map(|&(ts, v)| (dev.as_str().to_owned(), speed, ts, v.to_bits())).collect();
            proptest::prop_assert_eq!(got, want);
        }
    }
}
