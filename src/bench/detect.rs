//! `milepost bench --detect`: step detection's speed.
//!
//! 1. The pure scan (`detect::find_steps`) over a year of 1-minute bucket means
//!    (525,600 points), radius 10, each algorithm.
//! 2. `Detection.DryRun` over the real gRPC backend of a server holding that year
//!    (one reading a minute), 1-minute buckets (from raw readings) and 15-minute
//!    buckets (from the rollups): the time a client waits.
//! 3. Sustained ingest with and without active alerts on every series being
//!    written (background detection after each burst of commits), back to back,
//!    three rounds; the median of the rounds' changes.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;

use super::{BENCH_KEY, BenchArgs, BenchServer, generate};
use crate::backend::{Role, TokenAdmin, client, proto};
use crate::detect::{self, Algorithm, Direction, StepConfig};

const YEAR_MINUTES: usize = 525_600;
const RADIUS: usize = 10;

/// Figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct DetectReport {
    /// Pure scan of 525,600 points, ms per algorithm.
    pub scan_ms: Vec<(String, f64)>,
    /// DryRun over a year of 1-minute buckets, ms (best of 3, median of 3).
    pub dry_run_1m_ms: (f64, f64),
    /// DryRun over a year of 15-minute buckets, ms (best, median).
    pub dry_run_15m_ms: (f64, f64),
    /// Steps the 1-minute dry run found (the series has 11).
    pub dry_run_steps: usize,
    /// Ingest readings/s per round: (no alerts, an alert on every series written),
    /// run back to back.
    pub ingest_rounds: Vec<(f64, f64)>,
    /// Median over the rounds of (with alerts / without − 1), percent.
    pub ingest_change_pct: f64,
}

/// A year of minutes: noise around a level that steps by ±20 eleven times.
fn year_series() -> Vec<f64> {
    use rand::{Rng as _, SeedableRng as _};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..YEAR_MINUTES)
        .map(|i| {
            let level = 80.0
                + if (i / (YEAR_MINUTES / 12)) % 2 == 1 {
                    20.0
                } else {
                    0.0
                };
            level + rng.random::<f64>() * 2.0 - 1.0
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the detection benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<DetectReport> {
    let work = match &args.work_dir {
        Some(d) => d.clone(),
        None => tempfile::tempdir()?.keep(),
    };
    std::fs::create_dir_all(&work)?;
    let series = year_series();

    // 1. The pure scan.
    let mut scan_ms = Vec::new();
    for (alg, threshold) in [
        (Algorithm::Absolute, 10.0),
        (Algorithm::Percent, 0.1),
        (Algorithm::Cohen, 5.0),
        (Algorithm::Original, 20.0),
        (Algorithm::MannWhitneyU, 0.001),
    ] {
        let cfg = StepConfig::new(alg, RADIUS, threshold, Direction::Both)?;
        let started = Instant::now();
        let scan = detect::find_steps(&series, &cfg, 0, true);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        eprintln!(
            "bench --detect: scan of {YEAR_MINUTES} points, {alg}: {ms:.1} ms, {} steps",
            scan.steps.len()
        );
        scan_ms.push((alg.to_string(), ms));
    }

    // 2. DryRun over the backend of a server holding the year.
    let dir = work.join("detect-year");
    let server = BenchServer::start(&dir, &args.memory_limit)?;
    let t0 = chrono::DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")?.to_utc();
    ingest_year(server.base(), &series, t0).await?;
    let backend = server
        .0
        .backend
        .clone()
        .context("the server runs no backend")?;
    let (token, _) = TokenAdmin::new(&dir).create(Role::Editor, "bench")?;
    let client = proto::DetectionClient::new(client::channel(&format!("http://{backend}"))?);
    let end = t0 + chrono::Duration::minutes(YEAR_MINUTES as i64);
    let dry = async |bucket: &str| -> anyhow::Result<((f64, f64), usize)> {
        let mut times = Vec::new();
        let mut steps = 0;
        for _ in 0..3 {
            let req = client::authorized(
                Some(&token),
                proto::DryRunRequest {
                    config: Some(proto::AlertConfig {
                        name: "bench".into(),
                        device: "detect".into(),
                        sensor: "engine_temperature".into(),
                        bucket: bucket.into(),
                        algorithm: proto::Algorithm::Absolute as i32,
                        radius: RADIUS as u32,
                        threshold: 10.0,
                        direction: proto::Direction::Both as i32,
                        ..Default::default()
                    }),
                    from: t0.to_rfc3339(),
                    to: end.to_rfc3339(),
                    max_results: 0,
                },
            )?;
            let started = Instant::now();
            let r = client
                .clone()
                .dry_run(req)
                .await
                .map_err(|s| anyhow::anyhow!("DryRun: {s:?}"))?;
            times.push(started.elapsed().as_secs_f64() * 1e3);
            steps = r.get_ref().anomalies.len();
        }
        let best = times.iter().copied().fold(f64::INFINITY, f64::min);
        eprintln!(
            "bench --detect: DryRun over a year of {bucket} buckets: best {best:.0} ms, median {:.0} ms, {steps} steps",
            median(times.clone())
        );
        Ok(((best, median(times)), steps))
    };
    let (dry_run_1m_ms, dry_run_steps) = dry("1m").await?;
    let (dry_run_15m_ms, _) = dry("15m").await?;
    server.stop()?;

    // 3. Ingest with and without alerts on every series written.
    let gen_dir = work.join("detect-ingest-data");
    std::fs::create_dir_all(&gen_dir)?;
    let (n, chunk, seed) = (args.readings, args.chunk_lines, args.seed);
    let devices = args.clients.max(1);
    let g = {
        let d = gen_dir.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || {
                generate::generate(&d, "det", n, devices, chunk, seed)
            })
            .await??,
        )
    };
    let mut rounds = Vec::new();
    for round in 0..3 {
        let mut pair = (0.0, 0.0);
        for with_alerts in [false, true] {
            let dir = work.join(format!("detect-ingest-{round}-{with_alerts}"));
            super::flush_page_cache();
            let server = BenchServer::start(&dir, &args.memory_limit)?;
            if with_alerts {
                create_alerts(&server, &dir, devices).await?;
            }
            let name = if with_alerts {
                "ingest, alerts on every series"
            } else {
                "ingest, no alerts"
            };
            let phase = server.push(&g, false, name).await?;
            eprintln!(
                "bench --detect: {name}: {:.0} readings/s",
                phase.readings_per_sec
            );
            if with_alerts {
                pair.1 = phase.readings_per_sec;
            } else {
                pair.0 = phase.readings_per_sec;
            }
            server.stop()?;
            std::fs::remove_dir_all(&dir).ok();
        }
        rounds.push(pair);
    }
    let report = DetectReport {
        scan_ms,
        dry_run_1m_ms,
        dry_run_15m_ms,
        dry_run_steps,
        ingest_change_pct: median(rounds.iter().map(|(a, b)| (b / a - 1.0) * 100.0).collect()),
        ingest_rounds: rounds,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report)
}

