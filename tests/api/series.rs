//! Idle devices' series statistics on disk (`--series-memory`, `--series-idle`): with
//! a budget that holds a handful of devices, every count, span and latest value stays
//! exact — read while on disk, after the device comes back (re-sends deduplicated,
//! older and newer readings), after deleting one, a clean restart and a SIGKILL.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use milepost::backend::proto;
use milepost::config::ServeArgs;
use reqwest::StatusCode;

use crate::helpers::*;
use crate::metrics::{get, scrape};

const DEVICES: usize = 40;
const SENSORS: [&str; 3] = ["speed", "fuel", "revolution"];

fn at(min: u32, sec: u32) -> String {
    format!("2026-03-01T10:{min:02}:{sec:02}Z")
}

fn name(d: usize) -> String {
    format!("car-{d:02}")
}

/// Five readings of each sensor of device `d` at 10:10:00..04.
fn first_body(d: usize) -> String {
    let mut body = String::new();
    for sec in 0..5 {
        for (s, sensor) in SENSORS.iter().enumerate() {
            let value = (d * 100 + s * 10) as f64 + f64::from(sec);
            body += &(dline(&name(d), sensor, value, &at(10, sec)) + "\n");
        }
    }
    body
}

/// A budget of 1 KiB: about five devices of three sensors stay in memory.
fn tiny(a: &mut ServeArgs) {
    a.series_memory = 1024;
    a.series_idle = Duration::ZERO;
}

/// Waits until at least `n` devices' statistics are on disk.
async fn wait_on_disk(app: &TestApp, n: f64) {
    wait_on_disk_within(app, n, 1024.0).await;
}

