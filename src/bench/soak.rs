//! `milepost bench --scenario soak`: minutes of the traffic an appliance lives with,
//! to see whether anything drifts — memory that only grows, latency that creeps up,
//! errors that appear after a while.
//!
//! 1. A fresh `milepost serve` child process; `--history-days` of the default
//!    device's history (six sensors at 1 Hz) loaded first, so that charts and exports
//!    read real data.
//! 2. For `--minutes`: `--soak-devices` devices each sending one request per second
//!    with one reading per sensor (the default device among them: the dashboard's
//!    car); `--dashboards` browsers each polling the dashboard's seven URLs every
//!    10 s, revalidating with `If-None-Match` as a browser does; and a raw NDJSON
//!    export of the default device's speed (its whole history) every minute.
//! 3. Per minute: requests, errors (any status but 200/304) and p50/p99 latency per
//!    endpoint, and the server's resident memory at the end of the minute; at the
//!    end the trend of the resident memory over the run (least squares, MiB/min,
//!    after the first minute's warm-up) and every error.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::time::MissedTickBehavior;

use super::{BENCH_KEY, BenchArgs, BenchServer, generate, percentile};
use crate::domain::Timestamp;

/// Endpoints measured, in report order.
const ENDPOINTS: [&str; 6] = ["ingest", "status", "latest", "location", "chart", "export"];

/// One endpoint in one minute.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointMinute {
    /// Endpoint (see [`ENDPOINTS`]).
    pub endpoint: String,
    /// Requests answered.
    pub requests: usize,
    /// Answers other than 200 and 304.
    pub errors: usize,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

/// One minute of the run.
#[derive(Debug, Clone, Serialize)]
pub struct SoakMinute {
    /// Minute of the run, from 1.
    pub minute: usize,
    /// The server's resident memory at the end of the minute, MiB.
    pub rss_mib: f64,
    /// DuckDB's write-ahead log then, MiB: data written since the last checkpoint,
    /// which DuckDB also holds in memory until it checkpoints (at 16 MiB of log).
    pub wal_mib: f64,
    /// Per endpoint.
    pub endpoints: Vec<EndpointMinute>,
}

/// The whole soak.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// Devices sending.
    pub devices: usize,
    /// Dashboards polling.
    pub dashboards: usize,
    /// Readings of history loaded before the run.
    pub history_readings: u64,
    /// Readings acknowledged during the run.
    pub readings: u64,
    /// Per minute.
    pub minutes: Vec<SoakMinute>,
    /// Least-squares slope of the resident memory from minute 2 on, MiB per minute.
    pub rss_trend_mib_per_min: f64,
    /// Every answer other than 200/304, and every failed request, as text.
    pub errors: Vec<String>,
}

/// One answered (or failed) request.
struct Sample {
    at: Duration,
    endpoint: usize,
    ms: f64,
    ok: bool,
}

/// What every task records into.
struct Recorder {
    started: Instant,
    samples: Mutex<Vec<Sample>>,
    errors: Mutex<Vec<String>>,
}

impl Recorder {
    fn record(&self, endpoint: usize, t: Instant, status: Result<u16, String>) {
        let ok = matches!(status, Ok(200 | 304));
        if !ok {
            let what = match &status {
                Ok(s) => format!("{}: status {s}", ENDPOINTS[endpoint]),
                Err(e) => format!("{}: {e}", ENDPOINTS[endpoint]),
            };
            self.errors.lock().expect("errors").push(what);
        }
        self.samples.lock().expect("samples").push(Sample {
            at: t.duration_since(self.started),
            endpoint,
            ms: t.elapsed().as_secs_f64() * 1e3,
            ok,
        });
    }
}

