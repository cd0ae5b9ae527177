//! NDJSON reading parser.
//!
//! [`StreamParser`] takes the body in arbitrary chunks, cuts it into lines without
//! copying the ones that lie inside a chunk, and judges every line on its own: a bad
//! line becomes a [`LineError`] with its 1-based number and never affects its
//! neighbours. Memory stays bounded: at most one partial line (capped at the
//! configured maximum length) plus the current batch.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

use super::fast;
use super::gate::{Decisions, DeviceGate};
use crate::domain::{Batch, Catalog, Device, Row, SensorId, Timestamp};

/// How readings are judged.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Latest timestamp accepted (now plus the allowed clock skew).
    pub latest: Timestamp,
    /// Longest accepted line in bytes, excluding the newline.
    pub max_line_bytes: usize,
    /// Device of the API key, if it is bound to one: readings without `device` take
    /// it and readings naming another device are refused.
    pub bound_device: Option<Device>,
    /// Admits devices the request names (see [`DeviceGate`]); `None` admits all.
    pub gate: Option<Arc<dyn DeviceGate>>,
}

/// Why one line was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number in the body.
    pub line: u64,
    /// What was wrong, for people.
    pub error: String,
}

/// Errors kept in full per request; the count stays exact beyond this.
pub const MAX_REPORTED_ERRORS: usize = 100;

/// Whole lines below this many bytes are parsed on one thread: a thread costs more
/// than it saves.
const PARALLEL_MIN_BYTES: usize = 512 * 1024;

/// Incremental parser for one request body.
pub struct StreamParser {
    catalog: Arc<Catalog>,
    opts: IngestOptions,
    /// The unfinished line carried over between chunks.
    partial: Vec<u8>,
    /// The current line is over the limit: skip to its end.
    skipping: bool,
    /// Number of the next line to complete.
    line_no: u64,
    batch: Batch,
    /// Where each of the batch's devices is in its table.
    devices: DeviceTable,
    errors: Vec<LineError>,
    rejected: u64,
    /// Refused lines per sensor id; lines without a catalogued sensor are not here.
    rejected_by_sensor: HashMap<SensorId, u64>,
    oversize_lines: u64,
    /// What the gate said of each device of the request.
    decisions: Decisions,
}

impl StreamParser {
    /// A parser for one body.
    pub fn new(catalog: Arc<Catalog>, opts: IngestOptions) -> Self {
        Self {
            catalog,
            opts,
            partial: Vec::new(),
            skipping: false,
            line_no: 1,
            batch: Batch::default(),
            devices: DeviceTable::default(),
            errors: Vec::new(),
            rejected: 0,
            rejected_by_sensor: HashMap::new(),
            oversize_lines: 0,
            decisions: Decisions::default(),
        }
    }

