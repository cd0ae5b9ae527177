//! A `milepost serve` child process on 127.0.0.1:0, for the benchmark and for tests
//! that need a real process (signals, crashes, peak RSS).

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

use anyhow::{Context as _, bail};

/// A running `milepost serve`.
pub struct ServerProcess {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The internal gRPC backend's `127.0.0.1:PORT`, when it runs.
    pub backend: Option<String>,
}

impl ServerProcess {
    /// Starts `exe serve` on an ephemeral port with `data_dir` and `extra` flags, and
    /// waits until it listens (it reads the address from the JSON log). With `echo`,
    /// the server's log is copied to stderr; otherwise it is drained silently.
    pub fn start(exe: &Path, data_dir: &Path, extra: &[&str], echo: bool) -> anyhow::Result<Self> {
        Self::start_with_env(exe, data_dir, extra, &[], echo)
    }

    /// [`Self::start`] with extra environment variables (credentials of a blob store).
    pub fn start_with_env(
        exe: &Path,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        echo: bool,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .arg("--log")
            .arg(server_log())
            // Many servers may run at once (tests): the backend on a free port too.
            .args(["--backend-addr", "127.0.0.1:0"])
            .args(extra)
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("MILEPOST_API_KEY")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting milepost serve")?;
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let mut backend = None;
        let addr = loop {
            let Some(line) = lines.next() else {
                bail!("milepost serve exited before listening");
            };
            let line = line?;
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["fields"]["message"] == "internal gRPC backend listening" {
                backend = v["fields"]["addr"].as_str().map(str::to_owned);
            }
            if v["fields"]["message"] == "public HTTP API listening" {
                break v["fields"]["addr"].as_str().unwrap_or_default().to_owned();
            }
            if echo {
                eprintln!("server: {line}");
            }
        };
        // Keep draining the log so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if echo {
                    eprintln!("server: {line}");
                }
            }
        });
        Ok(Self {
            child,
            base: format!("http://{addr}"),
            backend,
        })
    }

    /// Peak resident set size so far (VmHWM), MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.status_mib("VmHWM:")
    }

    /// Resident set size now (VmRSS), MiB.
    pub fn rss_mib(&self) -> f64 {
        self.status_mib("VmRSS:")
    }

    /// A `kB` field of `/proc/PID/status` in MiB (0 when unreadable).
    fn status_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// CPU time the process has used so far (user + system), seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(&self.child.id().to_string())
    }

    /// Starts [`Self::peak_rss_mib`] over from the current resident size, so a phase
    /// can be measured on its own.
    pub fn reset_peak_rss(&self) -> anyhow::Result<()> {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5")
            .context("resetting the peak RSS (/proc/PID/clear_refs)")
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(mut self) -> anyhow::Result<ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(self.child.wait()?)
    }
}

impl Drop for ServerProcess {
    /// A server still running when its handle goes (a failed benchmark or test) is
    /// killed: it must not outlive whoever started it.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The benchmarked server's log filter: what the bench needs from it (where it
/// listens), or `MILEPOST_BENCH_SERVER_LOG` added to that, to look inside a run (for
/// example `milepost::store::writer=debug`: every commit and flush with its time).
fn server_log() -> String {
    let base = "warn,milepost::app=info,milepost::backend=info";
    match std::env::var("MILEPOST_BENCH_SERVER_LOG") {
        Ok(extra) if !extra.is_empty() => format!("{base},{extra}"),
        _ => base.to_owned(),
    }
}

/// CPU time (user + system, seconds) used so far by process `pid` (`self`: this one),
/// from `/proc/PID/stat`; 0 when unreadable.
pub fn cpu_seconds_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), 1-based from 3:
    // utime is field 14, stime 15, in clock ticks.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    // USER_HZ: /proc reports 100 ticks a second whatever the kernel's own HZ.
    (ticks(14).unwrap_or(0.0) + ticks(15).unwrap_or(0.0)) / 100.0
}
