//! `milepost bench --scenario fleet`: many devices sending small requests, each over
//! its own keep-alive connection, the way a fleet of cars or sensor boxes does.
//!
//! 1. A fresh `milepost serve` child process; a lean HTTP/1.1 client (hyper, one task
//!    per connection, no pool) so that the client takes as little of the machine's
//!    CPU as it can — client and server share the cores.
//! 2. First contact: `--new-devices` devices the server has never seen send one
//!    request each (the first request of a device also registers it).
//! 3. The fleet: `--devices` devices, each request one second of one device (six
//!    readings, one per sensor, unique timestamps), for `--duration` at every count of
//!    `--connections`; each device belongs to one connection, which cycles through
//!    its devices, so a device's requests arrive in order as they would from the
//!    device. Requests/s, readings/s, acknowledgement latency p50/p99/p99.9, the
//!    server's CPU time per request and its peak RSS per phase. Every request must be
//!    answered 200 with exactly the expected counts (accepted, duplicates).
//!    With `--order` other than `live`, each connection count gets a second phase of
//!    the same fleet sending older readings (see [`Order`]), right after the live one.
//! 4. One big request: `--big-readings` readings in one body, against DuckDB's own
//!    `read_json` load of the same file, in the same run.
//! 5. Start-up time of the server with every device of the run known.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use super::{BENCH_KEY, BenchArgs, BenchServer, generate, native_load, percentile};
use crate::domain::Timestamp;

/// One measured fleet phase.
#[derive(Debug, Clone, Serialize)]
pub struct FleetPhase {
    /// What was measured.
    pub name: String,
    /// Concurrent connections.
    pub connections: usize,
    /// Requests answered.
    pub requests: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Requests per second.
    pub requests_per_sec: f64,
    /// Readings acknowledged per second.
    pub readings_per_sec: f64,
    /// Acknowledgement latency percentiles, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// The server's CPU time (user + system) per request, µs.
    pub cpu_us_per_request: f64,
    /// The server's peak RSS during the phase, MiB.
    pub peak_rss_mib: f64,
    /// Apply lag sampled from `/metrics` every second: the most readings acknowledged
    /// and not yet in DuckDB…
    pub max_unapplied_readings: f64,
    /// …and the longest the oldest of them had waited, seconds.
    pub max_apply_lag_seconds: f64,
    /// The ingest log's `fdatasync`s over the phase (from `/metrics`), if any ran.
    pub log_syncs: Option<LogSyncs>,
    /// What readers saw meanwhile (`--readers`).
    pub reads: Option<super::readers::ReadReport>,
}

/// What the fleet's requests hold, besides new readings (`--order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Each device's next second: new readings, in order.
    Live,
    /// Exact re-sends of one of each device's last three requests (a retry after a
    /// timeout): every reading a duplicate.
    Retry,
    /// Every other request is a second of the previous day, walking forward (an
    /// offline buffer replayed while live data flows): all new.
    Backlog,
    /// Live, retry and backlog requests in turn.
    Mix,
}

/// Which server the requests are for, and so their shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// `POST /ingest`, NDJSON readings; answered with exact counts.
    Milepost,
    /// VictoriaMetrics' `POST /api/v1/import`: the same readings as its JSON lines
    /// (`{"metric":{"__name__":sensor,"device":…},"values":[v],"timestamps":[ms]}`);
    /// answered 204 without counts.
    Victoria,
}

/// A server under load and the shape of its requests.
#[derive(Clone, Copy)]
struct Target<'a> {
    server: &'a BenchServer,
    wire: Wire,
}

/// One request's kind.
#[derive(Clone, Copy)]
enum Kind {
    Live,
    Retry,
    Backlog,
}

impl Order {
    /// The kind of a connection's `i`-th request.
    fn kind(self, i: usize) -> Kind {
        match self {
            Order::Live => Kind::Live,
            Order::Retry => Kind::Retry,
            Order::Backlog => [Kind::Live, Kind::Backlog][i % 2],
            Order::Mix => [Kind::Live, Kind::Retry, Kind::Backlog][i % 3],
        }
    }
}

