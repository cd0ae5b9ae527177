//! Daily dumps: real stores (local files, memory, an S3 server), read back with
//! independent readers (DuckDB's own `read_parquet` over the Hive glob, gzip + a
//! JSON parser), re-ingested into a fresh server.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{Days, NaiveDate, Utc};
use milepost::domain::DumpFormat;
use milepost::export::{BlobStore, DumpSettings, Dumper, Layout, Retry};
use milepost::metrics::Metrics;
use milepost::store::{Store, StoreConfig};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::helpers::*;

pub(crate) type Row = (String, String, i64, f64);

pub(crate) fn day(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
}

/// `n` readings of `sensor` for `device` on `day`, every 61 s from `offset_s`, with
/// values that need all of a double's digits.
pub(crate) fn day_lines(
    device: &str,
    sensor: &str,
    day: NaiveDate,
    n: usize,
    offset_s: i64,
) -> String {
    let start = day.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp();
    (0..n)
        .map(|i| {
            let t = chrono::DateTime::from_timestamp(start + offset_s + 61 * i as i64, 0).unwrap();
            let ts = t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let v = (i as f64).sqrt() * 1.1 + 0.1;
            let l = if device == "default" {
                line(sensor, v, &ts)
            } else {
                dline(device, sensor, v, &ts)
            };
            l + "\n"
        })
        .collect()
}

/// Readings of three devices over three days, with both sides of each midnight at
/// microsecond precision.
pub(crate) fn three_days() -> String {
    let mut body = String::new();
    for (i, d) in ["2026-11-01", "2026-11-02", "2026-11-03"]
        .into_iter()
        .enumerate()
    {
        let d = day(d);
        body += &day_lines("default", "speed", d, 300, 7);
        body += &day_lines("truck-1", "fuel", d, 200, 13 + i as i64);
        body += &day_lines("truck-1", "speed", d, 100, 17);
    }
    body += &day_lines("van.2", "engine_temperature", day("2026-11-03"), 50, 3);
    body += &line("speed", 1.25, "2026-11-01T23:59:59.999999Z");
    body += "\n";
    body += &line("speed", 2.5, "2026-11-02T00:00:00.000000Z");
    body += "\n";
    body += &dline("truck-1", "fuel", 3.75, "2026-11-02T23:59:59.999999Z");
    body += "\n";
    body += &dline("truck-1", "fuel", -4.5, "2026-11-03T00:00:00Z");
    body += "\n";
    body
}

/// Reads the whole Parquet lake under `dir` with DuckDB's own reader, as a user
/// would: the Hive glob, nothing else.
pub(crate) fn read_lake(dir: &Path) -> Vec<(Row, String)> {
    let conn = duckdb::Connection::open_in_memory().unwrap();
    let glob = dir.join("parquet/*/*.parquet");
    let mut stmt = conn
        .prepare(&format!(
            "SELECT device, sensor, epoch_us(timestamp), value, strftime(date, '%Y-%m-%d')
             FROM read_parquet('{}', hive_partitioning = true)
             ORDER BY device, sensor, timestamp",
            glob.display()
        ))
        .unwrap();
    stmt.query_map([], |r| {
        Ok(((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?), r.get(4)?))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// The lines of a gzip NDJSON dump, parsed. `value` is parsed again from its text
/// with Rust's exact float parser (serde_json's default one may be off by an ulp).
pub(crate) fn read_json_gz(bytes: &[u8]) -> Vec<Value> {
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let raw = l
                .split("\"value\":")
                .nth(1)
                .and_then(|r| r.split([',', '}']).next())
                .unwrap_or_else(|| panic!("no value in {l}"));
            let exact: f64 = raw.parse().unwrap_or_else(|e| panic!("{e}: {l}"));
            v["value"] = serde_json::json!(exact);
            v
        })
        .collect()
}

pub(crate) fn json_rows(lines: &[Value]) -> Vec<Row> {
    let mut rows: Vec<Row> = lines
        .iter()
        .map(|v| {
            let ts = chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().unwrap())
                .unwrap()
                .timestamp_micros();
            (
                v.get("device")
                    .map_or("default", |d| d.as_str().unwrap())
                    .to_owned(),
                v["sensor"].as_str().unwrap().to_owned(),
                ts,
                v["value"].as_f64().unwrap(),
            )
        })
        .collect();
    rows.sort_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));
    rows
}

