//! Background jobs of `milepost serve`: daily dumps and, after them, retention, on
//! a schedule; compaction of finished days; step detection after commits
//! ([`detection`]) and the webhooks of what it finds ([`notify`]); handing the
//! allocator's free memory and idle code pages back to the kernel
//! ([`trim_memory_periodically`]).
//!
//! tokio-cron-scheduler only rings the bell (`--dump-schedule`, UTC); one task does
//! the work, so runs never overlap and a ring during a run just means "once more
//! when done". A run also starts with the server: days missed while it was down are
//! caught up without waiting for the next 06:00.

pub mod detection;
pub mod notify;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::export::Dumper;
use crate::metrics::Metrics;
use crate::store::WriterHandle;

/// The dump schedule, started.
pub struct DumpJobs {
    scheduler: JobScheduler,
    task: JoinHandle<()>,
}

/// What runs after each dump.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Readings of days older than this many days may go once dumped.
    pub days: u32,
}

impl DumpJobs {
    /// Validates `schedule` (cron with seconds), then starts the scheduler and the
    /// dump task, which stops when `stop` is cancelled.
    pub async fn start(
        schedule: &str,
        dumper: Arc<Dumper>,
        writer: WriterHandle,
        retention: Option<Retention>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let bell = Arc::new(Notify::new());
        let ring = bell.clone();
        let job = Job::new_async(schedule, move |_, _| {
            let ring = ring.clone();
            Box::pin(async move { ring.notify_one() })
        })
        .with_context(|| {
            format!(
                "--dump-schedule '{schedule}' is not a cron schedule with seconds \
                 (e.g. '0 0 6 * * *' for 06:00 UTC daily), nor 'off'"
            )
        })?;
        let scheduler = JobScheduler::new()
            .await
            .context("starting the job scheduler")?;
        scheduler.add(job).await.context("scheduling dumps")?;
        scheduler
            .start()
            .await
            .context("starting the job scheduler")?;
        bell.notify_one(); // catch up at start
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = bell.notified() => {}
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = run_once(&dumper, &writer, retention, &metrics) => {}
                }
            }
        });
        Ok(Self { scheduler, task })
    }

    /// Stops the scheduler and waits for the dump task (which stops at once when
    /// the token given to [`DumpJobs::start`] was cancelled).
    pub async fn stop(mut self) {
        self.scheduler.shutdown().await.ok();
        self.task.await.ok();
    }
}

/// One run: due dumps, then retention of what they made safe.
pub async fn run_once(
    dumper: &Dumper,
    writer: &WriterHandle,
    retention: Option<Retention>,
    metrics: &Metrics,
) {
    let today = chrono::Utc::now().date_naive();
    if let Err(e) = dumper.run_due(today).await {
        tracing::error!(error = %e, "dump run failed; retried next run");
        metrics.dumps_failed.inc();
        return;
    }
    let Some(r) = retention else {
        return;
    };
    let cutoff = today - chrono::Days::new(u64::from(r.days));
    let days = match dumper.retirable(cutoff).await {
        Ok(days) if days.is_empty() => return,
        Ok(days) => days,
        Err(e) => {
            tracing::error!(error = %e, "retention: finding dumped days failed");
            return;
        }
    };
    match writer.retire(days).await {
        Ok(done) => {
            metrics.retention_deleted_readings.inc_by(done.readings);
            tracing::info!(
                days = done.days.len(),
                readings = done.readings,
                "retention done, series statistics included"
            );
            for day in done.changed {
                tracing::info!(%day, "retention kept a day that received readings after its dump");
            }
        }
        Err(e) => tracing::error!(error = %e, "retention failed"),
    }
}

