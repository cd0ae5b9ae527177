//! Crash campaign: a real `milepost serve` under mixed load is SIGKILLed again and
//! again, and after every restart must hold exactly what it acknowledged.
//!
//! The load is what the field sends at once: one device's backlog in big requests
//! (three sensors of two devices, days in the past, so compaction and dumps have work),
//! two live devices in small requests, re-sent requests (the seed replays its offline
//! buffer), conflicting re-sends of stored readings, and bad lines among good ones.
//! Every client keeps a ledger of what it sent and what the server acknowledged.
//!
//! Kills land at random moments and right after the server logs (at debug) that it
//! starts a group commit, a compaction of a finished day, a rollup consolidation or a
//! dump; the server's log then tells whether the kill landed before that step was done.
//! After every restart: every acknowledged reading is served with the value first
//! sent for it, nothing that was never sent and nothing twice, the statistics (from
//! rollups) equal what the raw readings give, `/api/v1/devices` and `/api/status`
//! agree with the raw readings, and every dump the manifest lists has its size and
//! hash. The last cycle stops with SIGTERM under the same load. Then a replay of
//! everything ever sent must be all duplicates but for sent readings that were never
//! acknowledged and not stored, and the stopped database is checked directly: rows
//! and every rollup slot.
//!
//! `crash_campaign` runs 20 cycles in the normal suite; `crash_campaign_long` (ignored)
//! runs `MILEPOST_CRASH_CYCLES` (default 300). `MILEPOST_CRASH_SEED` repeats a run's
//! random choices (the timing of a real process is never exactly the same).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use chrono::SecondsFormat;
use reqwest::StatusCode;
use serde_json::Value;
use sha2::Digest as _;

use crate::helpers::*;

const DEVICES: [&str; 2] = ["car", "van"];
const SENSORS: [&str; 3] = ["speed", "fuel", "revolution"];
const DAY_US: i64 = 86_400_000_000;

/// A reading's identity: device index, sensor index, timestamp in microseconds.
type Key = (u8, u8, i64);

/// The value every first send of `k` carries. Multiples of 1/8 below 10^5: sums of
/// millions of them are exact, so rollups must match raw readings bit for bit.
fn value_of(k: Key) -> f64 {
    ((k.2 / 1_000) % 100_000) as f64 + f64::from(k.0) * 0.5 + f64::from(k.1) * 0.125
}

/// A value a conflicting re-send carries: never the stored one.
fn conflicting(k: Key) -> f64 {
    value_of(k) + 1_000_000.0
}

