//! `milepost bench`: ingest and query speed against DuckDB's own limit, on the same
//! machine and the same generated data, in one run.
//!
//! 1. Generates N readings (six sensors at 1 Hz, millisecond timestamps, one stream
//!    per device) as NDJSON, plus the same chunks gzip-compressed, deterministic from
//!    a seed.
//! 2. The limit: embedded DuckDB loading those files natively (`INSERT … SELECT … FROM
//!    read_json(…)`) into a fresh file with Milepost's schema.
//! 3. Milepost over HTTP: a fresh `milepost serve` child process on 127.0.0.1:0, the
//!    data pushed by K concurrent clients (one per device) in chunks; readings/s from
//!    first byte to last acknowledgement (acknowledged = committed), request latency
//!    p50/p99; again replaying everything (all duplicates); again with gzip bodies on
//!    another fresh server.
//! 4. Queries over HTTP on the loaded server, p50/p99: latest, location, a one-day
//!    15-minute chart, 30-day hourly statistics, and a full NDJSON export of one
//!    sensor (readings/s).
//! 5. Peak RSS of the server process and database bytes per reading after checkpoint.

pub mod console;
pub mod detect;
pub mod dump;
pub mod fleet;
mod generate;
pub mod process;
pub mod push;
pub mod readers;
pub mod soak;
pub mod sql;

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use clap::Args;
use serde::Serialize;

use crate::domain::Timestamp;
use crate::store::diagnostics;
use generate::{Generated, Stream};
use process::ServerProcess;

/// `milepost bench` options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Readings to generate.
    #[arg(long, default_value_t = 10_000_000)]
    pub readings: u64,
    /// Concurrent HTTP clients (each one device's stream).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// NDJSON lines per request.
    #[arg(long, default_value_t = 10_000)]
    pub chunk_lines: usize,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where generated files and databases go (default: a new temp directory).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// `--memory-limit` of the benchmarked server (its default unless given).
    #[arg(long, default_value = crate::store::DEFAULT_MEMORY_LIMIT)]
    pub memory_limit: String,
    /// DuckDB's memory limit for the native `read_json` load the server is compared
    /// with. Not the server's: `read_json` needs room for its buffers, and at 112 MB it
    /// failed asking for 32 MiB more (session 32).
    #[arg(long, default_value = "128MB")]
    pub native_memory_limit: String,
    /// Calls per query measurement.
    #[arg(long, default_value_t = 200)]
    pub query_runs: usize,
    /// Measure dumping a day instead (see `bench::dump`); e.g. `--dump --readings
    /// 10368000 --clients 20` is one day of 10.4 M readings.
    #[arg(long)]
    pub dump: bool,
    /// Measure step detection instead (see `bench::detect`): the pure scan and
    /// DryRun over a year of minutes, and ingest with alerts on every series.
    #[arg(long, conflicts_with = "dump")]
    pub detect: bool,
    /// `bulk`: the steps above. `fleet`: many devices sending small requests over
    /// their own connections, plus one big request (see `bench::fleet`). `soak`:
    /// minutes of devices, dashboards and exports at once (see `bench::soak`).
    #[arg(long, value_enum, default_value_t = Scenario::Bulk)]
    pub scenario: Scenario,
    /// Fleet: devices sending.
    #[arg(long, default_value_t = 2_000)]
    pub devices: usize,
    /// Fleet: connection counts to measure, one phase each (the SQL scenario
    /// uses the first).
    #[arg(long, value_delimiter = ',', default_values_t = [8, 64, 256])]
    pub connections: Vec<usize>,
    /// Fleet: what the requests hold besides new readings; other than `live`, each
    /// connection count is measured twice, live then this way (see
    /// `bench::fleet::Order`).
    #[arg(long, value_enum, default_value_t = fleet::Order::Live)]
    pub order: fleet::Order,
    /// Fleet: browsers reading while the fleet streams, each watching one device
    /// (see `bench::readers`); 0: none.
    #[arg(long, default_value_t = 0)]
    pub readers: usize,
    /// Fleet: seconds between one reader's polls (the seed dashboard polls every 10).
    #[arg(long, default_value_t = 10.0)]
    pub reader_interval: f64,
    /// Fleet: also write every read the readers timed to this file, one per line
    /// (phase, endpoint, Unix time it ended, milliseconds, tab-separated), to line
    /// slow reads up with what the server did at that moment.
    #[arg(long)]
    pub reads_log: Option<std::path::PathBuf>,
    /// Fleet: seconds per phase (also `--seconds`).
    #[arg(long, visible_alias = "seconds", default_value_t = 15.0)]
    pub duration: f64,
    /// Fleet: devices new to the server in the first-contact phase (0 skips it).
    #[arg(long, default_value_t = 20_000)]
    pub new_devices: usize,
    /// Fleet: readings in the one big request (0 skips it).
    #[arg(long, default_value_t = 5_000_000)]
    pub big_readings: u64,
    /// Fleet: VictoriaMetrics' binary, to measure its ingest of the same live fleet
    /// in the same run (`/api/v1/import`, the same readings as JSON lines): `auto`
    /// uses `victoria-metrics` from PATH when installed (Debian package
    /// `victoria-metrics`), `off` skips it.
    #[arg(long, default_value = "auto")]
    pub victoria_metrics: String,
    /// Fleet: rounds of Milepost's live fleet phases then VictoriaMetrics', each
    /// round on fresh servers; the report gives the rate ratio of every round and
    /// their median (this machine's speed drifts between minutes: compare only
    /// alternated runs).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Soak: minutes of mixed traffic.
    #[arg(long, default_value_t = 10)]
    pub minutes: u64,
    /// Soak: devices sending one request (six readings) per second.
    #[arg(long, default_value_t = 100)]
    pub soak_devices: usize,
    /// Soak: browsers polling the dashboard's seven URLs every 10 s.
    #[arg(long, default_value_t = 20)]
    pub dashboards: usize,
    /// Soak: days of the dashboard device's history loaded first.
    #[arg(long, default_value_t = 2)]
    pub history_days: u64,
}