    /// Parses every line completed by `chunk`.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while let Some(nl) = memchr::memchr(b'\n', chunk) {
            let (line, rest) = (&chunk[..nl], &chunk[nl + 1..]);
            chunk = rest;
            if self.skipping {
                self.skipping = false;
            } else if self.partial.is_empty() {
                self.line(line);
            } else if self.partial.len() + line.len() > self.opts.max_line_bytes
                && !self.cr_at_limit(self.partial.len() + line.len(), line, &self.partial)
            {
                self.partial.clear();
                self.oversize();
            } else {
                let mut joined = std::mem::take(&mut self.partial);
                joined.extend_from_slice(line);
                self.line(&joined);
                joined.clear();
                self.partial = joined;
            }
            self.line_no += 1;
        }
        if self.skipping || chunk.is_empty() {
            return;
        }
        if self.partial.len() + chunk.len() > self.opts.max_line_bytes
            && !self.cr_at_limit(self.partial.len() + chunk.len(), chunk, &self.partial)
        {
            self.partial.clear();
            self.skipping = true;
            self.oversize();
        } else {
            self.partial.extend_from_slice(chunk);
        }
    }

    /// Whether a line of `len` bytes, over the limit, is so only by a `\r` just past
    /// it (the last byte of `tail`, or of `head` when `tail` is empty), which may be
    /// the first half of a CRLF: the limit is on the line without its line break, as
    /// [`Self::line`] applies it. (Without this, a line of exactly the limit ending in
    /// CRLF was refused when the `\r` and the `\n` came in different reads, and
    /// accepted when they came in one.) Out of line and cold: a call in the hot loop
    /// cost bulk ingest ~9 % (`milepost bench`, 8 pairs).
    #[cold]
    #[inline(never)]
    fn cr_at_limit(&self, len: usize, tail: &[u8], head: &[u8]) -> bool {
        len == self.opts.max_line_bytes + 1 && tail.last().or(head.last()) == Some(&b'\r')
    }

    /// [`Self::feed`] for a large chunk, its whole lines cut into `parts` pieces at
    /// line boundaries and parsed on as many threads (NDJSON lines are independent);
    /// the results are merged in order, so batch, counts and line numbers are exactly
    /// those of [`Self::feed`].
    pub fn feed_parallel(&mut self, chunk: &[u8], parts: usize) {
        let (Some(first), Some(last)) =
            (memchr::memchr(b'\n', chunk), memchr::memrchr(b'\n', chunk))
        else {
            return self.feed(chunk);
        };
        // Every piece may name new devices (one per reading at most; a reading that
        // names one takes well over 32 bytes); the batch's table must hold them all.
        let room = Batch::MAX_DEVICES.saturating_sub(self.batch.devices.len());
        if parts < 2 || last - first < PARALLEL_MIN_BYTES || room < (last - first) / 32 {
            return self.feed(chunk);
        }
        // The line carried over from the previous chunk ends at `first`; after it the
        // parser holds no partial line and skips nothing.
        self.feed(&chunk[..=first]);
        let middle = &chunk[first + 1..=last];
        let mut pieces = Vec::with_capacity(parts);
        let mut rest = middle;
        for k in (1..parts).rev() {
            let target = rest.len() / (k + 1);
            match memchr::memchr(b'\n', &rest[target..]) {
                Some(nl) if target + nl + 1 < rest.len() => {
                    let (head, tail) = rest.split_at(target + nl + 1);
                    pieces.push(head);
                    rest = tail;
                }
                _ => break,
            }
        }
        pieces.push(rest);
        let mut starts = Vec::with_capacity(pieces.len());
        let mut line = self.line_no;
        for piece in &pieces {
            starts.push(line);
            line += memchr::memchr_iter(b'\n', piece).count() as u64;
        }
        let parsed: Vec<StreamParser> = std::thread::scope(|scope| {
            let handles: Vec<_> = pieces
                .iter()
                .zip(&starts)
                .skip(1)
                .map(|(piece, &start)| {
                    let mut sub = self.sub_parser(start);
                    let span = tracing::Span::current();
                    scope.spawn(move || {
                        span.in_scope(|| sub.feed(piece));
                        sub
                    })
                })
                .collect();
            let mut head = self.sub_parser(starts[0]);
            head.feed(pieces[0]);
            let mut all = vec![head];
            all.extend(
                handles
                    .into_iter()
                    .map(|h| h.join().expect("parser does not panic")),
            );
            all
        });
        for sub in parsed {
            self.absorb(sub);
        }
        self.line_no = line;
        self.feed(&chunk[last + 1..]);
    }

    /// A parser for whole lines numbered from `line_no`, judging them as this one.
    fn sub_parser(&self, line_no: u64) -> StreamParser {
        let mut p = StreamParser::new(self.catalog.clone(), self.opts.clone());
        p.line_no = line_no;
        p
    }

    /// Appends the results of a sub-parser that parsed the lines after this one's.
    fn absorb(&mut self, sub: StreamParser) {
        let map: Vec<u16> = sub
            .batch
            .devices
            .iter()
            .map(|d| {
                self.devices
                    .find(&self.batch, d.as_str())
                    .unwrap_or_else(|| {
                        let i = self
                            .batch
                            .push_device(d.as_str())
                            .expect("room for the devices was checked");
                        self.devices.added(&self.batch, i);
                        i
                    })
            })
            .collect();
        self.batch
            .rows
            .extend(sub.batch.rows.into_iter().map(|mut r| {
                r.device = map[r.device as usize];
                r
            }));
        let room = MAX_REPORTED_ERRORS.saturating_sub(self.errors.len());
        self.errors.extend(sub.errors.into_iter().take(room));
        self.rejected += sub.rejected;
        for (id, n) in sub.rejected_by_sensor {
            *self.rejected_by_sensor.entry(id).or_default() += n;
        }
        self.oversize_lines += sub.oversize_lines;
        self.decisions.absorb(sub.decisions);
    }

    /// Parses the last line if the body did not end with a newline.
    pub fn finish(&mut self) {
        if !self.skipping && !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line);
            self.line_no += 1;
        }
        self.skipping = false;
    }

    /// Readings parsed so far and not yet taken.
    pub fn pending(&self) -> usize {
        self.batch.len()
    }

    /// Takes the readings parsed so far.
    pub fn take_batch(&mut self) -> Batch {
        self.devices = DeviceTable::default();
        std::mem::take(&mut self.batch)
    }

    /// Lines refused so far.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Refused lines that named a catalogued sensor, per sensor; the rest of
    /// [`Self::rejected`] named none.
    pub fn rejected_by_sensor(&self) -> &HashMap<SensorId, u64> {
        &self.rejected_by_sensor
    }

    /// Some lines were refused because the request's key brought in too many new
    /// devices lately: the request may be retried after this many seconds.
    pub fn rate_limited(&self) -> Option<u64> {
        self.decisions.retry_after()
    }

    /// Lines refused for exceeding the length limit.
    pub fn oversize_lines(&self) -> u64 {
        self.oversize_lines
    }

    /// The first [`MAX_REPORTED_ERRORS`] refusals.
    pub fn errors(&self) -> &[LineError] {
        &self.errors
    }

    fn oversize(&mut self) {
        self.oversize_lines += 1;
        let msg = format!(
            "line is longer than the limit of {} bytes",
            self.opts.max_line_bytes
        );
        self.reject(msg);
    }

    fn reject(&mut self, error: String) {
        self.rejected += 1;
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(LineError {
                line: self.line_no,
                error,
            });
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        if line.len() > self.opts.max_line_bytes {
            self.oversize();
            return;
        }
        if let Err((sensor, e)) = self.reading(line) {
            if let Some(id) = sensor {
                *self.rejected_by_sensor.entry(id).or_default() += 1;
            }
            self.reject(e);
        }
    }

    /// Parses one line into the batch, or says why not (and which sensor the line
    /// was for, when it named a catalogued one).
    fn reading(&mut self, line: &[u8]) -> Result<(), (Option<SensorId>, String)> {
        if line.trim_ascii_start().first() != Some(&b'{') {
            return Err((
                None,
                "a reading must be a JSON object: {\"sensor\": …, \"value\": …, \"timestamp\": …}"
                    .into(),
            ));
        }
        // The common shape takes a shortcut; everything else goes through sonic-rs
        // (SIMD JSON with serde support; it validates UTF-8 like serde_json).
        let wire = match fast::scan(line) {
            Some(wire) => wire,
            None => sonic_rs::from_slice(line).map_err(|e| (None, describe_json_error(e)))?,
        };
        let sensor = self
            .catalog
            .get(&wire.sensor)
            .ok_or_else(|| (None, format!("unknown sensor '{}'", wire.sensor)))?;
        let id = sensor.id;
        let fail = |e: String| (Some(id), e);
        let value = sensor
            .check_value(wire.value.0)
            .map_err(|e| fail(e.to_string()))?;
        let ts = Timestamp::parse_reading(&wire.timestamp, self.opts.latest)
            .map_err(|e| fail(e.to_string()))?;
        let device = match (&wire.device, &self.opts.bound_device) {
            (None, None) => "default",
            (None, Some(bound)) => bound.as_str(),
            (Some(d), None) => d,
            (Some(d), Some(bound)) if d == bound.as_str() => d,
            (Some(d), Some(bound)) => {
                return Err(fail(format!(
                    "device '{d}' is not allowed: this API key is bound to device '{bound}'"
                )));
            }
        };
        let device = device_index(
            &mut self.batch,
            &mut self.devices,
            device,
            self.opts.gate.as_deref().map(|g| (g, &mut self.decisions)),
        )
        .map_err(fail)?;
        self.batch.rows.push(Row {
            device,
            sensor: sensor.id,
            ts,
            value,
        });
        Ok(())
    }
}

