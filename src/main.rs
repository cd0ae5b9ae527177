//! The `milepost` binary: parse the command line, start tracing, run (everything
//! else is in the library, so tests start the same app in-process).

/// jemalloc, for Rust's allocations and, through the unprefixed `malloc`, DuckDB's.
/// Measured with 100,000 devices streaming (2 cores, client on the same machine):
/// at 64 connections 35–41 k req/s and 24–28 µs of server CPU a request, against
/// 31–34 k and 32–35 µs with glibc's malloc (`MALLOC_ARENA_MAX=2`); over 12 minutes
/// at 8 connections 31.9 k against 23.9 k req/s, with the same median resident size
/// (205 MiB; docs/performance.md, session 21).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start (`MALLOC_CONF` in the environment still
/// overrides them): a background thread hands freed pages back to the kernel after a
/// second instead of the default ten, so resident memory follows the live data
/// rather than the last burst's high-water mark.
#[unsafe(export_name = "malloc_conf")]
static MALLOC_CONF: ConfPtr =
    ConfPtr(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// jemalloc's `const char *malloc_conf`: a pointer to a static string.
#[repr(transparent)]
struct ConfPtr(*const std::ffi::c_char);

// SAFETY: the pointer is to a `'static` string that nothing writes.
unsafe impl Sync for ConfPtr {}

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
