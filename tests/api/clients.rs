//! The published OpenAPI document against real tools: schemathesis fuzzes a live
//! server from it, and a client generated from it by openapi-python-client calls every
//! read endpoint. Both are Python tools the tests install on first use (`tools.rs`).

use std::path::Path;
use std::process::Output;

use chrono::{Duration, Utc};
use reqwest::StatusCode;

use crate::helpers::*;

/// Test cases schemathesis generates per operation and phase. With the seed below the
/// run is the same every time (~850 requests, ~20 s).
const EXAMPLES: &str = "30";
const SEED: &str = "1";

async fn run(cmd: &mut tokio::process::Command) -> Output {
    let out = cmd.output().await.expect("tool runs");
    if !out.status.success() {
        panic!(
            "{:?} failed ({}):\n{}\n{}",
            cmd.as_std(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A server with one day of data in it and dumps configured (so every endpoint has
/// something to answer).
async fn app_with_data() -> (TestApp, String) {
    let app = TestApp::spawn_with(|a| a.blob.node_name = Some("client-test".into())).await;
    let day = (Utc::now() - Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let body = [
        line("speed", 50.0, &format!("{day}T10:00:00Z")),
        line("speed", 60.0, &format!("{day}T12:00:00Z")),
        line("location_latitude", 52.5, &format!("{day}T10:00:00Z")),
        line("location_longitude", 13.4, &format!("{day}T10:00:00Z")),
    ]
    .join("\n");
    let (status, r) = app.ingest(body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    (app, day)
}

/// Schemathesis with a fixed seed and a bounded number of examples, every check but
/// `positive_data_acceptance` (the spec does not spell out every parameter's format,
/// e.g. which characters a device name may hold, so schema-valid values can be
/// refused with a documented 400): no 5xx, status codes, content types, headers and
/// bodies as documented, 405s with `Allow`, auth not ignored, invalid input refused.
#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_or_spec_violation() {
    let (app, _) = app_with_data().await;
    let reports = tempfile::tempdir().unwrap();
    let out = run(tokio::process::Command::new(
        crate::tools::PYTHON_TOOLS.bin().join("schemathesis"),
    )
    .arg("run")
    .arg(app.url("/openapi.json"))
    .args(["--seed", SEED, "--max-examples", EXAMPLES])
    .args([
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
    ])
    .args(["--auth", &format!("{KEY}:")])
    .args(["--generation-database", "none", "--no-color"])
    .arg("--report-dir")
    .arg(reports.path()))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .find(|l| l.contains(" generated, "))
        .expect("schemathesis summary line");
    println!("schemathesis: {}", summary.trim());
    let generated: u64 = summary
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("case count");
    assert!(generated >= 500, "too few cases generated: {summary}");
    // The server is still sound afterwards.
    let (status, _) = app.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
}

/// openapi-python-client generates a client from the served spec; a script calls
/// every read endpoint through it and checks the answers (tests/clients/).
#[tokio::test(flavor = "multi_thread")]
async fn a_generated_client_calls_every_read_endpoint() {
    let (app, day) = app_with_data().await;
    let work = tempfile::tempdir().unwrap();
    let spec = work.path().join("openapi.json");
    let (_, served) = app.get("/openapi.json").await;
    std::fs::write(&spec, served.to_string()).unwrap();
    let generator = crate::tools::PYTHON_TOOLS
        .bin()
        .join("openapi-python-client");
    run(tokio::process::Command::new(&generator)
        .args(["generate", "--meta", "none", "--path"])
        .arg(&spec)
        .arg("--output-path")
        .arg(work.path().join("milepost_client")))
    .await;
    // The generator's own interpreter has the client's dependencies (httpx, attrs).
    let python = crate::tools::PYTHON_TOOLS.bin().join("python3");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/generated_client.py");
    let out = run(tokio::process::Command::new(python)
        .arg(script)
        .args([&app.base, KEY, &day])
        .arg(&spec)
        .env("PYTHONPATH", work.path()))
    .await;
    print!("{}", String::from_utf8_lossy(&out.stdout));
}
