//! `chart.svg` and `track.svg`, parsed as XML: a point per bucket with readings, at
//! the right place; labels in the asked zone; the anomaly marker at its time.

use chrono::{DateTime, Utc};
use milepost::backend::{Role, TokenAdmin, proto};
use reqwest::StatusCode;

use crate::helpers::*;

/// Colours the renderer gives the average (line and points), anomaly markers, and
/// a route's start and end (`milepost::api::chart::render`).
const AVG: &str = "#1F77B4";
const ANOMALY: &str = "#D62728";
const START: &str = "#2CA02C";

/// 2026-01-10T00:00Z: `lada`'s engine temperature every 10 s for two hours, 80 °C
/// before 01:00 and 100 °C after, and an alert whose backfill found that step.
pub(crate) async fn app_with_a_step() -> (TestApp, DateTime<Utc>) {
    let app = TestApp::spawn_with(|a| a.backend.job_burst = 5).await;
    let t0 = DateTime::parse_from_rfc3339("2026-01-10T00:00:00Z")
        .unwrap()
        .to_utc();
    let (status, v) = app
        .ingest(crate::backend::readings_of("lada", t0, 0, 120))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let admin = TokenAdmin::new(app.dir.path())
        .create(Role::Admin, "root")
        .unwrap()
        .0;
    let authed = |msg| milepost::backend::client::authorized(Some(&admin), msg).unwrap();
    let addr = app.server().backend_addr().unwrap();
    let channel = milepost::backend::client::channel(&format!("http://{addr}")).unwrap();
    let alert = proto::AlertsClient::new(channel.clone())
        .create_alert(authed(crate::backend::alert_config("lada-temp", "")))
        .await
        .unwrap()
        .into_inner();
    let found = proto::JobsClient::new(channel)
        .backfill(
            milepost::backend::client::authorized(
                Some(&admin),
                proto::BackfillRequest {
                    alert_id: alert.id,
                    from: "2026-01-10T00:00:00Z".into(),
                    to: "2026-01-10T02:00:00Z".into(),
                },
            )
            .unwrap(),
        )
        .await
        .unwrap()
        .into_inner();
    assert!(found.new_anomalies >= 1, "{found:?}");
    (app, t0)
}

async fn svg(app: &TestApp, path: &str) -> (StatusCode, String) {
    let r = app.client.get(app.url(path)).send().await.unwrap();
    let status = r.status();
    if status == StatusCode::OK {
        assert_eq!(r.headers()["content-type"], "image/svg+xml");
    }
    (status, r.text().await.unwrap())
}