/// Asks the writer to compact finished days every `every`, and `settle` after a
/// burst of writes into finished days has ended (an import of history or a device's
/// offline backlog: their days get the fast, sorted layout within a minute instead of
/// at the next tick), until `stop`.
pub async fn compact_periodically(
    writer: WriterHandle,
    every: std::time::Duration,
    settle: std::time::Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: leave start-up alone
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            _ = writer.wrote_past_days() => {
                // Wait until such writes pause for `settle`, so an import is not
                // interrupted day by day; a steady trickle still gets the tick.
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(settle) => break,
                        _ = tick.tick() => break,
                        _ = writer.wrote_past_days() => continue,
                    }
                }
            }
        }
        // One day per writer turn, so ingest keeps flowing in between.
        loop {
            match writer.compact().await {
                Ok(done) if done.days > 0 && !stop.is_cancelled() => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, "compaction failed");
                    break;
                }
            }
        }
    }
}

/// glibc malloc's mmap threshold, fixed by [`configure_malloc`]: allocations of at
/// least this many bytes are mappings of their own, given back to the kernel when
/// freed.
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Free memory at the top of a malloc heap beyond which `free` gives it back at
/// once. Fixing the mmap threshold fixes this one too, at 128 KiB, and then the
/// writer's and the API's per-request buffers made a heap shrink and grow again
/// (page faults) with every large request; the periodic `malloc_trim` gives back
/// what stays free.
const TRIM_THRESHOLD: usize = 1 << 20;

/// Fixes glibc malloc's mmap threshold at [`MMAP_THRESHOLD`] (its initial value,
/// which glibc otherwise raises to the largest block freed so far, up to 32 MiB),
/// and its trim threshold at [`TRIM_THRESHOLD`].
///
/// Why: DuckDB's buffers are blocks of 128 KiB (256 KiB in files made before
/// session 31), allocated and freed all the time; both are at or over the fixed
/// threshold (with malloc's header), so they stay mappings of their own. Once
/// the threshold had risen above them they came from malloc's arenas, where
/// the holes they left filled with small long-lived allocations and the next blocks
/// grew the arenas. Measured (docs/performance.md, session 28, alternated with the
/// build before): a burst of a million new devices at the small VM's settings
/// peaked at 247–248 MiB against 280–281; 100,000 devices streaming with the
/// default budgets at 239–241 against 253–256; a bulk load's ingest at 97–102
/// against 104–109 (10 M readings). Fresh mappings cost page faults: the request
/// bodies' read buffers are reused for that (`api::ingest`), and a streamed export
/// of readings still runs 5–10 % slower (DuckDB's sort buffers). The live fleet's
/// rate did not change.
pub fn configure_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of the allocator, under its own lock.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as i32);
        nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as i32);
    }
}

/// How often [`trim_memory_periodically`] runs.
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Hands the memory glibc's malloc holds free back to the kernel every `every`, until
/// `stop`, and unmaps the code pages that ran since ([`release_code_pages`]);
/// `release` first drops what upper layers keep for reuse (the API's body buffers).
///
/// glibc returns freed memory only from the top of a heap; what is freed below stays
/// in the process. With 100,000 devices streaming (small-VM settings: 64 MB for
/// DuckDB, 40 MiB of budgets), the arenas held 40–65 MiB free and RSS drifted from
/// ~185 to 210–226 MiB within minutes; with `malloc_trim(0)` every 10 s (~0.7 ms
/// each) RSS stayed at 182–186 MiB. Elsewhere this does nothing.
pub async fn trim_memory_periodically(
    every: std::time::Duration,
    release: fn(),
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let _ = tokio::task::spawn_blocking(move || {
            release();
            trim_memory();
        })
        .await;
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_memory() {
    let _span = tracing::trace_span!("malloc_trim").entered();
    // SAFETY: malloc_trim has no preconditions; it takes the arenas' own locks.
    unsafe {
        nix::libc::malloc_trim(0);
    }
    release_code_pages();
}

/// Unmaps the binary's code and read-only data pages from the process
/// (`MADV_DONTNEED` on its read-only mappings that hold no page of their own), so
/// that resident memory counts what is in use rather than all that ever ran:
/// DuckDB's start-up registers thousands of functions, and an idle server held 39
/// MiB of its 71 MiB in code and 9 in read-only data (32 MiB in all after this).
/// The pages stay in the page cache; the next access to one is a minor fault.
/// A mapping with anonymous pages (the relocated data that is read-only after
/// start-up) is left alone: dropping those would lose the relocations. Measured:
/// peak RSS with 100,000 devices streaming 250–274 against 272–286 MiB, 2,000
/// devices 122–124 against 130–131, the same rates (docs/performance.md, session
/// 27).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_code_pages() {
    // Found once: the executable's mappings and which of them the loader wrote
    // (relocated data) do not change after start-up, and reading `smaps` takes
    // ~1.6 ms under load.
    static RANGES: std::sync::OnceLock<Vec<(usize, usize)>> = std::sync::OnceLock::new();
    let ranges = RANGES.get_or_init(|| {
        let exe = std::fs::read_link("/proc/self/exe");
        let smaps = std::fs::read_to_string("/proc/self/smaps");
        match (exe, smaps) {
            (Ok(exe), Ok(smaps)) => clean_read_only_mappings(&smaps, &exe.to_string_lossy()),
            _ => Vec::new(),
        }
    });
    for &(start, end) in ranges {
        // SAFETY: the range is a whole read-only mapping of this process's
        // executable without a page of its own: dropping its pages loses nothing
        // (they are read back from the file on the next access), and nothing can
        // write to it meanwhile.
        unsafe {
            nix::libc::madvise(start as *mut _, end - start, nix::libc::MADV_DONTNEED);
        }
    }
}