/// Runs the soak and prints its table.
pub async fn run(args: BenchArgs) -> anyhow::Result<SoakReport> {
    let (work, _tmp) = super::work_dir(&args, "milepost-bench-soak-")?;
    let data_dir = work.join("soak");
    let server = BenchServer::start(&data_dir, &args.memory_limit)?;
    let wal = crate::store::DataDir::new(&data_dir).wal();
    let base = server.base().to_owned();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .build()?;

    let history = load_history(&client, &base, args.history_days).await?;
    eprintln!(
        "bench: soak for {} min: {} devices at 1 request/s, {} dashboards polling every 10 s, \
         an export every minute",
        args.minutes, args.soak_devices, args.dashboards
    );
    let rec = Arc::new(Recorder {
        started: Instant::now(),
        samples: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
    });
    let until = rec.started + Duration::from_secs(args.minutes * 60);
    let mut tasks = Vec::new();
    for d in 0..args.soak_devices {
        let (client, base, rec) = (client.clone(), base.clone(), rec.clone());
        tasks.push(tokio::spawn(async move {
            device(client, base, d, rec, until).await
        }));
    }
    for b in 0..args.dashboards {
        let (client, base, rec) = (client.clone(), base.clone(), rec.clone());
        // Browsers opened at different moments.
        let offset = Duration::from_millis((b as u64 * 10_000) / args.dashboards.max(1) as u64);
        tasks.push(tokio::spawn(async move {
            dashboard(client, base, offset, rec, until).await
        }));
    }
    {
        let (client, base, rec) = (client.clone(), base.clone(), rec.clone());
        tasks.push(tokio::spawn(async move {
            exporter(client, base, rec, until).await
        }));
    }

    // Resident memory at the end of every minute.
    let (mut rss, mut wal_mib) = (Vec::new(), Vec::new());
    for minute in 1..=args.minutes {
        tokio::time::sleep_until((rec.started + Duration::from_secs(minute * 60)).into()).await;
        rss.push(server.0.rss_mib());
        wal_mib.push(std::fs::metadata(&wal).map_or(0.0, |m| m.len() as f64 / 1048576.0));
        eprintln!(
            "bench: soak minute {minute}: RSS {:.0} MiB, WAL {:.1} MiB, {} errors so far",
            rss.last().copied().unwrap_or(0.0),
            wal_mib.last().copied().unwrap_or(0.0),
            rec.errors.lock().expect("errors").len()
        );
    }
    let mut readings = 0u64;
    for t in tasks {
        readings += t.await.context("soak task")?;
    }
    server.stop()?;

    let samples = std::mem::take(&mut *rec.samples.lock().expect("samples"));
    let report = SoakReport {
        devices: args.soak_devices,
        dashboards: args.dashboards,
        history_readings: history,
        readings,
        minutes: per_minute(&samples, &rss, &wal_mib),
        rss_trend_mib_per_min: slope(rss.get(1..).unwrap_or_default()),
        errors: std::mem::take(&mut *rec.errors.lock().expect("errors")),
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

/// `days` of the default device's six sensors at 1 Hz up to now, in requests of
/// 100,000 readings; returns the readings stored.
async fn load_history(client: &reqwest::Client, base: &str, days: u64) -> anyhow::Result<u64> {
    use std::fmt::Write as _;
    let now = Timestamp::now().as_micros() / 1_000_000;
    let first = now - i64::try_from(days * 86_400)? - 60;
    eprintln!("bench: loading {days} days of history of the default device");
    let mut stored = 0;
    let mut body = String::new();
    let mut t = first;
    while t < now - 60 {
        body.clear();
        while t < now - 60 && body.len() < 8 << 20 {
            let ts = chrono::DateTime::from_timestamp(t, 0).unwrap_or_default();
            let ts = ts.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            for (i, s) in generate::SENSORS.iter().enumerate() {
                let value = ((t + i as i64) % 90) as f64 + 0.5;
                let _ = writeln!(
                    body,
                    r#"{{"sensor":"{s}","value":{value},"timestamp":"{ts}"}}"#
                );
            }
            t += 1;
        }
        let resp = client
            .post(format!("{base}/ingest"))
            .bearer_auth(BENCH_KEY)
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await?;
        let status = resp.status();
        let v: serde_json::Value = resp.json().await?;
        if status != 200 {
            bail!("loading the history answered {status}: {v}");
        }
        stored += v["accepted"].as_u64().unwrap_or(0);
    }
    Ok(stored)
}

/// One device: a request of one reading per sensor every second until `until`;
/// returns the readings acknowledged.
async fn device(
    client: reqwest::Client,
    base: String,
    d: usize,
    rec: Arc<Recorder>,
    until: Instant,
) -> u64 {
    use std::fmt::Write as _;
    // Device 0 is the dashboard's car (the default device: no `device` field).
    let field = if d == 0 {
        String::new()
    } else {
        format!(r#","device":"car-{d}""#)
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Spread over the second, as real devices are.
    tokio::time::sleep(Duration::from_millis((d as u64 * 7919) % 1000)).await;
    let mut acked = 0;
    let mut body = String::new();
    while Instant::now() < until {
        tick.tick().await;
        let now = chrono::Utc::now();
        let ts = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        body.clear();
        for (i, s) in generate::SENSORS.iter().enumerate() {
            let value = ((now.timestamp() + i as i64 + d as i64) % 90) as f64 + 0.25;
            let _ = writeln!(
                body,
                r#"{{"sensor":"{s}","value":{value},"timestamp":"{ts}"{field}}}"#
            );
        }
        let t = Instant::now();
        let answer = client
            .post(format!("{base}/ingest"))
            .bearer_auth(BENCH_KEY)
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await;
        let status = match answer {
            Ok(r) => {
                let status = r.status().as_u16();
                if let Ok(v) = r.json::<serde_json::Value>().await {
                    acked += v["accepted"].as_u64().unwrap_or(0);
                }
                Ok(status)
            }
            Err(e) => Err(e.to_string()),
        };
        rec.record(0, t, status);
    }
    acked
}

/// One browser with the dashboard open: its seven URLs every 10 s, fetched at once,
/// each revalidated with the ETag of its previous answer.
async fn dashboard(
    client: reqwest::Client,
    base: String,
    offset: Duration,
    rec: Arc<Recorder>,
    until: Instant,
) -> u64 {
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut etags: BTreeMap<String, String> = BTreeMap::new();
    while Instant::now() < until {
        tick.tick().await;
        let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
        let mut urls = vec![
            (1, "/api/status".to_owned()),
            (2, "/api/statistics/latest".to_owned()),
            (3, "/api/location/latest".to_owned()),
        ];
        for s in ["speed", "fuel", "engine_temperature", "revolution"] {
            urls.push((4, format!("/api/statistics/sensor/{s}/date/{day}")));
        }
        let polls = urls.into_iter().map(|(endpoint, path)| {
            let mut req = client.get(format!("{base}{path}"));
            if let Some(tag) = etags.get(&path) {
                req = req.header("if-none-match", tag);
            }
            let rec = rec.clone();
            async move {
                let t = Instant::now();
                let answer = req.send().await;
                let (status, tag) = match answer {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let tag = r
                            .headers()
                            .get("etag")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let _ = r.bytes().await;
                        (Ok(status), tag)
                    }
                    Err(e) => (Err(e.to_string()), None),
                };
                rec.record(endpoint, t, status);
                (path, tag)
            }
        });
        for (path, tag) in futures_util::future::join_all(polls).await {
            if let Some(tag) = tag {
                etags.insert(path, tag);
            }
        }
    }
    0
}

/// A raw NDJSON export of the default device's speed, every minute.
async fn exporter(
    client: reqwest::Client,
    base: String,
    rec: Arc<Recorder>,
    until: Instant,
) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Half a minute in: not at the same moment as the minute's RSS reading.
    tokio::time::sleep(Duration::from_secs(30)).await;
    while Instant::now() < until {
        tick.tick().await;
        let t = Instant::now();
        let answer = client
            .get(format!(
                "{base}/api/v1/sensors/speed/readings?format=ndjson"
            ))
            .send()
            .await;
        let status = match answer {
            Ok(r) => {
                let status = r.status().as_u16();
                match r.bytes().await {
                    Ok(_) => Ok(status),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        rec.record(5, t, status);
    }
    0
}

fn per_minute(samples: &[Sample], rss: &[f64], wal_mib: &[f64]) -> Vec<SoakMinute> {
    rss.iter()
        .enumerate()
        .map(|(m, &rss_mib)| {
            let endpoints = ENDPOINTS
                .iter()
                .enumerate()
                .map(|(e, name)| {
                    let mine: Vec<&Sample> = samples
                        .iter()
                        .filter(|s| s.endpoint == e && s.at.as_secs() / 60 == m as u64)
                        .collect();
                    let mut ms: Vec<f64> = mine.iter().map(|s| s.ms).collect();
                    ms.sort_by(f64::total_cmp);
                    EndpointMinute {
                        endpoint: (*name).to_owned(),
                        requests: mine.len(),
                        errors: mine.iter().filter(|s| !s.ok).count(),
                        p50_ms: percentile(&ms, 0.5),
                        p99_ms: percentile(&ms, 0.99),
                    }
                })
                .collect();
            SoakMinute {
                minute: m + 1,
                rss_mib,
                wal_mib: wal_mib.get(m).copied().unwrap_or(0.0),
                endpoints,
            }
        })
        .collect()
}

/// Least-squares slope of `ys` over 0, 1, 2, ….
fn slope(ys: &[f64]) -> f64 {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return 0.0;
    }
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = ys.iter().sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mean_x;
        num += dx * (y - mean_y);
        den += dx * dx;
    }
    num / den
}

fn print_report(r: &SoakReport) {
    println!(
        "milepost bench --scenario soak: {} devices at 1 request/s (6 readings), {} dashboards \
         (7 polls / 10 s), 1 export/min; {} readings of history, {} acknowledged during the run",
        r.devices, r.dashboards, r.history_readings, r.readings
    );
    print!("{:>3} {:>7} {:>7}", "min", "RSS MiB", "WAL MiB");
    for e in ENDPOINTS {
        print!(" {:>20}", format!("{e} n p50/p99 ms"));
    }
    println!(" {:>6}", "errors");
    for m in &r.minutes {
        print!("{:>3} {:>7.0} {:>7.1}", m.minute, m.rss_mib, m.wal_mib);
        for e in &m.endpoints {
            print!(
                " {:>20}",
                format!("{} {:.1}/{:.1}", e.requests, e.p50_ms, e.p99_ms)
            );
        }
        println!(
            " {:>6}",
            m.endpoints.iter().map(|e| e.errors).sum::<usize>()
        );
    }
    println!(
        "RSS trend from minute 2 on: {:+.2} MiB/min; errors: {}",
        r.rss_trend_mib_per_min,
        r.errors.len()
    );
    for e in r.errors.iter().take(20) {
        println!("  {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::slope;

    #[test]
    fn slope_is_the_least_squares_trend() {
        assert_eq!(slope(&[5.0, 5.0, 5.0]), 0.0);
        assert!((slope(&[1.0, 3.0, 5.0, 7.0]) - 2.0).abs() < 1e-12);
        assert!((slope(&[2.0, 1.0, 0.0]) + 1.0).abs() < 1e-12);
    }
}