/// The whole fleet run.
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    /// Devices of the fleet phases.
    pub devices: usize,
    /// Readings per request.
    pub readings_per_request: usize,
    /// Phases in order.
    pub phases: Vec<FleetPhase>,
    /// Readings in the big request (0 when skipped).
    pub big_readings: u64,
    /// DuckDB's own `read_json` load of the big request's file, readings/s.
    pub big_native_per_sec: f64,
    /// The big request over HTTP, readings/s.
    pub big_http_per_sec: f64,
    /// `big_http_per_sec / big_native_per_sec`.
    pub big_ratio: f64,
    /// Devices known to the server at the restart.
    pub devices_known: usize,
    /// Server start-up to ready with all of them known, ms.
    pub restart_ms: f64,
    /// Per round (`--rounds`), Milepost's live fleet rate over VictoriaMetrics' at
    /// the first connection count (empty when VictoriaMetrics was not run).
    pub victoria_ratios: Vec<f64>,
}

/// Sensors of every request, one reading each.
const SENSORS: [&str; 6] = generate::SENSORS;

/// The fleet: per device its name and the seconds it has sent so far, live and of
/// its backlog.
pub(super) struct Fleet {
    names: Vec<String>,
    /// Live seconds sent…
    seconds: Vec<Arc<AtomicU32>>,
    /// …and acknowledged (for the readers' read-your-writes check).
    acked: Vec<Arc<AtomicU32>>,
    backlog: Vec<AtomicU32>,
    /// Whole seconds (epoch) of every device's first reading.
    base: i64,
}

/// Seconds of a day: the backlog is the day before the live readings.
const DAY: i64 = 86_400;

impl Fleet {
    fn new(prefix: &str, n: usize, base: i64) -> Self {
        Self {
            names: (0..n).map(|i| format!("{prefix}-{i}")).collect(),
            seconds: (0..n).map(|_| Arc::new(AtomicU32::new(0))).collect(),
            acked: (0..n).map(|_| Arc::new(AtomicU32::new(0))).collect(),
            backlog: (0..n).map(|_| AtomicU32::new(0)).collect(),
            base,
        }
    }

    /// A request of device `d` of `kind` (its `i`-th on the connection) into `buf`;
    /// returns the readings it should get accepted (the rest are duplicates).
    fn body(&self, d: usize, kind: Kind, i: usize, buf: &mut String) -> usize {
        match kind {
            Kind::Live => {
                let sec = self.seconds[d].fetch_add(1, Ordering::Relaxed);
                self.second(d, self.base + i64::from(sec), buf);
                SENSORS.len()
            }
            Kind::Retry => {
                // One of the last three seconds sent (each was acknowledged: a
                // connection waits for every answer); a device that sent nothing
                // yet sends its first.
                let sent = i64::from(self.seconds[d].load(Ordering::Relaxed));
                if sent == 0 {
                    return self.body(d, Kind::Live, i, buf);
                }
                let sec = (sent - 1 - (i % 3) as i64).max(0);
                self.second(d, self.base + sec, buf);
                0
            }
            Kind::Backlog => {
                let sec = self.backlog[d].fetch_add(1, Ordering::Relaxed);
                self.second(d, self.base - DAY + i64::from(sec), buf);
                SENSORS.len()
            }
        }
    }

    /// Device `d`'s next live second in VictoriaMetrics' import format.
    fn victoria_body(&self, d: usize, buf: &mut String) {
        use std::fmt::Write as _;
        let sec = i64::from(self.seconds[d].fetch_add(1, Ordering::Relaxed));
        buf.clear();
        for (i, s) in SENSORS.iter().enumerate() {
            let value = (d as i64 + sec + i as i64).rem_euclid(90) as f64 + 0.5;
            let ms = (self.base + sec) * 1000 + (i * 100) as i64;
            let _ = writeln!(
                buf,
                r#"{{"metric":{{"__name__":"{s}","device":"{}"}},"values":[{value}],"timestamps":[{ms}]}}"#,
                self.names[d]
            );
        }
    }

