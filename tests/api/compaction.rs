use std::time::Duration;

use milepost::store::{Store, StoreConfig};
use reqwest::StatusCode;

use crate::helpers::*;

/// Two finished days of two devices, sensors interleaved as devices send them.
fn two_days() -> String {
    let mut body = String::new();
    for s in (0..2 * 86_400).step_by(300) {
        let t = chrono::DateTime::parse_from_rfc3339("2025-05-01T00:00:00Z")
            .unwrap()
            .timestamp()
            + s;
        let ts = chrono::DateTime::from_timestamp(t, 0).unwrap().to_rfc3339();
        for (i, sensor) in ["speed", "fuel", "revolution"].iter().enumerate() {
            body += &dline("car", sensor, (s % 997) as f64 + i as f64, &ts);
            body += "\n";
            body += &dline("van", sensor, (s % 331) as f64, &ts);
            body += "\n";
        }
    }
    body
}

fn compacted_days(dir: &std::path::Path) -> i64 {
    let c = duckdb::Connection::open(dir.join("milepost.duckdb")).unwrap();
    c.query_row("SELECT count(*) FROM compacted_days", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn compaction_rewrites_finished_days_without_changing_any_answer() {
    let app = TestApp::spawn().await;
    let (status, r) = app.ingest(two_days()).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let chart_path = "/api/statistics/sensor/speed/date/2025-05-02?device=car";
    let (_, chart_before) = app.get(chart_path).await;
    let dir = app.stop().await;
    let rows_before = stored_rows(dir.path());

    let cfg = StoreConfig {
        data_dir: dir.path().to_owned(),
        memory_limit: "128MB".into(),
        threads: 1,
        series_memory: milepost::store::DEFAULT_SERIES_MEMORY,
        temp_limit: None,
    };
    let store = Store::open(&cfg).unwrap();
    let done = store.compact().unwrap();
    assert_eq!((done.days, done.readings), (2, rows_before.len() as u64));
    assert_eq!(store.compact().unwrap().days, 0, "nothing left to do");
    drop(store);
    assert_eq!(stored_rows(dir.path()), rows_before);

    // A late upload into day one makes (only) that day due again.
    let app = TestApp::spawn_in(dir, |_| {}).await;
    let (_, chart_after) = app.get(chart_path).await;
    assert_eq!(chart_after, chart_before);
    let (_, r) = app
        .ingest(dline("car", "speed", 5.0, "2025-05-01T12:00:01Z"))
        .await;
    assert_eq!(num(&r, "accepted"), 1);
    let dir = app.stop().await;
    let store = Store::open(&cfg).unwrap();
    assert_eq!(store.compact().unwrap().days, 1);
    drop(store);
    assert_eq!(stored_rows(dir.path()).len(), rows_before.len() + 1);
}

#[tokio::test]
async fn the_server_compacts_finished_days_in_the_background() {
    let app = TestApp::spawn_with(|a| a.compact_interval = Duration::from_millis(100)).await;
    let (status, _) = app.ingest(two_days()).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, _) = app.ingest(line("speed", 1.0, "2025-06-01T00:00:00Z")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "ingest keeps working around compaction"
    );
    let dir = app.stop().await;
    assert!(compacted_days(dir.path()) >= 2);
}

#[tokio::test]
async fn an_import_of_past_days_is_compacted_once_it_settles() {
    let app = TestApp::spawn_with(|a| {
        a.compact_interval = Duration::from_secs(3600);
        a.compact_settle = Duration::from_millis(200);
    })
    .await;
    let (status, _) = app.ingest(two_days()).await;
    assert_eq!(status, StatusCode::OK);
    // Well before the hourly tick, but after the import paused for `settle`.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dir = app.stop().await;
    assert!(compacted_days(dir.path()) >= 2);
}
