//! The command line: subcommands and what each takes. The settings of the server and
//! of the offline commands are `config`'s; the subcommands that talk to other parts
//! (backend client, bench, recover, healthcheck) bring their own argument types.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{DumpArgs, LogArgs, ServeArgs, StorageArgs};

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
    Compact(CompactArgs),
    /// Dump days to the blob store now (the server does this on its schedule); the
    /// server must be stopped.
    Dump(Box<DumpArgs>),
    /// Diagnose a data directory that does not open, and offer the safe steps.
    Recover(super::recover::RecoverArgs),
    /// Manage the internal backend's tokens (works while the server runs).
    Token {
        /// Directory of the data (the tokens file lives there).
        #[arg(long, env = "MILEPOST_DATA_DIR", default_value = "./milepost-data")]
        data_dir: PathBuf,
        /// What to do.
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Alerts (step detection) on a running server, over its backend.
    Alert {
        /// The backend and the token.
        #[command(flatten)]
        client: crate::backend::client::ClientArgs,
        /// What to do.
        #[command(subcommand)]
        command: crate::backend::client::AlertCommand,
    },
    /// Anomalies the alerts found, over the backend.
    Anomaly {
        /// The backend and the token.
        #[command(flatten)]
        client: crate::backend::client::ClientArgs,
        /// What to do.
        #[command(subcommand)]
        command: crate::backend::client::AnomalyCommand,
    },
    /// Devices of a running server, over its backend.
    Device {
        /// The backend and the token.
        #[command(flatten)]
        client: crate::backend::client::ClientArgs,
        /// What to do.
        #[command(subcommand)]
        command: crate::backend::client::DeviceCommand,
    },
    /// Probe `/readyz` of the server on this machine: exit 0 when ready, 1 if not
    /// (container health checks; the runtime image has no curl).
    Healthcheck(super::healthcheck::HealthcheckArgs),
    /// Try Milepost: a server with simulated cars (a day of history, an alert that
    /// found their refuelling, yesterday dumped) streaming live readings; prints the
    /// console's address.
    Demo(crate::demo::DemoArgs),
    /// Send NDJSON files (a device's offline buffer, a backlog) to a server's
    /// `/ingest`: gzip, bounded requests, retries; exact totals.
    Push(crate::push::PushArgs),
    /// Print the OpenAPI document of the public API.
    Openapi,
    /// Measure ingest and query speed against DuckDB's own load (see docs/performance.md).
    Bench(crate::bench::BenchArgs),
}

/// `milepost token`.
/// `milepost compact` options.
#[derive(Debug, Clone, clap::Args)]
pub struct CompactArgs {
    /// The database.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Then copy the database into a new file that replaces it: the disk that
    /// compaction and retention freed inside the file is given back, and a file
    /// made before 128 KiB blocks gets them (compacted days ~15 % smaller). Needs
    /// free disk for the copy (about the data's size); 100 M readings took 18 s.
    #[arg(long)]
    pub rewrite: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Make a backend token; it is printed once and only its hash is kept.
    Create {
        /// What it may do.
        #[arg(long, value_enum)]
        role: crate::backend::Role,
        /// Who or what uses it.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List tokens (ids, names, roles; never the tokens).
    List,
    /// Revoke the token(s) with this id or name; the server refuses them at once.
    Revoke {
        /// Id (from `token list`) or name.
        which: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_day;
    use crate::domain::DumpFormat;

    #[test]
    fn dump_takes_the_seed_flag_names_and_a_format() {
        let cli = Cli::parse_from([
            "milepost",
            "dump",
            "--dump-date",
            "2026-11-30",
            "--format",
            "parquet",
            "--blob-store-url",
            "memory:///",
        ]);
        let Command::Dump(d) = cli.command else {
            panic!()
        };
        assert_eq!(d.date, Some(parse_day("2026-11-30").unwrap()));
        assert_eq!(d.blob.dump_format.formats(), vec![DumpFormat::Parquet]);
        assert!(
            Cli::try_parse_from(["milepost", "dump"]).is_err(),
            "a day is required"
        );
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