    /// Second `epoch` of device `d`: one reading per sensor.
    fn second(&self, d: usize, epoch: i64, buf: &mut String) {
        use chrono::{Datelike as _, Timelike as _};
        use std::fmt::Write as _;
        let sec = epoch - self.base;
        let t = chrono::DateTime::from_timestamp(epoch, 0).unwrap_or_default();
        let ts = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
        buf.clear();
        for (i, s) in SENSORS.iter().enumerate() {
            let value = (d as i64 + sec + i as i64).rem_euclid(90) as f64 + 0.5;
            let _ = writeln!(
                buf,
                r#"{{"device":"{}","sensor":"{s}","value":{value},"timestamp":"{ts}.{:03}Z"}}"#,
                self.names[d],
                i * 100
            );
        }
    }
}

/// Latencies (µs) and request count of one connection.
struct ConnResult {
    latencies_us: Vec<u32>,
}

/// One keep-alive connection sending requests for its devices until `until` (or
/// until each of its devices has sent `once` requests, when given).
async fn connection(
    addr: std::net::SocketAddr,
    wire: Wire,
    fleet: Arc<Fleet>,
    devices: Vec<usize>,
    until: Option<Instant>,
    order: Order,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<ConnResult> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let auth = format!("Bearer {BENCH_KEY}");
    let mut latencies_us = Vec::new();
    let mut body = String::new();
    // The answer of a request with `i` readings accepted, as the server writes it.
    let expected: Vec<Vec<u8>> = (0..=SENSORS.len())
        .map(|accepted| {
            format!(
                r#"{{"accepted":{accepted},"duplicates":{},"errors":[],"rejected":0}}"#,
                SENSORS.len() - accepted
            )
            .into_bytes()
        })
        .collect();
    let mut i = 0usize;
    loop {
        if devices.is_empty() {
            break;
        }
        match until {
            Some(t) if Instant::now() >= t => break,
            None if i >= devices.len() => break,
            _ => {}
        }
        let d = devices[i % devices.len()];
        // Each device's own requests run through the kinds in turn.
        let kind = order.kind(i / devices.len());
        let (path, accepted) = match wire {
            Wire::Milepost => ("/ingest", fleet.body(d, kind, i / devices.len(), &mut body)),
            Wire::Victoria => {
                fleet.victoria_body(d, &mut body);
                ("/api/v1/import", SENSORS.len())
            }
        };
        i += 1;
        let req = hyper::Request::post(path)
            .header("host", "milepost")
            .header("authorization", &auth)
            .header("content-type", "application/x-ndjson")
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))?;
        sender.ready().await?;
        let t = Instant::now();
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        latencies_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
        if wire == Wire::Victoria {
            if status != 204 {
                bail!(
                    "VictoriaMetrics answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            sent.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if status != 200 {
            bail!(
                "ingest answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        // Exact counts: first write wins, every duplicate counted. The answer is
        // compared as bytes with the one expected (parsing JSON per answer was client
        // CPU taken from the server on the same cores, and VictoriaMetrics' 204 needs
        // none); anything else is parsed to say what differs.
        let duplicates = SENSORS.len() - accepted;
        if *bytes != *expected[accepted] {
            let v: serde_json::Value = serde_json::from_slice(&bytes)?;
            if v["accepted"].as_u64() != Some(accepted as u64)
                || v["duplicates"].as_u64() != Some(duplicates as u64)
            {
                bail!("expected {accepted} readings accepted and {duplicates} duplicates, got {v}");
            }
        }
        if matches!(kind, Kind::Live) {
            fleet.acked[d].fetch_add(1, Ordering::Release);
        }
        sent.fetch_add(1, Ordering::Relaxed);
    }
    Ok(ConnResult { latencies_us })
}

/// Runs `connections` connections over the fleet's devices (device `d` on
/// connection `d % connections`).
async fn phase(
    Target { server, wire }: Target<'_>,
    name: &str,
    fleet: &Arc<Fleet>,
    connections: usize,
    duration: Option<Duration>,
    order: Order,
    readers: Option<&super::readers::Readers>,
) -> anyhow::Result<FleetPhase> {
    let addr: std::net::SocketAddr = server
        .base()
        .trim_start_matches("http://")
        .parse()
        .context("server address")?;
    server.0.reset_peak_rss()?;
    let cpu_before = server.0.cpu_seconds();
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = duration.map(|d| started + d);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let devices: Vec<usize> = (c..fleet.names.len()).step_by(connections).collect();
        tasks.push(tokio::spawn(connection(
            addr,
            wire,
            fleet.clone(),
            devices,
            until,
            order,
            sent.clone(),
        )));
    }
    let reads = match (readers, until) {
        (Some(readers), Some(until)) if readers.count > 0 => {
            let n = readers.count;
            let watched = (0..n)
                .map(|i| {
                    let d = i * fleet.names.len() / n;
                    super::readers::Watched {
                        name: fleet.names[d].clone(),
                        acked: fleet.acked[d].clone(),
                        sent: fleet.seconds[d].clone(),
                        base: fleet.base,
                    }
                })
                .collect();
            let base = server.base().to_owned();
            let (interval, log) = (readers.interval, readers.log.clone());
            let phase = name.to_owned();
            Some(tokio::spawn(async move {
                let log = log.as_deref().map(|path| (path, phase.as_str()));
                super::readers::run(&base, watched, interval, until, log).await
            }))
        }
        _ => None,
    };
    let lag = until.filter(|_| wire == Wire::Milepost).map(|until| {
        let url = format!("{}/metrics", server.base());
        tokio::spawn(sample_metrics(url, until))
    });
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??.latencies_us);
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = server.0.cpu_seconds() - cpu_before;
    let reads = match reads {
        Some(r) => Some(r.await?),
        None => None,
    };
    let sampled = match lag {
        Some(l) => l.await?,
        None => Sampled::default(),
    };
    let mut ms: Vec<f64> = lat.iter().map(|&u| f64::from(u) / 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let requests = ms.len() as u64;
    Ok(FleetPhase {
        name: name.to_owned(),
        connections,
        requests,
        seconds,
        requests_per_sec: requests as f64 / seconds,
        readings_per_sec: (requests * SENSORS.len() as u64) as f64 / seconds,
        p50_ms: percentile(&ms, 0.5),
        p99_ms: percentile(&ms, 0.99),
        p999_ms: percentile(&ms, 0.999),
        cpu_us_per_request: cpu * 1e6 / requests.max(1) as f64,
        peak_rss_mib: server.peak_rss_mib(),
        max_unapplied_readings: sampled.max_unapplied_readings,
        max_apply_lag_seconds: sampled.max_apply_lag_seconds,
        log_syncs: sampled.log_syncs(),
        reads,
    })
}

/// The ingest log's `fdatasync`s during a phase: how many a second and how long
/// they took (upper bounds of the histogram's buckets).
#[derive(Debug, Clone, Serialize)]
pub struct LogSyncs {
    /// `fdatasync`s a second.
    pub per_sec: f64,
    /// Median duration, ms (at most).
    pub p50_ms: f64,
    /// 99th percentile, ms (at most).
    pub p99_ms: f64,
}

/// The sync histogram's count and cumulative buckets (`le` seconds, count) at one
/// scrape.
#[derive(Debug, Clone, Default)]
struct SyncHistogram {
    at: Option<Instant>,
    count: f64,
    buckets: Vec<(f64, f64)>,
}

impl SyncHistogram {
    fn parse(text: &str, at: Instant) -> Self {
        const BUCKET: &str = "milepost_ingest_log_sync_duration_seconds_bucket{le=\"";
        const COUNT: &str = "milepost_ingest_log_sync_duration_seconds_count ";
        let mut h = Self {
            at: Some(at),
            ..Self::default()
        };
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix(BUCKET) {
                let (le, n) = rest.split_once("\"} ").unwrap_or_default();
                if let (Ok(le), Ok(n)) = (le.parse::<f64>(), n.parse::<f64>()) {
                    h.buckets.push((le, n));
                }
            } else if let Some(n) = l.strip_prefix(COUNT) {
                h.count = n.parse().unwrap_or(0.0);
            }
        }
        h
    }
}

