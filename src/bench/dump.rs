//! `milepost bench --dump`: dumping a day against DuckDB's own `COPY … TO` of the
//! same rows, in one run on the same file.
//!
//! 1. Generates the readings (`--clients` devices × six sensors at 1 Hz from
//!    2026-01-01: 20 devices make one day of 10.4 M readings) and loads them with
//!    DuckDB's `read_json` into Milepost's schema (the bench's native load).
//! 2. The reference: DuckDB's own `COPY` of that day's rows (joined to device and
//!    sensor names, sorted as the dump sorts them) to zstd Parquet and to gzip JSON
//!    with its JSON writer, on a direct connection with a 1 GB memory limit.
//! 3. Milepost: `milepost dump --date 2026-01-01` on the same file as a child
//!    process, to `file://` — copy, upload (hash), record, manifest; wall time and
//!    the child's peak RSS.
//! 4. In a server on the same file: HTTP ingest of new devices' readings alone, then
//!    the same amount while the server's start-up run dumps the day; the ingest
//!    rates, the server's peak RSS, and how long the in-server dump took.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{BenchArgs, generate, native_load};
use crate::store::diagnostics;

/// Results of the dump benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct DumpReport {
    /// HTTP ingest into the server on the same file, no dump running (readings/s).
    pub ingest_alone_per_sec: f64,
    /// The same amount of new readings while the server's start-up run dumps the day.
    pub ingest_during_dump_per_sec: f64,
    /// `1 - during / alone`.
    pub ingest_drop: f64,
    /// The server's peak RSS while it ingested and dumped, MiB.
    pub server_peak_rss_mib: f64,
    /// From the server's start to the day listed in `/api/v1/dumps`, seconds.
    pub server_dump_seconds: f64,
    /// Readings in the dumped day.
    pub day_readings: u64,
    /// DuckDB's own COPY of the day to Parquet and gzip JSON, seconds.
    pub reference_seconds: f64,
    /// `milepost dump` of the day in both formats, seconds (whole process).
    pub dump_seconds: f64,
    /// `dump_seconds / reference_seconds`.
    pub ratio: f64,
    /// Peak RSS of the dumping process, MiB.
    pub dump_peak_rss_mib: f64,
    /// Parquet object size / readings.
    pub parquet_bytes_per_reading: f64,
    /// gzip NDJSON object size / readings.
    pub json_bytes_per_reading: f64,
}

const DAY: &str = "2026-01-01";
/// Memory limit of the reference `COPY`.
const REFERENCE_MEMORY: &str = "1GB";