/// Which benchmark `milepost bench` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Bulk ingest from a few clients, queries, compaction.
    Bulk,
    /// Many small requests from a fleet of devices.
    Fleet,
    /// Minutes of mixed traffic (devices, dashboards, exports): drift in memory,
    /// latency or errors.
    Soak,
    /// `milepost push` of a generated backlog (`--readings` in `--clients` files)
    /// to a local server.
    Push,
    /// The console's pages and charts with `--readings` of `--devices` simulated
    /// cars stored, the newest now.
    Console,
    /// Users' SQL: a Grafana-style panel over the PostgreSQL protocol against
    /// DuckDB's own API, rows fetched over the wire and as Arrow, and live ingest
    /// beside heavy queries (see `bench::sql`).
    Sql,
}

/// One measured phase.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// What was measured.
    pub name: String,
    /// Readings processed (0 for queries).
    pub readings: u64,
    /// Wall time.
    pub seconds: f64,
    /// Readings per second (0 for queries).
    pub readings_per_sec: f64,
    /// Median request latency, ms.
    pub p50_ms: f64,
    /// 99th percentile request latency, ms.
    pub p99_ms: f64,
    /// The server's peak RSS during this phase, MiB (HTTP ingest phases only).
    pub peak_rss_mib: Option<f64>,
    /// CPU time per reading, µs: the server's for HTTP ingest, DuckDB's (this
    /// process's) for the native load. On a machine whose cores are all busy
    /// during ingest, this is what the rate follows.
    pub cpu_us_per_reading: Option<f64>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Readings generated.
    pub readings: u64,
    /// Clients.
    pub clients: usize,
    /// Lines per request.
    pub chunk_lines: usize,
    /// Phases in order.
    pub phases: Vec<Phase>,
    /// Peak RSS of the server during plain ingest, replay and queries, MiB.
    pub server_peak_rss_mib: f64,
    /// Database file after checkpoint, bytes.
    pub db_bytes: u64,
    /// `db_bytes / readings`.
    pub bytes_per_reading: f64,
    /// Used blocks of the database after compacting every finished day, bytes (the
    /// file keeps the freed blocks of the unsorted copies for later writes).
    pub db_bytes_compacted: u64,
    /// File size after compaction, bytes.
    pub db_file_bytes_compacted: u64,
    /// `db_bytes_compacted / readings`.
    pub bytes_per_reading_compacted: f64,
    /// Time to compact every finished day (`milepost compact`), seconds.
    pub compact_seconds: f64,
    /// File size after `milepost compact --rewrite`, bytes (then verified against the
    /// native load again).
    pub db_file_bytes_rewritten: u64,
    /// Time of the rewrite, seconds.
    pub rewrite_seconds: f64,
    /// Server start-up to ready on the loaded file, ms.
    pub restart_ms: f64,
    /// HTTP plain ingest readings/s divided by the native limit.
    pub ratio_http_to_native: f64,
    /// Series whose stored readings were found identical to the native load's, with
    /// rollups that agree with them (the run fails otherwise).
    pub verified_series: usize,
}