fn rfc3339(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn today_start_us() -> i64 {
    let now = chrono::Utc::now().timestamp_micros();
    now - now.rem_euclid(DAY_US)
}

/// One request body and the readings its good lines carry.
#[derive(Clone)]
struct Req {
    good: Vec<(Key, f64)>,
    bad: usize,
    body: String,
}

impl Req {
    /// Lines of `good`, with `bad` broken lines of assorted kinds at random places.
    fn new(good: Vec<(Key, f64)>, bad: usize, rng: &mut fastrand::Rng) -> Self {
        const BROKEN: [&str; 5] = [
            "{not json",
            r#"{"sensor":"warp","value":1,"timestamp":"2026-01-01T00:00:00Z","device":"car"}"#,
            r#"{"sensor":"speed","value":"fast","timestamp":"2026-01-01T00:00:00Z","device":"car"}"#,
            r#"{"sensor":"fuel","value":3,"device":"van"}"#,
            r#"{"sensor":"speed","value":1,"timestamp":"yesterday","device":"car"}"#,
        ];
        let mut lines: Vec<String> = good
            .iter()
            .map(|&((d, s, ts), v)| {
                dline(DEVICES[d as usize], SENSORS[s as usize], v, &rfc3339(ts))
            })
            .collect();
        for _ in 0..bad {
            let at = rng.usize(0..=lines.len());
            lines.insert(at, BROKEN[rng.usize(0..BROKEN.len())].to_owned());
        }
        let mut body = lines.join("\n");
        body.push('\n');
        Self { good, bad, body }
    }

    /// The good lines once more, unchanged: a replay.
    fn replay(&self) -> Self {
        self.clone()
    }
}

/// What the clients sent and what the server acknowledged, and anything it answered
/// that it must not have.
#[derive(Default)]
struct Ledger {
    sent: HashSet<Key>,
    acked: HashSet<Key>,
    requests_acked: u64,
    replays_acked: u64,
    conflicts_acked: u64,
    bad_lines_refused: u64,
    busy: u64,
    violations: Vec<String>,
}

enum Outcome {
    Acked,
    NotAcked,
    Down,
}

/// Sends `req`, checks the answer against the ledger and records it.
async fn send(client: &reqwest::Client, base: &str, req: &Req, ledger: &Mutex<Ledger>) -> Outcome {
    let distinct: HashSet<Key> = req.good.iter().map(|(k, _)| *k).collect();
    let known = {
        let mut l = ledger.lock().unwrap();
        l.sent.extend(distinct.iter().copied());
        distinct.iter().filter(|k| l.acked.contains(k)).count()
    };
    let resp = client
        .post(format!("{base}/ingest"))
        .basic_auth(KEY, None::<&str>)
        .header("content-type", "application/x-ndjson")
        .body(req.body.clone())
        .send()
        .await;
    let Ok(resp) = resp else {
        return Outcome::Down;
    };
    let status = resp.status();
    let Ok(text) = resp.text().await else {
        return Outcome::Down;
    };
    let mut l = ledger.lock().unwrap();
    match status {
        // 400 when some lines were refused: the others are stored all the same.
        StatusCode::OK | StatusCode::BAD_REQUEST
            if (status == StatusCode::OK) == (req.bad == 0) =>
        {
            let v: Value = serde_json::from_str(&text).unwrap_or_default();
            let (accepted, duplicates, rejected) = (
                num(&v, "accepted"),
                num(&v, "duplicates"),
                num(&v, "rejected"),
            );
            if accepted + duplicates != req.good.len() as u64
                || rejected != req.bad as u64
                || accepted > (distinct.len() - known) as u64
            {
                l.violations.push(format!(
                    "{} good lines ({} distinct, {known} acknowledged before), {} bad: {text}",
                    req.good.len(),
                    distinct.len(),
                    req.bad
                ));
            }
            l.acked.extend(distinct);
            l.requests_acked += 1;
            l.bad_lines_refused += rejected;
            if known == req.good.len() && known > 0 {
                l.replays_acked += 1;
            }
            Outcome::Acked
        }
        // The writer's queue was full for `--queue-timeout`: retry later.
        StatusCode::SERVICE_UNAVAILABLE => {
            l.busy += 1;
            Outcome::NotAcked
        }
        other => {
            l.violations.push(format!("{other}: {text}"));
            Outcome::NotAcked
        }
    }
}

/// The backlog device: big requests of both devices' past readings, oldest first; an
/// unacknowledged request is sent again first (the seed's offline buffer); now and
/// then an acknowledged request again, or stored readings with other values.
struct Backlog {
    rng: fastrand::Rng,
    /// Index of the next timestamp; 20 s apart from `start`, wrapping around with a
    /// one-second offset before today.
    next: i64,
    start_us: i64,
    pending: Option<Req>,
    history: Vec<Req>,
    /// Requests so far.
    n: u64,
}

impl Backlog {
    const PER_REQUEST: i64 = 500;
    const STEP_US: i64 = 20_000_000;

    fn new(seed: u64) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
            next: 0,
            start_us: today_start_us() - 4 * DAY_US,
            pending: None,
            history: Vec::new(),
            n: 0,
        }
    }

    fn fresh(&mut self) -> Req {
        let span = (today_start_us() - self.start_us) / Self::STEP_US;
        let mut good = Vec::new();
        for _ in 0..Self::PER_REQUEST {
            let (round, i) = (self.next / span, self.next % span);
            let ts = self.start_us + i * Self::STEP_US + round * 1_000_000;
            self.next += 1;
            for d in 0..2u8 {
                for s in 0..3u8 {
                    good.push(((d, s, ts), value_of((d, s, ts))));
                }
            }
        }
        let bad = self.rng.usize(0..3);
        Req::new(good, bad, &mut self.rng)
    }

    async fn run(&mut self, to: Target) {
        while !to.stopped() {
            self.n += 1;
            let n = self.n;
            let (req, kind) = if let Some(p) = self.pending.take() {
                (p, "pending")
            } else if n.is_multiple_of(4) && !self.history.is_empty() {
                let i = self.rng.usize(0..self.history.len());
                (self.history[i].replay(), "replay")
            } else if n.is_multiple_of(7) && !self.history.is_empty() {
                let i = self.rng.usize(0..self.history.len());
                let mut good = self.history[i].good.clone();
                self.rng.shuffle(&mut good);
                good.truncate(200);
                let good = good.into_iter().map(|(k, _)| (k, conflicting(k))).collect();
                (Req::new(good, 0, &mut self.rng), "conflict")
            } else {
                (self.fresh(), "fresh")
            };
            match to.send(&req).await {
                Outcome::Acked => {
                    if kind == "conflict" {
                        to.ledger.lock().unwrap().conflicts_acked += 1;
                    }
                    if kind == "fresh" || kind == "pending" {
                        self.history.push(req);
                        if self.history.len() > 16 {
                            self.history.remove(0);
                        }
                    }
                }
                Outcome::NotAcked => {
                    if kind != "conflict" {
                        self.pending = Some(req);
                    }
                }
                Outcome::Down => {
                    if kind != "conflict" {
                        self.pending = Some(req);
                    }
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(self.rng.u64(100..300))).await;
        }
    }
}

