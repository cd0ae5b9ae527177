//! `milepost bench --scenario sql`: users' SQL (SPEC 2.6, issue 25's speed goals)
//! on `--readings` generated readings, against DuckDB's own API on the same file,
//! in one run:
//!
//! 1. The readings are pushed over HTTP into a fresh server (the product's path:
//!    rollups and series as a real server has them), which also listens on the
//!    PostgreSQL protocol. The timed queries of steps 2 and 3 run with the shares
//!    of time off (one client's queries in a row would soon be told to wait their
//!    turn); step 4 on a restart with the defaults.
//! 2. A Grafana-style panel query (one device's sensor, hourly averages over the
//!    last 30 days of the data, Grafana's macros expanded) over the wire protocol
//!    through the extended protocol as drivers send it, p50/p99; the same question
//!    on the internal tables through DuckDB's own API on the same file (the server
//!    stopped; planned anew each run, as a dashboard's moving time range
//!    arrives), p50; their ratio, the answers compared.
//! 3. Rows fetched over the wire protocol (binary results, as drivers ask for
//!    them; decoded by `tokio-postgres`, and by psycopg when Python has it), and as
//!    an Arrow IPC stream over `POST /api/v1/sql`: rows/s of a result at the
//!    server's row cap.
//! 4. Live ingest (a fleet of small requests) quiet, then while four clients, each
//!    with its own token, loop heavy queries (hourly averages of every sensor and
//!    device over 30 days; `count(DISTINCT ts)` over all readings), honouring
//!    `429`/`503` + `Retry-After` as a well-behaved client does, measured once
//!    the loops have spent the server's budget of query time (its first 10 s);
//!    the ratio of the rates.
//! 5. Steps 2 and 3 again once the finished days are compacted.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::fleet::{self, FleetPhase};
use super::{BenchArgs, BenchServer, percentile};
use crate::domain::Timestamp;
use crate::store::diagnostics::HourlyMeans;

/// What the SQL scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct SqlReport {
    /// Readings stored before the queries.
    pub readings: u64,
    /// The readings' HTTP ingest, readings/s.
    pub ingest_per_sec: f64,
    /// Before and after compaction.
    pub passes: Vec<SqlPass>,
    /// The live fleet without SQL.
    pub fleet_quiet: FleetPhase,
    /// The live fleet while four clients loop heavy queries.
    pub fleet_beside_sql: FleetPhase,
    /// `fleet_beside_sql / fleet_quiet` requests/s.
    pub fleet_ratio: f64,
    /// Heavy queries answered during the fleet phase.
    pub heavy_answered: u64,
    /// Heavy queries told to come back later (429/503).
    pub heavy_deferred: u64,
    /// Heavy queries that failed otherwise (time limit, memory, …).
    pub heavy_failed: u64,
    /// The first such failure: status and message.
    pub heavy_failure: Option<String>,
}

/// One pass of the query measurements.
#[derive(Debug, Clone, Serialize)]
pub struct SqlPass {
    /// "uncompacted" or "compacted".
    pub name: String,
    /// The panel query over the wire protocol: median and 99th percentile, ms.
    pub panel_wire_p50_ms: f64,
    /// See `panel_wire_p50_ms`.
    pub panel_wire_p99_ms: f64,
    /// The same question on the internal tables through DuckDB's API, median, ms.
    pub panel_native_p50_ms: f64,
    /// `panel_wire_p50_ms / panel_native_p50_ms`.
    pub panel_ratio: f64,
    /// Rows in the panel's answer (equal both ways, checked).
    pub panel_rows: usize,
    /// Rows fetched over the wire protocol by `tokio-postgres` (binary), rows/s.
    pub wire_rows_per_sec: f64,
    /// The same by psycopg 3 (binary cursor), when Python has it.
    pub psycopg_rows_per_sec: Option<f64>,
    /// An Arrow IPC stream over `POST /api/v1/sql`, rows/s.
    pub arrow_rows_per_sec: f64,
    /// Rows of each fetch.
    pub fetch_rows: u64,
}

/// Rows of each fetch: the server's default row cap (`SqlLimits::max_rows`).
const FETCH_ROWS: u64 = 1_000_000;

/// The panel's hourly buckets, Grafana's `$__timeGroupAlias(ts, '1h')` expanded.
const HOUR_BUCKET: &str = "floor(extract(epoch from ts)/3600)*3600";

