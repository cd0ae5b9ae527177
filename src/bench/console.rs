//! `milepost bench --scenario console`: the console's pages and the charts it shows,
//! timed with `--readings` stored — `--devices` simulated cars (the demo's) at 1 Hz,
//! six sensors, their newest readings now — so "today", the live values and the
//! charts of the last day have real data under them.
//!
//! Each page is asked for `--query-runs` times in a row after one warm-up request;
//! the figures are the client's wall time on loopback (the server's time plus well
//! under a millisecond), p50 and p95.

use std::time::Instant;

use chrono::{SubsecRound as _, Utc};

use super::{BENCH_KEY, BenchArgs, BenchServer, work_dir};
use crate::demo::car::{Car, Sample};

/// Seconds of a car's readings per request.
const CHUNK_SECONDS: u64 = 3 * 3600;

/// Runs the console benchmark and prints the figures.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (work, _tmp) = work_dir(&args, "milepost-bench-console-")?;
    let devices = args.devices.max(1) as u64;
    let seconds = (args.readings / 6 / devices).max(3600);
    let server = BenchServer::start(&work.join("server"), &args.memory_limit)?;
    let base = server.base().to_owned();
    let http = reqwest::Client::new();
    let now = Utc::now().trunc_subsecs(0);
    let start = now - chrono::Duration::seconds(seconds as i64);
    eprintln!(
        "bench: {devices} cars × {:.1} h × 6 sensors = {} readings, ending now",
        seconds as f64 / 3600.0,
        devices * seconds * 6
    );
    let loaded = Instant::now();
    // Cars in parallel (two requests in flight keep the server's writer busy).
    let mut tasks = tokio::task::JoinSet::new();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..2 {
        let (http, base, next) = (http.clone(), base.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= devices {
                    return Ok::<_, anyhow::Error>(());
                }
                let mut car = Car::new(n, Some(seconds * 3 / 5));
                let device = format!("car-{}", n + 1);
                let mut s = 0;
                while s < seconds {
                    let (from, to) = (s, (s + CHUNK_SECONDS).min(seconds));
                    let samples: Vec<Sample> = (from..to).map(|_| car.step()).collect();
                    let body = tokio::task::spawn_blocking({
                        let device = device.clone();
                        move || body_of(&device, start, from, &samples)
                    })
                    .await?;
                    crate::demo::send(&http, &base, BENCH_KEY, body).await?;
                    s = to;
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    eprintln!(
        "bench: loaded in {:.1} s; timing the pages",
        loaded.elapsed().as_secs_f64()
    );

    // The fleet keeps driving while the pages are timed: every car sends its six
    // readings each second, so "today", the live values and the charts move (and
    // the overview's kept counts are extended, not reused).
    let streaming = tokio_util::sync::CancellationToken::new();
    let live = {
        let (http, base, stop) = (http.clone(), base.clone(), streaming.clone());
        tokio::spawn(async move {
            let mut cars: Vec<Car> = (0..devices).map(|n| Car::new(n, None)).collect();
            cars.iter_mut().for_each(Car::keep_driving);
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            while !stop.is_cancelled() {
                tick.tick().await;
                let at = Utc::now().trunc_subsecs(3);
                let mut body = String::new();
                for (n, car) in cars.iter_mut().enumerate() {
                    car.step()
                        .write_ndjson(&mut body, &format!("car-{}", n + 1), at);
                }
                let _ = crate::demo::send(&http, &base, BENCH_KEY, body).await;
            }
        })
    };
    let cold = {
        let t = Instant::now();
        let r = http.get(format!("{base}/?tz=Europe/Berlin")).send().await?;
        anyhow::ensure!(r.status().is_success(), "overview: {}", r.status());
        r.bytes().await?;
        t.elapsed().as_secs_f64() * 1e3
    };
    let thirty_days = (now - chrono::Duration::days(30)).to_rfc3339();
    let pages = [
        ("overview `/`", "/?tz=Europe/Berlin".to_owned()),
        (
            "device page, last day",
            "/device?name=car-1&tz=Europe/Berlin".to_owned(),
        ),
        (
            "device page, last 30 days",
            "/device?name=car-1&range=30d&tz=Europe/Berlin".to_owned(),
        ),
        (
            "chart.svg, last day",
            "/api/v1/sensors/speed/chart.svg?device=car-1&tz=Europe/Berlin".to_owned(),
        ),
        (
            "chart.svg, 30 days",
            format!(
                "/api/v1/sensors/speed/chart.svg?device=car-1&tz=Europe/Berlin&from={}",
                urlencode(&thirty_days)
            ),
        ),
        (
            "track.svg, last day",
            "/api/v1/location/track.svg?device=car-1".to_owned(),
        ),
        (
            "a row's `spark.svg` (a device's last 24 h per hour)",
            "/spark.svg?name=car-1&tz=Europe/Berlin".to_owned(),
        ),
        ("anomalies", "/anomalies?tz=Europe/Berlin".to_owned()),
        ("system", "/system".to_owned()),
    ];
    let runs = args.query_runs.max(5);
    println!(
        "| console, {} readings of {devices} cars streaming | p50 ms | p95 ms | bytes |",
        devices * seconds * 6
    );
    println!("|---|---:|---:|---:|");
    println!("| overview, first view (counts every shown device's day) | {cold:.1} | | |");
    for (name, path) in pages {
        let url = format!("{base}{path}");
        let warm = http.get(&url).send().await?;
        anyhow::ensure!(warm.status().is_success(), "{path}: {}", warm.status());
        let bytes = warm.bytes().await?.len();
        let mut ms = Vec::with_capacity(runs);
        for _ in 0..runs {
            // Views a person would make: not back to back, the fleet moving between.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let t = Instant::now();
            let r = http.get(&url).send().await?;
            r.bytes().await?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
        println!("| {name} | {:.1} | {:.1} | {bytes} |", pct(0.5), pct(0.95));
    }
    streaming.cancel();
    live.await?;
    println!("server peak RSS {:.0} MiB", server.peak_rss_mib());
    server.stop()
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// NDJSON of a car's samples from second `from` after `start`.
fn body_of(device: &str, start: chrono::DateTime<Utc>, from: u64, samples: &[Sample]) -> String {
    let mut body = String::with_capacity(samples.len() * 6 * 95);
    for (i, s) in samples.iter().enumerate() {
        s.write_ndjson(
            &mut body,
            device,
            start + chrono::Duration::seconds((from + i as u64) as i64),
        );
    }
    body
}
