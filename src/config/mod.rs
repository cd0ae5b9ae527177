//! Settings of the server and of the offline commands, as flags with `MILEPOST_*`
//! environment fallbacks and defaults that suit a small VM; seed flag names are
//! accepted where they fit. The subcommands that take them are `cli`'s: this module
//! knows nothing of `cli`, `app` or `bench` (see the layering in `lib.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

use chrono::NaiveDate;

use crate::domain::{Device, DumpFormat};

mod file;

pub use file::{ConfigFileError, FromFile, Origin, Rendered, Setting, apply_file, effective};

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

/// A feature switched on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Toggle {
    /// On.
    On,
    /// Off.
    Off,
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
    #[arg(long, env = "MILEPOST_MEMORY_LIMIT", default_value = crate::store::DEFAULT_MEMORY_LIMIT)]
    pub memory_limit: String,
    /// DuckDB worker threads.
    #[arg(long, env = "MILEPOST_THREADS", default_value_t = 2)]
    pub threads: usize,
    /// Most disk DuckDB's spill files may take (`max_temp_directory_size`), e.g.
    /// `4GB`, so that no query (a user's SQL above all) fills the disk. `auto`: half
    /// the data directory's free space at start.
    #[arg(long, env = "MILEPOST_TEMP_LIMIT", default_value = "auto")]
    pub temp_limit: String,
}

impl StorageArgs {
    /// The store settings these flags describe.
    pub fn store_config(&self) -> crate::store::StoreConfig {
        crate::store::StoreConfig {
            data_dir: self.data_dir.clone(),
            memory_limit: self.memory_limit.clone(),
            threads: self.threads,
            series_memory: crate::store::DEFAULT_SERIES_MEMORY,
            temp_limit: Some(self.temp_limit()),
        }
    }

    /// `--temp-limit` as DuckDB takes it: `auto` resolved against the free space
    /// of the data directory's file system (its parent when it does not exist yet).
    pub fn temp_limit(&self) -> String {
        if !self.temp_limit.trim().eq_ignore_ascii_case("auto") {
            return self.temp_limit.trim().to_owned();
        }
        let dir = self
            .data_dir
            .ancestors()
            .find(|d| d.exists())
            .unwrap_or(std::path::Path::new("."));
        let free = nix::sys::statvfs::statvfs(dir)
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(8 << 30);
        format!("{}MB", (free / 2 / 1_000_000).max(256))
    }
}