/// Runs the scenario and prints its table.
pub async fn run(args: BenchArgs) -> anyhow::Result<SqlReport> {
    let (work, _tmp) = super::work_dir(&args, "milepost-bench-sql-")?;
    let g = super::generate_inputs(&args, &work).await?;
    let dir = work.join("sql");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let tokens: Vec<String> = (0..5)
        .map(|_| viewer_token(&dir))
        .collect::<anyhow::Result<_>>()?;
    let device = g.streams[0].device.clone();
    // The last 30 days of the data (or all of it), as a panel's time range.
    let to = Timestamp::from_micros(g.last_ts + 1);
    let from = Timestamp::from_micros((g.last_ts - 30 * 86_400_000_000).max(g.first_ts));
    let panel = Panel {
        device: device.clone(),
        from_ms: from.as_micros() / 1000,
        to_ms: to.as_micros() / 1000,
        from: from.to_string(),
        to: to.to_string(),
    };

    super::flush_page_cache();
    eprintln!("bench: HTTP ingest of the readings");
    let server = SqlServer::start(&dir, &args.memory_limit, false)?;
    let ingest = server.http.push(&g, false, "http ingest").await?;
    let heavy = [
        format!(
            "SELECT device, sensor, {HOUR_BUCKET} AS time, avg(value) AS mean FROM readings
             WHERE ts BETWEEN '{}' AND '{}' GROUP BY ALL ORDER BY ALL",
            panel.from, panel.to
        ),
        "SELECT count(DISTINCT ts) FROM readings".to_owned(),
    ];

    let mut passes = Vec::new();
    let mut fleets = None;
    let mut server = Some(server);
    for compacted in [false, true] {
        let name = if compacted {
            "compacted"
        } else {
            "uncompacted"
        };
        let running = match server.take() {
            Some(s) => s,
            None => SqlServer::start(&dir, &args.memory_limit, false)?,
        };
        eprintln!("bench: queries, {name}");
        let wire = wire_pass(&running, &tokens[0], &panel, args.query_runs).await?;
        running.http.stop()?;
        if !compacted {
            let shared = SqlServer::start(&dir, &args.memory_limit, true)?;
            fleets = Some(beside_heavy_sql(&shared, &args, &tokens[1..], &heavy).await?);
            shared.http.stop()?;
        }
        let (native_ms, native) = {
            let (dir, mem, panel, runs) = (
                dir.clone(),
                args.memory_limit.clone(),
                panel.clone(),
                args.query_runs,
            );
            tokio::task::spawn_blocking(move || native_panel(&dir, &mem, &panel, runs)).await??
        };
        let same = |(t, m): &(f64, f64), (u, n): &(f64, f64)| {
            t == u && (m - n).abs() <= 1e-9 * m.abs().max(1.0)
        };
        if native.len() != wire.panel.len()
            || !native.iter().zip(&wire.panel).all(|(a, b)| same(a, b))
        {
            bail!(
                "the panel's {} hourly means over the wire differ from the {} of the internal tables",
                wire.panel.len(),
                native.len()
            );
        }
        passes.push(SqlPass {
            name: name.to_owned(),
            panel_native_p50_ms: native_ms,
            panel_ratio: wire.panel_p50_ms / native_ms,
            panel_wire_p50_ms: wire.panel_p50_ms,
            panel_wire_p99_ms: wire.panel_p99_ms,
            panel_rows: wire.panel.len(),
            wire_rows_per_sec: wire.wire_rows_per_sec,
            psycopg_rows_per_sec: wire.psycopg_rows_per_sec,
            arrow_rows_per_sec: wire.arrow_rows_per_sec,
            fetch_rows: wire.fetch_rows,
        });
        if !compacted {
            eprintln!("bench: compacting finished days");
            super::compact(&dir, &args.memory_limit).await?;
        }
    }

    let (quiet, beside, counts) = fleets.context("the fleet phases did not run")?;
    let report = SqlReport {
        readings: g.total,
        ingest_per_sec: ingest.readings_per_sec,
        passes,
        fleet_ratio: beside.requests_per_sec / quiet.requests_per_sec,
        fleet_quiet: quiet,
        fleet_beside_sql: beside,
        heavy_answered: counts.answered.load(Ordering::Relaxed),
        heavy_deferred: counts.deferred.load(Ordering::Relaxed),
        heavy_failed: counts.failed.load(Ordering::Relaxed),
        heavy_failure: counts.first_failure.lock().expect("failure").clone(),
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

/// The live fleet quiet, then beside four clients (`tokens`) looping `heavy`:
/// both phases and the heavy queries' outcomes.
async fn beside_heavy_sql(
    server: &SqlServer,
    args: &BenchArgs,
    tokens: &[String],
    heavy: &[String],
) -> anyhow::Result<(FleetPhase, FleetPhase, Arc<HeavyCounts>)> {
    eprintln!("bench: live fleet, quiet");
    let fleet = fleet::live_fleet(&server.http, args.devices).await?;
    let duration = Duration::from_secs_f64(args.duration);
    let connections = args.connections.first().copied().unwrap_or(64);
    let quiet = fleet::live_phase(&server.http, &fleet, "fleet", connections, duration).await?;
    eprintln!("bench: live fleet beside four clients looping heavy queries");
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(HeavyCounts::default());
    let loops: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            tokio::spawn(heavy_loop(
                server.http.base().to_owned(),
                token.clone(),
                heavy[i % heavy.len()].clone(),
                stop.clone(),
                counts.clone(),
            ))
        })
        .collect();
    // The server-wide budget of query time starts full (10 s): the fleet is
    // measured once the loops have spent it, in the steady state.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let beside = fleet::live_phase(
        &server.http,
        &fleet,
        "fleet beside heavy SQL",
        connections,
        duration,
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await??;
    }

    Ok((quiet, beside, counts))
}