/// Equal row lists, or a panic naming the first difference (not two huge lists).
pub(crate) fn assert_rows_eq(got: &[Row], want: &[Row], what: &str) {
    if let Some(i) = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: row {i} differs: got {:?}, want {:?}",
            got[i], want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: row count");
}

fn day_of(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap()
        .format("%Y-%m-%d")
        .to_string()
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn with_dumps(node: &str) -> TestApp {
    let node = node.to_owned();
    TestApp::spawn_with(move |a| a.blob.node_name = Some(node)).await
}

#[tokio::test]
async fn dumps_hold_exactly_what_was_ingested_and_reingest_to_the_same_day() {
    let app = with_dumps("node-a").await;
    let (status, r) = app.ingest(three_days()).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let summary = app
        .server()
        .dumper()
        .run_due(Utc::now().date_naive())
        .await
        .unwrap();
    // Every finished day from the first reading on: the three days, then empty ones.
    assert_eq!(
        summary.dumped[..3],
        [day("2026-11-01"), day("2026-11-02"), day("2026-11-03")]
    );
    assert!(summary.failed.is_empty());

    let dumps = app.dir.path().join("dumps");
    for d in ["2026-11-01", "2026-11-02", "2026-11-03"] {
        assert!(dumps.join(format!("{d}.json.gz")).is_file(), "{d} json");
        assert!(
            dumps
                .join(format!("parquet/date={d}/node-a.parquet"))
                .is_file(),
            "{d} parquet"
        );
    }

    // The Parquet lake, read by DuckDB with the glob alone, is exactly what is stored,
    // each reading in the partition of its UTC day.
    let lake = read_lake(&dumps);
    let (app_dir, api) = {
        let (_, list) = app.get("/api/v1/dumps").await;
        (app.stop().await, list)
    };
    let stored = stored_rows(app_dir.path());
    assert_eq!(stored.len(), 3 * 600 + 50 + 4);
    let lake_rows: Vec<Row> = lake.iter().map(|(r, _)| r.clone()).collect();
    assert_rows_eq(&lake_rows, &stored, "parquet lake");
    for (r, date) in &lake {
        assert_eq!(&day_of(r.2), date, "{r:?}");
    }
    assert!(
        lake.iter()
            .any(|(r, d)| r.2 % 1_000_000 == 999_999 && d == "2026-11-01")
    );

    // Column types and compression as documented.
    let conn = duckdb::Connection::open_in_memory().unwrap();
    let file = dumps.join("parquet/date=2026-11-01/node-a.parquet");
    let (ts_type, codecs, name_encodings): (String, String, String) = conn
        .query_row(
            &format!(
                "SELECT (SELECT typeof(timestamp) FROM read_parquet('{0}') LIMIT 1),
                        (SELECT string_agg(DISTINCT compression, ',') FROM parquet_metadata('{0}')),
                        (SELECT string_agg(encodings, ',') FROM parquet_metadata('{0}')
                         WHERE path_in_schema IN ('device', 'sensor'))",
                file.display()
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(ts_type, "TIMESTAMP WITH TIME ZONE");
    assert_eq!(codecs, "ZSTD");
    assert!(name_encodings.contains("DICTIONARY"), "{name_encodings}");
    // Each file is in (device, sensor, time) order as it lies on disk.
    for d in ["2026-11-01", "2026-11-02", "2026-11-03"] {
        let file = dumps.join(format!("parquet/date={d}/node-a.parquet"));
        let mut stmt = conn
            .prepare(&format!(
                "SELECT device, sensor, epoch_us(timestamp) FROM read_parquet('{}')",
                file.display()
            ))
            .unwrap();
        let keys: Vec<(String, String, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            keys.is_sorted(),
            "{d} is not sorted by device, sensor, time"
        );
        assert!(!keys.is_empty());
    }

    // The seed's NDJSON: exactly the stored readings, `device` only where it is not
    // the default, timestamps RFC 3339 UTC.
    let mut from_json = Vec::new();
    for d in ["2026-11-01", "2026-11-02", "2026-11-03"] {
        let bytes = std::fs::read(dumps.join(format!("{d}.json.gz"))).unwrap();
        let lines = read_json_gz(&bytes);
        for l in &lines {
            let keys: BTreeSet<&str> = l.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            let has_device = keys.contains("device");
            assert_eq!(keys.len(), if has_device { 4 } else { 3 }, "{l}");
            assert!(
                ["sensor", "value", "timestamp"]
                    .iter()
                    .all(|k| keys.contains(k)),
                "{l}"
            );
            if has_device {
                assert_ne!(l["device"], "default");
            }
            let ts = l["timestamp"].as_str().unwrap();
            assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");
            assert_eq!(&ts[..10], d, "{l}");
        }
        from_json.extend(json_rows(&lines));
    }
    from_json.sort_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));
    assert_rows_eq(&from_json, &stored, "json dumps");

    // The API lists the manifest; each download is the object itself.
    let listed = api["dumps"].as_array().unwrap();
    assert!(listed.len() >= 6, "{api}");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dumps.join("manifests/node-a.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["node"], "node-a");
    assert_eq!(manifest["dumps"].as_array().unwrap().len(), listed.len());
    for entry in manifest["dumps"].as_array().unwrap() {
        let bytes = std::fs::read(dumps.join(entry["key"].as_str().unwrap())).unwrap();
        assert_eq!(entry["bytes"].as_u64().unwrap(), bytes.len() as u64);
        assert_eq!(entry["sha256"].as_str().unwrap(), sha256(&bytes));
        let date = entry["date"].as_str().unwrap();
        let rows = stored.iter().filter(|r| day_of(r.2) == date).count() as u64;
        assert_eq!(entry["rows"].as_u64().unwrap(), rows, "{entry}");
    }

    // Re-ingesting the NDJSON dumps into an empty server stores the same readings.
    let fresh = TestApp::spawn().await;
    for d in ["2026-11-01", "2026-11-02", "2026-11-03"] {
        let gz = std::fs::read(dumps.join(format!("{d}.json.gz"))).unwrap();
        let resp = fresh
            .client
            .post(fresh.url("/ingest"))
            .basic_auth(KEY, None::<&str>)
            .header("content-type", "application/x-ndjson")
            .header("content-encoding", "gzip")
            .body(gz)
            .send()
            .await
            .unwrap();
        let (status, r) = json(resp).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_eq!(num(&r, "rejected"), 0);
    }
    let fresh_dir = fresh.stop().await;
    assert_rows_eq(&stored_rows(fresh_dir.path()), &stored, "re-ingested");
}

#[tokio::test]
async fn downloads_stream_the_objects_and_unknown_names_are_404() {
    let app = TestApp::spawn_with(|a| a.blob.blob_store_url = Some("memory:///lake".into())).await;
    app.ingest(three_days()).await;
    let dumper = app.server().dumper();
    dumper.dump_day(day("2026-11-02")).await.unwrap();
    let (status, list) = app.get("/api/v1/dumps").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["store"], "memory:///lake");
    let dumps = list["dumps"].as_array().unwrap();
    assert_eq!(dumps.len(), 2, "{list}");
    for d in dumps {
        let resp = app
            .client
            .get(app.url(d["url"].as_str().unwrap()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // The ETag is the object's SHA-256, the file name its download name.
        assert_eq!(
            resp.headers()["etag"],
            format!("\"{}\"", d["sha256"].as_str().unwrap()).as_str()
        );
        assert_eq!(
            resp.headers()["content-disposition"],
            format!("attachment; filename=\"{}\"", d["name"].as_str().unwrap()).as_str()
        );
        let bytes = resp.bytes().await.unwrap();
        assert_eq!(sha256(&bytes), d["sha256"].as_str().unwrap());
        assert_eq!(bytes.len() as u64, d["bytes"].as_u64().unwrap());
        if d["format"] == "json" {
            assert_eq!(
                read_json_gz(&bytes).len() as u64,
                d["rows"].as_u64().unwrap()
            );
        } else {
            assert_eq!(&bytes[..4], b"PAR1");
        }
    }
    let (status, body) = app.get("/api/v1/dumps/2026-11-01.parquet").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("2026-11-01.parquet")
    );
    let (status, _) = app.get("/api/v1/dumps/..%2F..%2Fmilepost.duckdb").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A run starts with the server: days missed while it was down are dumped without
/// waiting for the schedule (here 06:00 daily).
#[tokio::test]
async fn a_server_dumps_the_missed_days_when_it_starts() {
    let app = TestApp::spawn().await;
    app.ingest(three_days()).await;
    let dir = app.stop().await;
    let app = TestApp::spawn_in(dir, |a| a.dump_schedule = "0 0 6 * * *".into()).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, list) = app.get("/api/v1/dumps").await;
        let dates: BTreeSet<String> = list["dumps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["date"].as_str().unwrap().to_owned())
            .collect();
        if ["2026-11-01", "2026-11-02", "2026-11-03"]
            .iter()
            .all(|d| dates.contains(*d))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{list}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    app.stop().await;
}

/// A manifest the last run could not write (or a SIGTERM cancelled between
/// recording a day and writing it) is written when the server stops, so the lake
/// lists every object the node made.
#[tokio::test]
async fn a_stale_manifest_is_written_when_the_server_stops() {
    let lake = tempfile::tempdir().unwrap();
    let url = format!("file://{}", lake.path().display());
    let app = TestApp::spawn_with(move |a| {
        a.blob.blob_store_url = Some(url);
        a.blob.node_name = Some("n".into());
    })
    .await;
    app.ingest(three_days()).await;
    // The manifest cannot be written while `manifests` is a file.
    let manifests = lake.path().join("manifests");
    std::fs::remove_dir_all(&manifests).unwrap();
    std::fs::write(&manifests, "in the way").unwrap();
    app.server().run_jobs_once().await;
    let keys = |list: &Value| -> BTreeSet<String> {
        list["dumps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["key"].as_str().unwrap().to_owned())
            .collect()
    };
    // The three days with readings, and the empty days after them up to yesterday.
    let listed = keys(&app.get("/api/v1/dumps").await.1);
    assert!(
        listed.contains("parquet/date=2026-11-03/n.parquet"),
        "{listed:?}"
    );
    assert!(!manifests.join("n.json").exists());
    std::fs::remove_file(&manifests).unwrap();
    app.stop().await;
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(manifests.join("n.json")).unwrap()).unwrap();
    assert_eq!(keys(&manifest), listed);
    for key in &listed {
        assert!(lake.path().join(key).is_file(), "{key}");
    }
}

#[tokio::test]
async fn with_a_public_url_downloads_redirect_there() {
    let app = TestApp::spawn_with(|a| {
        a.blob.blob_store_url = Some("memory:///".into());
        a.dump_public_url = Some("https://cdn.example.com/trip/".into());
    })
    .await;
    app.ingest(three_days()).await;
    app.server()
        .dumper()
        .dump_day(day("2026-11-01"))
        .await
        .unwrap();
    let (_, list) = app.get("/api/v1/dumps").await;
    let parquet = list["dumps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["format"] == "parquet")
        .unwrap()
        .clone();
    let want = format!(
        "https://cdn.example.com/trip/parquet/date=2026-11-01/{}.parquet",
        list["node"].as_str().unwrap()
    );
    assert_eq!(parquet["url"], want.as_str());
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = no_follow
        .get(app.url("/api/v1/dumps/2026-11-01.parquet"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(resp.headers()["location"], want.as_str());
}

#[tokio::test]
async fn a_late_reading_triggers_exactly_one_redump() {
    let app = with_dumps("n").await;
    app.ingest(three_days()).await;
    let dumper = app.server().dumper();
    let today = Utc::now().date_naive();
    // Every day from the first reading on is due (empty ones too), at most
    // `max_days_per_run` per run: as many runs as that takes, then none is due.
    let mut runs = 0;
    while dumper.run_due(today).await.unwrap().pending > 0 {
        runs += 1;
        assert!(runs < 100, "days stay due run after run");
    }
    assert!(dumper.run_due(today).await.unwrap().dumped.is_empty());
    let before = dumper
        .records()
        .into_iter()
        .find(|r| r.day == day("2026-11-02") && r.format == DumpFormat::Json)
        .unwrap();

    let (status, r) = app
        .ingest(dline("truck-1", "speed", 9.0, "2026-11-02T12:34:56.789Z"))
        .await;
    assert_eq!((status, num(&r, "accepted")), (StatusCode::OK, 1));
    // A duplicate changes nothing.
    app.ingest(dline("truck-1", "speed", 9.0, "2026-11-02T12:34:56.789Z"))
        .await;
    let again = dumper.run_due(today).await.unwrap();
    assert_eq!(again.dumped, vec![day("2026-11-02")]);
    assert!(dumper.run_due(today).await.unwrap().dumped.is_empty());
    let after = dumper
        .records()
        .into_iter()
        .find(|r| r.day == day("2026-11-02") && r.format == DumpFormat::Json)
        .unwrap();
    assert_eq!(after.readings, before.readings + 1);
    assert_ne!(after.sha256, before.sha256);
    let bytes = std::fs::read(app.dir.path().join("dumps/2026-11-02.json.gz")).unwrap();
    assert!(
        read_json_gz(&bytes)
            .iter()
            .any(|l| l["timestamp"] == "2026-11-02T12:34:56.789Z" && l["device"] == "truck-1")
    );
}

#[tokio::test]
async fn catch_up_covers_every_day_since_the_first_reading_a_bounded_number_per_run() {
    let today = Utc::now().date_naive();
    let first = today - Days::new(6);
    let app = TestApp::spawn_with(|a| {
        a.blob.blob_store_url = Some("memory:///".into());
        a.dump_max_days = 4;
    })
    .await;
    app.ingest(
        day_lines("default", "speed", first, 10, 0)
            + &day_lines("default", "fuel", today - Days::new(2), 10, 0),
    )
    .await;
    let dumper = app.server().dumper();
    let run = dumper.run_due(today).await.unwrap();
    assert_eq!(run.dumped, first.iter_days().take(4).collect::<Vec<_>>());
    assert_eq!(run.pending, 2);
    let run = dumper.run_due(today).await.unwrap();
    assert_eq!(run.dumped, vec![today - Days::new(2), today - Days::new(1)]);
    assert_eq!(run.pending, 0);
    assert!(dumper.run_due(today).await.unwrap().dumped.is_empty());

    // Days without readings have valid, empty files.
    let empty = first + Days::new(1);
    let blob = dumper.blob();
    let json = blob
        .read(&format!("{}.json.gz", empty.format("%Y-%m-%d")))
        .await
        .unwrap()
        .unwrap();
    assert!(read_json_gz(&json).is_empty());
    let parquet = blob
        .read(&format!(
            "parquet/date={}/{}.parquet",
            empty.format("%Y-%m-%d"),
            dumper.settings().layout.node
        ))
        .await
        .unwrap()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("e.parquet");
    std::fs::write(&f, &parquet).unwrap();
    let n: i64 = duckdb::Connection::open_in_memory()
        .unwrap()
        .query_row(
            &format!("SELECT count(*) FROM read_parquet('{}')", f.display()),
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 0);
    let (_, list) = app.get("/api/v1/dumps").await;
    assert_eq!(list["dumps"].as_array().unwrap().len(), 12);
    // An empty day has no first or last reading: the fields are absent, not null.
    let empty_date = empty.format("%Y-%m-%d").to_string();
    let empty_entry = list["dumps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["date"] == empty_date.as_str())
        .unwrap();
    assert_eq!(empty_entry["rows"], 0);
    assert!(empty_entry.get("min_timestamp").is_none(), "{empty_entry}");
}

/// A real local store whose multipart uploads fail after their first part while
/// `failures` lasts.
#[derive(Debug)]
struct FlakyStore {
    inner: object_store::local::LocalFileSystem,
    failures: Arc<AtomicUsize>,
}

impl std::fmt::Display for FlakyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FlakyStore({})", self.inner)
    }
}

#[derive(Debug)]
struct FlakyUpload {
    inner: Box<dyn object_store::MultipartUpload>,
    parts: usize,
    failures: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl object_store::MultipartUpload for FlakyUpload {
    fn put_part(&mut self, data: object_store::PutPayload) -> object_store::UploadPart {
        self.parts += 1;
        let fail = self.parts > 1
            && self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if fail {
            return Box::pin(async {
                Err(object_store::Error::Generic {
                    store: "flaky",
                    source: "connection reset mid-upload".into(),
                })
            });
        }
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<object_store::PutResult> {
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for FlakyStore {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        Ok(Box::new(FlakyUpload {
            inner: self.inner.put_multipart_opts(location, opts).await?,
            parts: 0,
            failures: self.failures.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn delete(&self, location: &object_store::path::Path) -> object_store::Result<()> {
        self.inner.delete(location).await
    }

    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
    {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
    ) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
    ) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

#[tokio::test]
async fn a_store_failing_mid_upload_leaves_no_object_and_the_day_is_retried() {
    let app = TestApp::spawn().await;
    app.ingest(three_days()).await;
    let data = app.stop().await;

    let lake = tempfile::tempdir().unwrap();
    let failures = Arc::new(AtomicUsize::new(usize::MAX));
    let flaky = FlakyStore {
        inner: object_store::local::LocalFileSystem::new_with_prefix(lake.path()).unwrap(),
        failures: failures.clone(),
    };
    let blob = BlobStore::from_parts(Arc::new(flaky), "", "flaky:///")
        .with_part_bytes(4096)
        .with_retry(Retry {
            attempts: 2,
            backoff: std::time::Duration::from_millis(10),
        });
    let store = Store::open(&StoreConfig {
        data_dir: data.path().to_owned(),
        memory_limit: "128MB".into(),
        threads: 1,
        series_memory: milepost::store::DEFAULT_SERIES_MEMORY,
        temp_limit: None,
    })
    .unwrap();
    let settings = || DumpSettings {
        formats: DumpFormat::ALL.to_vec(),
        layout: Layout {
            node: "n".into(),
            shared: false,
        },
        work_dir: data.path().join("dump-tmp"),
        max_days_per_run: 3,
    };
    let metrics = Arc::new(Metrics::new());
    let dumper = Dumper::new(
        store.dump_source().unwrap(),
        blob,
        settings(),
        metrics.clone(),
    )
    .await
    .unwrap();
    let run = dumper.run_due(day("2026-11-04")).await.unwrap();
    assert!(run.dumped.is_empty(), "{run:?}");
    assert_eq!(run.failed.len(), 3);
    // Nothing under a final name, nothing recorded; the manifest (written at start,
    // to claim the node's name) lists nothing.
    let names: Vec<String> = walk(lake.path());
    assert_eq!(names, ["manifests/n.json"]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(lake.path().join("manifests/n.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["dumps"], serde_json::json!([]));
    assert!(dumper.records().is_empty());
    assert!(
        metrics.render().contains("milepost_dumps_failed_total 3"),
        "{}",
        metrics.render()
    );

    // The store recovers, but for one more failed part: that upload is retried
    // within the same run, and every day is dumped.
    failures.store(1, Ordering::SeqCst);
    let run = dumper.run_due(day("2026-11-04")).await.unwrap();
    assert_eq!(failures.load(Ordering::SeqCst), 0, "the failure happened");
    assert!(run.failed.is_empty(), "{run:?}");
    assert_eq!(run.dumped.len(), 3);
    assert_eq!(dumper.records().len(), 6);
    let names = walk(lake.path());
    assert!(
        names.contains(&"2026-11-02.json.gz".to_owned()),
        "{names:?}"
    );
    assert!(names.contains(&"manifests/n.json".to_owned()));
    // Survives a restart: the records are in the database.
    drop(dumper);
    let blob = BlobStore::open(&milepost::export::BlobConfig {
        url: format!("file://{}", lake.path().display()),
        s3_endpoint: None,
        s3_region: None,
    })
    .unwrap();
    let dumper = Dumper::new(store.dump_source().unwrap(), blob, settings(), metrics)
        .await
        .unwrap();
    // Another store (URL) has no dumps yet: every day is due there.
    assert_eq!(
        dumper.due_days(day("2026-11-04")).await.unwrap().len(),
        3,
        "dumps are per store"
    );
}

/// Every file under `dir`, relative, sorted.
pub(crate) fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn retention_deletes_only_dumped_days_and_every_endpoint_stays_consistent() {
    retention_keeps_every_endpoint_consistent(false).await;
}

/// The same with both devices' series statistics on disk (`--series-memory 0`) when
/// retention runs: their rows in the `series` table are brought up to date.
#[tokio::test]
async fn retention_keeps_the_statistics_of_devices_on_disk_exact() {
    retention_keeps_every_endpoint_consistent(true).await;
}

/// Waits until `n` devices' series statistics are on disk.
async fn devices_on_disk(app: &TestApp, n: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let m = crate::metrics::scrape(app).await;
        let got = crate::metrics::get(&m, "milepost_series_statistics_devices_on_disk");
        if got == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{got} devices on disk"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn retention_keeps_every_endpoint_consistent(on_disk: bool) {
    let today = Utc::now().date_naive();
    let days: Vec<NaiveDate> = (3..=5).rev().map(|n| today - Days::new(n)).collect();
    let configure = move |a: &mut milepost::config::ServeArgs| {
        a.blob.blob_store_url = Some("memory:///".into());
        a.retention_days = Some(2);
        a.dump_max_days = 1;
        if on_disk {
            a.series_memory = 0;
            a.series_idle = std::time::Duration::ZERO;
        }
    };
    let app = TestApp::spawn_with(configure).await;
    let disk_devices = if on_disk { 3.0 } else { 0.0 };
    let mut body = String::new();
    for d in &days {
        body += &day_lines("default", "speed", *d, 100, 5);
        body += &day_lines("truck-1", "fuel", *d, 40, 9);
    }
    // Only the oldest day has readings of truck-1's rpm, and of trailer-9 at all.
    body += &day_lines("truck-1", "revolution", days[0], 10, 1);
    body += &day_lines("trailer-9", "fuel", days[0], 10, 2);
    body += &line(
        "speed",
        42.0,
        &format!("{}T10:00:00Z", today.format("%Y-%m-%d")),
    );
    body += "\n";
    app.ingest(body).await;
    devices_on_disk(&app, disk_devices).await;
    let (_, latest_before) = app.get("/api/statistics/latest").await;
    let (_, status_before) = app.get("/api/status").await;
    let (_, metrics_before) = app.get_text("/metrics").await;
    assert!(
        metrics_before.contains("milepost_stored_readings 441\n"),
        "{metrics_before}"
    );

    // One day per run: the oldest is dumped, then deleted; the two others (older than
    // two days too, but not dumped yet) are kept.
    app.server().run_jobs_once().await;
    devices_on_disk(&app, disk_devices).await;
    let (_, metrics) = app.get_text("/metrics").await;
    assert!(
        metrics.contains("milepost_stored_readings 281\n"),
        "{metrics}"
    );
    let (_, devices) = app.get("/api/v1/devices").await;
    let default = &devices["devices"][0];
    assert_eq!(default["device"], "default");
    assert_eq!(default["readings"], 2 * 100 + 1, "{devices}");
    let first = format!("{}T00:00:05Z", days[1].format("%Y-%m-%d"));
    assert_eq!(default["first"], first.as_str());
    // A device with nothing left is listed empty.
    let trailer = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "trailer-9")
        .unwrap();
    assert_eq!(
        trailer,
        &serde_json::json!({"device": "trailer-9", "readings": 0, "first": null, "last": null})
    );
    let (_, sensors) = app.get("/api/v1/sensors?device=truck-1").await;
    let rpm = sensors["sensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "revolution")
        .unwrap();
    assert_eq!(rpm["readings"], 0, "{rpm}");
    assert_eq!(app.get("/api/statistics/latest").await.1, latest_before);
    assert_eq!(app.get("/api/status").await.1, status_before);
    let (_, chart) = app
        .get(&format!(
            "/api/statistics/sensor/speed/date/{}",
            days[0].format("%Y-%m-%d")
        ))
        .await;
    assert!(
        chart.as_array().unwrap().iter().all(|b| b["value"] == 0.0),
        "{chart}"
    );
    let (_, chart) = app
        .get(&format!(
            "/api/statistics/sensor/speed/date/{}",
            days[1].format("%Y-%m-%d")
        ))
        .await;
    assert!(chart.as_array().unwrap().iter().any(|b| b["value"] != 0.0));
    // The deleted day is still in the dumps, and still downloadable.
    let (_, list) = app.get("/api/v1/dumps").await;
    let name = format!("{}.json.gz", days[0].format("%Y-%m-%d"));
    let entry = list["dumps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name.as_str())
        .unwrap()
        .clone();
    assert_eq!(entry["rows"], 100 + 40 + 10 + 10);
    let bytes = app
        .client
        .get(app.url(entry["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(read_json_gz(&bytes).len(), 160);

    // Next run: the second day goes the same way; the third is still undumped.
    app.server().run_jobs_once().await;
    devices_on_disk(&app, disk_devices).await;
    let app = app.restart_with(configure).await;
    let (_, devices) = app.get("/api/v1/devices").await;
    assert_eq!(devices["devices"][0]["readings"], 100 + 1, "{devices}");
    assert_eq!(devices["devices"][1]["readings"], 40, "{devices}");
    let dir = app.stop().await;
    let rows = stored_rows(dir.path());
    let kept: BTreeSet<String> = rows.iter().map(|r| day_of(r.2)).collect();
    let want: BTreeSet<String> = [days[2], today]
        .iter()
        .map(|d| d.format("%Y-%m-%d").to_string())
        .collect();
    assert_eq!(kept, want);
}

/// At a small DuckDB limit retention groups the retired series a range of devices
/// at a time: 10,000 devices' day retired in several statements leaves every
/// device's count and first reading exact, resident or on disk.
#[tokio::test]
async fn retention_in_several_device_ranges_keeps_every_device_exact() {
    for on_disk in [false, true] {
        let today = Utc::now().date_naive();
        let (old, kept) = (today - Days::new(4), today - Days::new(1));
        let configure = move |a: &mut milepost::config::ServeArgs| {
            a.blob.blob_store_url = Some("memory:///".into());
            a.retention_days = Some(2);
            // ~47,000 groups a statement (see `store::device_ranges`): the retired
            // day's 10,000 devices take two.
            a.storage.memory_limit = "16MB".into();
            if on_disk {
                a.series_memory = 0;
                a.series_idle = std::time::Duration::ZERO;
            }
        };
        let app = TestApp::spawn_with(configure).await;
        let devices = 10_000;
        let mut body = String::new();
        for d in 0..devices {
            let name = format!("car-{d:04}");
            body += &day_lines(&name, "speed", old, 10, d);
            // Every seventh device keeps readings from a later day.
            if d % 7 == 0 {
                body += &day_lines(&name, "speed", kept, 3, d);
            }
        }
        app.ingest(body).await;
        if on_disk {
            devices_on_disk(&app, f64::from(devices as u32)).await;
        }
        app.server().run_jobs_once().await;
        let (_, metrics) = app.get_text("/metrics").await;
        let left = (devices as usize).div_ceil(7) * 3;
        assert!(
            metrics.contains(&format!("milepost_stored_readings {left}\n")),
            "{metrics}"
        );
        let (_, list) = app.get("/api/v1/devices").await;
        let list = list["devices"].as_array().unwrap();
        assert_eq!(list.len(), devices as usize);
        for entry in list {
            let name = entry["device"].as_str().unwrap();
            let d: i64 = name["car-".len()..].parse().unwrap();
            if d % 7 == 0 {
                let first = chrono::DateTime::from_timestamp(
                    kept.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp() + d,
                    0,
                )
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string();
                assert_eq!(entry["readings"], 3, "{entry}");
                assert_eq!(entry["first"], first.as_str(), "{entry}");
            } else {
                assert_eq!(
                    entry,
                    &serde_json::json!({"device": name, "readings": 0, "first": null, "last": null}),
                    "on disk: {on_disk}"
                );
            }
        }
        app.stop().await;
    }
}

#[tokio::test]
async fn a_bad_blob_store_fails_at_start_with_the_reason() {
    for (url, endpoint, want) in [
        ("ftp://example/x", None, "unsupported scheme 'ftp'"),
        ("not a url", None, "invalid blob store URL"),
        (
            "s3://no-such-bucket/x",
            Some("http://127.0.0.1:9"),
            "is not usable",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = milepost::config::ServeArgs::for_tests(dir.path().to_owned());
        args.api_keys = vec![KEY.into()];
        args.blob.blob_store_url = Some(url.into());
        args.blob.s3_endpoint = endpoint.map(str::to_owned);
        let err = match milepost::app::Server::start(args).await {
            Ok(_) => panic!("{url} started"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(want), "{url}: {err}");
    }
}
