//! Subcommand dispatch and process-wide setup (logging).

mod args;
pub mod healthcheck;
mod load;
pub mod recover;

pub use args::{Cli, Command, CompactArgs, TokenCommand};
pub use load::{ArgsError, Parsed, parse_args};

use tracing_subscriber::EnvFilter;

use crate::app::{Server, ShutdownSignal};
use crate::config::{DumpArgs, LogArgs, LogFormat};

/// A command that has said what went wrong and ends with this exit status.
#[derive(Debug, thiserror::Error)]
#[error("exit status {0}")]
pub struct Exit(pub u8);

/// Installs the global `tracing` subscriber.
pub fn init_tracing(log: &LogArgs) {
    let filter = EnvFilter::try_new(&log.log).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: files, pipes, the journal and log
    // shippers would get the escape codes as text. NO_COLOR (no-color.org) wins.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let signal = ShutdownSignal::install()?;
            // Installed before start-up too: SIGHUP's default action ends the process.
            #[cfg(unix)]
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            let server = Server::start(*args).await?;
            let token = server.shutdown_token();
            tokio::spawn(async move {
                signal.recv().await;
                tracing::info!("shutdown requested");
                token.cancel();
            });
            #[cfg(unix)]
            {
                let reloader = server.reloader();
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP: reloading API keys and TLS certificate");
                        reloader.reload().ok();
                    }
                });
            }
            server.wait().await
        }
        Command::Bench(args) if args.detect => crate::bench::detect::run(args).await.map(|_| ()),
        Command::Bench(args) if args.dump => crate::bench::dump::run(args).await.map(|_| ()),
        Command::Bench(args) if args.scenario == crate::bench::Scenario::Fleet => {
            crate::bench::fleet::run(args).await.map(|_| ())
        }
        Command::Bench(args) if args.scenario == crate::bench::Scenario::Soak => {
            crate::bench::soak::run(args).await.map(|_| ())
        }
        Command::Bench(args) if args.scenario == crate::bench::Scenario::Console => {
            crate::bench::console::run(args).await
        }
        Command::Bench(args) if args.scenario == crate::bench::Scenario::Sql => {
            crate::bench::sql::run(args).await.map(|_| ())
        }
        Command::Bench(args) if args.scenario == crate::bench::Scenario::Push => {
            crate::bench::push::run(args).await
        }
        Command::Bench(args) => crate::bench::run(args).await.map(|_| ()),
        Command::Compact(args) => compact(args).await,
        Command::Dump(args) => dump(*args).await,
        Command::Recover(args) => match recover::run(&args)? {
            recover::Recovery::Healthy => Ok(()),
            recover::Recovery::NeedsAction => anyhow::bail!("the database needs the steps above"),
        },
        Command::Token { data_dir, command } => token(&data_dir, command),
        Command::Alert { client, command } => crate::backend::client::alert(&client, command).await,
        Command::Anomaly { client, command } => {
            crate::backend::client::anomaly(&client, command).await
        }
        Command::Device { client, command } => {
            crate::backend::client::device(&client, command).await
        }
        Command::Healthcheck(args) => healthcheck::run(&args).await,
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Push(args) => {
            let totals = crate::push::run(args).await.map_err(|e| {
                eprintln!("error: {e:#}");
                Exit(2)
            })?;
            match totals.exit_code() {
                0 => Ok(()),
                code => Err(Exit(code).into()),
            }
        }
        Command::Openapi => {
            println!("{}", crate::api::openapi_json());
            Ok(())
        }
    }
}

/// `milepost compact`: finished days compacted, then the file rewritten if asked.
async fn compact(args: CompactArgs) -> anyhow::Result<()> {
    let cfg = args.storage.store_config();
    ensure_database(&cfg)?;
    let store = crate::store::Store::open(&cfg)?;
    tokio::task::spawn_blocking(move || {
        let done = store.compact()?;
        println!(
            "compacted {} day(s), {} readings, in {:.2} s",
            done.days,
            done.readings,
            done.elapsed.as_secs_f64()
        );
        if !args.rewrite {
            store.close()?;
            return Ok(());
        }
        let r = store.rewrite(&cfg)?;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "rewrote the database in {:.2} s: {:.1} MiB -> {:.1} MiB, {} KiB -> {} KiB blocks, {} rows",
            r.elapsed.as_secs_f64(),
            mib(r.bytes_before),
            mib(r.bytes_after),
            r.block_size_before >> 10,
            r.block_size_after >> 10,
            r.rows
        );
        Ok::<_, anyhow::Error>(())
    })
    .await?
}