/// The panel's question: one device's speed, hourly, over a time range.
#[derive(Debug, Clone)]
struct Panel {
    device: String,
    from_ms: i64,
    to_ms: i64,
    from: String,
    to: String,
}

impl Panel {
    /// As Grafana's PostgreSQL data source sends it, macros expanded.
    fn wire_sql(&self) -> String {
        format!(
            r#"SELECT {HOUR_BUCKET} AS "time", avg(value) AS "speed"
               FROM readings
               WHERE ts BETWEEN '{}' AND '{}' AND device = '{}' AND sensor = 'speed'
               GROUP BY 1 ORDER BY 1"#,
            self.from, self.to, self.device
        )
    }
}

/// A server with the PostgreSQL listener on a free port.
struct SqlServer {
    http: BenchServer,
    pg_port: u16,
}

impl SqlServer {
    /// With the shares of time on (`shares`, the defaults) or off: the timed
    /// queries of one client in a row would soon be told to wait their turn.
    fn start(dir: &Path, memory_limit: &str, shares: bool) -> anyhow::Result<Self> {
        // A free port now; the server binds it a moment later.
        let pg_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let pg_addr = format!("127.0.0.1:{pg_port}");
        let mut flags = vec!["--dump-schedule", "off", "--pg-addr", &pg_addr];
        if !shares {
            flags.extend(["--sql-time-share", "1", "--sql-total-share", "1"]);
        }
        let http = BenchServer::start_with(dir, memory_limit, &flags)?;
        Ok(Self { http, pg_port })
    }
}

