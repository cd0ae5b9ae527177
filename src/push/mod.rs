//! `milepost push`: the device side of the offline buffer. Streams NDJSON files (or
//! stdin) to a server's `POST /ingest` in bounded, gzip-compressed requests, waits out
//! `Retry-After`, retries network errors and 5xx with backoff, and reports exact
//! totals and the first refused lines by file and line.
//!
//! Why a re-send is always safe: a reading's identity is (device, sensor, timestamp)
//! and the server keeps the first, so a request whose answer was lost is simply sent
//! again; its stored readings come back as duplicates. The totals account for that
//! (see [`Tally::settle`]), so they count each line once.
//!
//! Reading and cutting requests runs on a blocking thread; compressing (on the
//! blocking pool) and sending overlap for up to `--concurrency` requests, answered
//! in order, so a file is known to be fully acknowledged the moment its last
//! request is.

mod files;
mod send;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use files::{Chunk, Source};
pub use send::Outcome;

/// `milepost push`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Exit status: 0 when every line was sent and stored (or was a duplicate); \
1 when the server refused lines (listed as file:line); 3 when something could not be sent \
(after retrying); 2 for a usage error."
)]
pub struct PushArgs {
    /// NDJSON files (`.gz` ones are decompressed), directories (their files, in name
    /// order, recursively; hidden files skipped), or `-` for standard input. Sent in
    /// the order given.
    #[arg(required = true, value_name = "FILE|DIR|-")]
    pub paths: Vec<PathBuf>,
    /// The server's base URL.
    #[arg(long, env = "MILEPOST_URL", default_value = "http://127.0.0.1:8080")]
    pub url: url::Url,
    /// API key.
    #[arg(long, env = "MILEPOST_PUSH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// File whose first line is the API key (e.g. the server's generated
    /// `<data-dir>/api-key`).
    #[arg(long, env = "MILEPOST_PUSH_API_KEY_FILE", conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,
    /// Device of lines that name none (otherwise the server takes `default`, or the
    /// device the key is bound to).
    #[arg(long)]
    pub device: Option<crate::domain::Device>,
    /// Most uncompressed bytes per request (whole lines; a longer line goes alone).
    /// 10 M readings to a local server on 2 cores: 1.6 M/s with 4 MiB, 2.9 M/s with
    /// 16 MiB (two in flight); each request's commit has a fixed cost.
    #[arg(long, default_value = "16MiB", value_parser = crate::config::parse_size)]
    pub request_bytes: u64,
    /// Requests in flight at once: two keep the server busy (one committing, the next
    /// arriving); four made the same 2-core machine 30% slower.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub concurrency: u32,
    /// Send uncompressed (gzip costs CPU on both ends; it saves ~90% of the bytes).
    #[arg(long)]
    pub no_gzip: bool,
    /// Delete each file once all of it was acknowledged and none of its lines was
    /// refused (a file with refused lines is kept, and named). Not for stdin.
    #[arg(long)]
    pub delete_after: bool,
    /// Longest time one request keeps being retried (server down, network errors,
    /// 5xx, 503 with Retry-After) before push gives up with exit status 3.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub give_up_after: Duration,
    /// PEM file of a CA (or a self-signed certificate) the server's TLS certificate
    /// must chain to, besides the system's roots.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Progress: a bar on a terminal, a line per file otherwise.
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    pub progress: Progress,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Progress {
    /// A bar when standard error is a terminal, lines otherwise.
    Auto,
    /// Always a bar.
    Bar,
    /// A line per file.
    Lines,
    /// Nothing but the totals.
    Quiet,
}

/// Refused lines printed at the end (the counts are exact).
const SHOWN_ERRORS: usize = 20;

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Readings newly stored.
    pub accepted: u64,
    /// Readings the server already had.
    pub duplicates: u64,
    /// Lines the server refused.
    pub rejected: u64,
    /// The first refused lines, as `file:line: reason`.
    pub errors: Vec<String>,
    /// Files whose lines could not all be sent (after retrying), with why.
    pub unsent: Vec<String>,
    /// Files deleted after they were acknowledged (`--delete-after`).
    pub deleted: Vec<PathBuf>,
    /// Files kept although `--delete-after` because some of their lines were refused.
    pub kept: Vec<PathBuf>,
}

impl Totals {
    /// The process exit status these totals call for (see `PushArgs`' help).
    pub fn exit_code(&self) -> u8 {
        if !self.unsent.is_empty() {
            3
        } else if self.rejected > 0 {
            1
        } else {
            0
        }
    }
}

/// Per-file counts while its requests are answered (in order: when its last
/// request is answered, all of it is).
#[derive(Default)]
struct FileState {
    rejected: u64,
    /// A request of it could not be sent, or it could not be read to its end.
    failed: bool,
}

