#[tokio::main]
async fn main() -> std::process::ExitCode {
    let parsed = milepost::cli::parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit());
    if let Some(settings) = parsed.print_config {
        print!("{settings}");
        return std::process::ExitCode::SUCCESS;
    }
    let cli = parsed.cli;
    milepost::cli::init_tracing(&cli.log);
    match milepost::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if let Some(milepost::cli::Exit(code)) = e.downcast_ref() {
                return std::process::ExitCode::from(*code);
            }
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
