//! Many appliances, one lake: real `milepost serve` processes, each with its own
//! `--node-name` and `--shared-lake`, dumping on the same every-second schedule into
//! one prefix (a local directory, a moto S3 bucket); the lake read back with DuckDB,
//! pyarrow, polars and Spark and compared with what each node stored. Then what must
//! not happen: a second lone appliance or a second holder of a node name is refused
//! at start, an object another node wrote is never overwritten, and a renamed node
//! and a version-1 lake move over without losing or doubling a day.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{Days, NaiveDate, Utc};
use milepost::bench::process::ServerProcess;
use object_store::ObjectStore as _;
use reqwest::StatusCode;
use serde_json::Value;

use crate::dumps::{Row, assert_rows_eq, day_lines, json_rows, read_json_gz, sha256};
use crate::helpers::*;
use crate::s3::{BUCKET, CREDS, get, s3, start_moto};

/// The three finished days every node has readings of.
fn days() -> Vec<NaiveDate> {
    let today = Utc::now().date_naive();
    (1..=3).rev().map(|n| today - Days::new(n)).collect()
}

/// What node `i` is sent: its own car; the `default` device at times of its own; and
/// for nodes 0 and 1 the very same `truck-1` readings (a device that reported to two
/// appliances: in the union twice, once after deduplication).
fn node_body(i: usize) -> String {
    let mut body = String::new();
    for d in days() {
        body += &day_lines(&format!("car-{i}"), "speed", d, 120, 5);
        body += &day_lines("default", "fuel", d, 80, 7 + i as i64);
        if i < 2 {
            body += &day_lines("truck-1", "engine_temperature", d, 40, 11);
        }
    }
    body
}

/// One node of a test: its process, data directory and name.
struct Node {
    name: String,
    dir: tempfile::TempDir,
    server: ServerProcess,
}

/// What a node left once stopped: what it stored and what it listed.
struct Published {
    name: String,
    stored: Vec<Row>,
    /// `GET /api/v1/dumps` just before it stopped.
    listed: Value,
}

fn start_nodes(n: usize, url: &str, extra: &[&str], env: &[(&str, &str)]) -> Vec<Node> {
    let exe = Path::new(env!("CARGO_BIN_EXE_milepost"));
    (0..n)
        .map(|i| {
            let name = format!("car-node-{i}");
            let dir = tempfile::tempdir().unwrap();
            let mut flags = vec![
                "--api-key",
                KEY,
                "--blob-store-url",
                url,
                "--node-name",
                &name,
                "--shared-lake",
                // Every node runs at every second: they dump the same days at once.
                "--dump-schedule",
                "*/1 * * * * *",
            ];
            flags.extend_from_slice(extra);
            let server = ServerProcess::start_with_env(exe, dir.path(), &flags, env, false)
                .expect("node starts");
            Node { name, dir, server }
        })
        .collect()
}

/// Sends each node its readings, waits until each lists all three days in both
/// formats at the counts it stored, and stops them.
async fn publish(nodes: Vec<Node>) -> Vec<Published> {
    let client = reqwest::Client::new();
    for (i, node) in nodes.iter().enumerate() {
        let (status, r) = post_ingest(&client, &node.server.base, node_body(i))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{r}");
    }
    let mut listed = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let sent = node_body(i).lines().count() as u64;
        let deadline = Instant::now() + Duration::from_secs(120);
        let list = loop {
            let list: Value = client
                .get(format!("{}/api/v1/dumps", node.server.base))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let dumps = list["dumps"].as_array().unwrap();
            let rows: u64 = dumps.iter().map(|d| num(d, "rows")).sum();
            if dumps.len() == 2 * days().len() && rows == 2 * sent {
                break list;
            }
            assert!(Instant::now() < deadline, "{}: {list}", node.name);
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        listed.push(list);
    }
    let mut out = Vec::new();
    for (node, listed) in nodes.into_iter().zip(listed) {
        let Node { name, dir, server } = node;
        let code = tokio::task::spawn_blocking(move || server.terminate().unwrap())
            .await
            .unwrap();
        assert!(code.success(), "{name} stops cleanly");
        out.push(Published {
            name,
            stored: stored_rows(dir.path()),
            listed,
        });
    }
    out
}

fn day_of(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap()
        .format("%Y-%m-%d")
        .to_string()
}