/// Index of `device` in the batch's device table, adding it if new. A device new to
/// the batch is put to the gate (once per request).
fn device_index(
    batch: &mut Batch,
    table: &mut DeviceTable,
    device: &str,
    gate: Option<(&dyn DeviceGate, &mut Decisions)>,
) -> Result<u16, String> {
    if let Some(i) = table.find(batch, device) {
        return Ok(i);
    }
    Device::check(device).map_err(|e| format!("invalid device '{device}': {e}"))?;
    if let Some((gate, decisions)) = gate {
        decisions.check(gate, device)?;
    }
    let i = batch
        .push_device(device)
        .ok_or_else(|| "too many distinct devices in one request".to_owned())?;
    table.added(batch, i);
    Ok(i)
}

/// Where each device of a batch is in its table, by name. Nearly every request names
/// a single device, which the last one found answers, and a few are searched in
/// order; a request that interleaves many (a gateway forwarding a fleet, a backlog
/// exported from many devices) gets a hash table: a linear search of a request's
/// 28,000 devices for each of its 170,000 lines took 80 % of the server's time (a
/// million devices' day pushed at 34 k readings/s).
#[derive(Default)]
struct DeviceTable {
    last: u16,
    /// Empty until the batch has more than [`DeviceTable::LINEAR`] devices.
    by_name: HashTable<u16>,
}

