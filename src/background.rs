//! Background work on a thread of its own at a low CPU priority.
//!
//! On a small VM, dumps and step detection must not take the CPU from ingest: they
//! run on a thread at niceness 19 and get the time ingest leaves. DuckDB runs most
//! of a query on the calling thread, so this covers the bulk of their queries.
//! Measured on 2 cores: ingest ran 41 % slower while a day was dumped at the default
//! priority, 3 % at niceness 19 (`milepost bench --dump`).

/// Niceness of background threads.
pub const NICENESS: i32 = 19;

/// Runs `f` on a new thread named `name` at [`NICENESS`], inside the current
/// tracing span; `None` if the thread could not start or panicked.
pub async fn run<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let span = tracing::Span::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _enter = span.enter();
            // On Linux a thread is a task: `who = 0` means this thread only.
            // SAFETY: setpriority has no memory-safety preconditions.
            let r = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, NICENESS) };
            if r != 0 {
                tracing::debug!("could not lower the background thread's priority");
            }
            let _ = tx.send(f());
        });
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot start a background thread");
        return None;
    }
    rx.await.ok()
}
