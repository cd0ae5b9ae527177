//! Command line and environment. Every flag has a `MILEPOST_*` environment variable
//! and a default that suits a small VM; seed flag names are accepted where they fit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::domain::Device;

/// `milepost`: a self-hosted telemetry appliance.
#[derive(Debug, Parser)]
#[command(name = "milepost", version, about, long_about = None)]
pub struct Cli {
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: ingest, HTTP API, background jobs.
    Serve(Box<ServeArgs>),
    /// Compact finished days now (the server does this hourly); the server must be stopped.
    Compact(StorageArgs),
    /// Diagnose a data directory that does not open, and offer the safe steps.
    Recover(crate::cli::recover::RecoverArgs),
    /// Print the OpenAPI document of the public API.
    Openapi,
    /// Measure ingest and query speed against DuckDB's own load (see docs/performance.md).
    Bench(crate::bench::BenchArgs),
}

/// Log output.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "MILEPOST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
    /// Log filter, in `tracing` env-filter syntax (e.g. `info,milepost=debug`).
    #[arg(long, env = "MILEPOST_LOG", default_value = "info", global = true)]
    pub log: String,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Where and how the database lives.
#[derive(Debug, Clone, Args)]
pub struct StorageArgs {
    /// Directory for the database, its lock and the generated API key.
    #[arg(long, env = "MILEPOST_DATA_DIR", default_value = "./milepost-data")]
    pub data_dir: PathBuf,
    /// DuckDB memory limit (queries spill to disk beyond it).
    #[arg(long, env = "MILEPOST_MEMORY_LIMIT", default_value = "128MB")]
    pub memory_limit: String,
    /// DuckDB worker threads.
    #[arg(long, env = "MILEPOST_THREADS", default_value_t = 2)]
    pub threads: usize,
}

impl StorageArgs {
    /// The store settings these flags describe.
    pub fn store_config(&self) -> crate::store::StoreConfig {
        crate::store::StoreConfig {
            data_dir: self.data_dir.clone(),
            memory_limit: self.memory_limit.clone(),
            threads: self.threads,
        }
    }
}

/// `milepost serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the public HTTP API.
    #[arg(long, env = "MILEPOST_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Port of the public HTTP API (seed flag; overrides the port of --listen).
    #[arg(long, env = "MILEPOST_PORT")]
    pub port: Option<u16>,
    /// Storage.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Valid API key, `KEY` or `KEY@DEVICE` to bind it to one device. Repeatable;
    /// comma-separated in the environment. Without any key, one is generated into the
    /// data directory on first start.
    #[arg(long = "api-key", env = "MILEPOST_API_KEY", value_delimiter = ',')]
    pub api_keys: Vec<String>,
    /// File with one API key per line (`KEY` or `KEY@DEVICE`, `#` comments).
    #[arg(long, env = "MILEPOST_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Device that reads without `?device=` refer to.
    #[arg(long, env = "MILEPOST_DEFAULT_DEVICE", default_value = "default")]
    pub default_device: Device,
    /// Built static dashboard (e.g. cloud-lada's) to serve at `/`, with `index.html`
    /// as the fallback for paths outside the API.
    #[arg(long, env = "MILEPOST_DASHBOARD_DIR")]
    pub dashboard_dir: Option<PathBuf>,
    /// Browser origin (e.g. `https://grafana.example.com`) allowed to call the API
    /// cross-origin; `*` allows any. Repeatable; comma-separated in the environment.
    /// Without it no CORS headers are sent (the bundled dashboard is same-origin).
    #[arg(
        long = "cors-origin",
        env = "MILEPOST_CORS_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// Largest accepted ingest body, after decompression (e.g. 1GiB, 500MB).
    #[arg(long, env = "MILEPOST_MAX_BODY_BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub max_body_bytes: u64,
    /// Longest accepted NDJSON line.
    #[arg(long, env = "MILEPOST_MAX_LINE_BYTES", default_value = "64KiB", value_parser = parse_size)]
    pub max_line_bytes: u64,
    /// How far in the future a reading's timestamp may be.
    #[arg(long, env = "MILEPOST_MAX_FUTURE_SKEW", default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_future_skew: Duration,
    /// Batches that may wait for the writer before requests get 503.
    #[arg(long, env = "MILEPOST_QUEUE_CAPACITY", default_value_t = 64)]
    pub queue_capacity: usize,
    /// How long a request waits for room in a full writer queue before 503.
    #[arg(long, env = "MILEPOST_QUEUE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub queue_timeout: Duration,
    /// How often finished days are compacted (rewritten sorted, ~40% smaller);
    /// `0s` turns it off.
    #[arg(long, env = "MILEPOST_COMPACT_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub compact_interval: Duration,
    /// After readings of finished days were written (an import, a late upload),
    /// compact once such writes have paused this long, without waiting for the next
    /// interval.
    #[arg(long, env = "MILEPOST_COMPACT_SETTLE", default_value = "1m", value_parser = humantime::parse_duration)]
    pub compact_settle: Duration,
    /// How long shutdown waits for in-flight requests.
    #[arg(long, env = "MILEPOST_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
}

impl ServeArgs {
    /// The listen address with `--port` applied.
    pub fn listen_addr(&self) -> SocketAddr {
        let mut a = self.listen;
        if let Some(p) = self.port {
            a.set_port(p);
        }
        a
    }

    /// Settings for a test or embedded server: loopback, ephemeral port, `data_dir`.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        Cli::parse_from(["milepost", "serve", "--listen", "127.0.0.1:0"])
            .command
            .into_serve()
            .map(|mut s| {
                s.storage.data_dir = data_dir;
                s
            })
            .expect("serve")
    }
}

impl Command {
    fn into_serve(self) -> Option<ServeArgs> {
        match self {
            Command::Serve(s) => Some(*s),
            _ => None,
        }
    }
}

/// Parses `1048576`, `64KiB`, `1GiB`, `500MB`, `2kb`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 1048576, 64KiB or 1GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return Err(format!("unknown size unit in '{s}'")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("1.5GiB").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn seed_port_flag_overrides_listen_port() {
        let cli = Cli::parse_from(["milepost", "serve", "--port", "9999"]);
        let Command::Serve(s) = cli.command else {
            panic!()
        };
        assert_eq!(s.listen_addr().to_string(), "0.0.0.0:9999");
        assert_eq!(s.max_line_bytes, 65536);
        assert_eq!(s.default_device.as_str(), "default");
    }
}