/// A live device: a few readings of now every few tens of milliseconds; requests the
/// server did not acknowledge wait in an offline buffer and go first when it is back.
struct Live {
    rng: fastrand::Rng,
    device: u8,
    last_us: i64,
    buffer: Vec<Req>,
    previous: Option<Req>,
}

impl Live {
    fn new(device: u8, seed: u64) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
            device,
            last_us: 0,
            buffer: Vec::new(),
            previous: None,
        }
    }

    fn fresh(&mut self) -> Req {
        let mut good = Vec::new();
        for _ in 0..self.rng.usize(1..=6) {
            let now = chrono::Utc::now().timestamp_millis() * 1000;
            self.last_us = now.max(self.last_us + 1000);
            let k = (self.device, self.rng.u8(0..3), self.last_us);
            good.push((k, value_of(k)));
        }
        // Now and then the previous request again in the same body (a retry).
        if self.rng.u8(0..8) == 0
            && let Some(p) = &self.previous
        {
            good.extend(p.good.iter().copied());
        }
        let bad = usize::from(self.rng.u8(0..10) == 0);
        Req::new(good, bad, &mut self.rng)
    }

    async fn run(&mut self, to: Target) {
        while !to.stopped() {
            let req = if self.buffer.is_empty() {
                self.fresh()
            } else {
                self.buffer.remove(0)
            };
            match to.send(&req).await {
                Outcome::Acked => self.previous = Some(req),
                Outcome::NotAcked => self.buffer.push(req),
                Outcome::Down => {
                    self.buffer.insert(0, req);
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(self.rng.u64(5..40))).await;
        }
    }
}

/// A `milepost serve` whose log (JSON, debug for the store and dumps) the test reads.
struct Victim {
    child: Child,
    base: String,
    /// Messages logged since start, in order.
    log: mpsc::Receiver<String>,
    /// Log lines at level ERROR, and panics.
    errors: Arc<Mutex<Vec<String>>>,
}

impl Victim {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_milepost"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--backend-addr",
                "127.0.0.1:0",
            ])
            .args(["--api-key", KEY, "--log-format", "json"])
            .args([
                "--log",
                "warn,milepost::app=info,milepost::store=debug,milepost::export=debug",
            ])
            // Work for every step the campaign kills: compaction as soon as a past
            // day's writes pause, consolidation every few backlog requests, a dump
            // run every second, today's readings sorted by device every 100.
            .args(["--compact-interval", "300ms", "--compact-settle", "200ms"])
            .args(["--cluster-rows", "100"])
            .args([
                "--rollup-merge-rows",
                "200",
                "--dump-schedule",
                "* * * * * *",
            ])
            .arg("--data-dir")
            .arg(dir)
            .env_remove("MILEPOST_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("milepost serve starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        let (addr_tx, addr_rx) = mpsc::channel();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let errs = errors.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).unwrap_or_default();
                let message = v["fields"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if message == "public HTTP API listening" {
                    let _ =
                        addr_tx.send(v["fields"]["addr"].as_str().unwrap_or_default().to_owned());
                }
                if v["level"] == "ERROR" || line.contains("panicked") || v.is_null() {
                    errs.lock().unwrap().push(line.clone());
                }
                let _ = tx.send(message);
            }
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no listening line; log: {:?}", errors.lock().unwrap()));
        Self {
            child,
            base: format!("http://{addr}"),
            log,
            errors,
        }
    }

    /// SIGKILL, and the log lines the process wrote up to its death.
    fn kill(mut self) -> (Vec<String>, Vec<String>) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let rest: Vec<String> = self.log.iter().collect();
        let errors = self.errors.lock().unwrap().clone();
        (rest, errors)
    }

    /// SIGTERM; the exit status and the errors it logged.
    fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        send_signal(self.child.id(), "-TERM");
        let code = self.child.wait().unwrap();
        (code, self.errors.lock().unwrap().clone())
    }
}