/// Runs `milepost push`; returns the totals (printed already). An error means nothing
/// was sent (no key, an input that does not exist, a bad `--ca-cert`).
pub async fn run(args: PushArgs) -> anyhow::Result<Totals> {
    let key = match (&args.api_key, &args.api_key_file) {
        (Some(k), _) => k.trim().to_owned(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the API key file {}", f.display()))?
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .with_context(|| format!("no key in {}", f.display()))?
            .to_owned(),
        (None, None) => anyhow::bail!("give --api-key or --api-key-file"),
    };
    let sources = files::expand(&args.paths)?;
    anyhow::ensure!(
        !(args.delete_after && sources.iter().any(|s| matches!(s, Source::Stdin))),
        "--delete-after cannot delete standard input"
    );
    let client = send::Client::new(&args, key)?;
    let total_bytes: u64 = sources.iter().filter_map(Source::size).sum();
    let bar = progress_bar(&args, &sources, total_bytes);

    let started = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(2 * args.concurrency as usize);
    let reader = {
        let sources = sources.clone();
        let (device, limit) = (args.device.clone(), args.request_bytes as usize);
        let span = tracing::info_span!("push_read");
        tokio::task::spawn_blocking(move || {
            let _span = span.entered();
            files::read_all(&sources, device.as_ref(), limit, &tx)
        })
    };
    let gzip = !args.no_gzip;
    let mut answers = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|chunk| {
            let client = client.clone();
            async move {
                let (chunk, body) = if gzip {
                    tokio::task::spawn_blocking(move || {
                        let body = files::gzip(&chunk.body);
                        (chunk, body)
                    })
                    .await
                    .expect("gzip does not panic")
                } else {
                    let body = chunk.body.clone();
                    (chunk, body)
                };
                let outcome = client.send(body, gzip).await;
                (chunk, outcome)
            }
        })
        .buffered(args.concurrency as usize);

    let mut totals = Totals::default();
    let mut state: Vec<FileState> = sources.iter().map(|_| FileState::default()).collect();
    let mut sent_bytes = 0u64;
    while let Some((chunk, outcome)) = answers.next().await {
        let f = &mut state[chunk.file];
        let name = sources[chunk.file].name();
        if let Some(why) = &chunk.read_error {
            f.failed = true;
            totals.unsent.push(format!("{name}: {why}"));
        }
        match outcome {
            Outcome::Answered(s) => {
                totals.accepted += s.accepted;
                totals.duplicates += s.duplicates;
                totals.rejected += s.rejected;
                f.rejected += s.rejected;
                for e in s.errors {
                    if totals.errors.len() < SHOWN_ERRORS {
                        let line = chunk.first_line + e.line.saturating_sub(1);
                        totals.errors.push(format!("{name}:{line}: {}", e.error));
                    }
                }
            }
            Outcome::Fatal(why) => {
                // The server refuses this client (bad key, wrong URL): nothing later
                // would fare better. What is not answered yet counts as not sent.
                totals.unsent.push(format!("{name}: {why}"));
                break;
            }
            Outcome::GaveUp(why) => {
                f.failed = true;
                if !totals.unsent.iter().any(|u| u.starts_with(&name)) {
                    totals.unsent.push(format!("{name}: {why}"));
                }
            }
        }
        sent_bytes += chunk.raw_len as u64;
        bar.set_position(sent_bytes.min(total_bytes.max(sent_bytes)));
        if chunk.last {
            finish_file(
                &args,
                &sources[chunk.file],
                &state[chunk.file],
                &mut totals,
                &bar,
            );
        }
    }
    // Stops the reader if the loop ended early.
    drop(answers);
    let read = reader.await.expect("the reader does not panic");
    bar.finish_and_clear();
    if let Err(e) = read {
        totals.unsent.push(format!("{e:#}"));
    }
    print_totals(&totals, started.elapsed());
    Ok(totals)
}

/// A file is fully answered: report it, and delete it if asked and clean.
fn finish_file(
    args: &PushArgs,
    source: &Source,
    f: &FileState,
    totals: &mut Totals,
    bar: &ProgressBar,
) {
    let name = source.name();
    let verdict = if f.failed {
        "not all sent"
    } else if f.rejected > 0 {
        "sent, with refused lines"
    } else {
        "sent"
    };
    if !matches!(args.progress, Progress::Quiet) && bar.is_hidden() {
        eprintln!("{name}: {verdict}");
    }
    if let (true, Source::File { path, .. }) = (args.delete_after, source) {
        if f.failed {
            return;
        }
        if f.rejected > 0 {
            totals.kept.push(path.clone());
        } else if let Err(e) = std::fs::remove_file(path) {
            bar.suspend(|| eprintln!("{name}: sent, but not deleted: {e}"));
        } else {
            totals.deleted.push(path.clone());
        }
    }
}

fn progress_bar(args: &PushArgs, sources: &[Source], total_bytes: u64) -> ProgressBar {
    let show = match args.progress {
        Progress::Auto => std::io::stderr().is_terminal(),
        Progress::Bar => true,
        Progress::Lines | Progress::Quiet => false,
    };
    if !show {
        return ProgressBar::hidden();
    }
    let unknown = sources.iter().any(|s| s.size().is_none());
    let bar = ProgressBar::with_draw_target(
        (!unknown).then_some(total_bytes),
        ProgressDrawTarget::stderr(),
    );
    let style = if unknown {
        ProgressStyle::with_template("{spinner} {bytes} sent, {binary_bytes_per_sec} {elapsed}")
    } else {
        ProgressStyle::with_template(
            "{wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
    };
    bar.set_style(style.unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar
}

fn print_totals(t: &Totals, elapsed: Duration) {
    let readings = t.accepted + t.duplicates;
    eprintln!(
        "{} accepted, {} duplicates, {} rejected in {:.1} s ({:.0} readings/s)",
        t.accepted,
        t.duplicates,
        t.rejected,
        elapsed.as_secs_f64(),
        readings as f64 / elapsed.as_secs_f64().max(1e-3)
    );
    if t.rejected > 0 {
        eprintln!("refused lines (first {}):", t.errors.len());
        for e in &t.errors {
            eprintln!("  {e}");
        }
    }
    for k in &t.kept {
        eprintln!("kept {} (it has refused lines)", k.display());
    }
    for u in &t.unsent {
        eprintln!("not sent: {u}");
    }
}
