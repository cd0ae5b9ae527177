use reqwest::StatusCode;

use crate::helpers::*;

/// The committed spec is the one the server serves. Regenerate with
/// `cargo run --release -- openapi > openapi/openapi.json`.
#[tokio::test]
async fn committed_spec_matches_the_served_one() {
    let app = TestApp::spawn().await;
    let (status, served) = app.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .expect("openapi/openapi.json exists"),
    )
    .unwrap();
    assert!(
        served == committed,
        "openapi/openapi.json is stale: run `cargo run --release -- openapi > openapi/openapi.json`"
    );
    for path in [
        "/ingest",
        "/api/statistics/latest",
        "/api/location/latest",
        "/api/status",
        "/api/statistics/sensor/{sensor}/date/{date}",
    ] {
        assert!(
            served["paths"].get(path).is_some(),
            "{path} missing from the spec"
        );
    }
    let r = app.client.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let page = r.text().await.unwrap();
    assert!(page.contains("swagger"));
    // The spec is inlined in the page (it is built per view, from the same spec).
    assert!(page.contains("/api/statistics/sensor/{sensor}/date/{date}"));
}
