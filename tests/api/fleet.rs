//! The small-request path (ingest log, flusher) and large bodies parsed in parallel:
//! durability under SIGKILL, read-your-writes, exact counts under many clients,
//! exact line numbers.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use milepost::bench::process::ServerProcess;
use reqwest::StatusCode;

use crate::helpers::*;

fn at(sec: i64) -> String {
    DateTime::<Utc>::from_timestamp(sec, 0)
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// One second of one device: a reading of every sensor, all with `value`.
fn second(device: &str, sec: i64, value: f64) -> String {
    SIX_SENSORS
        .iter()
        .map(|s| dline(device, s, value, &at(sec)) + "\n")
        .collect()
}

fn start_binary(dir: &Path) -> ServerProcess {
    let exe = Path::new(env!("CARGO_BIN_EXE_milepost"));
    ServerProcess::start(exe, dir, &["--api-key", KEY], false).expect("binary starts")
}

/// Acknowledged seconds per device, with the value sent.
type Ledger = Arc<Mutex<BTreeMap<String, BTreeMap<i64, f64>>>>;

/// Kills the real server with SIGKILL several times while 32 devices send one second
/// each per request, concurrently; every request acknowledged before a kill must be
/// stored, with its first-written value, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_fleet_load_loses_no_acknowledged_reading_and_stores_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let start = Utc::now().timestamp() - 3 * 3600;
    let devices: Vec<String> = (0..32).map(|d| format!("van-{d}")).collect();
    let acked: Ledger = Arc::default();
    let sent: Arc<Mutex<Vec<String>>> = Arc::default();
    // Per device, the next second to send: carried across restarts.
    let next: Arc<Vec<Mutex<i64>>> = Arc::new(devices.iter().map(|_| Mutex::new(start)).collect());
    let mut rng = fastrand::Rng::with_seed(11);
    let cycles = 4;
    let mut before = 0;
    for cycle in 0..cycles {
        let mut p = start_binary(dir.path());
        let client = reqwest::Client::new();
        let mut tasks = Vec::new();
        for (k, device) in devices.iter().enumerate() {
            let (client, base, device) = (client.clone(), p.base.clone(), device.clone());
            let (acked, sent, next) = (acked.clone(), sent.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let sec = {
                        let mut n = next[k].lock().unwrap();
                        *n += 1;
                        *n
                    };
                    // Within every sensor's range (latitude ±90).
                    let value = ((cycle * 37 + k) % 80) as f64 + (sec % 100) as f64 / 100.0;
                    let body = second(&device, sec, value);
                    sent.lock().unwrap().push(body.clone());
                    match post_ingest(&client, &base, body).await {
                        Ok((StatusCode::OK, r)) => {
                            assert_eq!(num(&r, "accepted"), 6, "{r}");
                            acked
                                .lock()
                                .unwrap()
                                .entry(device.clone())
                                .or_default()
                                .insert(sec, value);
                        }
                        Ok((status, r)) => panic!("answered {status}: {r}"),
                        // The kill: the connection breaks.
                        Err(_) => return,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(400..1500))).await;
        p.child.kill().unwrap();
        p.child.wait().unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        let n: usize = acked.lock().unwrap().values().map(BTreeMap::len).sum();
        assert!(
            n > before,
            "cycle {cycle}: requests were acknowledged before the kill"
        );
        before = n;
    }
    let acked = acked.lock().unwrap().clone();
    let acked_seconds: usize = acked.values().map(BTreeMap::len).sum();

    // After the restart: every acknowledged request, sent again, is all duplicates.
    let app = TestApp::spawn_in(dir, |_| {}).await;
    let client = reqwest::Client::new();
    let acked_bodies: HashSet<String> = acked
        .iter()
        .flat_map(|(d, secs)| secs.iter().map(move |(s, v)| second(d, *s, *v)))
        .collect();
    let sent = sent.lock().unwrap().clone();
    for body in sent.iter().filter(|b| acked_bodies.contains(*b)) {
        let (status, r) = post_ingest(&client, &app.url(""), body.clone())
            .await
            .unwrap();
        assert_eq!((status, num(&r, "duplicates")), (StatusCode::OK, 6), "{r}");
    }
    // Statistics (rollups) agree with the readings stored, per device.
    for device in devices.iter().take(4) {
        let (status, stats) = app
            .get(&format!(
                "/api/v1/sensors/fuel/statistics?device={device}&from={}&to={}&bucket=15m",
                at(start - 3600),
                at(start + 6 * 3600)
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{stats}");
        let counted = bucket_count_sum(&stats);
        let (_, page) = app
            .get(&format!(
                "/api/v1/sensors/fuel/readings?device={device}&limit=100000"
            ))
            .await;
        assert_eq!(counted, page["readings"].as_array().unwrap().len() as u64);
    }
    let rows = stored_rows(app.stop().await.path());

    // Nothing stored twice; every acknowledged reading stored with its value.
    let mut keys = HashSet::new();
    for (device, sensor, ts, _) in &rows {
        assert!(
            keys.insert((device.clone(), sensor.clone(), *ts)),
            "stored twice: {device} {sensor} {ts}"
        );
    }
    let stored: BTreeMap<(String, String, i64), f64> = rows
        .into_iter()
        .map(|(d, s, ts, v)| ((d, s, ts), v))
        .collect();
    for (device, secs) in &acked {
        for (sec, value) in secs {
            for s in SIX_SENSORS {
                let key = (device.clone(), s.to_owned(), sec * 1_000_000);
                assert_eq!(
                    stored.get(&key),
                    Some(value),
                    "acknowledged {key:?} lost or changed"
                );
            }
        }
    }
    assert!(stored.len() >= acked_seconds * 6);
}

/// Right after each acknowledgement every read endpoint shows the reading: the ones
/// answered from memory and the ones that query the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_endpoint_shows_a_reading_as_soon_as_it_is_acknowledged() {
    let app = TestApp::spawn().await;
    let start = Utc::now().timestamp() - 600;
    let (from, to) = (at(start - 3600), at(start + 3600));
    for i in 0..30i64 {
        let ts = at(start + i);
        let body: String = SIX_SENSORS
            .iter()
            .map(|s| line(s, 10.0 + i as f64, &ts) + "\n")
            .collect();
        let (status, r) = app.ingest(body).await;
        assert_eq!((status, num(&r, "accepted")), (StatusCode::OK, 6), "{r}");

        let (_, latest) = app.get("/api/statistics/latest").await;
        assert_eq!(latest["speed"], 10.0 + i as f64, "latest after {i}");
        let (_, status) = app.get("/api/status").await;
        assert_eq!(
            status["lastIngestTimestamp"].as_str().map(micros),
            Some(micros(&ts))
        );
        let (_, v1) = app.get("/api/v1/sensors?").await;
        let speed = sensor_entry(&v1, "speed");
        assert_eq!(num(&speed, "readings"), i as u64 + 1);
        let (_, page) = app
            .get(&format!(
                "/api/v1/sensors/speed/readings?from={from}&to={to}&limit=1000"
            ))
            .await;
        let readings = page["readings"].as_array().unwrap();
        assert_eq!(readings.len() as i64, i + 1, "raw readings after {i}");
        assert_eq!(readings.last().unwrap()["value"], 10.0 + i as f64);
        let (_, stats) = app
            .get(&format!(
                "/api/v1/sensors/fuel/statistics?from={from}&to={to}&bucket=1h"
            ))
            .await;
        let counted = bucket_count_sum(&stats);
        assert_eq!(counted as i64, i + 1, "statistics after {i}: {stats}");
    }
}

/// Posts until answered with anything but 503 or 429 (the writer's queue stayed full,
/// or too many requests from this address were in flight: a request answered so
/// stored nothing), waiting the `Retry-After` second between tries, as the seed
/// devices do.
async fn post_as_a_device_would(
    client: &reqwest::Client,
    base: &str,
    body: String,
) -> (StatusCode, serde_json::Value) {
    for _ in 0..30 {
        let answer = post_ingest(client, base, body.clone()).await.unwrap();
        if answer.0 != StatusCode::SERVICE_UNAVAILABLE && answer.0 != StatusCode::TOO_MANY_REQUESTS
        {
            return answer;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("still busy after 30 tries");
}

/// A thousand clients at once, each its own device and connection, each sending its
/// second twice (the second time all duplicates, sometimes in the same group commit
/// as the first): the counts are exact, per request and in total. The duplicates are
/// checked against DuckDB, one query per device: under a loaded test run some wait
/// longer than the queue timeout and are told to retry (503), as the API documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_small_clients_are_counted_exactly() {
    // A thousand devices on one address, as behind a carrier NAT: more at once than
    // `--max-ingest-per-client` lets in; the others are told to retry (429).
    let app = TestApp::spawn().await;
    let sec = Utc::now().timestamp() - 60;
    let base = app.url("");
    let mut tasks = Vec::new();
    for d in 0..1000 {
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            // One client each: its own connection.
            let client = reqwest::Client::new();
            let body = second(&format!("car-{d}"), sec, (d % 90) as f64);
            let first = post_as_a_device_would(&client, &base, body.clone()).await;
            let again = post_as_a_device_would(&client, &base, body).await;
            (first, again)
        }));
    }
    for t in tasks {
        let ((s1, r1), (s2, r2)) = t.await.unwrap();
        assert_eq!(
            (s1, num(&r1, "accepted"), num(&r1, "duplicates")),
            (StatusCode::OK, 6, 0)
        );
        assert_eq!(
            (s2, num(&r2, "accepted"), num(&r2, "duplicates")),
            (StatusCode::OK, 0, 6)
        );
    }
    let (_, devices) = app.get("/api/v1/devices").await;
    assert_eq!(
        devices["devices"].as_array().unwrap().len(),
        1000,
        "{devices}"
    );
    let metrics = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(counter("milepost_readings_accepted_total"), 6000);
    assert_eq!(counter("milepost_readings_duplicate_total"), 6000);
    let rows = stored_rows(app.stop().await.path());
    assert_eq!(rows.len(), 6000);
}