/// Fails unless `cfg`'s data directory holds a database. The offline commands work
/// on a server's data: a directory without one is a mistyped `--data-dir` (opening
/// it would create an empty database there and report nothing to do).
fn ensure_database(cfg: &crate::store::StoreConfig) -> anyhow::Result<()> {
    let db = crate::store::DataDir::new(&cfg.data_dir).database();
    anyhow::ensure!(
        db.exists(),
        "no milepost database at {} (is --data-dir right? `milepost serve` creates one there)",
        db.display()
    );
    Ok(())
}

/// `milepost dump`: dumps the given days with the server stopped (it holds the data
/// directory; a running server dumps on its own schedule and catches up at start).
async fn dump(args: DumpArgs) -> anyhow::Result<()> {
    let yesterday = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    let (first, last) = match (args.date, args.since) {
        (Some(d), _) => (d, d),
        (None, Some(since)) => (since, args.until.unwrap_or(yesterday)),
        (None, None) => anyhow::bail!("give --date DAY or --since DAY"),
    };
    anyhow::ensure!(first <= last, "--since {first} is after --until {last}");
    let cfg = args.storage.store_config();
    ensure_database(&cfg)?;
    let store = crate::store::Store::open(&cfg).map_err(|e| {
        let hint = if matches!(e, crate::store::StoreError::Locked { .. }) {
            " (milepost dump works with the server stopped; a running server dumps on \
             --dump-schedule and catches up every missing or changed day at start)"
        } else {
            ""
        };
        anyhow::anyhow!("{e}{hint}")
    })?;
    let dumper = crate::app::open_dumper(
        &args.blob,
        &args.storage.data_dir,
        store.dump_source()?,
        std::sync::Arc::new(crate::metrics::Metrics::new()),
        usize::MAX,
    )
    .await?;
    let mut failed = 0;
    for day in first.iter_days().take_while(|d| *d <= last) {
        match dumper.dump_day(day).await {
            Ok(records) => {
                for r in records {
                    println!(
                        "{day} {:<7} {:>10} readings {:>12} bytes  {}",
                        r.format, r.readings, r.bytes, r.key
                    );
                }
            }
            Err(e) => {
                eprintln!("{day}: {e}");
                failed += 1;
            }
        }
    }
    drop(dumper);
    tokio::task::spawn_blocking(move || store.close()).await??;
    anyhow::ensure!(failed == 0, "{failed} day(s) failed");
    Ok(())
}

/// `milepost token …`.
///
/// Tokens may be made before the server's first start, so a data directory without
/// a database is not refused; but the tokens file is read from the server's own
/// `--data-dir`, and a token written beside a mistyped one would be refused by it
/// with no hint why: the command says where it wrote and that no database is there.
fn token(data_dir: &std::path::Path, command: TokenCommand) -> anyhow::Result<()> {
    let admin = crate::backend::TokenAdmin::new(data_dir);
    if !crate::store::DataDir::new(data_dir).database().exists() {
        eprintln!(
            "note: no milepost database in {} yet; only a server started with \
             --data-dir {} reads these tokens",
            data_dir.display(),
            data_dir.display()
        );
    }
    match command {
        TokenCommand::Create { role, name } => {
            let (token, entry) = admin.create(role, &name)?;
            eprintln!(
                "token {} ({}, role {}): shown this once; only its hash is kept",
                entry.id,
                if name.is_empty() { "no name" } else { &name },
                role.as_str()
            );
            println!("{token}");
        }
        TokenCommand::List => {
            for t in admin.list()? {
                println!(
                    "{}\t{}\t{}\t{}",
                    t.id,
                    t.role.as_str(),
                    t.created_at,
                    t.name
                );
            }
        }
        TokenCommand::Revoke { which } => {
            for t in admin.revoke(&which)? {
                println!("revoked {} ({})", t.id, t.name);
            }
        }
    }
    Ok(())
}