/// A failing test must not leave its server running.
impl Drop for Victim {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Where a cycle's kill is aimed: the log line that starts the step, the one that
/// ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Aim {
    Random,
    GroupCommit,
    Compaction,
    Consolidation,
    Dump,
    Clustering,
}

impl Aim {
    const ALL: [Aim; 6] = [
        Aim::Random,
        Aim::GroupCommit,
        Aim::Compaction,
        Aim::Consolidation,
        Aim::Dump,
        Aim::Clustering,
    ];

    fn markers(self) -> Option<(&'static str, &'static str)> {
        match self {
            Aim::Random => None,
            Aim::GroupCommit => Some(("committing group", "committed")),
            Aim::Compaction => Some(("compacting day", "compacted finished days")),
            Aim::Consolidation => Some(("consolidating rollups", "consolidated rollups")),
            Aim::Dump => Some(("dumping day", "day dumped")),
            Aim::Clustering => Some((
                "sorting a chunk of today's readings by device",
                "sorted a chunk of today's readings by device",
            )),
        }
    }
}

/// Runs the load against `v`, kills it as `aim` says and returns whether the kill
/// landed inside the aimed step (`None`: random, or the step never started).
async fn cycle(
    v: Victim,
    aim: Aim,
    load: &Load,
    rng: &mut fastrand::Rng,
) -> (Option<bool>, Vec<String>) {
    let tasks = load.start(&v.base);
    tokio::time::sleep(Duration::from_millis(rng.u64(150..400))).await;
    let jitter = Duration::from_micros(rng.u64(0..3000));
    let random = Duration::from_millis(rng.u64(100..1500));
    let (inside, errors) = tokio::task::spawn_blocking(move || {
        let Some((begin, end)) = aim.markers() else {
            std::thread::sleep(random);
            return (None, v.kill().1);
        };
        // Drop what was logged so far; wait for the step to start.
        while v.log.try_recv().is_ok() {}
        let deadline = Instant::now() + Duration::from_secs(5);
        let started = loop {
            match v
                .log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(m) if m == begin => break true,
                Ok(_) => {}
                Err(_) => break false,
            }
        };
        if started {
            std::thread::sleep(jitter);
        }
        let (rest, errors) = v.kill();
        (started.then(|| !rest.iter().any(|m| m == end)), errors)
    })
    .await
    .unwrap();
    load.join(tasks).await;
    (inside, errors)
}

/// Where a client sends, what it records into, and when it stops.
#[derive(Clone)]
struct Target {
    client: reqwest::Client,
    base: String,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
}

impl Target {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    async fn send(&self, req: &Req) -> Outcome {
        send(&self.client, &self.base, req, &self.ledger).await
    }
}

/// The three clients, kept across cycles (their ledgers, buffers and cursors).
struct Load {
    client: reqwest::Client,
    ledger: Arc<Mutex<Ledger>>,
    backlog: Arc<tokio::sync::Mutex<Backlog>>,
    live: Vec<Arc<tokio::sync::Mutex<Live>>>,
    stop: Arc<AtomicBool>,
}

impl Load {
    fn new(seed: u64) -> Self {
        Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            ledger: Arc::default(),
            backlog: Arc::new(tokio::sync::Mutex::new(Backlog::new(seed))),
            live: (0..2u8)
                .map(|d| {
                    Arc::new(tokio::sync::Mutex::new(Live::new(
                        d,
                        seed + 1 + u64::from(d),
                    )))
                })
                .collect(),
            stop: Arc::default(),
        }
    }

    fn start(&self, base: &str) -> Vec<tokio::task::JoinHandle<()>> {
        self.stop.store(false, Ordering::Relaxed);
        let to = Target {
            client: self.client.clone(),
            base: base.to_owned(),
            ledger: self.ledger.clone(),
            stop: self.stop.clone(),
        };
        let backlog = self.backlog.clone();
        let t = to.clone();
        let mut tasks = vec![tokio::spawn(
            async move { backlog.lock().await.run(t).await },
        )];
        for live in &self.live {
            let (live, t) = (live.clone(), to.clone());
            tasks.push(tokio::spawn(async move { live.lock().await.run(t).await }));
        }
        tasks
    }

    fn known(&self) -> Known {
        let l = self.ledger.lock().unwrap();
        Known {
            sent: l.sent.clone(),
            acked: l.acked.clone(),
        }
    }

    async fn join(&self, tasks: Vec<tokio::task::JoinHandle<()>>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
    }
}

