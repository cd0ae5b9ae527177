use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = milepost::cli::Cli::parse();
    milepost::cli::init_tracing(&cli.log);
    match milepost::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
