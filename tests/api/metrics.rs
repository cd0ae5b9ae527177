//! `GET /metrics`: counters move by exactly what a request did.

use std::collections::HashMap;

use reqwest::StatusCode;

use crate::helpers::{TestApp, line};

/// Samples of a scrape: `name{labels}` → value.
pub(crate) async fn scrape(app: &TestApp) -> HashMap<String, f64> {
    let resp = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"));
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_owned(), value.parse().unwrap())
        })
        .collect()
}

pub(crate) fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

/// A body of `n` readings of `sensor`, one a second from 2026-05-01.
fn bulk(sensor: &str, value: f64, n: i64) -> String {
    let start = chrono::DateTime::parse_from_rfc3339("2026-05-01T00:00:00Z").unwrap();
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let ts = start + chrono::Duration::seconds(i);
            line(
                sensor,
                value,
                &ts.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            )
        })
        .collect();
    lines.join("\n")
}

#[tokio::test]
async fn counters_move_by_exactly_what_a_request_did() {
    let app = TestApp::spawn().await;
    app.ingest(line("speed", 1.0, "2026-05-01T00:00:00Z")).await;
    let before = scrape(&app).await;

    let body = [
        line("speed", 2.0, "2026-05-01T00:00:01Z"),
        line("speed", 3.0, "2026-05-01T00:00:02Z"),
        line("fuel", 50.0, "2026-05-01T00:00:02Z"),
        line("speed", 1.0, "2026-05-01T00:00:00Z"), // stored already
        line("speed", 2.0, "2026-05-01T00:00:01Z"), // earlier in this request
        line("warp", 9.0, "2026-05-01T00:00:00Z"),  // not in the catalog
        line("location_latitude", 91.0, "2026-05-01T00:00:00Z"), // out of range
        "not json".to_owned(),
    ]
    .join("\n");
    let (status, _) = app.ingest(body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let after = scrape(&app).await;

    let delta = |key: &str| get(&after, key) - get(&before, key);
    assert_eq!(
        delta(r#"milepost_readings_accepted_total{sensor="speed"}"#),
        2.0
    );
    assert_eq!(
        delta(r#"milepost_readings_accepted_total{sensor="fuel"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"milepost_readings_duplicate_total{sensor="speed"}"#),
        2.0
    );
    assert_eq!(
        delta(r#"milepost_readings_rejected_total{sensor="unknown"}"#),
        2.0
    );
    assert_eq!(
        delta(r#"milepost_readings_rejected_total{sensor="location_latitude"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"milepost_ingest_requests_total{status="400"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"milepost_ingest_requests_total{status="200"}"#),
        0.0
    );
    assert_eq!(delta("milepost_ingest_request_duration_seconds_count"), 1.0);
    assert_eq!(delta("milepost_batch_commit_duration_seconds_count"), 1.0);
    assert_eq!(get(&after, "milepost_stored_readings"), 4.0);
    assert_eq!(get(&after, "milepost_devices"), 1.0);
    assert_eq!(get(&after, "milepost_write_queue_depth"), 0.0);
    assert!(get(&after, "milepost_database_size_bytes") > 0.0);
    assert_eq!(
        get(&after, "milepost_last_reading_timestamp_seconds"),
        1_777_593_602.0
    );

    // A refused request is counted too.
    let resp = app
        .client
        .post(app.url("/ingest"))
        .header("content-type", "application/x-ndjson")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let last = scrape(&app).await;
    assert_eq!(
        get(&last, r#"milepost_ingest_requests_total{status="401"}"#),
        1.0
    );
    assert_eq!(
        get(&last, r#"milepost_readings_accepted_total{sensor="speed"}"#),
        get(
            &after,
            r#"milepost_readings_accepted_total{sensor="speed"}"#
        )
    );
}

/// Every series a dashboard or an alert uses is there from the first scrape, at 0:
/// `increase()` sees the first event, and nothing shows "no data".
#[tokio::test]
async fn every_series_is_exported_at_zero_from_start() {
    let app = TestApp::spawn().await;
    let fresh = scrape(&app).await;
    let (_, sensors) = app.get("/api/v1/sensors").await;
    let names: Vec<&str> = sensors["sensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"speed") && names.len() >= 6, "{names:?}");
    let mut expected: Vec<String> = names
        .iter()
        .flat_map(|s| {
            ["accepted", "duplicate", "rejected"]
                .map(|kind| format!(r#"milepost_readings_{kind}_total{{sensor="{s}"}}"#))
        })
        .collect();
    expected.push(r#"milepost_readings_rejected_total{sensor="unknown"}"#.into());
    for status in [200, 400, 401, 413, 415, 500, 503] {
        expected.push(format!(
            r#"milepost_ingest_requests_total{{status="{status}"}}"#
        ));
    }
    expected.extend(["milepost_devices", "milepost_stored_readings"].map(String::from));
    for reason in ["ceiling", "rate"] {
        expected.push(format!(
            r#"milepost_new_devices_refused_total{{reason="{reason}"}}"#
        ));
    }
    for path in ["data_file", "wal"] {
        expected.push(format!(
            r#"milepost_ingest_log_applied_readings_total{{path="{path}"}}"#
        ));
    }
    for key in &expected {
        assert_eq!(fresh.get(key), Some(&0.0), "{key} missing or not 0");
    }
    // The ceiling, to alert on devices / limit.
    assert_eq!(fresh.get("milepost_devices_limit"), Some(&100_000.0));
    // And they count from there.
    app.ingest(line("speed", 1.0, "2026-05-01T00:00:00Z")).await;
    let after = scrape(&app).await;
    assert_eq!(
        after[r#"milepost_readings_accepted_total{sensor="speed"}"#],
        1.0
    );
    assert_eq!(
        after[r#"milepost_ingest_requests_total{status="200"}"#],
        1.0
    );
    assert_eq!(after["milepost_devices"], 1.0);
}

/// A request of new readings, small or bulk, is acknowledged by one `fdatasync` of
/// the ingest log, counted in its histogram.
#[tokio::test]
async fn a_request_of_new_readings_is_acknowledged_by_one_counted_log_sync() {
    let app = TestApp::spawn().await;
    let count = "milepost_ingest_log_sync_duration_seconds_count";
    let before = scrape(&app).await;
    assert!(
        before.contains_key(count),
        "exported at zero from the start"
    );

    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (status, _) = app.ingest(line("speed", 1.0, &now)).await;
    assert_eq!(status, StatusCode::OK);
    let live = scrape(&app).await;
    assert_eq!(get(&live, count) - get(&before, count), 1.0);
    assert!(get(&live, "milepost_ingest_log_sync_duration_seconds_sum") > 0.0);

    let (status, _) = app.ingest(bulk("speed", 2.0, 5_000)).await;
    assert_eq!(status, StatusCode::OK);
    let after = scrape(&app).await;
    assert_eq!(
        get(
            &after,
            r#"milepost_readings_accepted_total{sensor="speed"}"#
        ),
        5_001.0
    );
    // A bulk request of new readings goes through the log too, in one group.
    assert_eq!(get(&after, count) - get(&live, count), 1.0);
}

/// `milepost_ingest_log_applied_readings_total{path}` (README, `/metrics`): a live
/// request's readings reach DuckDB in a small transaction (`wal`), a bulk import's in
/// whole row groups (`data_file`), each counted once it is applied.
#[tokio::test]
async fn readings_applied_from_the_log_are_counted_by_how_duckdb_wrote_them() {
    let app = TestApp::spawn().await;
    let wal = r#"milepost_ingest_log_applied_readings_total{path="wal"}"#;
    let data_file = r#"milepost_ingest_log_applied_readings_total{path="data_file"}"#;
    // Applied by the flusher within a second or so of the answer (segment age).
    let applied = |key: &'static str, want: f64| {
        let app = &app;
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                let m = scrape(app).await;
                if get(&m, key) >= want || std::time::Instant::now() > deadline {
                    return m;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };

    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (status, _) = app.ingest(line("speed", 1.0, &now)).await;
    assert_eq!(status, StatusCode::OK);
    let m = applied(wal, 1.0).await;
    assert_eq!((get(&m, wal), get(&m, data_file)), (1.0, 0.0));

    // 150,000 readings: more than a row group (122,880), in one request.
    let (status, _) = app.ingest(bulk("fuel", 40.0, 150_000)).await;
    assert_eq!(status, StatusCode::OK);
    let m = applied(data_file, 150_000.0).await;
    assert_eq!((get(&m, wal), get(&m, data_file)), (1.0, 150_000.0));
}