/// A body large enough to be parsed on several threads: refused lines anywhere in
/// it are reported with their exact line numbers, everything else is stored.
#[tokio::test]
async fn a_large_body_parsed_in_parallel_reports_exact_line_numbers() {
    let app = TestApp::spawn().await;
    let start = 1_750_000_000i64;
    let mut body = String::new();
    let mut bad = Vec::new();
    let lines = 120_000u64; // ~10 MB: several 1 MiB reads, each parsed in pieces
    for n in 1..=lines {
        if n % 3001 == 0 {
            bad.push(n);
            body.push_str(
                "{\"sensor\": \"warp\", \"value\": 1, \"timestamp\": \"2025-01-01T00:00:00Z\"}\n",
            );
        } else {
            body.push_str(&line("speed", n as f64, &at(start + n as i64)));
            body.push('\n');
        }
    }
    let (status, r) = app.ingest(body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{r}");
    assert_eq!(num(&r, "accepted"), lines - bad.len() as u64);
    assert_eq!(num(&r, "rejected"), bad.len() as u64);
    let reported: Vec<u64> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| num(e, "line"))
        .collect();
    assert_eq!(reported, bad);
    assert!(
        r["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("unknown sensor 'warp'")
    );
}

/// SIGTERM while live devices and backlog uploads are sending: the process exits 0,
/// every acknowledged reading is stored, and nothing is left to replay (no DuckDB
/// WAL, no ingest-log record) — the next start has no recovery to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_exits_cleanly_and_keeps_every_acknowledged_reading() {
    let dir = tempfile::tempdir().unwrap();
    let start = Utc::now().timestamp() - 3 * 3600;
    let mut p = start_binary(dir.path());
    let client = reqwest::Client::new();
    let acked: Ledger = Arc::default();
    let mut tasks = Vec::new();
    // 16 live devices, one second per request; 2 devices uploading a backlog of
    // 500 seconds (3,000 readings) per request, days in the past.
    for k in 0..18usize {
        let (client, base, acked) = (client.clone(), p.base.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let backlog = k >= 16;
            let device = format!("{}-{k}", if backlog { "backlog" } else { "live" });
            let mut sec = if backlog { start - 5 * 86_400 } else { start };
            loop {
                let span = if backlog { 500 } else { 1 };
                let value = (k % 80) as f64 + 0.25;
                let body: String = (sec..sec + span)
                    .map(|s| second(&device, s, value))
                    .collect();
                match post_ingest(&client, &base, body).await {
                    Ok((StatusCode::OK, r)) => {
                        assert_eq!(num(&r, "accepted"), 6 * span as u64, "{r}");
                        let mut a = acked.lock().unwrap();
                        let e = a.entry(device.clone()).or_default();
                        for s in sec..sec + span {
                            e.insert(s, value);
                        }
                    }
                    // Shutting down: refused or cut, not acknowledged.
                    Ok((StatusCode::SERVICE_UNAVAILABLE, _)) | Err(_) => return,
                    Ok((status, r)) => panic!("answered {status}: {r}"),
                }
                sec += span;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    send_signal(p.child.id(), "-TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    for t in tasks {
        t.await.unwrap();
    }
    // Nothing to replay.
    let leftovers: Vec<String> = walk(dir.path())
        .into_iter()
        .filter(|f| f.ends_with(".wal") || (f.contains("ingest-log") && f.ends_with(".log")))
        .collect();
    let segments_with_records: Vec<&String> = leftovers
        .iter()
        .filter(|f| !f.ends_with(".log") || std::fs::metadata(f).map_or(0, |m| m.len()) > 16)
        .collect();
    assert!(
        segments_with_records.is_empty(),
        "left to replay: {leftovers:?}"
    );

    let acked = acked.lock().unwrap().clone();
    let n: usize = acked.values().map(BTreeMap::len).sum();
    assert!(
        n > 1000,
        "too little was acknowledged before SIGTERM: {n} seconds"
    );
    let stored: BTreeMap<(String, String, i64), f64> = stored_rows(dir.path())
        .into_iter()
        .map(|(d, s, ts, v)| ((d, s, ts), v))
        .collect();
    for (device, secs) in &acked {
        for (sec, value) in secs {
            let key = (device.clone(), "speed".to_owned(), sec * 1_000_000);
            assert_eq!(stored.get(&key), Some(value), "acknowledged {key:?} lost");
        }
    }
}

/// Every file under `dir`, as paths.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// A fleet as it really behaves: 1,000 devices stream live seconds while each also
/// re-sends one of its last requests (a retry after a timeout), replays the day
/// before in order (an offline buffer) and re-sends a replayed request. Every answer
/// has the exact counts (first write wins, duplicates counted), no request takes a
/// second, and DuckDB ends up holding every reading once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn re_sent_and_backlog_requests_beside_live_data_are_exact_and_prompt() {
    let _alone = one_at_a_time().await;
    let app = TestApp::spawn().await;
    let live = Utc::now().timestamp() - 1800;
    let backlog = live - 86_400;
    let (devices, clients, rounds) = (1000usize, 50usize, 6i64);
    let base = app.url("");
    let mut tasks = Vec::new();
    for c in 0..clients {
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mine: Vec<String> = (c..devices)
                .step_by(clients)
                .map(|d| format!("van-{d}"))
                .collect();
            let mut slowest = Duration::ZERO;
            let mut send = async |body: String, accepted: u64, what: &str| {
                let started = std::time::Instant::now();
                let (status, r) = post_ingest(&client, &base, body).await.unwrap();
                slowest = slowest.max(started.elapsed());
                assert_eq!(
                    (status, num(&r, "accepted"), num(&r, "duplicates")),
                    (StatusCode::OK, accepted, 6 - accepted),
                    "{what}: {r}"
                );
            };
            // Live data first, so that everything after is older than the newest.
            for sec in 0..3 {
                for d in &mine {
                    send(second(d, live + sec, 1.0), 6, "live").await;
                }
            }
            for round in 0..rounds {
                for (k, d) in mine.iter().enumerate() {
                    let v = (k % 50) as f64;
                    send(second(d, live + 3 + round, v), 6, "live").await;
                    let again = live + 3 + round - (k as i64 % 3);
                    let first = if again < live + 3 { 1.0 } else { v };
                    send(second(d, again, first), 0, "re-sent live").await;
                    send(second(d, backlog + round, v + 1.0), 6, "backlog").await;
                    send(second(d, backlog + round, v + 1.0), 0, "re-sent backlog").await;
                    // A retry with another value: still a duplicate, the first stays.
                    send(second(d, backlog + round / 2, 77.0), 0, "late retry").await;
                }
            }
            slowest
        }));
    }
    for t in tasks {
        let slowest = t.await.unwrap();
        assert!(
            slowest < Duration::from_secs(1),
            "a request took {slowest:?}"
        );
    }
    let per_device = 3 + 2 * rounds as usize;
    let rows = stored_rows(app.stop().await.path());
    assert_eq!(rows.len(), devices * per_device * 6);
    let unique: HashSet<(String, String, i64)> = rows
        .iter()
        .map(|(d, s, ts, _)| (d.clone(), s.clone(), *ts))
        .collect();
    assert_eq!(unique.len(), rows.len(), "a reading stored twice");
    assert!(
        rows.iter().all(|(_, _, _, v)| *v != 77.0),
        "a retry overwrote the first write"
    );
}