/// Every file under `dir`, relative, `/`-separated.
fn objects(dir: &Path) -> BTreeSet<String> {
    crate::dumps::walk(dir).into_iter().collect()
}

/// Readings per `node/date`, from what each node stored.
fn expected_counts(nodes: &[Published]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for n in nodes {
        for r in &n.stored {
            *counts
                .entry(format!("{}/{}", n.name, day_of(r.2)))
                .or_default() += 1;
        }
    }
    counts
}

fn distinct_keys(nodes: &[Published]) -> u64 {
    nodes
        .iter()
        .flat_map(|n| n.stored.iter().map(|r| (r.0.clone(), r.1.clone(), r.2)))
        .collect::<BTreeSet<_>>()
        .len() as u64
}

/// The lake in `dir` (a local copy of the store's prefix) against what the nodes
/// stored and listed: each node's every reading once in the Parquet union and in its
/// NDJSON files, every object listed by exactly the node that wrote it, every
/// manifest's hashes and counts true.
fn check_lake(dir: &Path, nodes: &[Published]) {
    let all = objects(dir);
    // Only node-owned keys: no seed-named root files, no version-1 manifest.
    assert!(
        all.iter().all(|k| k.contains('/')),
        "a key outside the node folders: {all:?}"
    );

    // DuckDB over the documented glob, Hive partitions on.
    let conn = duckdb::Connection::open_in_memory().unwrap();
    let glob = dir.join("parquet/*/*.parquet");
    let mut stmt = conn
        .prepare(&format!(
            "SELECT node, device, sensor, epoch_us(timestamp), value, strftime(date, '%Y-%m-%d')
             FROM read_parquet('{}', hive_partitioning = true)
             ORDER BY node, device, sensor, timestamp",
            glob.display()
        ))
        .unwrap();
    let lake: Vec<(String, Row, String)> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?),
                r.get(5)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut listed_keys = BTreeSet::new();
    for n in nodes {
        let rows: Vec<Row> = lake
            .iter()
            .filter(|(node, ..)| *node == n.name)
            .map(|(_, r, _)| r.clone())
            .collect();
        assert_rows_eq(
            &rows,
            &n.stored,
            &format!("{} in the Parquet union", n.name),
        );
        assert!(
            lake.iter()
                .filter(|(node, ..)| *node == n.name)
                .all(|(_, r, date)| day_of(r.2) == *date)
        );

        // Its NDJSON files, gathered from the lake by name.
        let mut lines = Vec::new();
        for key in all.iter().filter(|k| k.starts_with("json/date=")) {
            if key.ends_with(&format!("/{}.json.gz", n.name)) {
                lines.extend(read_json_gz(&std::fs::read(dir.join(key)).unwrap()));
            }
        }
        assert_rows_eq(
            &json_rows(&lines),
            &n.stored,
            &format!("{} in the NDJSON dumps", n.name),
        );

        // What the node listed: its own keys only, each as the manifest says.
        let manifest_key = format!("manifests/{}.json", n.name);
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(dir.join(&manifest_key)).unwrap()).unwrap();
        assert_eq!(manifest["version"], 2);
        assert_eq!(manifest["node"], n.name.as_str());
        assert_eq!(manifest["root_day_files"], false);
        assert_eq!(n.listed["node"], n.name.as_str());
        let from_api: BTreeSet<String> = n.listed["dumps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["key"].as_str().unwrap().to_owned())
            .collect();
        let from_manifest: BTreeSet<String> = manifest["dumps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["key"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(from_api, from_manifest, "{}", n.name);
        let per_day = expected_counts(std::slice::from_ref(n));
        for e in manifest["dumps"].as_array().unwrap() {
            let key = e["key"].as_str().unwrap();
            assert!(key.contains(&n.name), "{key} is not {}'s key", n.name);
            let bytes = std::fs::read(dir.join(key)).unwrap();
            assert_eq!(sha256(&bytes), e["sha256"].as_str().unwrap(), "{key}");
            assert_eq!(bytes.len() as u64, num(e, "bytes"), "{key}");
            let date = e["date"].as_str().unwrap();
            assert_eq!(
                num(e, "rows"),
                per_day[&format!("{}/{date}", n.name)],
                "{key}"
            );
        }
        listed_keys.extend(from_manifest);
        listed_keys.insert(manifest_key);
    }
    assert_eq!(all, listed_keys, "every object is listed by its node, once");

    // The deduplication docs/dumps.md shows.
    let distinct: i64 = conn
        .query_row(
            &format!(
                "SELECT count(*) FROM (
                     SELECT * FROM read_parquet('{}', hive_partitioning = true)
                     QUALIFY row_number() OVER (PARTITION BY device, sensor, timestamp
                                                ORDER BY node) = 1)",
                glob.display()
            ),
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(distinct as u64, distinct_keys(nodes));
    assert!(
        distinct_keys(nodes) < lake.len() as u64,
        "truck-1 is there twice"
    );
}