/// `--work-dir`, or a new temporary directory (removed when the guard drops).
pub(crate) fn work_dir(
    args: &BenchArgs,
    prefix: &str,
) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    Ok(match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.clone(), None)
        }
        None => {
            let tmp = tempfile::Builder::new().prefix(prefix).tempdir()?;
            (tmp.path().to_owned(), Some(tmp))
        }
    })
}

/// Generates `--readings` in `--clients` streams under `work` (see [`generate`]).
async fn generate_inputs(args: &BenchArgs, work: &Path) -> anyhow::Result<Arc<Generated>> {
    eprintln!(
        "bench: generating {} readings in {}",
        args.readings,
        work.display()
    );
    let (work, a) = (work.to_owned(), args.clone());
    let generated = tokio::task::spawn_blocking(move || {
        generate::generate(&work, "bench", a.readings, a.clients, a.chunk_lines, a.seed)
    })
    .await??;
    Ok(Arc::new(generated))
}

/// Compacts the finished days of the (stopped) server's `dir` now; the
/// compaction's summary and the bytes the database then uses.
async fn compact(
    dir: &Path,
    memory_limit: &str,
) -> anyhow::Result<(crate::store::Compaction, u64)> {
    let cfg = offline_config(dir, memory_limit);
    Ok(tokio::task::spawn_blocking(move || {
        let store = crate::store::Store::open(&cfg)?;
        let done = store.compact()?;
        let used = store.used_bytes()?;
        store.close()?;
        Ok::<_, crate::store::StoreError>((done, used))
    })
    .await??)
}

/// `milepost compact --rewrite` of the database in `dir` (already compacted).
async fn rewrite(dir: &Path, memory_limit: &str) -> anyhow::Result<crate::store::Rewrite> {
    let cfg = offline_config(dir, memory_limit);
    Ok(
        tokio::task::spawn_blocking(move || crate::store::Store::open(&cfg)?.rewrite(&cfg))
            .await??,
    )
}

/// How the bench opens a stopped server's database itself.
fn offline_config(dir: &Path, memory_limit: &str) -> crate::store::StoreConfig {
    crate::store::StoreConfig {
        data_dir: dir.to_owned(),
        memory_limit: memory_limit.to_owned(),
        threads: 2,
        series_memory: crate::store::DEFAULT_SERIES_MEMORY,
        temp_limit: None,
    }
}

/// The benchmarked server's binary: this one, or `MILEPOST_BENCH_SERVER` (another
/// build, to compare it under the same client).
fn server_exe() -> anyhow::Result<PathBuf> {
    Ok(match std::env::var_os("MILEPOST_BENCH_SERVER") {
        Some(other) => PathBuf::from(other),
        None => std::env::current_exe()?,
    })
}