/// `milepost serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Settings file (TOML): any setting below, by its flag name without the dashes
    /// (`max-devices = 50000`, see dist/milepost.toml). A flag beats its `MILEPOST_*`
    /// variable, which beats the file, which beats the default.
    #[arg(long, env = "MILEPOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective settings, each with where it came from (flag,
    /// environment, file or default; keys and secrets masked), and exit.
    #[arg(long)]
    pub print_config: bool,
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
    /// The built-in web console: devices, charts, the track, anomalies, dumps and
    /// the system's state, read-only (at `/`, or at `/console/` when
    /// --dashboard-dir takes `/`).
    #[arg(long, env = "MILEPOST_CONSOLE", value_enum, default_value_t = Toggle::On)]
    pub console: Toggle,
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
    /// Devices the server holds at most. Readings of a new device beyond it are
    /// refused line by line (the request's other lines are stored) until devices
    /// are deleted (`milepost device delete`) or the limit is raised. Each device
    /// costs memory while it is known (see README); 0: no ceiling.
    #[arg(long, env = "MILEPOST_MAX_DEVICES", default_value_t = 100_000)]
    pub max_devices: usize,
    /// Devices one API key may have brought in (those that still exist). Readings of
    /// a new device beyond it are refused line by line, like over --max-devices, so
    /// one fleet's key cannot take the whole ceiling; 0: no quota.
    #[arg(long, env = "MILEPOST_MAX_DEVICES_PER_KEY", default_value_t = 0)]
    pub max_devices_per_key: u64,
    /// New devices one API key may bring in per minute (a token bucket holding one
    /// minute's worth, so a fleet's first contact may come at once). Beyond it the
    /// new devices' lines are refused and the request is answered 429 with
    /// Retry-After; 0: no limit.
    #[arg(
        long,
        env = "MILEPOST_MAX_NEW_DEVICES_PER_KEY",
        default_value_t = 10_000
    )]
    pub max_new_devices_per_key: u32,
    /// Memory for the live quarter hours of active devices, which charts read
    /// instead of scanning the newest readings (~0.9 KB per device streaming six
    /// sensors). Beyond it, devices idle for `--live-slots-idle` make room; if none
    /// is, a new device's charts read the database (exact, slower under load).
    #[arg(long, env = "MILEPOST_LIVE_SLOTS_MEMORY", default_value = "64MiB", value_parser = parse_size)]
    pub live_slots_memory: u64,
    /// How long a device must have sent nothing before its live quarter hours may
    /// make room for another's.
    #[arg(long, env = "MILEPOST_LIVE_SLOTS_IDLE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub live_slots_idle: Duration,
    /// Memory for the series statistics (count, first, last, newest value) of
    /// active devices (~290 bytes per device with six sensors). Beyond it, the
    /// statistics of devices idle for `--series-idle` move to the database and come
    /// back when the device sends again (one small query); beyond twice it, those of
    /// the least recently active devices move too, so memory stays bounded however
    /// many devices appear at once.
    #[arg(long, env = "MILEPOST_SERIES_MEMORY", default_value = "32MiB", value_parser = parse_size)]
    pub series_memory: u64,
    /// How long a device must have stored nothing before its series statistics may
    /// move to the database; longer than your devices wait between reports (a device
    /// coming back costs a query).
    #[arg(long, env = "MILEPOST_SERIES_IDLE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub series_idle: Duration,
    /// Memory for what the writer knows of recently written series' stored keys
    /// (spans and newest timestamps, ~75 bytes per series): it decides most re-sent
    /// and out-of-order readings without asking the database. Series not written for
    /// a while are forgotten first; theirs then cost a database look-up (exact,
    /// slower). The default holds ~38,000 devices of six sensors.
    #[arg(long, env = "MILEPOST_KNOWN_KEYS_MEMORY", default_value = "20MiB", value_parser = parse_size)]
    pub known_keys_memory: u64,
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
    /// Rollup rows the writer appends before it consolidates their slots into one row
    /// each; lower consolidates more often (smaller, more frequent transactions).
    #[arg(long, env = "MILEPOST_ROLLUP_MERGE_ROWS", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rollup_merge_rows: u64,
    /// Today's readings the writer sorts by device at a time, so that a device's
    /// readings pages and raw reads skip the rest of the fleet's (e.g. `1048576`:
    /// beside 2,000 streaming devices a page's median 26 → 20 ms, its tail the same,
    /// ~45 MiB more peak memory). `0`: today's readings stay in arrival order until
    /// the day's compaction.
    #[arg(long, env = "MILEPOST_CLUSTER_ROWS", default_value_t = crate::store::DEFAULT_CLUSTER_ROWS)]
    pub cluster_rows: u64,
    /// Daily dumps.
    #[command(flatten)]
    pub blob: BlobArgs,
    /// When dump runs start: cron with seconds, in UTC (`sec min hour day month
    /// weekday`). Each run dumps every finished day that has no dump or changed
    /// since its dump; a run also starts with the server. `off`: no dumps.
    #[arg(long, env = "MILEPOST_DUMP_SCHEDULE", default_value = "0 0 6 * * *")]
    pub dump_schedule: String,
    /// Most days one dump run writes; a longer backlog goes on in the next runs.
    #[arg(long, env = "MILEPOST_DUMP_MAX_DAYS", default_value_t = 31)]
    pub dump_max_days: usize,
    /// Delete local readings older than this many days once their day's dumps are in
    /// the manifest (never an undumped day). Unset: keep everything.
    #[arg(long, env = "MILEPOST_RETENTION_DAYS", value_parser = clap::value_parser!(u32).range(1..))]
    pub retention_days: Option<u32>,
    /// Public base URL of the blob store's prefix (e.g. a CDN or a public bucket):
    /// `GET /api/v1/dumps/{name}` redirects there instead of streaming the object.
    #[arg(long, env = "MILEPOST_DUMP_PUBLIC_URL")]
    pub dump_public_url: Option<String>,
    /// Internal backend.
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Connection limits and TLS of the public listener.
    #[command(flatten)]
    pub http: HttpArgs,
    /// How long shutdown waits for in-flight requests.
    #[arg(long, env = "MILEPOST_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// Longest a user SQL query (`POST /api/v1/sql`, the PostgreSQL listener) runs
    /// before DuckDB is interrupted (408; SQLSTATE 57014).
    #[arg(long, env = "MILEPOST_SQL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub sql_timeout: Duration,
    /// The share of the server's time one token's SQL queries may take over a
    /// longer run: a budget of query time that fills at this many seconds a second
    /// and holds at most 10 s; a token's next query waits (up to a second)
    /// or gets 429 + Retry-After (SQLSTATE 53300) while its budget is spent. 1
    /// turns it off. One client looping a heavy query otherwise costs live ingest a
    /// third of its rate on two cores.
    #[arg(long, env = "MILEPOST_SQL_TIME_SHARE", default_value_t = 0.25, value_parser = parse_share)]
    pub sql_time_share: f64,
    /// The share of the server's time all tokens' SQL queries together may take
    /// (a budget like each token's, server-wide), so that many tokens cannot add
    /// their shares up to the whole machine; over it a query waits (up to a
    /// second) or gets 503 + Retry-After (SQLSTATE 53300). 1 turns it off.
    #[arg(long, env = "MILEPOST_SQL_TOTAL_SHARE", default_value_t = 0.25, value_parser = parse_share)]
    pub sql_total_share: f64,
    /// PostgreSQL wire listener for users' SQL (psql, Grafana, drivers), e.g.
    /// `127.0.0.1:5433`; off when unset. Passwords are backend tokens; off loopback
    /// it needs `--tls-cert`/`--tls-key` (or `--pg-insecure`).
    #[arg(long, env = "MILEPOST_PG_ADDR")]
    pub pg_addr: Option<SocketAddr>,
    /// Let the PostgreSQL listener serve off loopback without TLS: tokens then
    /// cross the network in clear text (only behind a TLS-terminating proxy or on a
    /// trusted network).
    #[arg(long, env = "MILEPOST_PG_INSECURE")]
    pub pg_insecure: bool,
    /// Open connections to the PostgreSQL listener at most; more are closed.
    #[arg(long, env = "MILEPOST_PG_MAX_CONNECTIONS", default_value_t = 64)]
    pub pg_max_connections: usize,
}