/// One reading a minute for a year, in 10,000-line requests.
async fn ingest_year(
    base: &str,
    series: &[f64],
    t0: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let started = Instant::now();
    for (c, chunk) in series.chunks(10_000).enumerate() {
        let mut body = String::with_capacity(chunk.len() * 100);
        for (i, v) in chunk.iter().enumerate() {
            let t = t0 + chrono::Duration::minutes((c * 10_000 + i) as i64);
            body.push_str(&format!(
                "{{\"device\":\"detect\",\"sensor\":\"engine_temperature\",\"value\":{v},\"timestamp\":\"{}\"}}\n",
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ));
        }
        let r = client
            .post(format!("{base}/ingest"))
            .bearer_auth(BENCH_KEY)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "ingest answered {}", r.status());
    }
    eprintln!(
        "bench --detect: a year of minutes ingested in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// An active alert (1-minute buckets, radius 10) on every sensor of every device
/// the generated streams write.
async fn create_alerts(server: &BenchServer, dir: &Path, devices: usize) -> anyhow::Result<()> {
    let backend = server
        .0
        .backend
        .clone()
        .context("the server runs no backend")?;
    let (token, _) = TokenAdmin::new(dir).create(Role::Editor, "bench")?;
    let mut client = proto::AlertsClient::new(client::channel(&format!("http://{backend}"))?);
    for d in 0..devices {
        for sensor in generate::SENSORS {
            let req = client::authorized(
                Some(&token),
                proto::AlertConfig {
                    name: format!("det-{d}-{sensor}"),
                    device: format!("det-{d}"),
                    sensor: sensor.into(),
                    bucket: "1m".into(),
                    algorithm: proto::Algorithm::Cohen as i32,
                    radius: RADIUS as u32,
                    threshold: 5.0,
                    direction: proto::Direction::Both as i32,
                    ..Default::default()
                },
            )?;
            client
                .create_alert(req)
                .await
                .map_err(|s| anyhow::anyhow!("CreateAlert: {s:?}"))?;
        }
    }
    Ok(())
}

fn print_report(r: &DetectReport) {
    println!("\nStep detection (radius {RADIUS})");
    println!("| measurement | figure |");
    println!("|---|---|");
    for (alg, ms) in &r.scan_ms {
        println!("| pure scan, {YEAR_MINUTES} points, {alg} | {ms:.1} ms |");
    }
    println!(
        "| DryRun over gRPC, a year of 1m buckets (raw readings) | best {:.0} ms, median {:.0} ms ({} steps) |",
        r.dry_run_1m_ms.0, r.dry_run_1m_ms.1, r.dry_run_steps
    );
    println!(
        "| DryRun over gRPC, a year of 15m buckets (rollups) | best {:.0} ms, median {:.0} ms |",
        r.dry_run_15m_ms.0, r.dry_run_15m_ms.1
    );
    for (i, (plain, alerted)) in r.ingest_rounds.iter().enumerate() {
        println!(
            "| ingest round {}: no alerts / an alert on every series written | {plain:.0} / {alerted:.0} readings/s ({:+.1} %) |",
            i + 1,
            (alerted / plain - 1.0) * 100.0
        );
    }
    println!(
        "| ingest with alerts, median change over the rounds | {:+.1} % |",
        r.ingest_change_pct
    );
}