/// Runs the benchmark and prints the table.
pub async fn run(args: BenchArgs) -> anyhow::Result<Report> {
    let (work, _tmp) = work_dir(&args, "milepost-bench-")?;
    let gen_ = generate_inputs(&args, &work).await?;
    // A reused --work-dir holds the last run's databases: every phase starts empty.
    for dir in ["http", "http-gzip"] {
        remove_stale(&work.join(dir))?;
    }
    let mut phases = Vec::new();

    flush_page_cache();
    eprintln!("bench: native DuckDB read_json load");
    let native = {
        let (work, g, mem) = (work.clone(), gen_.clone(), args.native_memory_limit.clone());
        tokio::task::spawn_blocking(move || native_load(&work.join("native"), &g, &mem)).await??
    };
    phases.push(native.clone());

    flush_page_cache();
    eprintln!("bench: HTTP ingest, plain");
    let server = BenchServer::start(&work.join("http"), &args.memory_limit)?;
    let plain = server
        .push(&gen_, false, "http ingest (plain NDJSON)")
        .await?;
    phases.push(plain.clone());
    flush_page_cache();
    eprintln!("bench: HTTP replay (all duplicates)");
    phases.push(
        server
            .push(&gen_, false, "http replay (all duplicates)")
            .await?,
    );
    eprintln!("bench: queries");
    phases.extend(queries(server.base(), &gen_, args.query_runs, "").await?);
    let peak_rss = server.peak_rss_mib();
    server.stop()?;
    let db_path = crate::store::DataDir::new(work.join("http")).database();
    let db_bytes = std::fs::metadata(&db_path)?.len();

    eprintln!("bench: comparing what was stored with the native load");
    let native_fingerprints = {
        let (native_dir, http_dir) = (work.join("native"), work.join("http"));
        let mem = args.memory_limit.clone();
        tokio::task::spawn_blocking(move || {
            let (native, http) = (
                diagnostics::fingerprints(&native_dir, &mem)?,
                diagnostics::fingerprints(&http_dir, &mem)?,
            );
            if native != http {
                bail!("the server stored other readings than DuckDB's own load:\n native {native:?}\n http   {http:?}");
            }
            let off = diagnostics::rollup_mismatches(&http_dir, &mem)?;
            if off > 0 {
                bail!("{off} rollup slots disagree with the readings stored in them");
            }
            Ok(native)
        })
        .await??
    };
    let verified_series = native_fingerprints.len();

    eprintln!("bench: compacting finished days");
    let (compaction, db_bytes_compacted) = compact(&work.join("http"), &args.memory_limit).await?;
    let db_file_bytes_compacted = std::fs::metadata(&db_path)?.len();
    eprintln!("bench: rewriting the compacted file (milepost compact --rewrite)");
    let rewritten = rewrite(&work.join("http"), &args.memory_limit).await?;
    {
        // The rewritten file must hold what the native load holds, as the original did.
        let http_dir = work.join("http");
        let mem = args.memory_limit.clone();
        tokio::task::spawn_blocking(move || {
            if diagnostics::fingerprints(&http_dir, &mem)? != native_fingerprints {
                bail!("the rewritten database holds other readings than DuckDB's own load");
            }
            Ok(())
        })
        .await??;
    }

    eprintln!("bench: restart on the loaded, compacted file");
    let started = Instant::now();
    let server = BenchServer::start(&work.join("http"), &args.memory_limit)?;
    let restart_ms = started.elapsed().as_secs_f64() * 1e3;
    // The steady state of a running server: the background compactor rewrites every
    // finished day within `--compact-interval`.
    eprintln!("bench: queries on the compacted file");
    phases.extend(queries(server.base(), &gen_, args.query_runs, ", compacted").await?);
    server.stop()?;

    flush_page_cache();
    eprintln!("bench: HTTP ingest, gzip");
    let server = BenchServer::start(&work.join("http-gzip"), &args.memory_limit)?;
    phases.push(
        server
            .push(&gen_, true, "http ingest (gzip NDJSON)")
            .await?,
    );
    server.stop()?;

    let report = Report {
        readings: gen_.total,
        clients: args.clients,
        chunk_lines: args.chunk_lines,
        phases,
        server_peak_rss_mib: peak_rss,
        db_bytes,
        bytes_per_reading: db_bytes as f64 / gen_.total as f64,
        db_bytes_compacted,
        db_file_bytes_compacted,
        bytes_per_reading_compacted: db_bytes_compacted as f64 / gen_.total as f64,
        compact_seconds: compaction.elapsed.as_secs_f64(),
        db_file_bytes_rewritten: rewritten.bytes_after,
        rewrite_seconds: rewritten.elapsed.as_secs_f64(),
        restart_ms,
        ratio_http_to_native: plain.readings_per_sec / native.readings_per_sec,
        verified_series,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

fn print_report(r: &Report) {
    println!(
        "milepost bench: {} readings, {} clients, {} lines/request",
        r.readings, r.clients, r.chunk_lines
    );
    println!(
        "{:<46} {:>12} {:>9} {:>14} {:>9} {:>9} {:>8} {:>9}",
        "phase", "readings", "seconds", "readings/s", "p50 ms", "p99 ms", "RSS MiB", "CPU µs/r"
    );
    for p in &r.phases {
        let rate = if p.readings_per_sec > 0.0 {
            format!("{:.0}", p.readings_per_sec)
        } else {
            "-".into()
        };
        let lat = |v: f64| {
            if v > 0.0 {
                format!("{v:.3}")
            } else {
                "-".into()
            }
        };
        let rss = p.peak_rss_mib.map_or("-".into(), |m| format!("{m:.0}"));
        let cpu = p
            .cpu_us_per_reading
            .map_or("-".into(), |c| format!("{c:.3}"));
        println!(
            "{:<46} {:>12} {:>9.3} {:>14} {:>9} {:>9} {:>8} {:>9}",
            p.name,
            p.readings,
            p.seconds,
            rate,
            lat(p.p50_ms),
            lat(p.p99_ms),
            rss,
            cpu
        );
    }
    println!(
        "server peak RSS {:.1} MiB; database {:.1} MiB = {:.2} bytes/reading; restart to ready {:.0} ms",
        r.server_peak_rss_mib,
        r.db_bytes as f64 / (1 << 20) as f64,
        r.bytes_per_reading,
        r.restart_ms
    );
    println!(
        "compacted (sorted finished days) in {:.2} s: data {:.1} MiB = {:.2} bytes/reading \
         (file {:.1} MiB; freed blocks are reused by later writes)",
        r.compact_seconds,
        r.db_bytes_compacted as f64 / (1 << 20) as f64,
        r.bytes_per_reading_compacted,
        r.db_file_bytes_compacted as f64 / (1 << 20) as f64,
    );
    println!(
        "rewritten (milepost compact --rewrite) in {:.2} s: file {:.1} MiB = {:.2} bytes/reading",
        r.rewrite_seconds,
        r.db_file_bytes_rewritten as f64 / (1 << 20) as f64,
        r.db_file_bytes_rewritten as f64 / r.readings as f64,
    );
    println!(
        "stored readings identical to the native load in all {} series \
         (count, time range, hash of every timestamp and value; again after the rewrite)",
        r.verified_series
    );
    println!("http_ingest / native_limit = {:.2}", r.ratio_http_to_native);
}

/// Removes `dir` (a database of an earlier run in a reused `--work-dir`) if it exists.
pub(crate) fn remove_stale(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::anyhow!("cannot remove {}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The native limit: DuckDB loads the generated NDJSON itself into Milepost's schema.
fn native_load(dir: &Path, g: &Generated, memory_limit: &str) -> anyhow::Result<Phase> {
    remove_stale(dir)?;
    let devices: Vec<&str> = g.streams.iter().map(|s| s.device.as_str()).collect();
    let files: Vec<PathBuf> = g.streams.iter().map(|s| s.plain.clone()).collect();
    let cpu_before = process::cpu_seconds_of("self");
    let (n, secs) = diagnostics::load_natively(dir, memory_limit, &devices, &files)?;
    let cpu = process::cpu_seconds_of("self") - cpu_before;
    if n != g.total {
        bail!("native load stored {n} readings, expected {}", g.total);
    }
    Ok(Phase {
        name: "native DuckDB read_json (limit)".into(),
        readings: g.total,
        seconds: secs,
        readings_per_sec: g.total as f64 / secs,
        p50_ms: 0.0,
        p99_ms: 0.0,
        peak_rss_mib: None,
        cpu_us_per_reading: Some(cpu * 1e6 / g.total as f64),
    })
}

const BENCH_KEY: &str = "bench-key";

/// The benchmarked server: a child process running this same binary.
struct BenchServer(ServerProcess);

impl BenchServer {
    /// Default settings except that background compaction and dumps are held off: an
    /// import is compacted a minute after it settles, and a dump run at start would
    /// dump the imported history, either of which would land somewhere in the replay
    /// or the queries and blur both. The bench measures the loaded file as it
    /// arrived, then compacts it explicitly and measures again.
    fn start(dir: &Path, memory_limit: &str) -> anyhow::Result<Self> {
        Self::start_with(dir, memory_limit, &["--dump-schedule", "off"])
    }

    /// [`Self::start`] with `more` flags (which may set a dump schedule).
    /// The server is this binary, or `MILEPOST_BENCH_SERVER` (another build, to
    /// compare it under the same client).
    fn start_with(dir: &Path, memory_limit: &str, more: &[&str]) -> anyhow::Result<Self> {
        let exe = server_exe()?;
        let extra = [
            "--api-key",
            BENCH_KEY,
            "--memory-limit",
            memory_limit,
            "--compact-interval",
            "0s",
            // Every simulated device connects from 127.0.0.1.
            "--max-ingest-per-client",
            "100000",
        ];
        let flags: Vec<&str> = extra.iter().chain(more).copied().collect();
        // The fleet scenarios bring in tens of thousands of devices at once: no
        // device limits (set by environment, which an older build under
        // `MILEPOST_BENCH_SERVER` ignores, where it would refuse a flag).
        let env = [
            ("MILEPOST_MAX_DEVICES", "0"),
            ("MILEPOST_MAX_NEW_DEVICES_PER_KEY", "0"),
        ];
        ServerProcess::start_with_env(&exe, dir, &flags, &env, true).map(Self)
    }

    fn base(&self) -> &str {
        &self.0.base
    }

    /// [`push`] with the server's peak RSS during it, inputs warmed first.
    async fn push(&self, g: &Arc<Generated>, gzip: bool, name: &str) -> anyhow::Result<Phase> {
        warm_inputs(g, gzip).await?;
        self.0.reset_peak_rss()?;
        let cpu_before = self.0.cpu_seconds();
        let mut phase = push(self.base(), g, gzip, name).await?;
        phase.peak_rss_mib = Some(self.0.peak_rss_mib());
        let cpu = self.0.cpu_seconds() - cpu_before;
        phase.cpu_us_per_reading = Some(cpu * 1e6 / phase.readings.max(1) as f64);
        Ok(phase)
    }

    fn peak_rss_mib(&self) -> f64 {
        self.0.peak_rss_mib()
    }

    fn stop(self) -> anyhow::Result<()> {
        let status = self.0.terminate()?;
        if !status.success() {
            bail!("milepost serve exited with {status}");
        }
        Ok(())
    }
}

/// Writes every dirty page out before a timed phase, so the phase does not pay for
/// the previous one's files (gigabytes of generated NDJSON, the native load's
/// database): on ext4 the first fsyncs of a phase would otherwise wait for that
/// writeback.
fn flush_page_cache() {
    nix::unistd::sync();
}

/// Reads the clients' input files once before a timed phase, so the clients read
/// them from the page cache. Some VMs reclaim idle page cache within minutes (this
/// one runs DAMON's `kdamond`): the gzip phase, minutes after generation, had read its
/// input from disk and measured at half speed with 600 ms stalls.
async fn warm_inputs(g: &Arc<Generated>, gzip: bool) -> anyhow::Result<()> {
    let g = g.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 1 << 20];
        for s in &g.streams {
            let mut f = std::fs::File::open(if gzip { &s.gz } else { &s.plain })?;
            while std::io::Read::read(&mut f, &mut buf)? > 0 {}
        }
        Ok(())
    })
    .await?
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Pushes every stream concurrently, one client per stream.
async fn push(base: &str, g: &Arc<Generated>, gzip: bool, name: &str) -> anyhow::Result<Phase> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..g.streams.len() {
        let (g, base) = (g.clone(), base.to_owned());
        tasks.push(tokio::spawn(async move {
            push_stream(&base, &g.streams[i], gzip).await
        }));
    }
    let mut latencies = Vec::new();
    let mut stored = 0u64;
    for t in tasks {
        let (lat, n) = t.await??;
        latencies.extend(lat);
        stored += n;
    }
    let secs = started.elapsed().as_secs_f64();
    if stored != g.total {
        bail!(
            "{name}: server acknowledged {stored} readings, expected {}",
            g.total
        );
    }
    latencies.sort_by(f64::total_cmp);
    Ok(Phase {
        name: name.into(),
        readings: g.total,
        seconds: secs,
        readings_per_sec: g.total as f64 / secs,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        peak_rss_mib: None,
        cpu_us_per_reading: None,
    })
}

/// Sends one stream's chunks in order; returns latencies (ms) and readings acknowledged
/// (accepted + duplicates).
async fn push_stream(base: &str, s: &Stream, gzip: bool) -> anyhow::Result<(Vec<f64>, u64)> {
    let client = reqwest::Client::new();
    let (path, chunks) = if gzip {
        (&s.gz, &s.gz_chunks)
    } else {
        (&s.plain, &s.plain_chunks)
    };
    let file = std::fs::File::open(path)?;
    let mut latencies = Vec::with_capacity(chunks.len());
    let mut acked = 0;
    for &(offset, len) in chunks {
        let mut body = vec![0u8; len as usize];
        file.read_exact_at(&mut body, offset)?;
        let mut req = client
            .post(format!("{base}/ingest"))
            .bearer_auth(BENCH_KEY)
            .header("content-type", "application/x-ndjson")
            .body(body);
        if gzip {
            req = req.header("content-encoding", "gzip");
        }
        let t = Instant::now();
        let resp = req.send().await?;
        let status = resp.status();
        let v: serde_json::Value = resp.json().await?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        if !status.is_success() {
            bail!("ingest answered {status}: {v}");
        }
        acked += v["accepted"].as_u64().unwrap_or(0) + v["duplicates"].as_u64().unwrap_or(0);
    }
    Ok((latencies, acked))
}

async fn time_get(
    client: &reqwest::Client,
    url: &str,
    runs: usize,
    name: &str,
) -> anyhow::Result<Phase> {
    let mut lat = Vec::with_capacity(runs);
    let started = Instant::now();
    for _ in 0..runs {
        let t = Instant::now();
        let r = client.get(url).send().await?;
        let status = r.status();
        let _ = r.bytes().await?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        if !status.is_success() {
            bail!("{url} answered {status}");
        }
    }
    lat.sort_by(f64::total_cmp);
    Ok(Phase {
        name: name.into(),
        readings: 0,
        seconds: started.elapsed().as_secs_f64(),
        readings_per_sec: 0.0,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        peak_rss_mib: None,
        cpu_us_per_reading: None,
    })
}

async fn queries(
    base: &str,
    g: &Generated,
    runs: usize,
    suffix: &str,
) -> anyhow::Result<Vec<Phase>> {
    let client = reqwest::Client::new();
    let device = &g.streams[0].device;
    let mut out = vec![
        time_get(
            &client,
            &format!("{base}/api/statistics/latest?device={device}"),
            runs,
            &format!("query latest{suffix}"),
        )
        .await?,
        time_get(
            &client,
            &format!("{base}/api/location/latest?device={device}"),
            runs,
            &format!("query location/latest{suffix}"),
        )
        .await?,
    ];
    // A full day in the middle of the data.
    let mid = g.first_ts + (g.last_ts - g.first_ts) / 2;
    let day = crate::domain::Timestamp::from_micros(mid)
        .to_datetime()
        .format("%Y-%m-%d");
    out.push(
        time_get(
            &client,
            &format!("{base}/api/statistics/sensor/speed/date/{day}?device={device}"),
            runs,
            &format!("query one-day 15-min chart{suffix}"),
        )
        .await?,
    );
    // 30 days ending at the newest reading (or all there is), hourly.
    let to = Timestamp::from_micros(g.last_ts + 1);
    let from = Timestamp::from_micros((g.last_ts - 30 * 86_400_000_000).max(g.first_ts));
    out.push(
        time_get(
            &client,
            &format!(
                "{base}/api/v1/sensors/speed/statistics?device={device}&bucket=1h&from={from}&to={to}"
            ),
            runs,
            &format!("query 30-day 1-hour statistics{suffix}"),
        )
        .await?,
    );
    out.push(export(&client, base, device, runs.clamp(1, 5), suffix).await?);
    Ok(out)
}

/// Streams one sensor's whole series as NDJSON, `runs` times; readings/s from the
/// lines received.
async fn export(
    client: &reqwest::Client,
    base: &str,
    device: &str,
    runs: usize,
    suffix: &str,
) -> anyhow::Result<Phase> {
    use futures_util::StreamExt as _;
    let url = format!("{base}/api/v1/sensors/speed/readings?device={device}&format=ndjson");
    let mut lat = Vec::with_capacity(runs);
    let mut lines = 0u64;
    let started = Instant::now();
    for _ in 0..runs {
        let t = Instant::now();
        let r = client.get(&url).send().await?;
        if !r.status().is_success() {
            bail!("{url} answered {}", r.status());
        }
        let mut body = r.bytes_stream();
        while let Some(chunk) = body.next().await {
            lines += memchr::memchr_iter(b'\n', &chunk?).count() as u64;
        }
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let seconds = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Ok(Phase {
        name: format!("export speed as NDJSON{suffix}"),
        readings: lines,
        seconds,
        readings_per_sec: lines as f64 / seconds,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        peak_rss_mib: None,
        cpu_us_per_reading: None,
    })
}