/// Connection limits and TLS of the public HTTP listener.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Longest time a request's header may take to arrive; also how long an idle
    /// keep-alive connection stays open (as nginx's `client_header_timeout`). Cuts
    /// off clients that trickle their header (slowloris).
    #[arg(long, env = "MILEPOST_HEADER_READ_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Longest pause in an ingest body (no byte arriving) before the request is
    /// answered 408 and the connection closed. Readings of lines received before the
    /// pause are stored.
    #[arg(long, env = "MILEPOST_BODY_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_read_timeout: Duration,
    /// Open connections at most; more get 503 with Retry-After and are closed.
    #[arg(long, env = "MILEPOST_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Open connections from one IP address at most. Devices on a mobile network
    /// often share one address (carrier NAT): size it for the largest such group.
    #[arg(
        long,
        env = "MILEPOST_MAX_CONNECTIONS_PER_CLIENT",
        default_value_t = 1024
    )]
    pub max_connections_per_client: usize,
    /// `POST /ingest` requests in flight from one IP address at most; more get 429
    /// with Retry-After. A device sends one at a time, but devices behind one NAT
    /// share the cap: size it for the largest such group's bursts.
    #[arg(
        long,
        env = "MILEPOST_MAX_INGEST_PER_CLIENT",
        default_value_t = 128,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_ingest_per_client: u64,
    /// Largest request header (request line plus fields); larger ones get 431.
    #[arg(long, env = "MILEPOST_MAX_HEADER_BYTES", default_value = "64KiB", value_parser = parse_size)]
    pub max_header_bytes: u64,
    /// PEM certificate chain: serve HTTPS instead of HTTP (with `--tls-key`).
    /// Re-read on SIGHUP.
    #[arg(long, env = "MILEPOST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`. Re-read on SIGHUP.
    #[arg(long, env = "MILEPOST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Where and how daily dumps are written.