/// While 200 devices stream live readings, a dashboard reads one of them in a loop:
/// every day chart, statistics answer and readings page includes every reading
/// acknowledged before it was asked, and none takes a second (the answers used to
/// wait for the ingest log's flush into DuckDB: seconds, up to 30 s, under a fleet's
/// load). The page reads the readings DuckDB does not hold yet from memory, split at
/// the applied-through number its snapshot holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chart_read_while_a_fleet_streams_is_prompt_and_complete() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    let _alone = one_at_a_time().await;
    let app = TestApp::spawn().await;
    // The watched device's readings all fall into one 15-minute bucket of its day,
    // its k-th speed reading has value k: the bucket's average tells how many the
    // answer counted (n readings average (n + 1) / 2).
    let start = (Utc::now().timestamp() - 7200) / 900 * 900;
    let day = DateTime::<Utc>::from_timestamp(start, 0)
        .unwrap()
        .format("%Y-%m-%d")
        .to_string();
    let (acked, sent) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicI64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let base = app.url("");
    let mut fleet = Vec::new();
    for c in 0..16 {
        let (base, stop) = (base.clone(), stop.clone());
        fleet.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut sec = start;
            while !stop.load(Ordering::Relaxed) {
                for d in (c..200).step_by(16).skip(1) {
                    let (status, r) =
                        post_ingest(&client, &base, second(&format!("van-{d}"), sec, 5.0))
                            .await
                            .unwrap();
                    assert_eq!((status, num(&r, "accepted")), (StatusCode::OK, 6), "{r}");
                }
                sec += 1;
            }
        }));
    }
    let watched = {
        let (base, stop, acked, sent) = (base.clone(), stop.clone(), acked.clone(), sent.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for k in 1..=899 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                sent.store(k, Ordering::SeqCst);
                let body = dline("van-0", "speed", k as f64, &at(start + k - 1)) + "\n";
                let (status, r) = post_ingest(&client, &base, body).await.unwrap();
                assert_eq!((status, num(&r, "accepted")), (StatusCode::OK, 1), "{r}");
                acked.store(k, Ordering::SeqCst);
            }
        })
    };
    let bucket = at(start).replace(".000Z", "Z");
    let (from, to) = (at(start), at(start + 900));
    let mut slowest = Duration::ZERO;
    let mut reads = 0;
    let until = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < until {
        let before = acked.load(Ordering::SeqCst);
        let mut answers = Vec::new();
        for path in [
            format!("/api/statistics/sensor/speed/date/{day}?device=van-0"),
            format!("/api/v1/sensors/speed/statistics?device=van-0&from={from}&to={to}&bucket=15m"),
            format!("/api/v1/sensors/speed/readings?device=van-0&from={from}&to={to}&limit=1000"),
        ] {
            let t = std::time::Instant::now();
            answers.push(app.get(&path).await);
            slowest = slowest.max(t.elapsed());
        }
        let [(status, chart), (s2, stats), (s3, page)] =
            <[_; 3]>::try_from(answers).expect("three answers");
        let after = sent.load(Ordering::SeqCst);
        assert_eq!(
            (status, s2, s3),
            (StatusCode::OK, StatusCode::OK, StatusCode::OK)
        );
        let avg = chart
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["timestamp"].as_str() == Some(bucket.as_str()))
            .unwrap_or_else(|| panic!("no bucket {bucket} in {chart}"))["value"]
            .as_f64()
            .unwrap();
        let charted = (2.0 * avg - 1.0).round().max(0.0) as i64;
        let counted = bucket_count_sum(&stats) as i64;
        let paged = page["readings"].as_array().map_or(0, Vec::len) as i64;
        for (what, n) in [
            ("day chart", charted),
            ("statistics", counted),
            ("readings page", paged),
        ] {
            assert!(
                (before..=after).contains(&n),
                "{what} counted {n} readings; {before} were acknowledged before, {after} sent"
            );
        }
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    watched.await.unwrap();
    for t in fleet {
        t.await.unwrap();
    }
    assert!(
        reads > 20 && acked.load(Ordering::SeqCst) > 20,
        "{reads} reads"
    );
    assert!(slowest < Duration::from_secs(1), "a read took {slowest:?}");
}

