//! `milepost bench --scenario fleet --readers N`: browsers reading while the fleet
//! streams. Each reader watches one device of the fleet and, every
//! `--reader-interval`, fetches at once what the seed dashboard polls (status, latest
//! values, location, four day charts) plus `/api/v1` statistics and a readings page,
//! timing every answer. It also checks read-your-writes exactly: the v1 statistics
//! of the device's live range must count at least every live reading acknowledged
//! before the poll started, and at most the ones sent when it ended.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::percentile;

/// Latencies of one endpoint during a phase.
#[derive(Debug, Clone, Serialize)]
pub struct ReadLatency {
    /// Which endpoint.
    pub endpoint: String,
    /// Answers timed.
    pub requests: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// Answers other than 200.
    pub errors: usize,
}

/// What the readers saw during one phase.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReadReport {
    /// Per endpoint.
    pub endpoints: Vec<ReadLatency>,
    /// Statistics answers that counted fewer readings than were acknowledged before
    /// they were asked (or more than were sent): must be 0.
    pub stale_answers: usize,
    /// Statistics answers checked for read-your-writes.
    pub checked_answers: usize,
}

/// What a reader needs of the fleet: a device's name, its live seconds acknowledged
/// and sent, and where its live readings start (epoch seconds).
pub struct Watched {
    pub(super) name: String,
    pub(super) acked: Arc<AtomicU32>,
    pub(super) sent: Arc<AtomicU32>,
    pub(super) base: i64,
}

/// `--readers`, `--reader-interval` and `--reads-log`.
pub struct Readers {
    /// Readers, each watching one device; 0: none.
    pub count: usize,
    /// Between one reader's polls.
    pub interval: Duration,
    /// Where every timed read goes, if anywhere (see [`run`]).
    pub log: Option<PathBuf>,
}

type Samples = BTreeMap<&'static str, (Vec<f64>, usize)>;

