use std::path::Path;

use milepost::app::Server;
use milepost::config::ServeArgs;
use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;

/// Key every test app accepts.
pub const KEY: &str = "test-key";
/// Key bound to device `truck`.
pub const TRUCK_KEY: &str = "truck-key";

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub dir: TempDir,
    server: Option<Server>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(configure: impl FnOnce(&mut ServeArgs)) -> Self {
        Self::spawn_in(tempfile::tempdir().unwrap(), configure).await
    }

    pub async fn spawn_in(dir: TempDir, configure: impl FnOnce(&mut ServeArgs)) -> Self {
        if std::env::var_os("MILEPOST_TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_env("MILEPOST_TEST_LOG"))
                .with_test_writer()
                .try_init();
        }
        let mut args = ServeArgs::for_tests(dir.path().to_owned());
        args.api_keys = vec![KEY.into(), format!("{TRUCK_KEY}@truck")];
        configure(&mut args);
        let server = Server::start(args).await.expect("server starts");
        Self {
            base: format!("http://{}", server.local_addr()),
            client: reqwest::Client::new(),
            dir,
            server: Some(server),
        }
    }

    /// Stops the server gracefully and starts a new one on the same data directory.
    pub async fn restart(self) -> Self {
        self.restart_with(|_| {}).await
    }

    /// [`Self::restart`] with settings changed as `configure` says.
    pub async fn restart_with(mut self, configure: impl FnOnce(&mut ServeArgs)) -> Self {
        self.server
            .take()
            .unwrap()
            .stop()
            .await
            .expect("clean stop");
        Self::spawn_in(self.dir, configure).await
    }

    /// Stops the server and returns the data directory.
    pub async fn stop(mut self) -> TempDir {
        self.server
            .take()
            .unwrap()
            .stop()
            .await
            .expect("clean stop");
        self.dir
    }

    /// A channel to the server's internal gRPC backend.
    pub fn backend_channel(&self) -> tonic::transport::Channel {
        let addr = self.server().backend_addr().expect("backend runs");
        milepost::backend::client::channel(&format!("http://{addr}")).unwrap()
    }

    /// A new backend token of role admin.
    pub fn admin_token(&self) -> String {
        milepost::backend::TokenAdmin::new(self.dir.path())
            .create(milepost::backend::Role::Admin, "root")
            .unwrap()
            .0
    }

    /// The running server.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn ingest(&self, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        self.ingest_as(KEY, body).await
    }

    pub async fn ingest_as(
        &self,
        key: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let resp = self
            .client
            .post(self.url("/ingest"))
            .basic_auth(key, None::<&str>)
            .header("content-type", "application/stream+json")
            .body(body)
            .send()
            .await
            .unwrap();
        json(resp).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        json(self.client.get(self.url(path)).send().await.unwrap()).await
    }

    /// `GET path`: the response (headers, body not read yet).
    pub async fn get_response(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// `GET path`: status and body bytes.
    pub async fn get_bytes(&self, path: &str) -> (StatusCode, Vec<u8>) {
        let resp = self.get_response(path).await;
        (resp.status(), resp.bytes().await.unwrap().to_vec())
    }

    /// `GET path`: status and body text.
    pub async fn get_text(&self, path: &str) -> (StatusCode, String) {
        let (status, body) = self.get_bytes(path).await;
        (status, String::from_utf8(body).unwrap())
    }
}

/// The whole seconds of a response's `Retry-After` header (it must have one).
pub fn retry_after(resp: &reqwest::Response) -> u64 {
    resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

pub async fn json(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("not JSON ({e}), status {status}: {text}"));
    (status, value)
}

