//! Subcommand dispatch and process-wide setup (logging).

pub mod recover;

use tracing_subscriber::EnvFilter;

use crate::app::{Server, ShutdownSignal};
use crate::config::{Cli, Command, LogArgs, LogFormat};

/// Installs the global `tracing` subscriber.
pub fn init_tracing(log: &LogArgs) {
    let filter = EnvFilter::try_new(&log.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
            let server = Server::start(*args).await?;
            let token = server.shutdown_token();
            tokio::spawn(async move {
                signal.recv().await;
                tracing::info!("shutdown requested");
                token.cancel();
            });
            server.wait().await
        }
        Command::Bench(args) => crate::bench::run(args).await.map(|_| ()),
        Command::Compact(storage) => {
            let store = crate::store::Store::open(&storage.store_config())?;
            let done = tokio::task::spawn_blocking(move || {
                let done = store.compact()?;
                store.close()?;
                Ok::<_, crate::store::StoreError>(done)
            })
            .await??;
            println!(
                "compacted {} day(s), {} readings, in {:.2} s",
                done.days,
                done.readings,
                done.elapsed.as_secs_f64()
            );
            Ok(())
        }
        Command::Recover(args) => match recover::run(&args)? {
            recover::Recovery::Healthy => Ok(()),
            recover::Recovery::NeedsAction => anyhow::bail!("the database needs the steps above"),
        },
        Command::Openapi => {
            println!("{}", crate::api::openapi_json());
            Ok(())
        }
    }
}
