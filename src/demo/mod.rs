//! `milepost demo`: a server with something to look at in the first minute. It starts
//! a real server (a temporary data directory unless `--data-dir`), sends the last
//! 24 hours of simulated cars through the real `POST /ingest`, creates an alert over
//! the backend that finds the refuelling in that history, dumps yesterday, then
//! streams live readings at 1 Hz until stopped. Everything goes through the same
//! doors a user's devices and tools use.

pub mod car;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, SubsecRound as _, Utc};

use crate::app::{Server, ShutdownSignal};
use crate::backend::{Role, TokenAdmin, proto};
use crate::config::ServeArgs;
use car::Car;

/// `milepost demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Address of the demo's HTTP API and console.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Keep the data here (default: a temporary directory, deleted on exit).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Simulated cars.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub devices: u64,
    /// Hours of history sent before the live readings.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(2..=24 * 14))]
    pub hours: u64,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

/// Hours of history ingested per request.
const CHUNK_SECONDS: u64 = 3600;

/// Runs the demo until Ctrl-C (or `--duration`).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let signal = ShutdownSignal::install()?;
    let temp;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("milepost-demo-")
                .tempdir()?;
            temp.path().to_owned()
        }
    };
    let key = format!("demo-{:016x}", rand::random::<u64>());
    let mut serve = ServeArgs::for_tests(data_dir.clone());
    serve.listen = args.listen;
    serve.api_keys = vec![key.clone()];
    serve.default_device = crate::domain::Device::parse("car-1").expect("a valid name");
    let server = Server::start(serve)
        .await
        .with_context(|| format!("starting the demo server on {}", args.listen))?;
    let base = format!("http://{}", server.local_addr());
    let http = reqwest::Client::new();

    let now = Utc::now().trunc_subsecs(0);
    let start = now - chrono::Duration::hours(args.hours as i64);
    eprintln!(
        "demo: sending {} h of {} simulated car(s) through {base}/ingest …",
        args.hours, args.devices
    );
    let history = args.hours * 3600;
    let mut cars: Vec<Car> = (0..args.devices)
        .map(|n| Car::new(n, (n == 0).then_some(history * 3 / 5)))
        .collect();
    for (n, car) in cars.iter_mut().enumerate() {
        let device = format!("car-{}", n + 1);
        let mut second = 0;
        while second < history {
            let mut body = String::with_capacity(CHUNK_SECONDS as usize * 6 * 90);
            for s in second..(second + CHUNK_SECONDS).min(history) {
                let at = start + chrono::Duration::seconds(s as i64);
                car.step().write_ndjson(&mut body, &device, at);
            }
            send(&http, &base, &key, body).await?;
            second += CHUNK_SECONDS;
        }
    }

    let found = refuel_alert(&server, &data_dir, start, now).await?;
    let yesterday = (now - chrono::Duration::days(1)).date_naive();
    let dumped = server.dumper().dump_day(yesterday).await?;

    println!(
        "Milepost demo: {} simulated car(s), {} h of history, live readings every second.",
        args.devices, args.hours
    );
    println!("  console   {base}/");
    println!("  API docs  {base}/docs");
    println!("  API key   {key}");
    println!("            milepost push FILE --url {base} --api-key {key}");
    println!(
        "  data      {}{}",
        data_dir.display(),
        if args.data_dir.is_some() {
            ""
        } else {
            " (deleted on exit)"
        }
    );
    println!(
        "  found     {found} step(s) in car-1's fuel (the refuelling); dumped {yesterday} ({} file(s))",
        dumped.len()
    );
    println!("Press Ctrl-C to stop.");

    for car in &mut cars {
        car.keep_driving();
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let stopper = stop.clone();
    tokio::spawn(async move {
        signal.recv().await;
        stopper.cancel();
    });
    let until = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if until.is_some_and(|u| tokio::time::Instant::now() >= u) {
            break;
        }
        let at = Utc::now().trunc_subsecs(3);
        let mut body = String::new();
        for (n, car) in cars.iter_mut().enumerate() {
            car.step()
                .write_ndjson(&mut body, &format!("car-{}", n + 1), at);
        }
        if let Err(e) = send(&http, &base, &key, body).await {
            tracing::warn!("demo: live readings not sent: {e:#}");
        }
    }
    eprintln!("demo: stopping");
    server.stop().await
}

/// `POST {base}/ingest` of an NDJSON `body` with `key`; an error unless 2xx.
pub async fn send(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    body: String,
) -> anyhow::Result<()> {
    let r = http
        .post(format!("{base}/ingest"))
        .basic_auth(key, None::<&str>)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await?;
    let status = r.status();
    anyhow::ensure!(
        status.is_success(),
        "ingest answered {status}: {}",
        r.text().await.unwrap_or_default()
    );
    Ok(())
}

/// Creates, over the backend, an alert on car-1's fuel that a refuelling trips (an
/// upward step of more than 25 points between 5-minute means), and runs it over the
/// history; returns the steps found.
async fn refuel_alert(
    server: &Server,
    data_dir: &std::path::Path,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<u32> {
    let addr = server
        .backend_addr()
        .context("the demo needs the internal backend")?;
    let (token, _) = TokenAdmin::new(data_dir).create(Role::Admin, "demo")?;
    let channel = crate::backend::client::channel(&format!("http://{addr}"))?;
    let alert = proto::AlertsClient::new(channel.clone())
        .create_alert(crate::backend::client::authorized(
            Some(&token),
            proto::AlertConfig {
                name: "car-1 refuelled".into(),
                device: "car-1".into(),
                sensor: "fuel".into(),
                bucket: "5m".into(),
                algorithm: proto::Algorithm::Absolute as i32,
                radius: 3,
                threshold: 25.0,
                direction: proto::Direction::Up as i32,
                ..Default::default()
            },
        )?)
        .await
        .context("creating the demo's alert")?
        .into_inner();
    let done = proto::JobsClient::new(channel)
        .backfill(crate::backend::client::authorized(
            Some(&token),
            proto::BackfillRequest {
                alert_id: alert.id,
                from: from.to_rfc3339(),
                to: to.to_rfc3339(),
            },
        )?)
        .await
        .context("running the demo's alert over the history")?
        .into_inner();
    Ok(done.found)
}