/// One NDJSON line.
pub fn line(sensor: &str, value: f64, ts: &str) -> String {
    format!(r#"{{"sensor":"{sensor}","value":{value},"timestamp":"{ts}"}}"#)
}

/// One NDJSON line with a device.
pub fn dline(device: &str, sensor: &str, value: f64, ts: &str) -> String {
    format!(r#"{{"sensor":"{sensor}","value":{value},"timestamp":"{ts}","device":"{device}"}}"#)
}

/// Rows in the database file, per device name, read directly after the server stopped.
pub fn stored_rows(dir: &Path) -> Vec<(String, String, i64, f64)> {
    let conn = duckdb::Connection::open(dir.join("milepost.duckdb")).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT d.name, s.name, r.ts_ms * 1000 + r.ts_us, r.value FROM readings r
             JOIN devices d ON d.id = r.device_id JOIN sensors s ON s.id = r.sensor_id
             ORDER BY 1, 2, 3",
        )
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

pub fn num(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

/// Microseconds since the epoch of an RFC 3339 timestamp.
pub fn micros(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap()
        .timestamp_micros()
}

/// `POST /ingest` from a client of the test's own (a separate process's server, or
/// a connection of its own), with the test key.
pub async fn post_ingest(
    client: &reqwest::Client,
    base: &str,
    body: String,
) -> reqwest::Result<(StatusCode, Value)> {
    let r = client
        .post(format!("{base}/ingest"))
        .basic_auth(KEY, None::<&str>)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await?;
    let status = r.status();
    Ok((status, r.json().await?))
}

/// The entry of sensor `name` in a `/api/v1/sensors` answer.
pub fn sensor_entry(v: &Value, name: &str) -> Value {
    v["sensors"]
        .as_array()
        .unwrap_or_else(|| panic!("no sensors in {v}"))
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {v}"))
        .clone()
}

/// `GET url` as JSON, from a client of the test's own.
pub async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// `GET url` as text, from a client of the test's own.
pub async fn get_text_from(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// Readings counted over every bucket of a statistics answer.
pub fn bucket_count_sum(stats: &Value) -> u64 {
    stats["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| num(b, "count"))
        .sum()
}

/// `milepost serve` of the real binary on ephemeral ports with `data_dir`, dumps off;
/// callers add flags and run it.
pub fn serve_command(data_dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_milepost"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--backend-addr",
        "127.0.0.1:0",
    ])
    .args(["--dump-schedule", "off"])
    .arg("--data-dir")
    .arg(data_dir)
    .env_remove("MILEPOST_API_KEY");
    cmd
}

/// Starts `cmd` (a [`serve_command`] with `--log-format json`), its log in `log`;
/// returns the process (killed when dropped) and its public base URL once it listens.
pub fn spawn_logged(cmd: &mut std::process::Command, log: &Path) -> (Proc, String) {
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let base = format!(
        "http://{}",
        listening_addr(&wait_for_log(log, "public HTTP API listening"))
    );
    (proc, base)
}

/// The built-in sensors of six a car sends.
pub const SIX_SENSORS: [&str; 6] = [
    "speed",
    "fuel",
    "revolution",
    "engine_temperature",
    "location_latitude",
    "location_longitude",
];

/// Sends `sig` (e.g. `-TERM`, `-HUP`) to process `pid` with kill(1).
pub fn send_signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Running a command that is expected to exit (an offline command, or a `serve` that
/// must refuse to start), bounded: [`std::process::Command::output`] would turn an
/// unexpected successful start into a test run that never ends (CI once spent its whole
/// budget on one).
pub trait OutputWithin {
    /// Like `output()`, but a process still running after [`EXIT_LIMIT`] is killed and
    /// the test fails with what it printed.
    fn output_within_limit(&mut self) -> std::process::Output;
}

/// How long an offline command or a refused start may take in the tests: seconds
/// normally, far more than enough on a loaded CI machine.
pub const EXIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

impl OutputWithin for std::process::Command {
    fn output_within_limit(&mut self) -> std::process::Output {
        use std::io::Read as _;
        use std::process::Stdio;
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {self:?}: {e}"));
        let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                buf
            })
        };
        let stdout = drain(Box::new(child.stdout.take().expect("piped")));
        let stderr = drain(Box::new(child.stderr.take().expect("piped")));
        let deadline = std::time::Instant::now() + EXIT_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for the child") {
                break Some(status);
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
        let Some(status) = status else {
            panic!(
                "{self:?} was still running after {EXIT_LIMIT:?} and was killed; it printed:\n{}{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        };
        std::process::Output {
            status,
            stdout,
            stderr,
        }
    }
}

/// Held by the tests whose bounds are about time (latency guards) and by the ones
/// that load the machine most (the crash campaign), so that no two of them run at
/// once and a time bound measures the server, not the rest of the suite.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    // Not poisoned by a test that failed while holding it; fine across the tests'
    // separate runtimes.
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A child process killed when dropped (a test that fails must not leave a server).
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// Waits until the log file has a line containing `needle`; returns the log.
pub fn wait_for_log(log: &Path, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no '{needle}' in the log:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The address a `serve --log-format json` log announced for the public API.
pub fn listening_addr(log: &str) -> String {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "public HTTP API listening")
        .and_then(|v| v["fields"]["addr"].as_str().map(str::to_owned))
        .expect("the log announces the address")
}
