//! `milepost bench --scenario push`: `milepost push` of a generated backlog
//! (`--readings` in `--clients` NDJSON files, one device each) to a local server,
//! with the defaults a device would use and then with gzip off; readings/s and the
//! server's peak RSS.

use std::time::Instant;

use super::{BENCH_KEY, BenchArgs, BenchServer, generate, work_dir};
use crate::push::{Progress, PushArgs};

/// Runs the push benchmark and prints the figures.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (work, _tmp) = work_dir(&args, "milepost-bench-push-")?;
    eprintln!(
        "bench: generating {} readings in {} files",
        args.readings, args.clients
    );
    let generated = {
        let (work, a) = (work.clone(), args.clone());
        tokio::task::spawn_blocking(move || {
            generate::generate(&work, "push", a.readings, a.clients, a.chunk_lines, a.seed)
        })
        .await??
    };
    let files: Vec<_> = generated.streams.iter().map(|s| s.plain.clone()).collect();
    println!(
        "| push (fresh server each) | readings | seconds | readings/s | server peak RSS MiB |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (name, gzip) in [("defaults (gzip)", true), ("--no-gzip", false)] {
        let dir = work.join(format!("server-{gzip}"));
        let server = BenchServer::start(&dir, &args.memory_limit)?;
        let push = PushArgs {
            paths: files.clone(),
            url: server.base().parse()?,
            api_key: Some(BENCH_KEY.to_owned()),
            api_key_file: None,
            device: None,
            request_bytes: 16 << 20,
            concurrency: 2,
            no_gzip: !gzip,
            delete_after: false,
            give_up_after: std::time::Duration::from_secs(60),
            ca_cert: None,
            progress: Progress::Quiet,
        };
        let started = Instant::now();
        let totals = crate::push::run(push).await?;
        let seconds = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            totals.exit_code() == 0 && totals.accepted == args.readings,
            "push did not store the backlog: {totals:?}"
        );
        println!(
            "| {name} | {} | {seconds:.2} | {:.0} | {:.0} |",
            totals.accepted,
            totals.accepted as f64 / seconds,
            server.peak_rss_mib()
        );
        server.stop()?;
        std::fs::remove_dir_all(&dir).ok();
    }
    Ok(())
}