/// What the clients sent and had acknowledged, copied while they are stopped.
struct Known {
    sent: HashSet<Key>,
    acked: HashSet<Key>,
}

/// Every stored reading, read back through the API, checked against the ledger and
/// against the statistics, devices and status answers. Returns the stored readings.
async fn verify(client: &reqwest::Client, base: &str, ledger: &Known) -> BTreeMap<Key, f64> {
    let mut stored = BTreeMap::new();
    for (d, device) in DEVICES.iter().enumerate() {
        let mut series_total = 0u64;
        let (mut first, mut last) = (i64::MAX, i64::MIN);
        for (s, sensor) in SENSORS.iter().enumerate() {
            let url =
                format!("{base}/api/v1/sensors/{sensor}/readings?device={device}&format=ndjson");
            let resp = client.get(&url).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{url}");
            let text = resp.text().await.unwrap();
            let mut raw: Vec<(i64, f64)> = Vec::new();
            for line in text.lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                raw.push((
                    micros(v["timestamp"].as_str().unwrap()),
                    v["value"].as_f64().unwrap(),
                ));
            }
            for w in raw.windows(2) {
                assert!(
                    w[0].0 < w[1].0,
                    "{device}/{sensor} stored twice or out of order at {}",
                    rfc3339(w[1].0)
                );
            }
            for &(ts, value) in &raw {
                let k = (d as u8, s as u8, ts);
                assert!(
                    ledger.sent.contains(&k),
                    "{device}/{sensor} {} stored but never sent",
                    rfc3339(ts)
                );
                assert_eq!(
                    value,
                    value_of(k),
                    "{device}/{sensor} {}: not the first value sent",
                    rfc3339(ts)
                );
                stored.insert(k, value);
            }
            series_total += raw.len() as u64;
            if let (Some(a), Some(b)) = (raw.first(), raw.last()) {
                first = first.min(a.0);
                last = last.max(b.0);
            }
            check_statistics(client, base, device, sensor, &raw).await;
        }
        // /api/v1/devices and /api/status describe the same readings.
        let (_, devices) = json(
            client
                .get(format!("{base}/api/v1/devices"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        let listed = devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["device"] == *device);
        if series_total == 0 {
            assert!(listed.is_none_or(|v| v["readings"] == 0), "{devices}");
            continue;
        }
        let listed = listed.unwrap_or_else(|| panic!("{device} missing: {devices}"));
        assert_eq!(num(listed, "readings"), series_total, "{devices}");
        assert_eq!(
            micros(listed["first"].as_str().unwrap()),
            first,
            "{devices}"
        );
        assert_eq!(micros(listed["last"].as_str().unwrap()), last, "{devices}");
        let (_, status) = json(
            client
                .get(format!("{base}/api/status?device={device}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            micros(status["lastIngestTimestamp"].as_str().unwrap()),
            last,
            "{status}"
        );
    }
    let missing: Vec<_> = ledger
        .acked
        .iter()
        .filter(|k| !stored.contains_key(k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged readings lost (of {} acknowledged, first few): {missing:?}",
        ledger.acked.len()
    );
    stored
}

/// Daily statistics (whole days: served from the rollups, plus the raw readings of
/// today's live slots) equal what the raw readings of `raw` give.
async fn check_statistics(
    client: &reqwest::Client,
    base: &str,
    device: &str,
    sensor: &str,
    raw: &[(i64, f64)],
) {
    let from = today_start_us() - 6 * DAY_US;
    let to = today_start_us() + 2 * DAY_US;
    let url = format!(
        "{base}/api/v1/sensors/{sensor}/statistics?device={device}&bucket=1d&from={}&to={}",
        rfc3339(from),
        rfc3339(to)
    );
    let (status, stats) = json(client.get(&url).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    for b in stats["buckets"].as_array().unwrap() {
        let start = micros(b["start"].as_str().unwrap());
        let day: Vec<f64> = raw
            .iter()
            .filter(|(ts, _)| (start..start + DAY_US).contains(ts))
            .map(|(_, v)| *v)
            .collect();
        let what = format!("{device}/{sensor} {}: {b}", rfc3339(start));
        assert_eq!(num(b, "count"), day.len() as u64, "{what}");
        if day.is_empty() {
            continue;
        }
        let min = day.iter().copied().fold(f64::INFINITY, f64::min);
        let max = day.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let avg = day.iter().sum::<f64>() / day.len() as f64;
        assert_eq!(b["min"].as_f64(), Some(min), "{what}");
        assert_eq!(b["max"].as_f64(), Some(max), "{what}");
        assert_eq!(b["first"].as_f64(), day.first().copied(), "{what}");
        assert_eq!(b["last"].as_f64(), day.last().copied(), "{what}");
        let got = b["avg"].as_f64().unwrap();
        assert!(
            (got - avg).abs() <= 1e-9 * avg.abs().max(1.0),
            "{what}: avg {avg}"
        );
    }
}

/// The server's manifest (`manifests/<host name>.json`, the only one in the lake).
fn manifest_text(dumps: &Path) -> Option<String> {
    // (Skips the local store's staging files, `<name>.json#<n>`, of a write under way.)
    let mut files = std::fs::read_dir(dumps.join("manifests"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"));
    let path = files.next()?;
    assert!(files.next().is_none(), "one node, one manifest");
    std::fs::read_to_string(path).ok()
}

/// Every object the manifest lists exists. (Its size and hash are checked once the
/// dumps have settled: a re-dump overwrites a day's objects before the manifest.)
fn check_manifest_lists_existing(dir: &Path) -> usize {
    let dumps = dir.join("dumps");
    let Some(text) = manifest_text(&dumps) else {
        return 0;
    };
    let manifest: Value = serde_json::from_str(&text).expect("the manifest is whole JSON");
    let entries = manifest["dumps"].as_array().unwrap();
    for e in entries {
        let key = e["key"].as_str().unwrap();
        assert!(dumps.join(key).is_file(), "{key} listed but missing");
    }
    entries.len()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Readings per finished UTC day (start, µs) of `stored`.
fn finished_days(stored: &BTreeMap<Key, f64>) -> BTreeMap<i64, u64> {
    let mut per_day = BTreeMap::new();
    for k in stored.keys().filter(|k| k.2 < today_start_us()) {
        *per_day.entry(k.2 - k.2.rem_euclid(DAY_US)).or_default() += 1;
    }
    per_day
}

/// Whether the manifest lists every finished day in both formats at its count.
fn dumps_settled(dir: &Path, stored: &BTreeMap<Key, f64>) -> bool {
    let Some(text) = manifest_text(&dir.join("dumps")) else {
        return false;
    };
    let Ok(manifest) = serde_json::from_str::<Value>(&text) else {
        return false;
    };
    let entries = manifest["dumps"].as_array().cloned().unwrap_or_default();
    finished_days(stored).iter().all(|(&day, &n)| {
        ["json", "parquet"].iter().all(|format| {
            entries.iter().any(|e| {
                e["date"] == rfc3339(day)[..10] && e["format"] == *format && e["rows"] == n
            })
        })
    })
}

/// Settled dumps: every finished day with readings is in the manifest in both formats,
/// each object with its listed size and SHA-256, and each gzip NDJSON dump holds
/// exactly the day's stored readings. Returns the readings checked.
fn check_dumps(dir: &Path, stored: &BTreeMap<Key, f64>) -> u64 {
    let dumps = dir.join("dumps");
    let manifest: Value =
        serde_json::from_str(&manifest_text(&dumps).expect("a manifest")).unwrap();
    let entries = manifest["dumps"].as_array().unwrap();
    for (&day, &n) in &finished_days(stored) {
        let date = &rfc3339(day)[..10];
        for format in ["json", "parquet"] {
            let e = entries
                .iter()
                .find(|e| e["date"] == date && e["format"] == format)
                .unwrap_or_else(|| panic!("{date} {format} not dumped: {manifest}"));
            assert_eq!(num(e, "rows"), n, "{e}");
        }
    }
    let mut lines = 0;
    for e in entries {
        let key = e["key"].as_str().unwrap();
        let bytes = std::fs::read(dumps.join(key)).unwrap_or_else(|_| panic!("{key} missing"));
        assert_eq!(bytes.len() as u64, num(e, "bytes"), "{key}");
        assert_eq!(
            hex(&sha2::Sha256::digest(&bytes)),
            e["sha256"].as_str().unwrap(),
            "{key}"
        );
        if e["format"] != "json" {
            continue;
        }
        let mut text = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .unwrap();
        let mut rows = 0;
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let d = DEVICES.iter().position(|d| v["device"] == *d).unwrap() as u8;
            let s = SENSORS.iter().position(|s| v["sensor"] == *s).unwrap() as u8;
            let k = (d, s, micros(v["timestamp"].as_str().unwrap()));
            assert_eq!(
                stored.get(&k).copied(),
                v["value"].as_f64(),
                "dumped {line}"
            );
            rows += 1;
        }
        assert_eq!(rows, num(e, "rows"), "{e}");
        lines += rows;
    }
    lines
}

/// The stopped database, read directly: exactly the readings the API served, and every
/// rollup slot (partial rows combined) equal to its raw readings.
fn check_database(dir: &Path, stored: &BTreeMap<Key, f64>) {
    let rows = stored_rows(dir);
    assert_eq!(rows.len(), stored.len());
    for (device, sensor, ts, value) in &rows {
        let d = DEVICES.iter().position(|x| x == device).unwrap() as u8;
        let s = SENSORS.iter().position(|x| x == sensor).unwrap() as u8;
        assert_eq!(stored.get(&(d, s, *ts)), Some(value));
    }
    let conn = duckdb::Connection::open(dir.join("milepost.duckdb")).unwrap();
    let differing: i64 = conn
        .query_row(
            "WITH raw AS (
                 SELECT device_id, sensor_id, ts_ms - ((ts_ms % 900000) + 900000) % 900000 AS slot_ms,
                        count(*) AS n, min(value) AS lo, max(value) AS hi, sum(value) AS total,
                        arg_min(value, ts_ms * 1000 + ts_us) AS first_v,
                        arg_max(value, ts_ms * 1000 + ts_us) AS last_v
                 FROM readings GROUP BY ALL),
             rolled AS (
                 SELECT device_id, sensor_id, slot_ms, sum(readings) AS n, min(min_value) AS lo,
                        max(max_value) AS hi, sum(sum_value) AS total,
                        arg_min(first_value, first_us) AS first_v, arg_max(last_value, last_us) AS last_v
                 FROM rollups GROUP BY ALL)
             SELECT count(*) FROM raw FULL JOIN rolled USING (device_id, sensor_id, slot_ms)
             WHERE raw.n IS DISTINCT FROM rolled.n OR raw.lo IS DISTINCT FROM rolled.lo
                OR raw.hi IS DISTINCT FROM rolled.hi OR raw.total IS DISTINCT FROM rolled.total
                OR raw.first_v IS DISTINCT FROM rolled.first_v OR raw.last_v IS DISTINCT FROM rolled.last_v",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(differing, 0, "rollup slots that differ from their readings");
}

/// Counts of the campaign, printed at the end.
#[derive(Default)]
struct Tally {
    aimed: BTreeMap<Aim, (u32, u32, u32)>,
}

async fn campaign(cycles: usize) {
    let _alone = one_at_a_time().await;
    let seed = std::env::var("MILEPOST_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(14);
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let load = Load::new(seed);
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut stored = BTreeMap::new();
    let mut manifest_entries = 0;
    for i in 0..cycles {
        if i > 0 && i % 25 == 0 {
            eprintln!(
                "crash campaign: {i} cycles in {:.0} s, {} readings stored",
                started.elapsed().as_secs_f64(),
                stored.len()
            );
        }
        let v = Victim::start(dir.path());
        stored = verify(&load.client, &v.base, &load.known()).await;
        manifest_entries = check_manifest_lists_existing(dir.path());
        let aim = Aim::ALL[i % Aim::ALL.len()];
        let (inside, errors) = cycle(v, aim, &load, &mut rng).await;
        assert!(
            errors.is_empty(),
            "cycle {i}: the server logged errors: {errors:#?}"
        );
        let t = tally.aimed.entry(aim).or_default();
        t.0 += 1;
        match inside {
            Some(true) => t.1 += 1,
            Some(false) => {}
            None if aim != Aim::Random => t.2 += 1,
            None => {}
        }
    }

    // The last cycle stops with SIGTERM under the same load: exit 0, no WAL.
    let v = Victim::start(dir.path());
    verify(&load.client, &v.base, &load.known()).await;
    let tasks = load.start(&v.base);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (code, errors) = tokio::task::spawn_blocking(move || v.terminate())
        .await
        .unwrap();
    load.join(tasks).await;
    assert!(code.success(), "SIGTERM under load: {code:?}");
    assert!(errors.is_empty(), "{errors:#?}");
    assert!(
        !dir.path().join("milepost.duckdb.wal").exists(),
        "WAL left after SIGTERM"
    );

    // A full replay of everything ever sent: all duplicates but for what was sent,
    // never acknowledged and not stored.
    let v = Victim::start(dir.path());
    let known = load.known();
    let before = verify(&load.client, &v.base, &known).await;
    let mut all: Vec<Key> = known.sent.iter().copied().collect();
    all.sort();
    let (mut accepted, mut duplicates) = (0, 0);
    for chunk in all.chunks(50_000) {
        let good = chunk.iter().map(|&k| (k, value_of(k))).collect();
        let req = Req::new(good, 0, &mut rng);
        let (status, r) = post_ingest(&load.client, &v.base, req.body).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{r}");
        accepted += num(&r, "accepted");
        duplicates += num(&r, "duplicates");
    }
    assert_eq!(duplicates, before.len() as u64);
    assert_eq!(accepted, (all.len() - before.len()) as u64);
    let after = verify(&load.client, &v.base, &known).await;
    assert_eq!(after.len(), all.len());
    // The replay made past days due again: wait until the runs (every second, at
    // low priority) have dumped every finished day at its final count.
    let deadline = Instant::now() + Duration::from_secs(180);
    while !dumps_settled(dir.path(), &after) {
        assert!(Instant::now() < deadline, "dumps did not catch up in 180 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, errors) = v.terminate();
    assert!(code.success() && errors.is_empty(), "{code:?} {errors:#?}");
    check_database(dir.path(), &after);
    let dumped = check_dumps(dir.path(), &after);

    let ledger = load.ledger.lock().unwrap();
    eprintln!(
        "crash campaign (seed {seed}): {cycles} SIGKILL cycles + SIGTERM under load in {:.1} s; \
         {} readings sent, {} acknowledged ({} requests, {} replays and {} conflicting re-sends \
         all duplicates, {} bad lines refused, {} busy answers), {} stored before the final \
         replay; {} dumps in the manifest ({dumped} dumped JSON readings checked); \
         stored before last verify {}",
        started.elapsed().as_secs_f64(),
        all.len(),
        ledger.acked.len(),
        ledger.requests_acked,
        ledger.replays_acked,
        ledger.conflicts_acked,
        ledger.bad_lines_refused,
        ledger.busy,
        before.len(),
        manifest_entries,
        stored.len(),
    );
    for (aim, (kills, inside, never)) in &tally.aimed {
        eprintln!(
            "  {aim:?}: {kills} kills, {inside} inside the step, {never} where it never started"
        );
    }
    assert!(
        ledger.violations.is_empty(),
        "answers that break the contract: {:#?}",
        ledger.violations
    );
    // Aimed kills must land inside their step, or the campaign silently degrades to
    // timed kills (a renamed log marker would do that). Group commits are short, so
    // only some kills aimed at them land inside (13 of 30 in a long run, so none of
    // 4 now and then); the others land inside nearly always.
    let (mut kills, mut inside_all) = (0, 0);
    for (aim, (n, inside, _)) in tally.aimed.iter().filter(|(a, _)| **a != Aim::Random) {
        assert!(
            *inside > 0 || *aim == Aim::GroupCommit,
            "no kill aimed at {aim:?} landed inside it ({n} tried)"
        );
        kills += n;
        inside_all += inside;
    }
    assert!(
        2 * inside_all >= kills,
        "only {inside_all} of {kills} aimed kills landed inside their step"
    );
}

/// 20 SIGKILL cycles and a SIGTERM, in the normal suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_campaign() {
    campaign(20).await;
}

/// The same for `MILEPOST_CRASH_CYCLES` (default 300) cycles:
/// `cargo test --release --test api crash_campaign_long -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long: hundreds of crash cycles"]
async fn crash_campaign_long() {
    let cycles = std::env::var("MILEPOST_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    campaign(cycles).await;
}