/// Waits until at least `n` devices' statistics are on disk and those in memory take
/// at most `bytes`. Both, not the first alone: devices go in batches, and one batch
/// may have left while the next still waits for its turn (a second).
async fn wait_on_disk_within(app: &TestApp, n: f64, bytes: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(app).await;
        let on_disk = get(&m, "milepost_series_statistics_devices_on_disk");
        let memory = get(&m, "milepost_series_statistics_memory_bytes");
        if on_disk >= n && memory <= bytes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{on_disk} devices on disk, {memory} bytes in memory: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a device is expected to hold: per sensor (readings, first, last, last value).
type Expected = BTreeMap<String, BTreeMap<&'static str, (u64, String, String, f64)>>;

fn expected_after_first() -> Expected {
    (0..DEVICES)
        .map(|d| {
            let sensors = SENSORS
                .iter()
                .enumerate()
                .map(|(s, sensor)| {
                    let last = (d * 100 + s * 10) as f64 + 4.0;
                    (*sensor, (5, at(10, 0), at(10, 4), last))
                })
                .collect();
            (name(d), sensors)
        })
        .collect()
}

/// Every view of the statistics agrees with `want`: `/metrics` totals, the device
/// list, each device's sensors, and a statistics query (whose range comes from them).
async fn assert_exact(app: &TestApp, want: &Expected) {
    let total: u64 = want.values().flat_map(|s| s.values()).map(|e| e.0).sum();
    let m = scrape(app).await;
    assert_eq!(get(&m, "milepost_stored_readings"), total as f64);
    let (status, v) = app.get("/api/v1/devices").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let listed: BTreeMap<String, (u64, i64, i64)> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap().to_owned(),
                (
                    num(d, "readings"),
                    micros(d["first"].as_str().unwrap()),
                    micros(d["last"].as_str().unwrap()),
                ),
            )
        })
        .collect();
    assert_eq!(listed.len(), want.len(), "{v}");
    for (device, sensors) in want {
        let readings = sensors.values().map(|e| e.0).sum();
        let first = sensors.values().map(|e| micros(&e.1)).min().unwrap();
        let last = sensors.values().map(|e| micros(&e.2)).max().unwrap();
        assert_eq!(listed[device], (readings, first, last), "{device}");
        let (status, v) = app.get(&format!("/api/v1/sensors?device={device}")).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        for (sensor, (n, first, last, value)) in sensors {
            let e = sensor_entry(&v, sensor);
            assert_eq!(num(&e, "readings"), *n, "{device} {sensor}: {e}");
            assert_eq!(micros(e["first"].as_str().unwrap()), micros(first), "{e}");
            assert_eq!(micros(e["last"].as_str().unwrap()), micros(last), "{e}");
            assert_eq!(e["last_value"].as_f64(), Some(*value), "{device}: {e}");
        }
    }
    // A statistics query of one device, which finds its range from the statistics.
    let (device, sensors) = want.iter().next().unwrap();
    let (status, v) = app
        .get(&format!(
            "/api/v1/sensors/speed/statistics?device={device}&from=2026-03-01T00:00:00Z&to=2026-03-02T00:00:00Z&bucket=1h"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(bucket_count_sum(&v), sensors["speed"].0, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_devices_statistics_go_to_disk_and_stay_exact() {
    let app = TestApp::spawn_with(tiny).await;
    for d in 0..DEVICES {
        let (status, v) = app.ingest(first_body(d)).await;
        assert_eq!((status, num(&v, "accepted")), (StatusCode::OK, 15), "{v}");
    }
    let mut want = expected_after_first();
    wait_on_disk(&app, 30.0).await;
    assert_exact(&app, &want).await;

    // Every device re-sends its request: each comes back from disk, and every line
    // is a duplicate.
    for d in 0..DEVICES {
        let (status, v) = app.ingest(first_body(d)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!((num(&v, "accepted"), num(&v, "duplicates")), (0, 15), "{v}");
    }
    wait_on_disk(&app, 30.0).await;

    // A device on disk sends a duplicate, an older and a newer reading at once.
    let body = [
        dline("car-01", "speed", 999.0, &at(10, 2)),
        dline("car-01", "speed", 7.0, &at(9, 0)),
        dline("car-01", "speed", 8.0, &at(11, 0)),
    ]
    .join("\n");
    let (status, v) = app.ingest(body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!((num(&v, "accepted"), num(&v, "duplicates")), (2, 1), "{v}");
    want.get_mut("car-01")
        .unwrap()
        .insert("speed", (7, at(9, 0), at(11, 0), 8.0));
    wait_on_disk(&app, 30.0).await;
    assert_exact(&app, &want).await;
    // The console lists every device, and shows a device on disk with its values.
    let (status, page) = app.get_text("/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("<strong>40</strong> devices"), "{page}");
    let (_, page) = app.get_text("/?q=car-01").await;
    assert!(
        page.contains("car-01") && page.contains(r#"data-sensor="speed""#),
        "{page}"
    );

    // Deleting a device on disk takes its readings out of the totals.
    let m = scrape(&app).await;
    assert!(get(&m, "milepost_series_statistics_devices_on_disk") >= 30.0);
    let token = app.admin_token();
    let mut devices = proto::DevicesClient::new(app.backend_channel());
    // The devices idle longest went to disk first: car-05 is among them.
    let request = milepost::backend::client::authorized(
        Some(&token),
        proto::DeleteDeviceRequest {
            name: "car-05".into(),
        },
    )
    .unwrap();
    devices.delete_device(request).await.unwrap();
    want.remove("car-05");
    assert_exact(&app, &want).await;

    // A clean restart starts with the devices that sent last, the rest on disk.
    let app = app.restart_with(tiny).await;
    assert_exact(&app, &want).await;
    let m = scrape(&app).await;
    assert!(
        get(&m, "milepost_series_statistics_devices_on_disk") >= 30.0,
        "{m:?}"
    );
    // And a device on disk since the start deduplicates exactly.
    let (status, v) = app.ingest(first_body(7)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!((num(&v, "accepted"), num(&v, "duplicates")), (0, 15), "{v}");
}

/// `/metrics` and `/api/v1/devices` agree that each of the `n` devices holds
/// `readings`.
async fn assert_every_device_has(app: &TestApp, n: u32, readings: u64) {
    let m = scrape(app).await;
    assert_eq!(
        get(&m, "milepost_stored_readings"),
        f64::from(n) * readings as f64
    );
    let (_, v) = app.get("/api/v1/devices").await;
    let devices = v["devices"].as_array().unwrap();
    assert_eq!(devices.len(), n as usize);
    let short: Vec<&serde_json::Value> = devices
        .iter()
        .filter(|d| num(d, "readings") != readings)
        .collect();
    assert!(
        short.is_empty(),
        "{} devices short, e.g. {:?}",
        short.len(),
        short.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_twice_the_budget_devices_go_to_disk_before_they_are_idle() {
    // An idle time of an hour: none is idle, yet 40 devices in a 1 KiB budget go to
    // disk down to the ceiling (twice the budget), least recently active first.
    let app = TestApp::spawn_with(|a| {
        tiny(a);
        a.series_idle = Duration::from_secs(3600);
    })
    .await;
    for d in 0..DEVICES {
        let (status, v) = app.ingest(first_body(d)).await;
        assert_eq!((status, num(&v, "accepted")), (StatusCode::OK, 15), "{v}");
    }
    wait_on_disk_within(&app, 25.0, 2048.0).await;
    let want = expected_after_first();
    assert_exact(&app, &want).await;
    // Re-sent requests, of devices on disk and in memory, are all duplicates.
    for d in 0..DEVICES {
        let (status, v) = app.ingest(first_body(d)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!((num(&v, "accepted"), num(&v, "duplicates")), (0, 15), "{v}");
    }
    assert_exact(&app, &want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_of_idle_devices_goes_to_disk_whole() {
    // 25,000 devices of six readings: the first batch to disk holds ~150,000 rows,
    // more than a DuckDB row group (122,880), which DuckDB writes out early.
    let many = |a: &mut ServeArgs| {
        tiny(a);
        a.max_new_devices_per_key = 0;
    };
    let app = TestApp::spawn_with(many).await;
    // An empty (or short) list goes out whole, with an ETag to revalidate.
    let resp = app.get_response("/api/v1/devices").await;
    assert!(resp.headers().get("etag").is_some(), "{:?}", resp.headers());
    assert_eq!(resp.text().await.unwrap(), r#"{"devices":[]}"#);
    let n = 25_000;
    let body: String = (0..n)
        .flat_map(|d| {
            SIX_SENSORS
                .iter()
                .map(move |s| dline(&format!("bulk-{d}"), s, 1.0, &at(10, 0)) + "\n")
        })
        .collect();
    let lines: Vec<&str> = body.lines().collect();
    for chunk in lines.chunks(30_000) {
        let (status, v) = app.ingest(chunk.join("\n")).await;
        assert_eq!(
            (status, num(&v, "accepted")),
            (StatusCode::OK, 30_000),
            "{v}"
        );
    }
    wait_on_disk(&app, f64::from(n - 10)).await;
    assert_every_device_has(&app, n, 6).await;
    // A list this long is streamed a page of devices at a time (no length to tag).
    let resp = app.get_response("/api/v1/devices").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert!(
        h.get("content-length").is_none() && h.get("etag").is_none(),
        "{h:?}"
    );
    let app = app.restart_with(many).await;
    assert_every_device_has(&app, n, 6).await;
    // Devices back from disk deduplicate exactly (a sample: re-sent old readings of
    // many devices at once are checked against DuckDB device by device, ~1 ms each).
    let sample = lines[..3000].join("\n");
    let (status, v) = app.ingest(sample).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (num(&v, "accepted"), num(&v, "duplicates")),
        (0, 3000),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_the_statistics_of_devices_on_disk_and_in_memory_are_exact() {
    let _serial = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let (proc, base) = spawn_logged(
        serve_command(dir.path())
            .args(["--log-format", "json", "--api-key", KEY])
            .args(["--series-memory", "1KiB", "--series-idle", "0s"]),
        &log,
    );
    let client = reqwest::Client::new();
    for d in 0..DEVICES {
        let (status, v) = post_ingest(&client, &base, first_body(d)).await.unwrap();
        assert_eq!((status, num(&v, "accepted")), (StatusCode::OK, 15), "{v}");
    }
    let on_disk = || async {
        let text = get_text_from(&client, &format!("{base}/metrics")).await;
        text.lines()
            .find_map(|l| l.strip_prefix("milepost_series_statistics_devices_on_disk "))
            .map_or(0.0, |n| n.trim().parse::<f64>().unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while on_disk().await < 30.0 {
        assert!(Instant::now() < deadline, "devices never went to disk");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two devices come back and store more: their rows on disk are stale now.
    let mut want = expected_after_first();
    for d in [2, 3] {
        let line = dline(&name(d), "fuel", 1.5, &at(12, 0));
        let (status, v) = post_ingest(&client, &base, line).await.unwrap();
        assert_eq!((status, num(&v, "accepted")), (StatusCode::OK, 1), "{v}");
        want.get_mut(&name(d))
            .unwrap()
            .insert("fuel", (6, at(10, 0), at(12, 0), 1.5));
    }
    drop(proc); // SIGKILL
    std::fs::remove_file(&log).unwrap();
    let app = TestApp::spawn_in(dir, tiny).await;
    assert_exact(&app, &want).await;
}