/// A backlog reading of an earlier day goes through the ingest log like a live one
/// (it is new for its series); the day's chart and statistics, whose finished
/// quarter hours come from rollups, show it as soon as it is acknowledged.
#[tokio::test]
async fn a_backlog_reading_shows_in_its_days_rollup_buckets_at_once() {
    let app = TestApp::spawn().await;
    let today = Utc::now().timestamp() - 600;
    // A minute into a quarter hour: the 20 readings below never straddle two of the
    // chart's 15-minute buckets (the test failed when run at 18:09:50).
    let yesterday = (today - 86_400) / 900 * 900 + 60;
    let day = DateTime::<Utc>::from_timestamp(yesterday, 0)
        .unwrap()
        .format("%Y-%m-%d")
        .to_string();
    let from = at(yesterday / 86_400 * 86_400);
    let to = at(yesterday / 86_400 * 86_400 + 86_400);
    let (status, _) = app.ingest(second("car", today, 1.0)).await;
    assert_eq!(status, StatusCode::OK);
    for k in 0..20 {
        let (status, r) = app.ingest(second("car", yesterday + k, 3.0)).await;
        assert_eq!((status, num(&r, "accepted")), (StatusCode::OK, 6), "{r}");
        let (_, stats) = app
            .get(&format!(
                "/api/v1/sensors/speed/statistics?device=car&from={from}&to={to}&bucket=15m"
            ))
            .await;
        assert_eq!(bucket_count_sum(&stats), k as u64 + 1, "{stats}");
        let (_, chart) = app
            .get(&format!(
                "/api/statistics/sensor/fuel/date/{day}?device=car"
            ))
            .await;
        let values: Vec<f64> = chart
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| b["value"].as_f64())
            .filter(|v| *v != 0.0)
            .collect();
        assert_eq!(values, vec![3.0], "after {k}: {chart}");
    }
}

