//! `milepost demo`, the real binary for a few seconds: live readings close to now,
//! the alert that found the refuelling, yesterday's dump, the console.

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_drives_live_with_a_found_refuelling_and_yesterday_dumped() {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_milepost"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--devices",
            "2",
            "--duration",
            "120s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut printed = Vec::new();
    while !printed
        .iter()
        .any(|l: &String| l.starts_with("Press Ctrl-C"))
    {
        let line = rx
            .recv_timeout(EXIT_LIMIT)
            .unwrap_or_else(|_| panic!("the demo did not start: {printed:?}"));
        printed.push(line);
    }
    let base = printed
        .iter()
        .find_map(|l| l.trim().strip_prefix("console"))
        .map(|u| u.trim().trim_end_matches('/').to_owned())
        .unwrap_or_else(|| panic!("no console address in {printed:?}"));
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        async move {
            let r = http.get(path).send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap_or_default())
        }
    };

    // The alert found car-1's refuelling: fuel stepped up.
    let (s, v) = get(format!("{base}/api/v1/anomalies?device=car-1&sensor=fuel")).await;
    assert_eq!(s, StatusCode::OK);
    let steps = v["anomalies"].as_array().unwrap();
    assert!(!steps.is_empty(), "{v}");
    assert!(steps.iter().all(|a| a["direction"] == "up"), "{v}");
    assert!(steps[0]["after_mean"].as_f64() > steps[0]["before_mean"].as_f64().map(|b| b + 25.0));

    // Yesterday is dumped, in both formats.
    let yesterday = (chrono::Utc::now() - chrono::Duration::days(1))
        .date_naive()
        .to_string();
    let (_, v) = get(format!("{base}/api/v1/dumps")).await;
    let formats: Vec<&str> = v["dumps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["date"] == yesterday.as_str())
        .filter_map(|d| d["format"].as_str())
        .collect();
    assert_eq!(formats.len(), 2, "{v}");

    // A day of history, and live readings arriving now.
    let newest = |v: &Value| -> (i64, u64) {
        let speed = sensor_entry(v, "speed");
        (
            micros(speed["last"].as_str().unwrap()),
            num(&speed, "readings"),
        )
    };
    let (_, v) = get(format!("{base}/api/v1/sensors?device=car-2")).await;
    let (last, readings) = newest(&v);
    assert!(readings >= 24 * 3600, "{readings}");
    let now = chrono::Utc::now().timestamp_micros();
    assert!(
        (now - last).abs() < 5_000_000,
        "newest reading {} s old",
        (now - last) / 1_000_000
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, v) = get(format!("{base}/api/v1/sensors?device=car-2")).await;
    let (later, more) = newest(&v);
    assert!(later > last && more > readings, "no live readings");

    // The console lists both cars.
    let page = get_text_from(&http, &format!("{base}/")).await;
    assert!(page.contains("data-device=\"car-1\"") && page.contains("data-device=\"car-2\""));

    send_signal(demo.id(), "-TERM");
    let status = tokio::task::spawn_blocking(move || demo.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}
