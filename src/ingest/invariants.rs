//! What the NDJSON parser guarantees for any input whatsoever, as one function that
//! panics on a violation. The property tests run it on generated input in the normal
//! suite (`ndjson::props`); the `cargo fuzz` target in `fuzz/` runs it on whatever
//! libFuzzer's coverage guidance finds (see `fuzz/README.md`).

use std::sync::Arc;

use super::fast;
use super::ndjson::{IngestOptions, StreamParser};
use super::wire::Wire;
use crate::domain::{Catalog, Timestamp};

/// Readings (device, sensor, µs, value bits), refused lines, oversize lines and the
/// listed errors (line, reason) of one parse.
pub type Outcome = (Vec<(String, u16, i64, u64)>, u64, u64, Vec<(u64, String)>);

/// A parser over the cloud-lada catalog with a short line limit (so that oversize
/// lines are reached too).
pub fn parser() -> StreamParser {
    StreamParser::new(
        Arc::new(Catalog::new(Catalog::builtin())),
        IngestOptions {
            latest: Timestamp::now().plus(chrono::Duration::hours(24)),
            max_line_bytes: 512,
            bound_device: None,
            gate: None,
        },
    )
}

/// Everything `p` produced, once the body has ended.
pub fn outcome(mut p: StreamParser) -> Outcome {
    p.finish();
    let b = p.take_batch();
    let rows = b
        .rows
        .iter()
        .map(|r| {
            let d = b.devices[r.device as usize].as_str().to_owned();
            (d, r.sensor.0, r.ts.as_micros(), r.value.to_bits())
        })
        .collect();
    let errors = p
        .errors()
        .iter()
        .map(|e| (e.line, e.error.clone()))
        .collect();
    (rows, p.rejected(), p.oversize_lines(), errors)
}

/// Checks, for any `body`:
/// - parsing never panics;
/// - fed at once, fed in chunks of the sizes in `cuts` (cycled; 0 counts as 1), and
///   parsed in `parts` parallel parts, it yields the same readings, counts and error
///   lines;
/// - every line the fast path takes, the full JSON parser takes with the same fields.
///
/// Returns the outcome of the single feed.
pub fn check(body: &[u8], cuts: &[usize], parts: usize) -> Outcome {
    let mut whole = parser();
    whole.feed(body);
    let whole = outcome(whole);

    let mut chunked = parser();
    let (mut at, mut i) = (0, 0);
    while at < body.len() {
        let n = cuts
            .get(i % cuts.len().max(1))
            .copied()
            .unwrap_or(1)
            .clamp(1, body.len() - at);
        chunked.feed(&body[at..at + n]);
        at += n;
        i += 1;
    }
    assert_eq!(outcome(chunked), whole, "chunked differs from whole");

    let mut parallel = parser();
    parallel.feed_parallel(body, parts.max(1));
    assert_eq!(outcome(parallel), whole, "parallel differs from whole");

    for line in body.split(|&b| b == b'\n') {
        if let Some(fast) = fast::scan(line) {
            let full: Result<Wire<'_>, _> = sonic_rs::from_slice(line);
            let full = full.unwrap_or_else(|e| {
                panic!(
                    "the fast path took a line the full parser refuses ({e}): {:?}",
                    String::from_utf8_lossy(line)
                )
            });
            assert_eq!(
                fields(&fast),
                fields(&full),
                "fast and full parse differ: {:?}",
                String::from_utf8_lossy(line)
            );
        }
    }
    whole
}

/// The fields of a parsed line, comparable.
pub(super) fn fields(w: &Wire<'_>) -> (String, u64, String, Option<String>) {
    (
        w.sensor.to_string(),
        w.value.0.to_bits(),
        w.timestamp.to_string(),
        w.device.as_ref().map(|d| d.to_string()),
    )
}