#[derive(Debug, Clone, Args)]
pub struct BlobArgs {
    /// Blob store for daily dumps: `file:///path`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix` or `memory://` (tests).
    /// Default: `file://<data-dir>/dumps`. Credentials come from the provider's usual
    /// environment variables (`AWS_ACCESS_KEY_ID`, …).
    #[arg(long, env = "MILEPOST_BLOB_STORE_URL")]
    pub blob_store_url: Option<String>,
    /// Endpoint of an S3-compatible store (MinIO, Ceph…), e.g.
    /// `http://127.0.0.1:9000`: path-style requests, plain HTTP allowed.
    #[arg(long, env = "MILEPOST_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: `AWS_REGION`, else us-east-1).
    #[arg(long, env = "MILEPOST_S3_REGION")]
    pub s3_region: Option<String>,
    /// Name of this appliance in the lake: every key it writes holds it
    /// (`parquet/date=…/<node>.parquet`, `manifests/<node>.json`), so several can
    /// publish into one prefix. Keep it when the machine is replaced (restore the data
    /// directory); see docs/dumps.md. Default: the host name.
    #[arg(long, env = "MILEPOST_NODE_NAME", value_parser = parse_node)]
    pub node_name: Option<String>,
    /// The blob store's prefix is shared with other appliances: write each day's
    /// NDJSON as `json/date=YYYY-MM-DD/<node>.json.gz` instead of the seed-named
    /// `YYYY-MM-DD.json.gz` at the root, which only a lone appliance writes. Set it on
    /// every node of a shared prefix (a node without it is refused at start when
    /// another one writes the root files).
    #[arg(long, env = "MILEPOST_SHARED_LAKE")]
    pub shared_lake: bool,
    /// Formats each day is dumped in (`--format` for `milepost dump`).
    #[arg(long, alias = "format", env = "MILEPOST_DUMP_FORMAT", value_enum, default_value_t = DumpFormats::Both)]
    pub dump_format: DumpFormats,
}

/// `--dump-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DumpFormats {
    /// `YYYY-MM-DD.json.gz` only.
    Json,
    /// The Parquet lake only.
    Parquet,
    /// Both.
    Both,
}

impl DumpFormats {
    /// The formats selected.
    pub fn formats(self) -> Vec<DumpFormat> {
        match self {
            DumpFormats::Json => vec![DumpFormat::Json],
            DumpFormats::Parquet => vec![DumpFormat::Parquet],
            DumpFormats::Both => DumpFormat::ALL.to_vec(),
        }
    }
}

impl BlobArgs {
    /// The blob store settings, with the default under `data_dir`.
    pub fn blob_config(&self, data_dir: &std::path::Path) -> crate::export::BlobConfig {
        let url = self.blob_store_url.clone().unwrap_or_else(|| {
            let dir = std::path::absolute(data_dir.join("dumps"))
                .unwrap_or_else(|_| data_dir.join("dumps"));
            url::Url::from_directory_path(&dir)
                .map(|u| u.to_string())
                .unwrap_or_else(|()| format!("file://{}", dir.display()))
        });
        crate::export::BlobConfig {
            url,
            s3_endpoint: self.s3_endpoint.clone(),
            s3_region: self.s3_region.clone(),
        }
    }

    /// `--node-name`, or the host name made safe for an object key.
    pub fn node(&self) -> String {
        if let Some(n) = &self.node_name {
            return n.clone();
        }
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        let safe: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        if safe.is_empty() {
            "milepost".into()
        } else {
            safe
        }
    }
}

/// A share of time: more than 0, at most 1.
fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
        _ => Err(format!(
            "'{s}' is not a share: a number above 0 and at most 1"
        )),
    }
}

/// Node names become file names in the lake.
fn parse_node(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !s.starts_with('.');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "'{s}' is not a node name: 1-64 of A-Z a-z 0-9 _ . -, not starting with '.'"
        ))
    }
}