/// One timed read for `--reads-log`: endpoint, Unix time it ended (s), latency (ms).
type Timed = (&'static str, f64, f64);

/// One reader: polls until `until`.
async fn reader(
    base: String,
    watched: Watched,
    interval: Duration,
    offset: Duration,
    until: Instant,
    logging: bool,
) -> (Samples, usize, usize, Vec<Timed>) {
    let client = reqwest::Client::new();
    let mut samples: Samples = BTreeMap::new();
    let mut timed = Vec::new();
    let (mut stale, mut checked) = (0, 0);
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let d = &watched.name;
    let at = |s: i64| {
        chrono::DateTime::from_timestamp(s, 0)
            .unwrap_or_default()
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    };
    // The live range: from the first live second for a day (a device sends fewer).
    let (from, to) = (at(watched.base), at(watched.base + 86_400));
    while Instant::now() < until {
        tick.tick().await;
        let day = chrono::Utc::now().format("%Y-%m-%d");
        let mut urls: Vec<(&'static str, String)> = vec![
            ("seed status", format!("/api/status?device={d}")),
            ("seed latest", format!("/api/statistics/latest?device={d}")),
            ("seed location", format!("/api/location/latest?device={d}")),
        ];
        for s in ["speed", "fuel", "engine_temperature", "revolution"] {
            urls.push((
                "seed day chart",
                format!("/api/statistics/sensor/{s}/date/{day}?device={d}"),
            ));
        }
        urls.push((
            "v1 readings page",
            format!("/api/v1/sensors/fuel/readings?device={d}&from={from}&to={to}&limit=100"),
        ));
        let acked_before = watched.acked.load(Ordering::Acquire);
        let stats =
            format!("/api/v1/sensors/speed/statistics?device={d}&from={from}&to={to}&bucket=15m");
        let polls = urls
            .into_iter()
            .chain([("v1 statistics", stats)])
            .map(|(name, path)| {
                let req = client.get(format!("{base}{path}"));
                async move {
                    let t = Instant::now();
                    let answer = match req.send().await {
                        Ok(r) if r.status() == 200 => r.bytes().await.ok(),
                        _ => None,
                    };
                    (name, t.elapsed().as_secs_f64() * 1e3, answer)
                }
            });
        for (name, ms, answer) in futures_util::future::join_all(polls).await {
            if logging {
                let ended = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                timed.push((name, ended.as_secs_f64(), ms));
            }
            let entry = samples.entry(name).or_default();
            entry.0.push(ms);
            let Some(body) = answer else {
                entry.1 += 1;
                continue;
            };
            if name == "v1 statistics" {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let counted: u64 = v["buckets"]
                    .as_array()
                    .map(|b| b.iter().filter_map(|x| x["count"].as_u64()).sum())
                    .unwrap_or(0);
                let sent_after = watched.sent.load(Ordering::Acquire);
                checked += 1;
                if counted < u64::from(acked_before) || counted > u64::from(sent_after) {
                    stale += 1;
                    eprintln!(
                        "bench: {d}: statistics counted {counted} readings, {acked_before} were acknowledged before, {sent_after} sent"
                    );
                }
            }
        }
    }
    (samples, stale, checked, timed)
}

/// Runs one reader per watched device until `until`, their polls spread over the
/// interval, and sums up what they saw. With `log` (a file and the phase's name),
/// every timed read is appended to the file, in the order they ended.
pub async fn run(
    base: &str,
    watched: Vec<Watched>,
    interval: Duration,
    until: Instant,
    log: Option<(&Path, &str)>,
) -> ReadReport {
    let n = watched.len().max(1) as u32;
    let tasks: Vec<_> = watched
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let offset = interval * i as u32 / n;
            tokio::spawn(reader(
                base.to_owned(),
                w,
                interval,
                offset,
                until,
                log.is_some(),
            ))
        })
        .collect();
    let mut all: Samples = BTreeMap::new();
    let mut report = ReadReport::default();
    let mut timed = Vec::new();
    for t in tasks {
        let Ok((samples, stale, checked, reads)) = t.await else {
            continue;
        };
        timed.extend(reads);
        report.stale_answers += stale;
        report.checked_answers += checked;
        for (name, (ms, errors)) in samples {
            let e = all.entry(name).or_default();
            e.0.extend(ms);
            e.1 += errors;
        }
    }
    if let Some((path, phase)) = log
        && let Err(e) = write_log(path, phase, &mut timed)
    {
        eprintln!("bench: cannot write --reads-log {}: {e}", path.display());
    }
    for (name, (mut ms, errors)) in all {
        ms.sort_by(f64::total_cmp);
        report.endpoints.push(ReadLatency {
            endpoint: name.to_owned(),
            requests: ms.len(),
            p50_ms: percentile(&ms, 0.5),
            p99_ms: percentile(&ms, 0.99),
            p999_ms: percentile(&ms, 0.999),
            max_ms: ms.last().copied().unwrap_or(0.0),
            errors,
        });
    }
    report
}

/// Appends `timed` to `path`, in the order the reads ended.
fn write_log(path: &Path, phase: &str, timed: &mut [Timed]) -> std::io::Result<()> {
    timed.sort_by(|a, b| a.1.total_cmp(&b.1));
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    let mut out = std::io::BufWriter::new(file);
    for (endpoint, ended, ms) in timed.iter() {
        writeln!(out, "{phase}\t{endpoint}\t{ended:.3}\t{ms:.2}")?;
    }
    out.flush()
}

/// Prints a phase's read table.
pub fn print(phase: &str, r: &ReadReport) {
    println!(
        "  reads during {phase}: {} statistics answers checked, {} missed acknowledged readings",
        r.checked_answers, r.stale_answers
    );
    for e in &r.endpoints {
        println!(
            "    {:<20} {:>7} answers  p50 {:>7.2}  p99 {:>8.2}  p99.9 {:>8.2}  max {:>8.2} ms  errors {}",
            e.endpoint, e.requests, e.p50_ms, e.p99_ms, e.p999_ms, e.max_ms, e.errors
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--reads-log`: one tab-separated line per read, in the order they ended, each
    /// phase appended after the one before.
    #[test]
    fn the_reads_log_lists_every_read_in_the_order_they_ended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reads.tsv");
        let mut first = [
            ("v1 readings page", 1_700_000_002.5, 41.25),
            ("seed status", 1_700_000_001.25, 2.5),
        ];
        write_log(&path, "fleet", &mut first).unwrap();
        write_log(
            &path,
            "fleet mix",
            &mut [("seed latest", 1_700_000_003.0, 3.0)],
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "fleet\tseed status\t1700000001.250\t2.50\n\
             fleet\tv1 readings page\t1700000002.500\t41.25\n\
             fleet mix\tseed latest\t1700000003.000\t3.00\n"
        );
    }
}