fn name_hash(name: &str) -> u64 {
    FxBuildHasher.hash_one(name)
}

impl DeviceTable {
    /// Devices searched in order, without hashing or allocating: a fleet's small
    /// requests name one.
    const LINEAR: usize = 8;

    /// The index of `name` in `batch`'s table, if there.
    fn find(&mut self, batch: &Batch, name: &str) -> Option<u16> {
        let devices = &batch.devices;
        if devices
            .get(usize::from(self.last))
            .is_some_and(|d| d.as_str() == name)
        {
            return Some(self.last);
        }
        let i = if devices.len() <= Self::LINEAR {
            devices.iter().position(|d| d.as_str() == name)? as u16
        } else {
            *self.by_name.find(name_hash(name), |&i| {
                devices[usize::from(i)].as_str() == name
            })?
        };
        self.last = i;
        Some(i)
    }

    /// Notes that `batch`'s device `i`, its last, was just added.
    fn added(&mut self, batch: &Batch, i: u16) {
        self.last = i;
        let devices = &batch.devices;
        if devices.len() <= Self::LINEAR {
            return;
        }
        let hash = |j: &u16| name_hash(devices[usize::from(*j)].as_str());
        // Past the linear search: every device so far, this one included.
        let from = if self.by_name.is_empty() { 0 } else { i };
        for j in from..=i {
            self.by_name.insert_unique(hash(&j), j, hash);
        }
    }
}

