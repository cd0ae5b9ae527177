use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn empty_database_answers_zeros_and_null_status() {
    let app = TestApp::spawn().await;
    let (status, s) = app.get("/api/status").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s, json!({"lastIngestTimestamp": null}));
    let (_, l) = app.get("/api/statistics/latest").await;
    assert_eq!(
        l,
        json!({"speed": 0.0, "fuel": 0.0, "engineTemperature": 0.0, "revolutions": 0.0})
    );
    let (_, l) = app.get("/api/location/latest").await;
    assert_eq!(l, json!({"latitude": 0.0, "longitude": 0.0}));
}

#[tokio::test]
async fn latest_values_location_and_status() {
    let app = TestApp::spawn().await;
    let body = [
        line("speed", 50.0, "2024-03-01T10:00:00Z"),
        line("speed", 70.0, "2024-03-01T10:00:02Z"),
        line("speed", 60.0, "2024-03-01T10:00:01Z"),
        line("fuel", 44.5, "2024-03-01T09:00:00Z"),
        line("revolution", 2100.0, "2024-03-01T10:00:00Z"),
        line("engine_temperature", 88.0, "2024-03-01T10:00:00Z"),
        line("location_latitude", 52.52, "2024-03-01T10:00:00.123456Z"),
        line("location_longitude", 13.405, "2024-03-01T10:00:00.123456Z"),
        line("location_latitude", 52.0, "2024-03-01T08:00:00Z"),
    ]
    .join("\n");
    let (status, r) = app.ingest(body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let (_, l) = app.get("/api/statistics/latest").await;
    assert_eq!(
        l,
        json!({"speed": 70.0, "fuel": 44.5, "engineTemperature": 88.0, "revolutions": 2100.0})
    );
    let (_, l) = app.get("/api/location/latest").await;
    assert_eq!(l, json!({"latitude": 52.52, "longitude": 13.405}));
    let (_, s) = app.get("/api/status").await;
    assert_eq!(s["lastIngestTimestamp"], "2024-03-01T10:00:02Z");
    // The in-memory view survives a restart (it is stored, not rebuilt by luck).
    let app = app.restart().await;
    let (_, l2) = app.get("/api/location/latest").await;
    assert_eq!(l2, json!({"latitude": 52.52, "longitude": 13.405}));
    let (_, s) = app.get("/api/status").await;
    assert_eq!(s["lastIngestTimestamp"], "2024-03-01T10:00:02Z");
}

/// Deterministic pseudo-random values so the expected averages are computed, not typed.
fn value(i: u64) -> f64 {
    ((i.wrapping_mul(2_654_435_761) % 10_000) as f64) / 100.0
}

#[tokio::test]
async fn day_chart_averages_every_15_minute_bucket() {
    let app = TestApp::spawn().await;
    let day_start = chrono::DateTime::parse_from_rfc3339("2024-06-10T00:00:00Z")
        .unwrap()
        .timestamp();
    // Readings every 97 s across the day and a bit beyond on both sides.
    let mut expected_sum = vec![0.0; 96];
    let mut expected_n = vec![0u32; 96];
    let mut body = String::new();
    let mut i = 0u64;
    let mut t = day_start - 3_000;
    while t < day_start + 86_400 + 3_000 {
        let in_day = t >= day_start && t < day_start + 86_400;
        let b = ((t - day_start).max(0) / 900) as usize;
        // Bucket 40 stays empty: it must come back as 0.
        if !(in_day && b == 40) {
            let v = value(i);
            let ts = chrono::DateTime::from_timestamp(t, 0)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            body.push_str(&line("speed", v, &ts));
            body.push('\n');
            if in_day {
                expected_sum[b] += v;
                expected_n[b] += 1;
            }
        }
        i += 1;
        t += 97;
    }
    let (status, r) = app.ingest(body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let (status, chart) = app
        .get("/api/statistics/sensor/speed/date/2024-06-10")
        .await;
    assert_eq!(status, StatusCode::OK);
    let chart = chart.as_array().unwrap();
    assert_eq!(chart.len(), 96);
    for (b, point) in chart.iter().enumerate() {
        assert_eq!(point["sensor"], "speed");
        let start = chrono::DateTime::from_timestamp(day_start + b as i64 * 900, 0).unwrap();
        assert_eq!(
            point["timestamp"],
            start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        let want = if expected_n[b] == 0 {
            0.0
        } else {
            expected_sum[b] / expected_n[b] as f64
        };
        let got = point["value"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-9, "bucket {b}: {got} vs {want}");
    }
    assert_eq!(chart[40]["value"], 0.0);
    assert_eq!(expected_n[40], 0);
}

#[tokio::test]
async fn day_chart_errors_future_dates_and_other_sensors() {
    let app = TestApp::spawn().await;
    for (path, says) in [
        (
            "/api/statistics/sensor/warp/date/2024-06-10",
            "unknown sensor 'warp'",
        ),
        ("/api/statistics/sensor/speed/date/2024-13-01", "YYYY-MM-DD"),
        ("/api/statistics/sensor/speed/date/10-06-2024", "YYYY-MM-DD"),
        (
            "/api/statistics/sensor/speed/date/2024-06-10?tz=Mars/Base",
            "unknown time zone 'Mars/Base'",
        ),
        (
            "/api/statistics/sensor/speed/date/2024-06-10?device=a%20b",
            "invalid device 'a b'",
        ),
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(says)),
            "{path}: {body}"
        );
    }
    let (status, body) = app.get("/api/statistics/sensor/fuel/date/2999-01-01").await;
    assert_eq!(status, StatusCode::OK);
    let all_zero = body.as_array().unwrap().iter().all(|p| p["value"] == 0.0);
    assert!(all_zero && body.as_array().unwrap().len() == 96);
}

#[tokio::test]
async fn daylight_saving_days_in_a_time_zone() {
    let app = TestApp::spawn().await;
    // One reading per local hour around the spring-forward day in Berlin.
    let body: String = (0..30)
        .map(|h| {
            let t = chrono::DateTime::parse_from_rfc3339("2026-03-28T23:00:00Z")
                .unwrap()
                .timestamp()
                + h * 3600;
            let ts = chrono::DateTime::from_timestamp(t, 0).unwrap().to_rfc3339();
            line("engine_temperature", h as f64, &ts) + "\n"
        })
        .collect();
    let (status, _) = app.ingest(body).await;
    assert_eq!(status, StatusCode::OK);
    let (_, spring) = app
        .get("/api/statistics/sensor/engine_temperature/date/2026-03-29?tz=Europe/Berlin")
        .await;
    let spring = spring.as_array().unwrap();
    assert_eq!(spring.len(), 92);
    assert_eq!(spring[0]["timestamp"], "2026-03-28T23:00:00Z");
    assert_eq!(spring[0]["value"], 0.0); // h = 0 at local midnight
    assert_eq!(spring[4]["value"], 1.0);
    assert_eq!(spring[91]["timestamp"], "2026-03-29T21:45:00Z");
    let (_, autumn) = app
        .get("/api/statistics/sensor/engine_temperature/date/2026-10-25?tz=Europe/Berlin")
        .await;
    let autumn = autumn.as_array().unwrap();
    assert_eq!(autumn.len(), 100);
    assert_eq!(autumn[0]["timestamp"], "2026-10-24T22:00:00Z");
    let (_, utc) = app
        .get("/api/statistics/sensor/engine_temperature/date/2026-03-29")
        .await;
    assert_eq!(utc.as_array().unwrap().len(), 96);
    assert_eq!(utc[0]["value"], 1.0); // 00:00Z is h = 1
}

#[tokio::test]
async fn etag_revalidation_and_no_cache() {
    let app = TestApp::spawn().await;
    let path = app.url("/api/statistics/sensor/speed/date/2024-06-10");
    let r = app.client.get(&path).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-cache");
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let r = app
        .client
        .get(&path)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert!(r.text().await.unwrap().is_empty());
    // New data for that day changes the ETag.
    app.ingest(line("speed", 12.0, "2024-06-10T12:00:00Z"))
        .await;
    let r = app
        .client
        .get(&path)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_ne!(r.headers()["etag"].to_str().unwrap(), etag);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body[48]["value"], 12.0);
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_json() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get("/api/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not found");
    let (status, body) = json(app.client.get(app.url("/ingest")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    let (status, body) = app.get("/healthz").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, _) = app.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
}