/// With room for the live quarter hours of only a few devices (`--live-slots-memory`),
/// every device's statistics over its live quarter hours stay exact — devices without
/// room are read from the database — and the memory stays within the budget: with
/// idle devices evicted at once, and with none idle (new devices then not held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_quarter_hours_beyond_their_memory_budget_are_still_counted_exactly() {
    use crate::metrics::{get, scrape};
    let budget: u64 = 4 * 1024;
    for idle in [Duration::ZERO, Duration::from_secs(3600)] {
        let app = TestApp::spawn_with(|a| {
            a.live_slots_memory = budget;
            a.live_slots_idle = idle;
        })
        .await;
        let client = reqwest::Client::new();
        let base = app.url("");
        let now = Utc::now().timestamp();
        let (from, to) = (at((now - 3600) / 900 * 900), at((now + 1800) / 900 * 900));
        let devices = 30;
        for round in 1..=3 {
            for d in 0..devices {
                let body = second(&format!("car-{d}"), now - 10 + round, 1.0);
                let (status, r) = post_ingest(&client, &base, body).await.unwrap();
                assert_eq!((status, num(&r, "accepted")), (StatusCode::OK, 6), "{r}");
            }
            for d in 0..devices {
                let (status, stats) = app
                    .get(&format!(
                        "/api/v1/sensors/speed/statistics?device=car-{d}&from={from}&to={to}&bucket=15m"
                    ))
                    .await;
                assert_eq!(status, StatusCode::OK);
                assert_eq!(
                    bucket_count_sum(&stats),
                    round as u64,
                    "car-{d} after round {round} (idle {idle:?}): {stats}"
                );
            }
        }
        let m = scrape(&app).await;
        let (held, bytes) = (
            get(&m, "milepost_live_slots_devices"),
            get(&m, "milepost_live_slots_memory_bytes"),
        );
        assert!(held >= 1.0 && held < devices as f64, "{held} devices held");
        assert!(bytes > 0.0 && bytes <= budget as f64, "{bytes} bytes held");
    }
}