/// The address ranges of `path`'s private read-only mappings (`r-xp`, `r--p`)
/// whose pages all come from the file (`Anonymous: 0 kB`), from `/proc/PID/smaps`.
fn clean_read_only_mappings(smaps: &str, path: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let is_header = fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'));
        if is_header {
            current = None;
            let read_only = matches!(fields.get(1), Some(&("r-xp" | "r--p")));
            if read_only && fields.get(5) == Some(&path) {
                current = fields[0].split_once('-').and_then(|(a, b)| {
                    Some((
                        usize::from_str_radix(a, 16).ok()?,
                        usize::from_str_radix(b, 16).ok()?,
                    ))
                });
            }
        } else if fields.first() == Some(&"Anonymous:")
            && let Some(range) = current.take()
            && fields.get(1) == Some(&"0")
        {
            out.push(range);
        }
    }
    out
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_memory() {}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// KiB of this process's executable's `r-xp` mappings that are resident.
    fn code_resident_kib() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_string_lossy().into_owned();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_code = false;
        let mut kib = 0;
        for line in smaps.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields
                .first()
                .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
            {
                in_code = fields.get(1) == Some(&"r-xp") && fields.get(5) == Some(&exe.as_str());
            } else if in_code && fields.first() == Some(&"Rss:") {
                kib += fields[1].parse::<u64>().unwrap();
            }
        }
        kib
    }

    #[test]
    fn only_clean_read_only_mappings_of_the_binary_are_released() {
        let smaps = "\
55d0a0000000-55d0a1400000 r--p 00000000 fd:01 42 /usr/bin/milepost
Size:              20480 kB
Anonymous:             0 kB
55d0a1400000-55d0a5400000 r-xp 01400000 fd:01 42 /usr/bin/milepost
Size:              65536 kB
Anonymous:             0 kB
55d0a5400000-55d0a5600000 r--p 05400000 fd:01 42 /usr/bin/milepost
Size:               2048 kB
Anonymous:          2048 kB
55d0a5600000-55d0a5700000 rw-p 05600000 fd:01 42 /usr/bin/milepost
Anonymous:             4 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:01 7 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
";
        assert_eq!(
            super::clean_read_only_mappings(smaps, "/usr/bin/milepost"),
            [
                (0x55d0a0000000, 0x55d0a1400000),
                (0x55d0a1400000, 0x55d0a5400000)
            ]
        );
    }

    #[test]
    fn code_pages_are_released_and_still_run() {
        let before = code_resident_kib();
        assert!(before > 0, "no resident code found");
        super::release_code_pages();
        let after = code_resident_kib();
        assert!(
            after < before / 2,
            "{before} KiB resident before, {after} after"
        );
        // The code runs on: every page it needs is read back.
        assert!(code_resident_kib() > 0);
        assert_eq!(format!("{}", 6 * 7), "42");
    }
}