/// What `/metrics` showed once a second over a phase.
#[derive(Debug, Default)]
struct Sampled {
    max_unapplied_readings: f64,
    max_apply_lag_seconds: f64,
    first: SyncHistogram,
    last: SyncHistogram,
}

impl Sampled {
    /// The syncs between the first and the last scrape.
    fn log_syncs(&self) -> Option<LogSyncs> {
        let (a, b) = (&self.first, &self.last);
        let seconds = b.at?.duration_since(a.at?).as_secs_f64();
        let n = b.count - a.count;
        if n <= 0.0 || seconds <= 0.0 || a.buckets.len() != b.buckets.len() {
            return None;
        }
        let at_most = |q: f64| {
            b.buckets
                .iter()
                .zip(&a.buckets)
                .find(|((_, nb), (_, na))| nb - na >= q * n)
                .map_or(f64::INFINITY, |((le, _), _)| le * 1e3)
        };
        Some(LogSyncs {
            per_sec: n / seconds,
            p50_ms: at_most(0.5),
            p99_ms: at_most(0.99),
        })
    }
}

/// The apply lag's maxima and the ingest log's syncs over a phase, from `/metrics`
/// once a second.
async fn sample_metrics(url: String, until: Instant) -> Sampled {
    let client = reqwest::Client::new();
    let mut sampled = Sampled::default();
    let mut first = true;
    while Instant::now() < until {
        if !first {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let Ok(text) = client
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
        else {
            continue;
        };
        let text = text.text().await.unwrap_or_default();
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let s = &mut sampled;
        s.max_unapplied_readings = s
            .max_unapplied_readings
            .max(value("milepost_ingest_log_unapplied_readings "));
        s.max_apply_lag_seconds = s
            .max_apply_lag_seconds
            .max(value("milepost_ingest_log_apply_lag_seconds "));
        let h = SyncHistogram::parse(&text, Instant::now());
        if std::mem::take(&mut first) {
            s.first = h;
        } else {
            s.last = h;
        }
    }
    sampled
}

/// Runs the fleet scenario and prints its table.
pub async fn run(args: BenchArgs) -> anyhow::Result<FleetReport> {
    let (work, _tmp) = super::work_dir(&args, "milepost-bench-fleet-")?;
    let duration = Duration::from_secs_f64(args.duration);
    // Ten minutes ago: a live fleet. Each device runs ahead of the clock when it
    // sends more than one second per second, within the allowed future skew.
    let base = Timestamp::now().as_micros() / 1_000_000 - 600;
    let mut phases = Vec::new();
    let mut victoria_ratios = Vec::new();
    let dir = work.join("fleet");
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            eprintln!("bench: round {round} of {}", args.rounds);
        }
        let ours = fleet_round(&args, &work, base, duration, round == 1).await?;
        let theirs = victoria(&args, &work, base, duration).await?;
        let live = |p: &&FleetPhase| {
            p.connections == args.connections[0]
                && matches!(p.name.as_str(), "fleet" | "victoria-metrics fleet")
        };
        if let (Some(a), Some(b)) = (ours.iter().find(live), theirs.iter().find(live)) {
            victoria_ratios.push(a.requests_per_sec / b.requests_per_sec);
        }
        phases.extend(ours.into_iter().chain(theirs));
    }

    eprintln!("bench: restart with every device known");
    // The last round's server: only the first saw the new devices.
    let known = args.devices
        + if args.rounds == 1 {
            args.new_devices
        } else {
            0
        };
    let started = Instant::now();
    let server = BenchServer::start(&dir, &args.memory_limit)?;
    let restart_ms = started.elapsed().as_secs_f64() * 1e3;
    server.stop()?;

    let (mut big_native, mut big_http) = (0.0, 0.0);
    if args.big_readings > 0 {
        eprintln!("bench: one request of {} readings", args.big_readings);
        let g = {
            let (work, n, seed) = (work.clone(), args.big_readings, args.seed);
            tokio::task::spawn_blocking(move || {
                let dir = work.join("big-input");
                std::fs::create_dir_all(&dir)?;
                generate::generate(&dir, "big", n, 1, n as usize, seed)
            })
            .await??
        };
        super::flush_page_cache();
        let native = {
            let (work, mem) = (work.clone(), args.native_memory_limit.clone());
            tokio::task::spawn_blocking(move || {
                native_load(&work.join("big-native"), &g, &mem).map(|p| (p, g))
            })
            .await??
        };
        let (native, g) = native;
        big_native = native.readings_per_sec;
        super::flush_page_cache();
        let server = BenchServer::start(&work.join("big-http"), &args.memory_limit)?;
        let path = g.streams[0].plain.clone();
        // Read once so the request streams from the page cache, like the native load.
        tokio::fs::read(&path).await.map(drop)?;
        let file = tokio::fs::File::open(&path).await?;
        let body =
            reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
        let started = Instant::now();
        let resp = reqwest::Client::new()
            .post(format!("{}/ingest", server.base()))
            .bearer_auth(BENCH_KEY)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let v: serde_json::Value = resp.json().await?;
        let secs = started.elapsed().as_secs_f64();
        if !status.is_success() || v["accepted"].as_u64() != Some(g.total) {
            bail!("the big request answered {status}: {v}");
        }
        big_http = g.total as f64 / secs;
        server.stop()?;
    }

    let report = FleetReport {
        devices: args.devices,
        readings_per_request: SENSORS.len(),
        phases,
        big_readings: args.big_readings,
        big_native_per_sec: big_native,
        big_http_per_sec: big_http,
        big_ratio: if big_native > 0.0 {
            big_http / big_native
        } else {
            0.0
        },
        devices_known: known,
        restart_ms,
        victoria_ratios,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

/// The median of `xs` (the mean of the middle two for an even count).
fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// One round's Milepost phases on a fresh server: the first contact of new devices
/// (first round only), the fleet's hello (not timed), then every connection count.
async fn fleet_round(
    args: &BenchArgs,
    work: &std::path::Path,
    base: i64,
    duration: Duration,
    first: bool,
) -> anyhow::Result<Vec<FleetPhase>> {
    // A reused --work-dir (or the last round) holds servers whose readings ran
    // ahead of the clock: this round's warm-up would get duplicates. Each starts empty.
    for old in ["fleet", "big-http", "victoria-metrics"] {
        super::remove_stale(&work.join(old))?;
    }
    let mut phases = Vec::new();
    let server = BenchServer::start(&work.join("fleet"), &args.memory_limit)?;
    let milepost = Target {
        server: &server,
        wire: Wire::Milepost,
    };
    if first && args.new_devices > 0 {
        eprintln!("bench: first contact of {} new devices", args.new_devices);
        let new = Arc::new(Fleet::new("new", args.new_devices, base));
        phases.push(
            phase(
                milepost,
                "first contact (new devices)",
                &new,
                64,
                None,
                Order::Live,
                None,
            )
            .await?,
        );
    }
    let fleet = Arc::new(Fleet::new("car", args.devices, base));
    eprintln!("bench: {} devices say hello (not timed)", args.devices);
    warm_up(milepost, &fleet).await?;
    if let Some(path) = &args.reads_log {
        std::fs::File::create(path).with_context(|| format!("--reads-log {}", path.display()))?;
    }
    let readers = super::readers::Readers {
        count: args.readers,
        interval: Duration::from_secs_f64(args.reader_interval),
        log: args.reads_log.clone(),
    };
    for &c in &args.connections {
        eprintln!(
            "bench: fleet of {} devices over {c} connections",
            args.devices
        );
        phases.push(
            phase(
                milepost,
                "fleet",
                &fleet,
                c,
                Some(duration),
                Order::Live,
                Some(&readers),
            )
            .await?,
        );
        if args.order != Order::Live {
            let name = format!("fleet {}", order_name(args.order));
            eprintln!("bench: {name}, {c} connections");
            phases.push(
                phase(
                    milepost,
                    &name,
                    &fleet,
                    c,
                    Some(duration),
                    args.order,
                    Some(&readers),
                )
                .await?,
            );
        }
    }
    server.stop()?;
    Ok(phases)
}

/// The live fleet phases against VictoriaMetrics, when it is installed: a fresh
/// server, the same devices' first contact (not timed), then every connection count.
async fn victoria(
    args: &BenchArgs,
    work: &std::path::Path,
    base: i64,
    duration: Duration,
) -> anyhow::Result<Vec<FleetPhase>> {
    let exe = match args.victoria_metrics.as_str() {
        "off" => return Ok(Vec::new()),
        "auto" => match which("victoria-metrics") {
            Some(p) => p,
            None => {
                eprintln!(
                    "bench: VictoriaMetrics is not installed (Debian: apt install victoria-metrics); not compared"
                );
                return Ok(Vec::new());
            }
        },
        path => std::path::PathBuf::from(path),
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = work.join("victoria-metrics");
    let child = std::process::Command::new(&exe)
        .arg(format!("-storageDataPath={}", dir.display()))
        .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
        .args(["-retentionPeriod=100y", "-loggerLevel=ERROR"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let server = BenchServer(super::process::ServerProcess {
        child,
        base: format!("http://127.0.0.1:{port}"),
        backend: None,
    });
    let health = format!("{}/health", server.base());
    let ready = Instant::now() + Duration::from_secs(30);
    while reqwest::get(&health)
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        if Instant::now() > ready {
            bail!("VictoriaMetrics did not answer {health} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fleet = Arc::new(Fleet::new("car", args.devices, base));
    eprintln!(
        "bench: VictoriaMetrics, {} devices say hello (not timed)",
        args.devices
    );
    let mut phases = Vec::new();
    let victoria = Target {
        server: &server,
        wire: Wire::Victoria,
    };
    let run = async {
        warm_up(victoria, &fleet).await?;
        for &c in &args.connections {
            eprintln!("bench: VictoriaMetrics, fleet over {c} connections");
            let p = phase(
                victoria,
                "victoria-metrics fleet",
                &fleet,
                c,
                Some(duration),
                Order::Live,
                None,
            )
            .await?;
            phases.push(p);
        }
        anyhow::Ok(())
    }
    .await;
    let _ = server.0.terminate();
    run.map(|()| phases)
}

/// A live fleet of `devices` devices that `server` knows (their first requests
/// sent), for other scenarios to measure ingest beside their own load.
pub(super) async fn live_fleet(server: &BenchServer, devices: usize) -> anyhow::Result<Arc<Fleet>> {
    let base = Timestamp::now().as_micros() / 1_000_000 - 600;
    let fleet = Arc::new(Fleet::new("car", devices, base));
    let target = Target {
        server,
        wire: Wire::Milepost,
    };
    warm_up(target, &fleet).await?;
    Ok(fleet)
}

/// One live phase of `fleet` over `connections` connections for `duration`.
pub(super) async fn live_phase(
    server: &BenchServer,
    fleet: &Arc<Fleet>,
    name: &str,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<FleetPhase> {
    let target = Target {
        server,
        wire: Wire::Milepost,
    };
    phase(
        target,
        name,
        fleet,
        connections,
        Some(duration),
        Order::Live,
        None,
    )
    .await
}

/// Every device's first request (not timed): the server knows them all afterwards.
async fn warm_up(target: Target<'_>, fleet: &Arc<Fleet>) -> anyhow::Result<()> {
    phase(target, "warm-up", fleet, 64, None, Order::Live, None)
        .await
        .map(drop)
}

/// `name` on PATH, if there.
fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

fn order_name(o: Order) -> &'static str {
    match o {
        Order::Live => "live",
        Order::Retry => "retry",
        Order::Backlog => "backlog",
        Order::Mix => "mix",
    }
}

fn print_report(r: &FleetReport) {
    // The server inherits the environment; two malloc arenas (as deployed) cost the
    // fleet ~7 % of its rate (docs/performance.md, session 26), so say which ran.
    let arenas = std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "unset".into());
    println!(
        "milepost bench --scenario fleet: {} devices, {} readings per request, \
         MALLOC_ARENA_MAX {arenas}",
        r.devices, r.readings_per_request
    );
    println!(
        "{:<30} {:>5} {:>9} {:>7} {:>9} {:>11} {:>8} {:>8} {:>9} {:>8} {:>8}",
        "phase",
        "conns",
        "requests",
        "seconds",
        "req/s",
        "readings/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "CPU µs/r",
        "RSS MiB"
    );
    for p in &r.phases {
        println!(
            "{:<30} {:>5} {:>9} {:>7.1} {:>9.0} {:>11.0} {:>8.2} {:>8.2} {:>9.2} {:>8.0} {:>8.0}",
            p.name,
            p.connections,
            p.requests,
            p.seconds,
            p.requests_per_sec,
            p.readings_per_sec,
            p.p50_ms,
            p.p99_ms,
            p.p999_ms,
            p.cpu_us_per_request,
            p.peak_rss_mib
        );
    }
    for p in r.phases.iter().filter(|p| p.max_unapplied_readings > 0.0) {
        println!(
            "  apply lag during {} ({} connections): at most {:.0} readings, {:.2} s",
            p.name, p.connections, p.max_unapplied_readings, p.max_apply_lag_seconds
        );
    }
    if let Some(median) = median(&r.victoria_ratios) {
        let each: Vec<String> = r
            .victoria_ratios
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect();
        println!(
            "fleet / VictoriaMetrics at {} connections, {} round(s): {} (median {median:.2})",
            r.phases
                .iter()
                .find(|p| p.name == "fleet")
                .map_or(0, |p| p.connections),
            r.victoria_ratios.len(),
            each.join(", ")
        );
    }
    for p in &r.phases {
        if let Some(s) = &p.log_syncs {
            println!(
                "  ingest log during {} ({} connections): {:.0} fdatasyncs/s ({:.1} requests each), p50 ≤ {:.2} ms, p99 ≤ {:.2} ms",
                p.name,
                p.connections,
                s.per_sec,
                p.requests_per_sec / s.per_sec,
                s.p50_ms,
                s.p99_ms
            );
        }
    }
    for p in &r.phases {
        if let Some(reads) = &p.reads {
            super::readers::print(
                &format!("{} ({} connections)", p.name, p.connections),
                reads,
            );
        }
    }
    if r.big_readings > 0 {
        println!(
            "one request of {} readings: {:.2} M readings/s; DuckDB's own read_json load {:.2} M/s; ratio {:.2}",
            r.big_readings,
            r.big_http_per_sec / 1e6,
            r.big_native_per_sec / 1e6,
            r.big_ratio
        );
    }
    println!(
        "restart with {} devices known: ready in {:.0} ms",
        r.devices_known, r.restart_ms
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(count: u64, buckets: &[(f64, u64)], at: Instant) -> SyncHistogram {
        let mut text = String::from("# TYPE milepost_ingest_log_sync_duration_seconds histogram\n");
        for (le, n) in buckets {
            text.push_str(&format!(
                "milepost_ingest_log_sync_duration_seconds_bucket{{le=\"{le}\"}} {n}\n"
            ));
        }
        text.push_str(&format!(
            "milepost_ingest_log_sync_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             milepost_ingest_log_sync_duration_seconds_count {count}\n"
        ));
        SyncHistogram::parse(&text, at)
    }

    #[test]
    fn the_median_of_rounds() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[0.9]), Some(0.9));
        assert_eq!(median(&[1.0, 0.8, 0.9]), Some(0.9));
        assert_eq!(median(&[1.0, 0.5, 0.75, 0.25]), Some(0.625));
    }

    #[test]
    fn log_syncs_come_from_the_histograms_difference() {
        let t0 = Instant::now();
        let first = scrape(100, &[(0.0001, 50), (0.001, 100)], t0);
        // 1,000 more syncs in 2 s: 600 ≤ 0.1 ms, 395 more ≤ 1 ms, 5 slower.
        let last = scrape(
            1100,
            &[(0.0001, 650), (0.001, 1095)],
            t0 + Duration::from_secs(2),
        );
        let s = Sampled {
            first,
            last,
            ..Sampled::default()
        }
        .log_syncs()
        .expect("syncs ran");
        assert_eq!(s.per_sec, 500.0);
        assert_eq!(s.p50_ms, 0.1);
        assert_eq!(s.p99_ms, 1.0);
        let none = Sampled {
            first: scrape(7, &[(0.0001, 7)], t0),
            last: scrape(7, &[(0.0001, 7)], t0 + Duration::from_secs(1)),
            ..Sampled::default()
        };
        assert!(none.log_syncs().is_none());
    }
}