/// Runs the dump benchmark and prints the figures.
pub async fn run(args: BenchArgs) -> anyhow::Result<DumpReport> {
    let tmp = tempfile::Builder::new()
        .prefix("milepost-bench-dump-")
        .tempdir()?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&work)?;
    eprintln!(
        "bench --dump: generating {} readings on {} devices",
        args.readings, args.clients
    );
    let g = {
        let (work, a) = (work.clone(), args.clone());
        tokio::task::spawn_blocking(move || {
            generate::generate(&work, "bench", a.readings, a.clients, a.chunk_lines, a.seed)
        })
        .await??
    };
    let db_dir = work.join("native");
    let mem = args.native_memory_limit.clone();
    eprintln!("bench --dump: loading with DuckDB's read_json");
    {
        let db_dir = db_dir.clone();
        tokio::task::spawn_blocking(move || native_load(&db_dir, &g, &mem)).await??;
    }

    eprintln!("bench --dump: reference COPY of {DAY}");
    // DuckDB's sort in `COPY … ORDER BY` of 10 M rows ran out of a 128 MB limit in
    // one of three runs: the reference gets 1 GB, which only helps it.
    let (reference_seconds, day_readings) = {
        let (db, out) = (db_dir.clone(), work.join("reference"));
        let day: chrono::NaiveDate = DAY.parse()?;
        tokio::task::spawn_blocking(move || {
            diagnostics::copy_day_natively(&db, REFERENCE_MEMORY, day, &out)
        })
        .await??
    };

    eprintln!("bench --dump: milepost dump --date {DAY}");
    let lake = work.join("lake");
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let mut child = Command::new(&exe)
        .args([
            "--log",
            "warn",
            "dump",
            "--date",
            DAY,
            "--node-name",
            "bench",
        ])
        .arg("--memory-limit")
        .arg(&args.memory_limit)
        .arg("--data-dir")
        .arg(&db_dir)
        .arg("--blob-store-url")
        .arg(format!("file://{}", lake.display()))
        .spawn()
        .context("running milepost dump")?;
    // The child's own high-water mark, read until it exits (getrusage would also
    // count the pages it shared with this process between fork and exec).
    let mut peak_kib = 0.0f64;
    let status = loop {
        let hwm = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
        if let Some(kib) = hwm {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let dump_seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("milepost dump failed: {status}");
    }

    let live = in_server(&args, &work, &db_dir).await?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64;
    let parquet = size(&lake.join(format!("parquet/date={DAY}/bench.parquet")));
    let json = size(&lake.join(format!("{DAY}.json.gz")));
    let n = day_readings.max(1) as f64;
    let report = DumpReport {
        ingest_alone_per_sec: live.alone,
        ingest_during_dump_per_sec: live.during,
        ingest_drop: 1.0 - live.during / live.alone,
        server_peak_rss_mib: live.rss,
        server_dump_seconds: live.dump_seconds,
        day_readings,
        reference_seconds,
        dump_seconds,
        ratio: dump_seconds / reference_seconds,
        dump_peak_rss_mib: peak_kib / 1024.0,
        parquet_bytes_per_reading: parquet / n,
        json_bytes_per_reading: json / n,
    };
    println!(
        "milepost bench --dump: one day of {} readings, both formats, to file://",
        report.day_readings
    );
    println!(
        "DuckDB's own COPY (Parquet zstd + gzip JSON): {:.2} s; milepost dump: {:.2} s \
         (ratio {:.2}); dump peak RSS {:.0} MiB",
        report.reference_seconds, report.dump_seconds, report.ratio, report.dump_peak_rss_mib
    );
    println!(
        "Parquet {:.2} bytes/reading, gzip NDJSON {:.2} bytes/reading",
        report.parquet_bytes_per_reading, report.json_bytes_per_reading
    );
    println!(
        "in the server: ingest {:.0} readings/s alone, {:.0} while it dumps the day \
         (drop {:.0} %); peak RSS {:.0} MiB; start to dump listed {:.1} s",
        report.ingest_alone_per_sec,
        report.ingest_during_dump_per_sec,
        report.ingest_drop * 100.0,
        report.server_peak_rss_mib,
        report.server_dump_seconds
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

/// Figures of the in-server phase.
struct Live {
    alone: f64,
    during: f64,
    rss: f64,
    dump_seconds: f64,
}

/// Ingest into a server on the dumped file (new devices, the same day), once with
/// dumps off and once while its start-up run dumps the day; the server's peak RSS
/// over both.
async fn in_server(args: &BenchArgs, work: &Path, db_dir: &Path) -> anyhow::Result<Live> {
    let n = (args.readings / 2).max(1);
    let mut sets = Vec::new();
    for prefix in ["live-a", "live-b"] {
        let (dir, a) = (work.join(prefix), args.clone());
        std::fs::create_dir_all(&dir)?;
        let g = tokio::task::spawn_blocking(move || {
            generate::generate(&dir, prefix, n, 4, a.chunk_lines, a.seed + 1)
        })
        .await??;
        sets.push(std::sync::Arc::new(g));
    }
    super::flush_page_cache();
    eprintln!("bench --dump: ingest alone");
    let server = super::BenchServer::start(db_dir, &args.memory_limit)?;
    let alone = server.push(&sets[0], false, "ingest alone").await?;
    server.stop()?;
    super::flush_page_cache();
    eprintln!("bench --dump: ingest while the server dumps {DAY}");
    let started = Instant::now();
    let server =
        super::BenchServer::start_with(db_dir, &args.memory_limit, &["--dump-max-days", "1"])?;
    let during = server.push(&sets[1], false, "ingest during a dump").await?;
    let url = format!("{}/api/v1/dumps", server.base());
    let listed = loop {
        let list: serde_json::Value = reqwest::get(&url).await?.json().await?;
        let done = list["dumps"]
            .as_array()
            .is_some_and(|d| d.iter().filter(|e| e["date"] == DAY).count() == 2);
        if done {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed().as_secs() > 1800 {
            bail!("the server did not dump {DAY} within 30 minutes");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let rss = server.peak_rss_mib();
    server.stop()?;
    Ok(Live {
        alone: alone.readings_per_sec,
        during: during.readings_per_sec,
        rss,
        dump_seconds: listed,
    })
}
