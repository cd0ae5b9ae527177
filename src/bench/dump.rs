//! `milepost bench --dump`: dumping a day against DuckDB's own `COPY … TO` of the
//! same rows, in one run on the same file.
//!
//! 1. Generates the readings (`--clients` devices × six sensors at 1 Hz from
//!    2026-01-01: 20 devices make one day of 10.4 M readings) and loads them with
//!    DuckDB's `read_json` into Milepost's schema (the bench's native load).
//! 2. The reference: DuckDB's own `COPY` of that day's rows (joined to device and
//!    sensor names, sorted as the dump sorts them) to zstd Parquet and to gzip JSON
//!    with its JSON writer, on a direct connection.
//! 3. Milepost: `milepost dump --date 2026-01-01` on the same file as a child
//!    process, to `file://` — copy, upload (hash), record, manifest; wall time and
//!    the child's peak RSS.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{BenchArgs, generate, native_load, open_db};

/// Results of the dump benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct DumpReport {
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
            generate::generate(&work, a.readings, a.clients, a.chunk_lines, a.seed)
        })
        .await??
    };
    let db_dir = work.join("native");
    let mem = args.memory_limit.clone();
    eprintln!("bench --dump: loading with DuckDB's read_json");
    {
        let db_dir = db_dir.clone();
        tokio::task::spawn_blocking(move || native_load(&db_dir, &g, &mem)).await??;
    }

    eprintln!("bench --dump: reference COPY of {DAY}");
    let (reference_seconds, day_readings) = {
        let (db, mem, out) = (
            db_dir.join(crate::store::DB_FILE),
            args.memory_limit.clone(),
            work.join("reference"),
        );
        tokio::task::spawn_blocking(move || reference_copy(&db, &mem, &out)).await??
    };

    eprintln!("bench --dump: milepost dump --date {DAY}");
    let lake = work.join("lake");
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let status = Command::new(&exe)
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
        .status()
        .context("running milepost dump")?;
    let dump_seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("milepost dump failed: {status}");
    }
    // Only child so far that was waited for: its peak is the dump's.
    let rss_kib =
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?.max_rss();
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64;
    let parquet = size(&lake.join(format!("parquet/date={DAY}/bench.parquet")));
    let json = size(&lake.join(format!("{DAY}.json.gz")));
    let n = day_readings.max(1) as f64;
    let report = DumpReport {
        day_readings,
        reference_seconds,
        dump_seconds,
        ratio: dump_seconds / reference_seconds,
        dump_peak_rss_mib: rss_kib as f64 / 1024.0,
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
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

/// DuckDB's own `COPY` of the day: the same rows, names and order as the dump, with
/// DuckDB's JSON writer for the JSON. Returns seconds and the day's readings.
fn reference_copy(db: &Path, memory_limit: &str, out: &Path) -> anyhow::Result<(f64, u64)> {
    std::fs::create_dir_all(out)?;
    let conn = open_db(db, memory_limit, true)?;
    let from = format!(
        "FROM readings r JOIN devices d ON d.id = r.device_id JOIN sensors s ON s.id = r.sensor_id
         WHERE r.ts_ms >= epoch_ms(DATE '{DAY}') AND r.ts_ms < epoch_ms(DATE '{DAY}' + 1)"
    );
    let started = Instant::now();
    conn.execute_batch(&format!(
        "COPY (SELECT d.name AS device, s.name AS sensor,
                      make_timestamp(r.ts_ms * 1000 + r.ts_us) AS timestamp, r.value AS value
               {from} ORDER BY d.name, s.name, r.ts_ms, r.ts_us)
         TO '{}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 1048576);
         COPY (SELECT s.name AS sensor, r.value AS value,
                      make_timestamp(r.ts_ms * 1000 + r.ts_us) AS timestamp, d.name AS device
               {from} ORDER BY r.ts_ms, r.ts_us, d.name, s.name)
         TO '{}' (FORMAT json, COMPRESSION gzip);",
        out.join("day.parquet").display(),
        out.join("day.json.gz").display()
    ))?;
    let secs = started.elapsed().as_secs_f64();
    let n: i64 = conn.query_row(&format!("SELECT count(*) {from}"), [], |r| r.get(0))?;
    Ok((secs, n as u64))
}