fn describe_json_error(e: sonic_rs::Error) -> String {
    use sonic_rs::error::Category;
    let kind = match e.classify() {
        Category::Eof => "malformed JSON (line ends early)",
        Category::Syntax | Category::Io => "malformed JSON",
        _ => "invalid reading",
    };
    // The parser appends "at line 1 column N"; the line is ours to number.
    let msg = e.to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg);
    format!("{kind}: {msg} (column {})", e.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> StreamParser {
        parser_with(None)
    }

    fn parser_with(bound: Option<&str>) -> StreamParser {
        StreamParser::new(
            Arc::new(Catalog::new(Catalog::builtin())),
            IngestOptions {
                latest: Timestamp::now().plus(chrono::Duration::hours(24)),
                max_line_bytes: 200,
                bound_device: bound.map(|d| Device::parse(d).unwrap()),
                gate: None,
            },
        )
    }

    const SEED: &str = r#"{"sensor": "speed", "value": 55.5, "timestamp": "2012-04-23T18:25:43.511Z"}
{"sensor": "speed", "value": 60.2, "timestamp": "2012-04-23T18:26:43.511Z"}
{"sensor": "speed", "value": 61.9, "timestamp": "2012-04-23T18:27:43.511Z"}
"#;

    /// Readings of a parser as (device name, sensor, µs, value).
    fn readings(b: &Batch) -> Vec<(String, u16, i64, u64)> {
        b.rows
            .iter()
            .map(|r| {
                let d = b.devices[r.device as usize].as_str().to_owned();
                (d, r.sensor.0, r.ts.as_micros(), r.value.to_bits())
            })
            .collect()
    }

    /// A body of good lines for thousands of interleaved devices, with bad, blank, CRLF and oversize
    /// lines among them; the same body parsed sequentially and in parallel, in chunks
    /// of many sizes, gives the same readings in the same order, the same counts and
    /// the same line numbers in the errors.
    #[test]
    fn parallel_parsing_matches_sequential_parsing_exactly() {
        // Many bad lines (only the first 100 are listed), then few (all listed, so
        // every piece's line numbers show).
        parallel_matches_sequential(0..100, false);
        parallel_matches_sequential(0..2_000, true);
    }

    fn parallel_matches_sequential(odds: std::ops::Range<u32>, sparse: bool) {
        let mut body = String::new();
        let mut rng = fastrand::Rng::with_seed(7);
        for i in 0..40_000u32 {
            let sensor = ["speed", "fuel", "revolution"][(i % 3) as usize];
            match rng.u32(odds.clone()) {
                0 => body.push_str("not json\n"),
                1 => body.push_str("{\"sensor\": \"warp\", \"value\": 1, \"timestamp\": \"2020-01-01T00:00:00Z\"}\n"),
                2 => body.push('\n'),
                3 => body.push_str(&format!("{{\"sensor\": \"speed\", \"value\": 1, \"timestamp\": \"2020-01-01T00:00:00Z\", \"pad\": \"{}\"}}\n", "x".repeat(300))),
                4 => body.push_str(&format!("{{\"sensor\": \"fuel\", \"value\": {i}, \"timestamp\": \"2020-01-01T00:00:{:02}Z\"}}\r\n", i % 60)),
                _ => body.push_str(&format!(
                    "{{\"device\": \"dev-{}\", \"sensor\": \"{sensor}\", \"value\": {}.25, \"timestamp\": \"2020-01-01T{:02}:{:02}:{:02}.{:03}Z\"}}\n",
                    rng.u32(0..5_000),
                    i,
                    (i / 3600) % 24,
                    (i / 60) % 60,
                    i % 60,
                    i % 1000
                )),
            }
        }
        body.push_str(
            "{\"sensor\": \"speed\", \"value\": 2, \"timestamp\": \"2020-01-02T00:00:00Z\"}",
        );
        let run = |chunk: usize, parallel: bool| {
            let mut p = parser();
            let mut rows = Vec::new();
            for c in body.as_bytes().chunks(chunk) {
                if parallel {
                    p.feed_parallel(c, 3);
                } else {
                    p.feed(c);
                }
                if p.pending() > 5_000 {
                    rows.extend(readings(&p.take_batch()));
                }
            }
            p.finish();
            rows.extend(readings(&p.take_batch()));
            let errors: Vec<(u64, String)> = p
                .errors()
                .iter()
                .map(|e| (e.line, e.error.clone()))
                .collect();
            let mut by_sensor: Vec<_> = p
                .rejected_by_sensor()
                .iter()
                .map(|(k, v)| (k.0, *v))
                .collect();
            by_sensor.sort();
            (rows, errors, p.rejected(), p.oversize_lines(), by_sensor)
        };
        let want = run(body.len(), false);
        if sparse {
            assert!(want.2 > 20 && (want.2 as usize) < MAX_REPORTED_ERRORS && want.3 > 0);
            assert!(
                want.1.last().unwrap().0 > 30_000,
                "errors all over the body"
            );
        } else {
            assert!(
                want.0.len() > 35_000 && want.2 > 1_000 && want.3 > 100,
                "a varied body"
            );
            assert_eq!(want.1.len(), MAX_REPORTED_ERRORS);
        }
        for chunk in [100_003, 256 * 1024, 1 << 20, body.len()] {
            assert!(run(chunk, true) == want, "chunks of {chunk} bytes");
        }
    }

    #[test]
    fn parses_the_seed_sample_in_any_chunking() {
        for size in [1, 2, 7, 64, SEED.len()] {
            let mut p = parser();
            for chunk in SEED.as_bytes().chunks(size) {
                p.feed(chunk);
            }
            p.finish();
            let b = p.take_batch();
            assert_eq!(b.len(), 3, "chunk size {size}");
            assert_eq!(p.rejected(), 0);
            assert_eq!(b.rows[1].value, 60.2);
            assert_eq!(b.devices[0].as_str(), "default");
            assert_eq!(b.rows[2].ts.to_string(), "2012-04-23T18:27:43.511Z");
        }
    }

    fn run(body: &str) -> (Batch, StreamParser) {
        let mut p = parser();
        p.feed(body.as_bytes());
        p.finish();
        (p.take_batch(), p)
    }

    #[test]
    fn each_bad_line_is_reported_with_its_number_and_the_rest_kept() {
        let body = [
            r#"{"sensor":"speed","value":1,"timestamp":"2020-01-01T00:00:00Z"}"#,
            r#"{"sensor":"speed","value":"1","timestamp":"2020-01-01T00:00:01Z"}"#,
            "",
            r#"{"sensor":"speed","value":null,"timestamp":"2020-01-01T00:00:02Z"}"#,
            r#"{"sensor":"speed","value":true,"timestamp":"2020-01-01T00:00:03Z"}"#,
            r#"{"sensor":"warp","value":1,"timestamp":"2020-01-01T00:00:04Z"}"#,
            r#"{"sensor":"speed","value":1,"timestamp":"2020-01-01T00:00:05"}"#,
            r#"{"sensor":"speed","value":1}"#,
            r#"{"sensor":"location_latitude","value":91,"timestamp":"2020-01-01T00:00:06Z"}"#,
            r#"{"sensor":"speed","value":1,"timestamp":"0001-01-01T00:00:00Z"}"#,
            r#"{"sensor":"speed","value":1,"timestamp":"2999-01-01T00:00:00Z"}"#,
            r#"[1, 2]"#,
            r#"{"sensor":"fuel","value":2.5e1,"timestamp":"2020-01-01T00:00:07+01:00"}"#,
            r#"{"sensor":"fuel","value":1,"timestamp":"2020-01-01T00:00:08Z","device":"a b"}"#,
            r#"{"sensor":"fuel","value":1e999,"timestamp":"2020-01-01T00:00:09Z"}"#,
            r#"{"sensor":"speed","value":3,"timest"#,
        ]
        .join("\n");
        let (b, p) = run(&body);
        assert_eq!(b.len(), 2);
        let lines: Vec<u64> = p.errors().iter().map(|e| e.line).collect();
        assert_eq!(lines, [2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16]);
        assert_eq!(p.rejected(), 13);
        let msg = |line| &p.errors().iter().find(|e| e.line == line).unwrap().error;
        assert!(msg(2).contains("finite number"), "{}", msg(2));
        assert!(msg(4).contains("null"), "{}", msg(4));
        assert!(msg(6).contains("unknown sensor 'warp'"));
        assert!(msg(7).contains("RFC 3339"));
        assert!(msg(8).contains("missing field `timestamp`"));
        assert!(msg(9).contains("valid range"));
        assert!(msg(10).contains("zero time"));
        assert!(msg(11).contains("future"));
        assert!(msg(12).contains("must be a JSON object"), "{}", msg(12));
        assert!(msg(14).contains("invalid device"));
        assert!(msg(16).contains("ends early"), "{}", msg(16));
    }

    #[test]
    fn oversize_lines_are_refused_and_skipped_in_any_chunking() {
        let long = format!(
            r#"{{"sensor":"speed","value":1,"timestamp":"2020-01-01T00:00:00Z","pad":"{}"}}"#,
            "x".repeat(500)
        );
        let ok = r#"{"sensor":"speed","value":2,"timestamp":"2020-01-01T00:00:01Z"}"#;
        let body = format!("{ok}\n{long}\n{ok}\n{long}");
        for size in [1, 13, 100, body.len()] {
            let mut p = parser();
            for c in body.as_bytes().chunks(size) {
                p.feed(c);
            }
            p.finish();
            assert_eq!(p.take_batch().len(), 2, "chunk {size}");
            assert_eq!(p.oversize_lines(), 2);
            let lines: Vec<u64> = p.errors().iter().map(|e| e.line).collect();
            assert_eq!(lines, [2, 4]);
        }
    }

    #[test]
    fn a_line_of_exactly_the_limit_ending_in_crlf_is_accepted_however_cut() {
        let limit = parser().opts.max_line_bytes;
        let head = r#"{"sensor":"speed","value":2,"timestamp":"2020-01-01T00:00:01Z","pad":""#;
        let line = format!("{head}{}\"}}", "x".repeat(limit - head.len() - 2));
        assert_eq!(line.len(), limit);
        let body = format!("{line}\r\n{line}x\r\n{line}\r\n");
        // Every cut, including the one between a `\r` and its `\n`.
        for cut in 1..body.len() {
            let mut p = parser();
            p.feed(&body.as_bytes()[..cut]);
            p.feed(&body.as_bytes()[cut..]);
            p.finish();
            let lines: Vec<u64> = p.errors().iter().map(|e| e.line).collect();
            assert_eq!(
                lines,
                [2],
                "cut at {cut}: only the line one byte over is refused"
            );
            assert_eq!(p.oversize_lines(), 1, "cut at {cut}");
        }
    }

    #[test]
    fn invalid_utf8_and_crlf() {
        let mut body =
            b"{\"sensor\":\"speed\",\"value\":1,\"timestamp\":\"2020-01-01T00:00:00Z\"}\r\n"
                .to_vec();
        body.extend_from_slice(
            b"{\"sensor\":\"sp\xffeed\",\"value\":1,\"timestamp\":\"2020-01-01T00:00:00Z\"}\n",
        );
        let mut p = parser();
        p.feed(&body);
        p.finish();
        assert_eq!(p.take_batch().len(), 1);
        assert_eq!(p.errors()[0].line, 2);
    }

    #[test]
    fn bound_keys_fill_and_police_the_device() {
        let mut p = parser_with(Some("truck"));
        p.feed(
            br#"{"sensor":"speed","value":1,"timestamp":"2020-01-01T00:00:00Z"}
{"sensor":"speed","value":1,"timestamp":"2020-01-01T00:00:00Z","device":"truck"}
{"sensor":"speed","value":1,"timestamp":"2020-01-01T00:00:00Z","device":"car"}
"#,
        );
        p.finish();
        let b = p.take_batch();
        assert_eq!(b.len(), 2);
        assert_eq!(b.devices.len(), 1);
        assert_eq!(b.devices[0].as_str(), "truck");
        assert_eq!(p.errors()[0].line, 3);
        assert!(p.errors()[0].error.contains("bound to device 'truck'"));
    }

    /// Admits names starting with `ok`, refuses `rate*` as over a rate and the rest
    /// as over the ceiling; counts what it was asked.
    #[derive(Debug, Default)]
    struct TestGate(std::sync::Mutex<Vec<String>>);

    impl DeviceGate for TestGate {
        fn admit(&self, device: &str) -> Result<(), crate::ingest::Refusal> {
            self.0.lock().unwrap().push(device.to_owned());
            match device {
                d if d.starts_with("ok") => Ok(()),
                d if d.starts_with("rate") => Err(crate::ingest::Refusal::Rate {
                    reason: format!("{d} too fast"),
                    retry_after: 7,
                }),
                d => Err(crate::ingest::Refusal::Full(format!("{d} is one too many"))),
            }
        }
    }

    fn gated_body() -> String {
        let mut body = String::new();
        for (i, d) in ["ok1", "full1", "ok1", "rate1", "ok2", "full1", "ok2"]
            .iter()
            .enumerate()
        {
            body += &format!(
                "{{\"sensor\":\"speed\",\"value\":{i},\"timestamp\":\"2020-01-01T00:00:0{i}Z\",\"device\":\"{d}\"}}\n"
            );
        }
        body
    }

    #[test]
    fn a_refused_device_loses_its_lines_only_and_each_device_is_asked_once() {
        let gate = Arc::new(TestGate::default());
        let mut opts = parser().opts;
        opts.gate = Some(gate.clone());
        let mut p = StreamParser::new(Arc::new(Catalog::new(Catalog::builtin())), opts);
        p.feed(gated_body().as_bytes());
        p.finish();
        let b = p.take_batch();
        let kept: Vec<_> = b
            .rows
            .iter()
            .map(|r| b.devices[r.device as usize].as_str())
            .collect();
        assert_eq!(kept, ["ok1", "ok1", "ok2", "ok2"]);
        let refused: Vec<_> = p
            .errors()
            .iter()
            .map(|e| (e.line, e.error.as_str()))
            .collect();
        assert_eq!(
            refused,
            [
                (2, "full1 is one too many"),
                (4, "rate1 too fast"),
                (6, "full1 is one too many")
            ]
        );
        assert_eq!(p.rate_limited(), Some(7));
        assert_eq!(*gate.0.lock().unwrap(), ["ok1", "full1", "rate1", "ok2"]);
    }

    #[test]
    fn a_request_refused_only_for_the_ceiling_is_not_rate_limited() {
        let mut opts = parser().opts;
        opts.gate = Some(Arc::new(TestGate::default()));
        let mut p = StreamParser::new(Arc::new(Catalog::new(Catalog::builtin())), opts);
        p.feed(gated_body().replace("rate1", "ok3").as_bytes());
        p.finish();
        assert_eq!(p.rejected(), 2);
        assert_eq!(p.rate_limited(), None);
    }

    #[test]
    fn error_list_is_capped_but_count_exact() {
        let body = "x\n".repeat(250);
        let (_, p) = run(&body);
        assert_eq!(p.rejected(), 250);
        assert_eq!(p.errors().len(), MAX_REPORTED_ERRORS);
    }
}