fn attr(n: &roxmltree::Node, name: &str) -> f64 {
    n.attribute(name)
        .unwrap_or_else(|| panic!("no {name} on {n:?}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_chart_has_a_point_per_bucket_with_readings_at_its_place() {
    let (app, t0) = app_with_a_step().await;
    let step = app.get("/api/v1/anomalies?device=lada").await.1["anomalies"][0]["time"]
        .as_str()
        .unwrap()
        .to_owned();
    let step_ms = DateTime::parse_from_rfc3339(&step)
        .unwrap()
        .timestamp_millis();
    // Three hours in 10-minute buckets: 12 with readings, 6 empty; Tokyo is UTC+9.
    let (status, text) = svg(
        &app,
        "/api/v1/sensors/engine_temperature/chart.svg?device=lada&from=2026-01-10T00:00:00Z\
         &to=2026-01-10T03:00:00Z&bucket=10m&tz=Asia/Tokyo&width=900&height=300",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let doc = roxmltree::Document::parse(&text).expect("the chart is well-formed XML");
    let root = doc.root_element();
    assert_eq!(
        (attr(&root, "width"), attr(&root, "height")),
        (900.0, 300.0)
    );
    let points: Vec<(f64, f64)> = doc
        .descendants()
        .filter(|n| n.has_tag_name("circle") && n.attribute("fill") == Some(AVG))
        .map(|n| (attr(&n, "cx"), attr(&n, "cy")))
        .collect();
    assert_eq!(points.len(), 12, "one point per bucket with readings");
    for &(x, y) in &points {
        assert!(
            (0.0..=900.0).contains(&x) && (0.0..=300.0).contains(&y),
            "{x},{y}"
        );
    }
    // x grows with the buckets' middles, evenly; y is one level for 80 °C and a
    // higher one (smaller y) for 100 °C.
    let bucket_ms = 600_000.0;
    let mid = |i: usize| t0.timestamp_millis() as f64 + (i as f64 + 0.5) * bucket_ms;
    let px_per_ms = (points[11].0 - points[0].0) / (mid(11) - mid(0));
    for (i, &(x, _)) in points.iter().enumerate() {
        let want = points[0].0 + (mid(i) - mid(0)) * px_per_ms;
        assert!(
            (x - want).abs() <= 1.0,
            "point {i} at x {x}, expected {want}"
        );
    }
    let (low, high) = (points[0].1, points[11].1);
    assert!(high < low, "100 °C drawn above 80 °C");
    assert!(points[..6].iter().all(|p| (p.1 - low).abs() <= 0.5));
    assert!(points[6..].iter().all(|p| (p.1 - high).abs() <= 0.5));
    // The step's marker, a vertical line where the step is.
    let marker_x: Vec<f64> = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(ANOMALY))
        .map(|n| {
            let pts = n.attribute("points").unwrap();
            pts.split_whitespace()
                .next()
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let want = points[0].0 + (step_ms as f64 - mid(0)) * px_per_ms;
    assert_eq!(marker_x.len(), 1, "{text}");
    assert!(
        (marker_x[0] - want).abs() <= 1.5,
        "marker at {marker_x:?}, step at {want}"
    );
    // Time labels are Tokyo's: 09:00 to 12:00 there (00:00 to 03:00 UTC).
    let labels: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(|t| t.trim().to_owned())
        .filter(|t| t.len() == 5 && t.as_bytes()[2] == b':')
        .collect();
    assert!(labels.len() >= 3, "{labels:?}");
    assert!(
        labels
            .iter()
            .all(|l| ("09:00"..="12:00").contains(&l.as_str())),
        "{labels:?}"
    );
    // The unit from the catalog labels the y axis.
    assert!(
        doc.descendants()
            .any(|n| n.text().is_some_and(|t| t.trim() == "°C"))
    );

    // Without a bucket, one is chosen to fit; a week at 800 px needs 1h.
    let (status, text) = svg(
        &app,
        "/api/v1/sensors/engine_temperature/chart.svg?device=lada&from=2026-01-05T00:00:00Z&to=2026-01-12T00:00:00Z",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let doc = roxmltree::Document::parse(&text).unwrap();
    let n = doc
        .descendants()
        .filter(|n| n.has_tag_name("circle") && n.attribute("fill") == Some(AVG))
        .count();
    assert_eq!(n, 2, "two hours of readings, in 1h buckets");
}

#[tokio::test]
async fn chart_bounds_are_clear_errors() {
    let app = TestApp::spawn().await;
    for (path, status) in [
        ("/api/v1/sensors/speed/chart.svg?width=199", 400),
        ("/api/v1/sensors/speed/chart.svg?width=4001", 400),
        ("/api/v1/sensors/speed/chart.svg?height=2001", 400),
        (
            "/api/v1/sensors/speed/chart.svg?bucket=1m&from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z",
            400,
        ),
        ("/api/v1/sensors/speed/chart.svg?bucket=7m", 400),
        ("/api/v1/sensors/speed/chart.svg?tz=Mars/Olympus", 400),
        ("/api/v1/sensors/warp/chart.svg", 404),
        ("/api/v1/location/track.svg?width=50", 400),
    ] {
        let (s, v) = app.get(path).await;
        assert_eq!(s.as_u16(), status, "{path}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {v}"
        );
    }
    // An empty range is a chart that says so, not an error.
    let (s, text) = svg(&app, "/api/v1/sensors/speed/chart.svg").await;
    assert_eq!(s, StatusCode::OK);
    assert!(text.contains("no readings in this range"));
}

#[tokio::test]
async fn a_track_picture_marks_start_and_end() {
    let app = TestApp::spawn().await;
    let mut body = String::new();
    let t0 = DateTime::parse_from_rfc3339("2026-01-10T08:00:00Z").unwrap();
    for i in 0..50 {
        let ts = (t0 + chrono::Duration::seconds(i * 10)).to_rfc3339();
        body += &format!(
            "{}\n",
            dline("van", "location_latitude", 52.0 + i as f64 * 0.001, &ts)
        );
        body += &format!(
            "{}\n",
            dline("van", "location_longitude", 13.0 + i as f64 * 0.002, &ts)
        );
    }
    assert_eq!(app.ingest(body).await.0, StatusCode::OK);
    let (status, text) = svg(
        &app,
        "/api/v1/location/track.svg?device=van&from=2026-01-10T07:00:00Z&to=2026-01-10T10:00:00Z",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let doc = roxmltree::Document::parse(&text).unwrap();
    let route = doc
        .descendants()
        .find(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(AVG))
        .expect("the route");
    let pts: Vec<(f64, f64)> = route
        .attribute("points")
        .unwrap()
        .split_whitespace()
        .map(|p| {
            let (x, y) = p.split_once(',').unwrap();
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect();
    assert_eq!(pts.len(), 50);
    // North-east: x grows, y (down the page) shrinks.
    assert!(pts.windows(2).all(|w| w[1].0 >= w[0].0 && w[1].1 <= w[0].1));
    let start = doc
        .descendants()
        .find(|n| n.has_tag_name("circle") && n.attribute("fill") == Some(START))
        .expect("start marker");
    assert!((attr(&start, "cx") - pts[0].0).abs() <= 1.0);
    assert!((attr(&start, "cy") - pts[0].1).abs() <= 1.0);
    let end = doc
        .descendants()
        .find(|n| n.has_tag_name("circle") && n.attribute("fill") == Some(ANOMALY))
        .expect("end marker");
    assert!((attr(&end, "cx") - pts[49].0).abs() <= 1.0);
}