/// The lake through Python engines (tests/clients/lake_readers.py): per node and day
/// the counts each node stored, names as strings, timestamps in UTC.
async fn check_readers(dir: &Path, nodes: &[Published], engines: &[&str]) {
    let python = crate::tools::PYTHON_TOOLS.bin().join("python3");
    if engines.contains(&"spark") {
        crate::tools::ensure_java();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/lake_readers.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(dir)
        .args(engines)
        .env("SPARK_LOCAL_IP", "127.0.0.1")
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = expected_counts(nodes);
    let answers: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), engines.len(), "{stdout}");
    for a in answers {
        let engine = a["engine"].as_str().unwrap();
        let counts: BTreeMap<String, u64> = a["counts"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
            .collect();
        assert_eq!(counts, want, "{engine}");
        assert_eq!(num(&a, "distinct_keys"), distinct_keys(nodes), "{engine}");
        let columns = a["columns"].as_object().unwrap();
        let names: BTreeSet<&str> = columns.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            BTreeSet::from(["node", "device", "sensor", "timestamp", "value", "date"]),
            "{engine}"
        );
        for c in ["node", "device", "sensor"] {
            assert!(
                columns[c].as_str().unwrap().to_lowercase().contains("str"),
                "{engine} reads {c} as {}",
                columns[c]
            );
        }
        let ts = columns["timestamp"].as_str().unwrap();
        assert!(ts.contains("UTC") || ts == "timestamp", "{engine}: {ts}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_share_a_directory_and_every_reader_sees_each_nodes_days_once() {
    let lake = tempfile::tempdir().unwrap();
    let url = format!("file://{}", lake.path().display());
    let nodes = start_nodes(2, &url, &[], &[]);
    let published = publish(nodes).await;
    check_lake(lake.path(), &published);
    check_readers(lake.path(), &published, &["pyarrow", "polars", "spark"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_share_an_s3_prefix_dumping_at_the_same_seconds() {
    let moto = start_moto().await;
    let url = format!("s3://{BUCKET}/fleet");
    let nodes = start_nodes(3, &url, &["--s3-endpoint", moto.endpoint.as_str()], &CREDS);
    let published = publish(nodes).await;

    // The prefix copied down as it is.
    let store = s3(&moto.endpoint);
    let local = tempfile::tempdir().unwrap();
    let keys: Vec<String> = {
        use futures_util::TryStreamExt as _;
        store
            .list(Some(&"fleet".into()))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap()
    };
    assert!(!keys.is_empty());
    for key in keys {
        let bytes = get(&store, &key).await.unwrap();
        let path = local.path().join(key.strip_prefix("fleet/").unwrap());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    check_lake(local.path(), &published);
    check_readers(local.path(), &published, &["pyarrow", "polars"]).await;
}

/// Settings of an in-process node named `name` publishing into the lake at `url`.
fn node(url: &str, name: &str, shared: bool) -> impl FnOnce(&mut milepost::config::ServeArgs) {
    let (url, name) = (url.to_owned(), name.to_owned());
    move |a| {
        a.blob.blob_store_url = Some(url);
        a.blob.node_name = Some(name);
        a.blob.shared_lake = shared;
    }
}

/// `milepost serve` of the real binary on `dir`, expected to refuse to start: its
/// exit status and error output.
fn refused(dir: &Path, url: &str, node: &str) -> String {
    let out = serve_command(dir)
        .args([
            "--api-key",
            KEY,
            "--blob-store-url",
            url,
            "--node-name",
            node,
        ])
        .output_within_limit();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    err
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_lone_appliance_or_a_second_holder_of_a_name_is_refused_at_start() {
    let lake = tempfile::tempdir().unwrap();
    let url = format!("file://{}", lake.path().display());
    let d = days()[0];
    let date = d.format("%Y-%m-%d").to_string();

    // A lone appliance: the seed-named day file at the root, downloadable by its
    // seed name.
    let lone = TestApp::spawn_with(node(&url, "lone", false)).await;
    lone.ingest(day_lines("default", "speed", d, 30, 0)).await;
    lone.server().dumper().dump_day(d).await.unwrap();
    let root_file = lake.path().join(format!("{date}.json.gz"));
    let seed_bytes = std::fs::read(&root_file).unwrap();
    assert_eq!(read_json_gz(&seed_bytes).len(), 30);
    let (status, body) = lone
        .get_bytes(&format!("/api/v1/dumps/{date}.json.gz"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, seed_bytes);

    // A second appliance without --shared-lake would write the same root keys.
    let other = tempfile::tempdir().unwrap();
    let err = refused(other.path(), &url, "second");
    assert!(
        err.contains("--shared-lake")
            && err.contains("'lone'")
            && err.contains("Nothing was written"),
        "{err}"
    );
    // The same name from another data directory: another appliance's.
    let err = refused(other.path(), &url, "lone");
    assert!(err.contains("belongs to another appliance"), "{err}");
    assert!(err.contains("restore"), "{err}");

    // In shared mode it joins, under keys of its own; the lone node's file stays.
    let shared = TestApp::spawn_in(other, node(&url, "second", true)).await;
    shared.ingest(day_lines("default", "speed", d, 20, 3)).await;
    let records = shared.server().dumper().dump_day(d).await.unwrap();
    let keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            format!("json/date={date}/second.json.gz"),
            format!("parquet/date={date}/second.parquet")
        ]
    );
    assert_eq!(std::fs::read(&root_file).unwrap(), seed_bytes);
    let (_, list) = shared.get("/api/v1/dumps").await;
    assert_eq!(list["dumps"].as_array().unwrap().len(), 2);
    let (status, body) = shared
        .get_bytes(&format!("/api/v1/dumps/{date}.json.gz"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read_json_gz(&body).len(), 20, "its own day file");
    shared.stop().await;
    lone.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_object_another_node_wrote_is_never_overwritten() {
    let lake = tempfile::tempdir().unwrap();
    let url = format!("file://{}", lake.path().display());
    let spawn = |name| TestApp::spawn_with(node(&url, name, true));
    let days = days();
    let a = spawn("a").await;
    let b = spawn("b").await;
    for app in [&a, &b] {
        app.ingest(
            days.iter()
                .map(|d| day_lines("default", "speed", *d, 10, 0))
                .collect::<String>(),
        )
        .await;
    }
    a.server().dumper().dump_day(days[0]).await.unwrap();
    // Misconfiguration by hand: a's Parquet file lands at b's key of the next day.
    let date = days[1].format("%Y-%m-%d");
    let foreign = lake.path().join(format!("parquet/date={date}/b.parquet"));
    std::fs::create_dir_all(foreign.parent().unwrap()).unwrap();
    let a_file = lake.path().join(format!(
        "parquet/date={}/a.parquet",
        days[0].format("%Y-%m-%d")
    ));
    std::fs::copy(&a_file, &foreign).unwrap();
    let before = std::fs::read(&foreign).unwrap();

    let run = b
        .server()
        .dumper()
        .run_due(Utc::now().date_naive())
        .await
        .unwrap();
    assert_eq!(run.dumped, [days[0], days[2]]);
    assert_eq!(run.failed, [days[1]]);
    assert_eq!(std::fs::read(&foreign).unwrap(), before, "left as it was");
    // Nothing of that day was written, not even the format whose key was free.
    assert!(
        !lake
            .path()
            .join(format!("json/date={date}/b.json.gz"))
            .exists()
    );
    let (_, metrics) = b.get_text("/metrics").await;
    assert!(
        metrics.contains("milepost_dumps_failed_total 1"),
        "{metrics}"
    );
    let err = b
        .server()
        .dumper()
        .dump_day(days[1])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("node 'a'") && err.contains("not overwritten"),
        "{err}"
    );

    // Once it is moved away, the next run writes the day.
    std::fs::remove_file(&foreign).unwrap();
    let run = b
        .server()
        .dumper()
        .run_due(Utc::now().date_naive())
        .await
        .unwrap();
    assert_eq!(run.dumped, [days[1]]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renamed_node_moves_its_days_and_a_version_1_lake_is_migrated() {
    let lake = tempfile::tempdir().unwrap();
    let url = format!("file://{}", lake.path().display());
    let with = |name| node(&url, name, false);
    let days = days();
    let today = Utc::now().date_naive();
    let app = TestApp::spawn_with(with("old")).await;
    app.ingest(
        days.iter()
            .map(|d| day_lines("default", "speed", *d, 10, 0))
            .collect::<String>(),
    )
    .await;
    assert_eq!(
        app.server().dumper().run_due(today).await.unwrap().dumped,
        days
    );
    let dir = app.stop().await;

    // Renamed: the days go under the new name, the old name's objects and manifest
    // are gone, nothing is in the lake twice.
    let app = TestApp::spawn_in(dir, with("new")).await;
    assert!(!lake.path().join("manifests/old.json").exists());
    assert_eq!(
        app.server().dumper().run_due(today).await.unwrap().dumped,
        days
    );
    let all = objects(lake.path());
    assert!(all.iter().all(|k| !k.contains("old")), "{all:?}");
    let dir = app.stop().await;
    let stored = stored_rows(dir.path());
    let union: Vec<Row> = crate::dumps::read_lake(lake.path())
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert_rows_eq(&union, &stored, "after the rename");

    // As an earlier Milepost left it: a version-1 manifest at the root, a day file
    // without a writer in its header (its record says its size).
    let manifest = lake.path().join("manifests/new.json");
    let mut v1: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    v1["version"] = 1.into();
    v1.as_object_mut().unwrap().remove("instance");
    v1.as_object_mut().unwrap().remove("root_day_files");
    std::fs::write(lake.path().join("manifest.json"), v1.to_string()).unwrap();
    std::fs::remove_file(&manifest).unwrap();
    let date = days[0].format("%Y-%m-%d").to_string();
    let day_file = lake.path().join(format!("{date}.json.gz"));
    let plain = {
        use std::io::{Read as _, Write as _};
        let gzipped = std::fs::read(&day_file).unwrap();
        let mut text = Vec::new();
        flate2::read::MultiGzDecoder::new(&gzipped[..])
            .read_to_end(&mut text)
            .unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&text).unwrap();
        gz.finish().unwrap()
    };
    std::fs::write(&day_file, &plain).unwrap();
    {
        let conn = duckdb::Connection::open(dir.path().join("milepost.duckdb")).unwrap();
        let n = conn
            .execute(
                "UPDATE dumps SET bytes = ?, sha256 = ? WHERE object_key = ?",
                duckdb::params![
                    plain.len() as i64,
                    sha256(&plain),
                    format!("{date}.json.gz")
                ],
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    let app = TestApp::spawn_in(dir, with("new")).await;
    assert!(!lake.path().join("manifest.json").exists(), "migrated");
    let m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(m["version"], 2);
    assert_eq!(m["dumps"].as_array().unwrap().len(), 2 * days.len());
    // A late reading of that day: the old file is this node's (its size is on
    // record), so it is replaced.
    app.ingest(line("speed", 1.5, &format!("{date}T23:00:00Z")) + "\n")
        .await;
    assert_eq!(
        app.server().dumper().run_due(today).await.unwrap().dumped,
        [days[0]]
    );
    assert_eq!(read_json_gz(&std::fs::read(&day_file).unwrap()).len(), 11);
    let dir = app.stop().await;

    // Renamed again and moved to shared mode: the seed-named root files go too.
    let app = TestApp::spawn_in(dir, node(&url, "moved", true)).await;
    assert_eq!(
        app.server().dumper().run_due(today).await.unwrap().dumped,
        days
    );
    let (_, list) = app.get("/api/v1/dumps").await;
    assert_eq!(list["manifest"], "manifests/moved.json");
    let dir = app.stop().await;
    let all = objects(lake.path());
    let mut want: BTreeSet<String> = days
        .iter()
        .flat_map(|d| {
            let d = d.format("%Y-%m-%d");
            [
                format!("json/date={d}/moved.json.gz"),
                format!("parquet/date={d}/moved.parquet"),
            ]
        })
        .collect();
    want.insert("manifests/moved.json".into());
    assert_eq!(all, want);
    let union: Vec<Row> = crate::dumps::read_lake(lake.path())
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert_rows_eq(&union, &stored_rows(dir.path()), "after the move");
}