/// Property tests (proptest): arbitrary input never panics and parses the same however
/// it is cut; every valid reading is accepted exactly.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    use crate::ingest::invariants::{check, outcome, parser};

    /// Bytes that look like NDJSON readings often enough to reach every branch: whole
    /// readings, fragments of them, and raw noise.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(br#"{"sensor":"speed","value":1.5,"timestamp":"2026-01-01T00:00:00Z"}"#.to_vec()),
            Just(br#"{"sensor":"fuel","value":-1,"timestamp":"2026-01-01T00:00:01.5Z","device":"a"}"#.to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(br#"{"sensor":"#.to_vec()),
            Just(br#""value":1e999,"#.to_vec()),
            prop::collection::vec(any::<u8>(), 0..40),
        ];
        prop::collection::vec(piece, 0..40).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// No input panics, and one feed, any chunking and the parallel parse agree
        /// on every reading, count and error line.
        #[test]
        fn any_bytes_parse_the_same_however_cut(
            body in body(),
            cuts in prop::collection::vec(1usize..64, 1..8),
            parts in 1usize..5,
        ) {
            check(&body, &cuts, parts);
        }

        /// Every valid reading — any catalogued sensor, a value in its range, a
        /// timestamp with up to µs precision, an optional device, keys in any order
        /// with any spacing — is accepted with exactly its values.
        #[test]
        fn every_valid_reading_is_accepted_exactly(
            readings in prop::collection::vec(
                (0usize..64, any::<f64>(), 946_684_800_000_000i64..1_767_225_600_000_000, prop::option::of("[A-Za-z0-9_.-]{1,64}"), any::<u64>()),
                1..40,
            ),
        ) {
            let catalog = Catalog::new(Catalog::builtin());
            let sensors: Vec<_> = catalog.iter().cloned().collect();
            let mut body = String::new();
            let mut expected = Vec::new();
            for (s, raw, ts, device, shuffle) in readings {
                let sensor = &sensors[s % sensors.len()];
                // A finite value inside the sensor's range.
                let (lo, hi) = (sensor.min.unwrap_or(-1e12), sensor.max.unwrap_or(1e12));
                let unit = if raw.is_finite() { (raw.abs() % 1.0).clamp(0.0, 1.0) } else { 0.5 };
                let value = lo + (hi - lo) * unit;
                let t = chrono::DateTime::from_timestamp_micros(ts).unwrap();
                let stamp = t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
                let mut fields = vec![
                    format!("\"sensor\":\"{}\"", sensor.name),
                    format!("\"value\":{}", serde_json::to_string(&value).unwrap()),
                    format!("\"timestamp\":\"{stamp}\""),
                ];
                if let Some(d) = &device {
                    fields.push(format!("\"device\":\"{d}\""));
                }
                let turn = (shuffle % fields.len() as u64) as usize;
                fields.rotate_left(turn);
                let space = if shuffle & 8 == 0 { "" } else { " " };
                body.push_str(&format!("{{{space}{}}}\n", fields.join(&format!(",{space}"))));
                let device = device.unwrap_or_else(|| "default".into());
                expected.push((device, sensor.id.0, ts, value.to_bits()));
            }
            let mut p = parser();
            p.feed(body.as_bytes());
            let (rows, rejected, _, errors) = outcome(p);
            prop_assert_eq!(rejected, 0, "{:?}", errors);
            prop_assert_eq!(rows, expected);
        }
    }
}