/// Every reading of `device`'s `sensor` in `[from, to)` through the v1 readings pages
/// of `limit`: `(time µs, value)` in the order served.
async fn walk_pages(
    app: &TestApp,
    device: &str,
    sensor: &str,
    (from, to): (&str, &str),
    limit: usize,
) -> Vec<(i64, f64)> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, page) = app
            .get(&format!(
                "/api/v1/sensors/{sensor}/readings?device={device}&from={from}&to={to}\
                 &limit={limit}{cursor}"
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for r in page["readings"].as_array().unwrap() {
            out.push((
                micros(r["timestamp"].as_str().unwrap()),
                r["value"].as_f64().unwrap(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

/// Today's readings sorted by device a chunk at a time (`--cluster-rows 200`) while 20
/// devices stream and re-send: after every round each device's page walk and
/// statistics hold exactly what was acknowledged, once, in time order; re-sends are
/// all duplicates; after a restart (the chunks read back from the file) the same, and
/// a full re-send is all duplicates. The moved chunks are in the file sorted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_sorted_by_device_while_live_stay_exact() {
    let app = TestApp::spawn_with(|a| a.cluster_rows = 200).await;
    // Today's seconds, in the past, however close to midnight the test runs.
    let now = Utc::now().timestamp();
    let start = (now - 2000).max(now - now.rem_euclid(86_400));
    let (from, to) = (at(start - 60), at(start + 86_400));
    let devices: Vec<String> = (0..20).map(|d| format!("sorted-{d}")).collect();
    let mut acked: BTreeMap<&str, Vec<(i64, f64)>> = BTreeMap::new();
    let mut sent = Vec::new();
    for round in 0..12i64 {
        // Each device's next five seconds of three sensors, devices interleaved in
        // every request as a gateway forwards them; every third round also the
        // previous round's requests again.
        for chunk in devices.chunks(5) {
            let mut body = String::new();
            for (d, device) in chunk.iter().enumerate() {
                for k in 0..5 {
                    let sec = start + round * 5 + k;
                    let value = (round * 100 + d as i64 * 7 + k) as f64 / 4.0;
                    for s in ["speed", "fuel", "revolution"] {
                        body.push_str(&dline(device, s, value, &at(sec)));
                        body.push('\n');
                    }
                    acked
                        .entry(device.as_str())
                        .or_default()
                        .push((sec * 1_000_000, value));
                }
            }
            let (status, r) = app.ingest(body.clone()).await;
            assert_eq!((status, num(&r, "accepted")), (StatusCode::OK, 75), "{r}");
            sent.push(body);
        }
        if round % 3 == 2 {
            for body in &sent[sent.len() - 8..sent.len() - 4] {
                let (status, r) = app.ingest(body.clone()).await;
                assert_eq!((status, num(&r, "duplicates")), (StatusCode::OK, 75), "{r}");
            }
        }
        let device = &devices[(round as usize * 7) % devices.len()];
        let walk = walk_pages(&app, device, "fuel", (&from, &to), 13).await;
        assert_eq!(
            &walk,
            &acked[device.as_str()],
            "{device} after round {round}"
        );
    }
    check_all(&app, &devices, &acked, (&from, &to)).await;
    let app = app.restart().await;
    check_all(&app, &devices, &acked, (&from, &to)).await;
    for body in &sent {
        let (status, r) = app.ingest(body.clone()).await;
        assert_eq!((status, num(&r, "duplicates")), (StatusCode::OK, 75), "{r}");
    }
    let dir = app.stop().await;

    // In the file: most of today's readings moved, sorted by device within each
    // chunk, as plain values; today is listed for compaction.
    let conn = duckdb::Connection::open(dir.path().join("milepost.duckdb")).unwrap();
    let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    let moved = count("SELECT count(*) FROM compacted_readings WHERE mant IS NULL");
    assert!(moved >= 3000, "{moved} of 3600 moved");
    assert_eq!(count("SELECT count(*) FROM readings"), 3600);
    let today = &at(start)[..10];
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM uncompacted_days WHERE day = DATE '{today}'"
        )),
        1
    );
}

/// Every device's speed readings by pages and its revolution count by statistics
/// equal what was acknowledged (sixty seconds each).
async fn check_all(
    app: &TestApp,
    devices: &[String],
    acked: &BTreeMap<&str, Vec<(i64, f64)>>,
    (from, to): (&str, &str),
) {
    for device in devices {
        let walk = walk_pages(app, device, "speed", (from, to), 50).await;
        assert_eq!(&walk, &acked[device.as_str()], "{device}");
        let (_, stats) = app
            .get(&format!(
                "/api/v1/sensors/revolution/statistics?device={device}\
                 &from={from}&to={to}&bucket=1h"
            ))
            .await;
        assert_eq!(bucket_count_sum(&stats), 60, "{device}: {stats}");
    }
}
