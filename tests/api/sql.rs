//! `POST /api/v1/sql` against a live server: the same answers as the API, in every
//! format; hostile statements refused over HTTP with nothing changed; the time limit;
//! tokens.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

/// A viewer token for `app`.
pub(crate) fn viewer(app: &TestApp) -> String {
    milepost::backend::TokenAdmin::new(app.dir.path())
        .create(milepost::backend::Role::Viewer, "analyst")
        .unwrap()
        .0
}

async fn sql(app: &TestApp, token: &str, body: Value, accept: &str) -> (StatusCode, String) {
    let r = app
        .client
        .post(app.url("/api/v1/sql"))
        .bearer_auth(token)
        .header("Accept", accept)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

async fn sql_json(app: &TestApp, token: &str, query: &str) -> Value {
    let (status, body) = sql(app, token, json!({"sql": query}), "application/json").await;
    assert_eq!(status, StatusCode::OK, "{query}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// A query that never ends by itself.
const BOMB: &str =
    "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t";

/// `(µs, value)` of each NDJSON line, the time in field `ts`.
fn timed_values(ndjson: &str, ts: &str) -> Vec<(i64, f64)> {
    ndjson
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                micros(v[ts].as_str().unwrap()),
                v["value"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Two devices' speed over three hours, every 7 minutes, values from their minute.
pub(crate) fn history() -> String {
    let mut body = String::new();
    for device in ["car-a", "car-b"] {
        for m in (0..180).step_by(7) {
            let ts = format!("2026-03-01T{:02}:{:02}:00Z", 10 + m / 60, m % 60);
            let v = m as f64 * if device == "car-a" { 1.5 } else { 0.5 };
            body += &format!("{}\n", dline(device, "speed", v, &ts));
        }
    }
    body
}

#[tokio::test]
async fn sql_answers_as_the_api_does_in_every_format() {
    let app = TestApp::spawn().await;
    assert_eq!(app.ingest(history()).await.0, StatusCode::OK);
    let token = viewer(&app);
    for device in ["car-a", "car-b"] {
        // Hourly averages from SQL (with a parameter) = the statistics endpoint's.
        let (status, body) = sql(
            &app,
            &token,
            json!({
                "sql": "SELECT date_trunc('hour', ts) AS hour, count(*) AS n, avg(value) AS mean
                        FROM readings WHERE device = ? AND sensor = 'speed'
                        GROUP BY ALL ORDER BY hour",
                "params": [device],
            }),
            "application/json",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let got: Value = serde_json::from_str(&body).unwrap();
        let types: Vec<&str> = got["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["TIMESTAMP", "BIGINT", "DOUBLE"]);
        let (_, stats) = app
            .get(&format!(
                "/api/v1/sensors/speed/statistics?device={device}&from=2026-03-01T10:00:00Z&to=2026-03-01T13:00:00Z&bucket=1h"
            ))
            .await;
        let buckets = stats["buckets"].as_array().unwrap();
        let rows = got["rows"].as_array().unwrap();
        assert_eq!(rows.len(), buckets.len(), "{got} {stats}");
        assert_eq!(got["row_count"], buckets.len());
        for (row, b) in rows.iter().zip(buckets) {
            assert_eq!(row[0], b["start"], "{row} {b}");
            assert_eq!(row[1], b["count"], "{row} {b}");
            assert!((row[2].as_f64().unwrap() - b["avg"].as_f64().unwrap()).abs() < 1e-9);
        }
        // The quarter hours' rollups = the 15-minute statistics.
        let got = sql_json(
            &app,
            &token,
            &format!(
                "SELECT bucket, count, min, max, first, last, sum / count FROM rollups_15m
                 WHERE device = '{device}' AND sensor = 'speed' ORDER BY bucket"
            ),
        )
        .await;
        let (_, stats) = app
            .get(&format!(
                "/api/v1/sensors/speed/statistics?device={device}&from=2026-03-01T10:00:00Z&to=2026-03-01T13:00:00Z&bucket=15m"
            ))
            .await;
        let buckets: Vec<&Value> = stats["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["count"] != 0)
            .collect();
        let rows = got["rows"].as_array().unwrap();
        assert_eq!(rows.len(), buckets.len(), "{got} {stats}");
        for (row, b) in rows.iter().zip(buckets) {
            assert_eq!(row[0], b["start"], "{row} {b}");
            for (i, k) in [
                (1, "count"),
                (2, "min"),
                (3, "max"),
                (4, "first"),
                (5, "last"),
                (6, "avg"),
            ] {
                assert_eq!(row[i].as_f64(), b[k].as_f64(), "{k}: {row} {b}");
            }
        }
        // Raw rows, as NDJSON and CSV, = the API's NDJSON export.
        let (_, export) = app
            .get_text(&format!(
                "/api/v1/sensors/speed/readings?device={device}&format=ndjson"
            ))
            .await;
        let exported = timed_values(&export, "timestamp");
        let query = json!({
            "sql": "SELECT ts, value FROM readings WHERE device = $1 ORDER BY ts",
            "params": [device],
        });
        let (status, ndjson) = sql(&app, &token, query.clone(), "application/x-ndjson").await;
        assert_eq!(status, StatusCode::OK);
        let rows = timed_values(&ndjson, "ts");
        assert_eq!(rows, exported);
        let (status, csv) = sql(&app, &token, query, "text/csv").await;
        assert_eq!(status, StatusCode::OK);
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some("ts,value"));
        assert_eq!(lines.count(), exported.len());
    }
    // The other views.
    let v = sql_json(&app, &token, "SELECT count(*) FROM devices").await;
    assert_eq!(v["rows"], json!([[2]]));
    let v = sql_json(
        &app,
        &token,
        "SELECT unit FROM sensors WHERE name = 'speed'",
    )
    .await;
    assert_eq!(v["rows"], json!([["km/h"]]));
    for view in ["anomalies", "dumps", "rollups_15m"] {
        sql_json(&app, &token, &format!("SELECT * FROM {view} LIMIT 1")).await;
    }
    // NULLs and an empty result.
    let v = sql_json(&app, &token, "SELECT NULL AS x, 1 AS y WHERE false").await;
    assert_eq!(v["rows"], json!([]));
    let v = sql_json(&app, &token, "SELECT NULL AS x, true AS y").await;
    assert_eq!(v["rows"], json!([[null, true]]));
}

/// Statements that would write files, read files or internal tables, change data
/// or settings, or load code; each must be refused (`out`: where they would
/// write). Sent over HTTP here and over the PostgreSQL protocol in `pg`.
pub(crate) fn hostile_statements(out: &std::path::Path) -> Vec<String> {
    let o = out.display();
    vec![
        format!("COPY readings TO '{o}/a.csv'"),
        format!("COPY (SELECT * FROM readings) TO '{o}/b.parquet' (FORMAT parquet)"),
        format!("EXPORT DATABASE '{o}/x'"),
        format!("ATTACH '{o}/y.duckdb' AS y"),
        format!("SELECT * FROM '{o}/z.csv'"),
        "INSTALL httpfs".into(),
        "LOAD httpfs".into(),
        "SET memory_limit = '8GB'".into(),
        "SET enable_external_access = true".into(),
        "PRAGMA database_list".into(),
        "CALL checkpoint()".into(),
        "CHECKPOINT".into(),
        "CREATE TABLE t AS SELECT 1".into(),
        "CREATE TEMP VIEW readings AS SELECT 1".into(),
        "DROP VIEW readings".into(),
        "DELETE FROM readings".into(),
        "UPDATE readings SET value = 0".into(),
        "INSERT INTO readings VALUES ('x', 'speed', now()::TIMESTAMP, 1)".into(),
        "DELETE FROM milepost.main.readings".into(),
        "SELECT 1; DELETE FROM milepost.main.readings".into(),
        "SELECT * FROM read_csv('/etc/passwd')".into(),
        "SELECT * FROM read_text('/etc/passwd')".into(),
        "SELECT * FROM glob('/*')".into(),
        "SELECT * FROM '/etc/passwd'".into(),
        "SELECT * FROM range(1000000000000)".into(),
        "SELECT * FROM query('SELECT 1')".into(),
        "SELECT * FROM duckdb_settings()".into(),
        "SELECT * FROM series".into(),
        "SELECT * FROM milepost.main.series".into(),
        "SELECT webhook_url FROM milepost.main.alerts".into(),
        "SELECT * FROM alerts".into(),
        "SELECT * FROM deliveries".into(),
        "SELECT getenv('HOME')".into(),
        "SELECT current_setting('temp_directory')".into(),
        "SELECT nextval('s')".into(),
        "DESCRIBE readings".into(),
        "SHOW TABLES".into(),
        "SUMMARIZE readings".into(),
        "BEGIN TRANSACTION".into(),
        "VACUUM".into(),
        "DETACH milepost".into(),
        "SELEC 1".into(),
    ]
}

#[tokio::test]
async fn hostile_sql_over_http_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    assert_eq!(app.ingest(history()).await.0, StatusCode::OK);
    let token = viewer(&app);
    let count = "SELECT count(*) FROM readings";
    let before = sql_json(&app, &token, count).await;
    let out = tempfile::tempdir().unwrap();
    let hostile = hostile_statements(out.path());
    assert!(hostile.len() >= 40);
    for q in &hostile {
        let (status, body) = sql(&app, &token, json!({"sql": q}), "application/json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(!v["error"].as_str().unwrap().is_empty(), "{q}: {body}");
    }
    assert_eq!(sql_json(&app, &token, count).await, before);
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    // No token, a wrong one, an ingest key: 401. Ingest still works.
    for t in [None, Some("nope"), Some(KEY)] {
        let mut req = app.client.post(app.url("/api/v1/sql")).body("SELECT 1");
        if let Some(t) = t {
            req = req.bearer_auth(t);
        }
        assert_eq!(req.send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    let (status, _) = app
        .ingest(line("speed", 1.0, "2026-03-01T09:00:00Z") + "\n")
        .await;
    assert_eq!(status, StatusCode::OK);
    // Counted by status: the two counts above, the hostile ones, the three 401s.
    let m = crate::metrics::scrape(&app).await;
    let count = |s: u16| {
        crate::metrics::get(
            &m,
            &format!("milepost_sql_requests_total{{status=\"{s}\"}}"),
        )
    };
    assert_eq!(count(200), 2.0);
    assert_eq!(count(400), hostile.len() as f64);
    assert_eq!(count(401), 3.0);
    assert_eq!(
        crate::metrics::get(&m, "milepost_sql_query_duration_seconds_count"),
        (hostile.len() + 5) as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_over_the_time_limit_is_stopped_and_ingest_goes_on() {
    let app = TestApp::spawn_with(|a| a.sql_timeout = Duration::from_millis(800)).await;
    let token = viewer(&app);
    let started = Instant::now();
    let query = sql(&app, &token, json!({"sql": BOMB}), "application/json");
    let ingest = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        let (status, _) = app
            .ingest(line("speed", 1.0, "2026-03-01T09:00:00Z") + "\n")
            .await;
        (status, t.elapsed())
    };
    let ((status, body), (ingested, took)) = tokio::join!(query, ingest);
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(ingested, StatusCode::OK);
    assert!(took < Duration::from_secs(1), "ingest waited {took:?}");
    // The next query answers.
    let v = sql_json(&app, &token, "SELECT count(*) FROM readings").await;
    assert_eq!(v["rows"], json!([[1]]));
}

/// The statuses and headers the README promises beside the answers and refusals:
/// the row count header, 406, 413 for a result over the cap and for a query text
/// over 1 MiB, 503 with `Retry-After` while two queries run, 429 for a token's
/// second query beside its first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_count_not_acceptable_too_large_and_busy() {
    let app = TestApp::spawn_with(|a| a.sql_timeout = Duration::from_secs(3)).await;
    assert_eq!(app.ingest(history()).await.0, StatusCode::OK);
    let token = viewer(&app);
    let post = |body: String, accept: &'static str| {
        app.client
            .post(app.url("/api/v1/sql"))
            .bearer_auth(&token)
            .header("Accept", accept)
            .body(body)
            .send()
    };
    let r = post("SELECT * FROM readings".into(), "*/*").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-row-count"], "52");
    let r = post("SELECT 1".into(), "image/png").await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_ACCEPTABLE);
    // 52⁴ rows: stopped past the 1,000,000-row cap, nothing of it sent.
    let r = post(
        "SELECT a.value FROM readings a, readings b, readings c, readings d".into(),
        "application/json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.text().await.unwrap().contains("1000000 rows"));
    let r = post(format!("SELECT 1 -- {}", "x".repeat(1 << 20)), "*/*")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Two runaway queries of two tokens take both slots: a third token's query
    // waits a second, then 503; the first token's second query 429 (one at a
    // time each, so no client takes every slot).
    let other = viewer(&app);
    let as_other = app
        .client
        .post(app.url("/api/v1/sql"))
        .bearer_auth(&other)
        .body(BOMB)
        .send();
    let (a, b, c, d) = tokio::join!(
        post(BOMB.into(), "*/*"),
        as_other,
        async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            app.client
                .post(app.url("/api/v1/sql"))
                .bearer_auth(viewer(&app))
                .body("SELECT 1")
                .send()
                .await
        },
        async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            post("SELECT 1".into(), "*/*").await
        }
    );
    let c = c.unwrap();
    assert_eq!(c.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(c.headers()["retry-after"], "1");
    let d = d.unwrap();
    assert_eq!(d.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(d.headers()["retry-after"], "1");
    for r in [a, b] {
        assert_eq!(r.unwrap().status(), StatusCode::REQUEST_TIMEOUT);
    }
}

/// Arrow IPC streams and Parquet files, read by pyarrow: the same rows, columns
/// and types as the JSON answer.
#[tokio::test]
async fn arrow_and_parquet_results_read_in_pyarrow() {
    let app = TestApp::spawn().await;
    assert_eq!(app.ingest(history()).await.0, StatusCode::OK);
    let token = viewer(&app);
    let query = "SELECT device, sensor, ts, value, value > 100 AS fast, count(*) OVER () AS n \
                 FROM readings ORDER BY device, ts";
    let want = sql_json(&app, &token, query).await;
    let dir = tempfile::tempdir().unwrap();
    for (accept, file) in [
        ("application/vnd.apache.arrow.stream", "result.arrows"),
        ("application/vnd.apache.parquet", "result.parquet"),
    ] {
        let r = app
            .client
            .post(app.url("/api/v1/sql"))
            .bearer_auth(&token)
            .header("Accept", accept)
            .body(query)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], accept);
        assert_eq!(r.headers()["x-row-count"], "52");
        std::fs::write(dir.path().join(file), r.bytes().await.unwrap()).unwrap();
    }
    let python = crate::tools::PYTHON_TOOLS.bin().join("python3");
    let script = r#"
import json, sys, pyarrow.ipc, pyarrow.parquet
d = sys.argv[1]
for t in (pyarrow.ipc.open_stream(open(d + "/result.arrows", "rb")).read_all(),
          pyarrow.parquet.read_table(d + "/result.parquet")):
    rows = [[r["device"], r["sensor"], r["ts"].isoformat() + "Z", r["value"], r["fast"], r["n"]]
            for r in t.to_pylist()]
    print(json.dumps({"types": [str(f.type) for f in t.schema], "rows": rows}))
"#;
    let out = tokio::process::Command::new(&python)
        .args(["-c", script])
        .arg(dir.path())
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(read.len(), 2);
    for r in read {
        assert_eq!(
            r["types"],
            json!([
                "string",
                "string",
                "timestamp[us]",
                "double",
                "bool",
                "int64"
            ])
        );
        assert_eq!(r["rows"], want["rows"]);
    }
}

/// Results over 1 MiB are streamed as DuckDB produces them (no `X-Row-Count`):
/// whole when the query ends well; a limit reached after the first bytes ends
/// NDJSON with an error record and breaks the others' connection, never a short
/// result that reads as whole.
#[tokio::test]
async fn large_results_stream_and_a_late_limit_is_never_a_short_result() {
    let app = TestApp::spawn().await;
    assert_eq!(app.ingest(history()).await.0, StatusCode::OK);
    let token = viewer(&app);
    let post = |sql: &'static str, accept: &'static str| {
        app.client
            .post(app.url("/api/v1/sql"))
            .bearer_auth(&token)
            .header("Accept", accept)
            .body(sql)
            .send()
    };
    // 52³ rows, ~8 MB of NDJSON.
    let big = "SELECT a.ts, a.value AS x, b.value AS y, c.value AS z \
               FROM readings a, readings b, readings c";
    let r = post(big, "application/x-ndjson").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("x-row-count").is_none());
    let body = r.text().await.unwrap();
    assert_eq!(body.lines().count(), 52 * 52 * 52);
    assert!(body.lines().all(|l| l.starts_with("{\"ts\":")));
    let r = post(big, "application/vnd.apache.arrow.stream")
        .await
        .unwrap();
    assert!(r.headers().get("x-row-count").is_none());
    let bytes = r.bytes().await.unwrap();
    let reader =
        arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 52 * 52 * 52);

    // 52⁴ rows: past the 1,000,000-row cap after the first MiB went out.
    let over = "SELECT a.value FROM readings a, readings b, readings c, readings d";
    let r = post(over, "application/x-ndjson").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.text().await.unwrap();
    let last: Value = serde_json::from_str(body.lines().last().unwrap()).unwrap();
    assert!(
        last["error"].as_str().unwrap().contains("1000000 rows"),
        "{last}"
    );
    assert!(body.lines().count() <= 1_000_001);
    for accept in ["text/csv", "application/vnd.apache.arrow.stream"] {
        let r = post(over, accept).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.bytes().await.is_err(),
            "{accept}: the body ended as if whole"
        );
    }
    // Whole JSON: decided before the first byte.
    let r = post(over, "application/json").await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The server goes on.
    let v = sql_json(&app, &token, "SELECT count(*) FROM readings").await;
    assert_eq!(v["rows"], json!([[52]]));
}

/// A client that stops reading a streamed result does not keep its query slot:
/// once it took nothing for the time limit the query is stopped (its result ends
/// with an error record), and others' queries run.
#[tokio::test]
async fn a_reader_that_stalls_frees_its_query_slot() {
    let app = TestApp::spawn_with(|a| a.sql_timeout = Duration::from_secs(1)).await;
    assert_eq!(app.ingest(history()).await.0, StatusCode::OK);
    // 900,000 rows with long names, ~190 MB of NDJSON (14 MB of Arrow, within the
    // cap): far more than the sockets' buffers hold (36 MiB on loopback here).
    let big = "SELECT a.value AS a_long_name_that_makes_each_ndjson_line_long_enough_0123456789, \
               b.value AS another_long_name_that_makes_each_ndjson_line_long_enough_012345 \
               FROM readings a, readings b, readings c, readings d LIMIT 900000";
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let r = app
            .client
            .post(app.url("/api/v1/sql"))
            .bearer_auth(viewer(&app))
            .header("Accept", "application/x-ndjson")
            .body(big)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        stalled.push(r);
    }
    // Both slots were taken; within a few seconds one is free again.
    let other = viewer(&app);
    let started = std::time::Instant::now();
    loop {
        let r = app
            .client
            .post(app.url("/api/v1/sql"))
            .bearer_auth(&other)
            .body("SELECT 1 AS one")
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::OK {
            break;
        }
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the stalled readers still hold the slots"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Neither reader has read a byte for longer than the limit by now: both
    // results end with the error, neither is whole.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for r in stalled {
        let body = r.text().await.unwrap();
        assert!(body.lines().count() < 900_000);
        let last: Value = serde_json::from_str(body.lines().last().unwrap()).unwrap();
        assert!(
            last["error"]
                .as_str()
                .unwrap()
                .contains("took none of the result"),
            "{last}"
        );
    }
}

/// A streamed result is announced with `Trailer: X-Row-Count` and ends with its
/// row count as a trailer for a client that accepts trailers (`TE: trailers`).
#[tokio::test]
async fn streamed_results_end_with_their_row_count() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = TestApp::spawn().await;
    assert_eq!(app.ingest(history()).await.0, StatusCode::OK);
    let token = viewer(&app);
    let url = reqwest::Url::parse(&app.url("/api/v1/sql")).unwrap();
    let addr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    // 52³ rows, ~8 MB of NDJSON: streamed.
    let big = "SELECT a.ts, a.value AS x, b.value AS y, c.value AS z \
               FROM readings a, readings b, readings c";
    for accept in ["application/x-ndjson", "text/csv"] {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let request = format!(
            "POST /api/v1/sql HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
             Accept: {accept}\r\nTE: trailers\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{big}",
            big.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8_lossy(&raw).to_lowercase();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("\r\ntrailer: x-row-count"), "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert!(!head.contains("\r\nx-row-count:"), "{head}");
        assert!(
            body.ends_with(&format!("\r\n0\r\nx-row-count: {}\r\n\r\n", 52 * 52 * 52)),
            "{accept}: {}",
            &body[body.len().saturating_sub(200)..]
        );
    }
}

/// A token whose queries used up their share of time is told when to come back
/// (429 + Retry-After), while another token's query runs.
#[tokio::test]
async fn a_token_over_its_share_of_time_is_told_when_to_come_back() {
    // A 1-s limit: the budget holds 1 s and fills at 0.25 s a second.
    let app = TestApp::spawn_with(|a| a.sql_timeout = Duration::from_secs(1)).await;
    let token = viewer(&app);
    let bomb =
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t";
    let post = |token: &str| {
        app.client
            .post(app.url("/api/v1/sql"))
            .bearer_auth(token)
            .body(bomb)
            .send()
    };
    for _ in 0..2 {
        assert_eq!(
            post(&token).await.unwrap().status(),
            StatusCode::REQUEST_TIMEOUT
        );
    }
    // Two 1-s queries left the budget at about -0.75 s: three seconds to wait.
    let r = post(&token).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry = retry_after(&r);
    assert!((2..=4).contains(&retry), "{retry}");
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("share of the server's time"),
        "{body}"
    );
    let v = sql_json(&app, &viewer(&app), "SELECT 1 AS one").await;
    assert_eq!(v["rows"], json!([[1]]));
}