/// The internal gRPC backend, step detection and its notifications.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Address of the internal gRPC backend (alerts, anomalies, jobs). Loopback by
    /// default: it is for operators and other services, not the internet. `off`: none.
    #[arg(long, env = "MILEPOST_BACKEND_ADDR", default_value = "127.0.0.1:8005", value_parser = parse_backend_addr)]
    pub backend_addr: BackendAddr,
    /// Quiet time after commits before background detection runs (once per burst).
    #[arg(long, env = "MILEPOST_DETECT_DEBOUNCE", default_value = "2s", value_parser = humantime::parse_duration)]
    pub detect_debounce: Duration,
    /// Calls per minute of each backend job method (Redump, Backfill) — a token bucket.
    #[arg(long, env = "MILEPOST_JOB_RATE", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub job_rate_per_minute: u32,
    /// Job calls that may come at once before the rate applies.
    #[arg(long, env = "MILEPOST_JOB_BURST", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub job_burst: u32,
    /// Most steps a dry run returns.
    #[arg(long, env = "MILEPOST_DRY_RUN_MAX_RESULTS", default_value_t = 1000)]
    pub dry_run_max_results: usize,
    /// Attempts per webhook notification, the first included.
    #[arg(long, env = "MILEPOST_WEBHOOK_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub webhook_attempts: u32,
    /// Wait before the second webhook attempt; doubles after each failure.
    #[arg(long, env = "MILEPOST_WEBHOOK_BACKOFF", default_value = "2s", value_parser = humantime::parse_duration)]
    pub webhook_backoff: Duration,
}

/// `--backend-addr`: an address, or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendAddr(pub Option<SocketAddr>);

fn parse_backend_addr(s: &str) -> Result<BackendAddr, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(BackendAddr(None));
    }
    s.parse()
        .map(|a| BackendAddr(Some(a)))
        .map_err(|e| format!("'{s}' is not an address like 127.0.0.1:8005 (or off): {e}"))
}

/// `milepost dump`.
#[derive(Debug, Clone, Args)]
pub struct DumpArgs {
    /// Storage.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Blob store and formats.
    #[command(flatten)]
    pub blob: BlobArgs,
    /// The UTC day to dump, `YYYY-MM-DD` (seed flag: `--dump-date`).
    #[arg(long, alias = "dump-date", value_parser = parse_day, required_unless_present = "since", conflicts_with = "since")]
    pub date: Option<NaiveDate>,
    /// First day of a range to dump.
    #[arg(long, value_parser = parse_day)]
    pub since: Option<NaiveDate>,
    /// Last day of the range (default: yesterday, UTC).
    #[arg(long, value_parser = parse_day, requires = "since")]
    pub until: Option<NaiveDate>,
}

/// Parses `YYYY-MM-DD`.
pub fn parse_day(s: &str) -> Result<NaiveDate, String> {
    crate::domain::Day::parse(s)
        .map(|d| d.date())
        .map_err(|e| e.to_string())
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

    /// Settings for a test or embedded server: the defaults, on loopback with
    /// ephemeral ports, in `data_dir`, without scheduled dumps.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        /// `ServeArgs` alone, parsed as the command line would (defaults and all).
        #[derive(Parser)]
        struct Serve {
            #[command(flatten)]
            args: ServeArgs,
        }
        let mut s = Serve::parse_from(["milepost", "--listen", "127.0.0.1:0"]).args;
        s.storage.data_dir = data_dir;
        // Tests that dump turn it on; the others should not pay for it.
        s.dump_schedule = "off".into();
        s.backend.backend_addr = BackendAddr(Some(SocketAddr::from(([127, 0, 0, 1], 0))));
        s
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
    fn node_names_are_safe_file_names() {
        assert!(parse_node("../x").is_err() && parse_node(".hidden").is_err());
        assert!(parse_node("car-1").is_ok() && parse_node("car_1.eu").is_ok());
    }

    #[test]
    fn the_temp_limit_is_half_the_free_space_unless_given() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = ServeArgs::for_tests(dir.path().join("not-yet"));
        let auto = args.storage.temp_limit();
        let mb: u64 = auto.strip_suffix("MB").unwrap().parse().unwrap();
        let s = nix::sys::statvfs::statvfs(dir.path()).unwrap();
        let free_mb = s.blocks_available() * s.fragment_size() / 1_000_000;
        assert!(
            mb >= 256 && mb.abs_diff(free_mb / 2) <= 64.max(free_mb / 50),
            "{mb} of {free_mb}"
        );
        args.storage.temp_limit = "4GB".into();
        assert_eq!(
            args.storage.store_config().temp_limit.as_deref(),
            Some("4GB")
        );
    }
}