/// A new viewer token in `dir` (`milepost token create`, as an operator makes one).
fn viewer_token(dir: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(super::server_exe()?)
        .args(["token", "create", "--role", "viewer"])
        .env("MILEPOST_DATA_DIR", dir)
        .output()
        .context("milepost token create")?;
    if !out.status.success() {
        bail!(
            "milepost token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout)?
        .lines()
        .last()
        .map(|l| l.trim().to_owned())
        .context("milepost token create printed no token")
}

/// What one pass measured on the running server.
struct WirePass {
    panel_p50_ms: f64,
    panel_p99_ms: f64,
    panel: HourlyMeans,
    wire_rows_per_sec: f64,
    psycopg_rows_per_sec: Option<f64>,
    arrow_rows_per_sec: f64,
    fetch_rows: u64,
}

/// The panel query `runs` times and the three fetches, on the running server.
async fn wire_pass(
    server: &SqlServer,
    token: &str,
    panel: &Panel,
    runs: usize,
) -> anyhow::Result<WirePass> {
    let config = format!(
        "host=127.0.0.1 port={} user=bench password={token} dbname=milepost",
        server.pg_port
    );
    let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls)
        .await
        .context("connecting over the PostgreSQL protocol")?;
    let conn = tokio::spawn(connection);
    let sql = panel.wire_sql();
    let mut lat = Vec::with_capacity(runs);
    let mut answer = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let rows = client.query(sql.as_str(), &[]).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        answer = rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()?;
    }
    lat.sort_by(f64::total_cmp);

    let fetch = format!("SELECT device, sensor, ts, value FROM readings LIMIT {FETCH_ROWS}");
    let mut rates = Vec::new();
    let mut fetch_rows = 0;
    for _ in 0..3 {
        let (n, secs) = wire_fetch(&client, &fetch).await?;
        fetch_rows = n;
        rates.push(n as f64 / secs);
    }
    drop(client);
    conn.await?.context("the PostgreSQL connection")?;
    let mut arrow = Vec::new();
    for _ in 0..3 {
        let (n, secs) = arrow_fetch(server.http.base(), token, &fetch).await?;
        if n != fetch_rows {
            bail!("the Arrow stream held {n} rows, the wire {fetch_rows}");
        }
        arrow.push(n as f64 / secs);
    }
    let psycopg = psycopg_fetch(server.pg_port, token, &fetch, fetch_rows)?;
    Ok(WirePass {
        panel_p50_ms: percentile(&lat, 0.5),
        panel_p99_ms: percentile(&lat, 0.99),
        panel: answer,
        wire_rows_per_sec: median(&mut rates),
        psycopg_rows_per_sec: psycopg,
        arrow_rows_per_sec: median(&mut arrow),
        fetch_rows,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(v, 0.5)
}

/// Streams `sql`'s rows with binary results, decoding every column; rows and
/// seconds.
async fn wire_fetch(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<(u64, f64)> {
    use futures_util::TryStreamExt as _;
    let started = Instant::now();
    let rows = client
        .query_raw(
            sql,
            std::iter::empty::<&(dyn tokio_postgres::types::ToSql + Sync)>(),
        )
        .await?;
    futures_util::pin_mut!(rows);
    let (mut n, mut check) = (0u64, 0f64);
    while let Some(row) = rows.try_next().await? {
        let device: &str = row.try_get(0)?;
        let sensor: &str = row.try_get(1)?;
        let ts: chrono::NaiveDateTime = row.try_get(2)?;
        let value: f64 = row.try_get(3)?;
        check += value
            + (device.len() + sensor.len()) as f64
            + f64::from(ts.and_utc().timestamp_subsec_micros());
        n += 1;
    }
    std::hint::black_box(check);
    Ok((n, started.elapsed().as_secs_f64()))
}

/// `sql` as an Arrow IPC stream over `POST /api/v1/sql`, decoded; rows and seconds.
async fn arrow_fetch(base: &str, token: &str, sql: &str) -> anyhow::Result<(u64, f64)> {
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/v1/sql"))
        .bearer_auth(token)
        .header("accept", "application/vnd.apache.arrow.stream")
        .body(sql.to_owned())
        .send()
        .await?;
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if !status.is_success() {
        bail!(
            "POST /api/v1/sql answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    let mut n = 0u64;
    for batch in reader {
        n += batch?.num_rows() as u64;
    }
    Ok((n, started.elapsed().as_secs_f64()))
}

/// The fetch by psycopg 3 with a binary cursor, when `python3` has psycopg (the
/// median of three, rows/s); `None` otherwise.
fn psycopg_fetch(port: u16, token: &str, sql: &str, rows: u64) -> anyhow::Result<Option<f64>> {
    const SCRIPT: &str = r#"
import sys, time
import psycopg
port, token, sql = sys.argv[1], sys.argv[2], sys.argv[3]
rates = []
with psycopg.connect(host="127.0.0.1", port=port, user="bench", password=token,
                     dbname="milepost", sslmode="disable", autocommit=True) as conn:
    for _ in range(3):
        t = time.perf_counter()
        with conn.cursor(binary=True) as cur:
            cur.execute(sql)
            n = len(cur.fetchall())
        rates.append(n / (time.perf_counter() - t))
print(n, sorted(rates)[1])
"#;
    let python = std::env::var("MILEPOST_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python)
        .args(["-c", "import psycopg"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("bench: {python} has no psycopg; its fetch is skipped");
        return Ok(None);
    }
    let out = std::process::Command::new(&python)
        .args(["-c", SCRIPT, &port.to_string(), token, sql])
        .output()?;
    if !out.status.success() {
        bail!(
            "psycopg's fetch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let mut parts = text.split_whitespace();
    let n: u64 = parts.next().context("psycopg's row count")?.parse()?;
    let rate: f64 = parts.next().context("psycopg's rate")?.parse()?;
    if n != rows {
        bail!("psycopg fetched {n} rows, the wire {rows}");
    }
    Ok(Some(rate))
}

/// The panel's question on the internal tables through DuckDB's own API, `runs`
/// times on the file (the server stopped): median ms and the answer.
fn native_panel(
    dir: &Path,
    memory_limit: &str,
    panel: &Panel,
    runs: usize,
) -> anyhow::Result<(f64, HourlyMeans)> {
    let (mut times, answer) = crate::store::diagnostics::hourly_means_natively(
        dir,
        memory_limit,
        (&panel.device, "speed"),
        (panel.from_ms * 1000, panel.to_ms * 1000),
        runs,
    )?;
    Ok((median(&mut times), answer))
}

/// Outcomes of the heavy queries.
#[derive(Default)]
struct HeavyCounts {
    answered: AtomicU64,
    deferred: AtomicU64,
    failed: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

/// Loops `sql` over HTTP until `stop`, waiting out `Retry-After` when told to.
async fn heavy_loop(
    base: String,
    token: String,
    sql: String,
    stop: Arc<AtomicBool>,
    counts: Arc<HeavyCounts>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    while !stop.load(Ordering::Relaxed) {
        let resp = client
            .post(format!("{base}/api/v1/sql"))
            .bearer_auth(&token)
            .body(sql.clone())
            .send()
            .await?;
        let status = resp.status();
        let retry = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok());
        let body = resp.bytes().await?;
        if status.is_success() {
            counts.answered.fetch_add(1, Ordering::Relaxed);
        } else if let Some(secs) = retry {
            counts.deferred.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs_f64(secs.clamp(0.0, 10.0))).await;
        } else {
            counts.failed.fetch_add(1, Ordering::Relaxed);
            let mut first = counts.first_failure.lock().expect("failure");
            if first.is_none() {
                let text = String::from_utf8_lossy(&body);
                *first = Some(format!(
                    "{status}: {}",
                    text.chars().take(200).collect::<String>()
                ));
            }
        }
    }
    Ok(())
}

fn print_report(r: &SqlReport) {
    println!(
        "milepost bench --scenario sql: {} readings (HTTP ingest {:.2} M/s)",
        r.readings,
        r.ingest_per_sec / 1e6
    );
    println!(
        "{:<12} {:>14} {:>14} {:>15} {:>7} {:>11} {:>11} {:>11}",
        "file",
        "panel wire p50",
        "panel wire p99",
        "panel DuckDB p50",
        "ratio",
        "wire rows/s",
        "psycopg",
        "Arrow rows/s"
    );
    for p in &r.passes {
        println!(
            "{:<12} {:>11.2} ms {:>11.2} ms {:>12.2} ms {:>7.2} {:>11.0} {:>11} {:>11.0}",
            p.name,
            p.panel_wire_p50_ms,
            p.panel_wire_p99_ms,
            p.panel_native_p50_ms,
            p.panel_ratio,
            p.wire_rows_per_sec,
            p.psycopg_rows_per_sec
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.0}")),
            p.arrow_rows_per_sec
        );
    }
    println!(
        "  panel: {} hourly rows; fetches of {} rows",
        r.passes.first().map_or(0, |p| p.panel_rows),
        r.passes.first().map_or(0, |p| p.fetch_rows)
    );
    for f in [&r.fleet_quiet, &r.fleet_beside_sql] {
        println!(
            "{:<24} {:>4} conns {:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms  apply lag at most {:.0} readings",
            f.name, f.connections, f.requests_per_sec, f.p50_ms, f.p99_ms, f.max_unapplied_readings
        );
    }
    println!(
        "fleet beside heavy SQL / quiet = {:.2}; heavy queries: {} answered, {} told to come back, {} failed",
        r.fleet_ratio, r.heavy_answered, r.heavy_deferred, r.heavy_failed
    );
    if let Some(f) = &r.heavy_failure {
        println!("  first heavy failure: {f}");
    }
}
