//! Dumps to a real S3 server (moto, started on 127.0.0.1 by the test) from the real
//! binary: the scheduled run, `milepost dump` by hand, a bad bucket refused.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use milepost::bench::process::ServerProcess;
use object_store::ObjectStore as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use reqwest::StatusCode;
use serde_json::Value;

use crate::dumps::{assert_rows_eq, read_json_gz, read_lake, sha256, three_days};
use crate::helpers::*;

pub(crate) const BUCKET: &str = "trip-bucket";
pub(crate) const CREDS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
];

/// A moto S3 server on a free loopback port, killed on drop.
pub(crate) struct Moto {
    child: Child,
    pub(crate) endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

pub(crate) async fn start_moto() -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(crate::tools::MOTO.bin().join("moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server runs");
    let moto = Moto {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Creating the bucket doubles as the readiness check.
        match client
            .put(format!("{}/{BUCKET}", moto.endpoint))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => return moto,
            _ if Instant::now() > deadline => panic!("moto_server did not start"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

pub(crate) fn s3(endpoint: &str) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_bucket_name(BUCKET)
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_region("us-east-1")
        .build()
        .unwrap()
}

pub(crate) async fn get(s3: &AmazonS3, key: &str) -> Option<bytes::Bytes> {
    match s3.get(&Key::from(key)).await {
        Ok(r) => Some(r.bytes().await.unwrap()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("{key}: {e}"),
    }
}

fn manifest_dates(m: &Value) -> Vec<String> {
    m["dumps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["date"].as_str().unwrap().to_owned())
        .collect()
}

/// When the manifest says the Parquet file of `date` was written.
fn generated_at(manifest: &Value, date: &str) -> Value {
    manifest["dumps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["date"] == date && d["format"] == "parquet")
        .unwrap_or_else(|| panic!("no parquet dump of {date} in {manifest}"))["generated_at"]
        .clone()
}

#[tokio::test]
async fn scheduled_dumps_land_in_s3_and_a_day_is_redone_by_hand() {
    let moto = start_moto().await;
    let store = s3(&moto.endpoint);
    let dir = tempfile::tempdir().unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_milepost"));
    let url = format!("s3://{BUCKET}/trip");
    let flags = [
        "--api-key",
        KEY,
        "--blob-store-url",
        url.as_str(),
        "--s3-endpoint",
        moto.endpoint.as_str(),
        "--node-name",
        "n1",
        "--dump-schedule",
        "*/1 * * * * *",
    ];
    let server = ServerProcess::start_with_env(exe, dir.path(), &flags, &CREDS, false)
        .expect("server starts");
    let resp = reqwest::Client::new()
        .post(format!("{}/ingest", server.base))
        .basic_auth(KEY, None::<&str>)
        .header("content-type", "application/x-ndjson")
        .body(three_days())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // The schedule (every second here) dumps the finished days.
    let deadline = Instant::now() + Duration::from_secs(120);
    let manifest: Value = loop {
        if let Some(m) = get(&store, "trip/manifests/n1.json").await {
            let m: Value = serde_json::from_slice(&m).unwrap();
            if manifest_dates(&m)
                .iter()
                .filter(|d| d.as_str() == "2026-11-03")
                .count()
                == 2
            {
                break m;
            }
        }
        assert!(Instant::now() < deadline, "no dumps in S3");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let code = tokio::task::spawn_blocking(move || server.terminate().unwrap())
        .await
        .unwrap();
    assert!(code.success());
    let stored = stored_rows(dir.path());

    // Every object is what the manifest says; the lake, copied down as it is, reads
    // back as exactly the stored readings.
    let local = tempfile::tempdir().unwrap();
    for entry in manifest["dumps"].as_array().unwrap() {
        let key = entry["key"].as_str().unwrap();
        let bytes = get(&store, &format!("trip/{key}")).await.expect(key);
        assert_eq!(sha256(&bytes), entry["sha256"].as_str().unwrap(), "{key}");
        assert_eq!(bytes.len() as u64, entry["bytes"].as_u64().unwrap());
        let path = local.path().join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        if entry["format"] == "json" {
            assert_eq!(
                read_json_gz(&bytes).len() as u64,
                entry["rows"].as_u64().unwrap()
            );
        }
    }
    let lake: Vec<_> = read_lake(local.path())
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert_rows_eq(&lake, &stored, "lake from S3");

    // By hand, with the server stopped (and the seed's flag name).
    let before = generated_at(&manifest, "2026-11-02");
    let out = Command::new(exe)
        .args([
            "dump",
            "--dump-date",
            "2026-11-02",
            "--blob-store-url",
            &url,
        ])
        .args([
            "--s3-endpoint",
            &moto.endpoint,
            "--node-name",
            "n1",
            "--data-dir",
        ])
        .arg(dir.path())
        .envs(CREDS)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("parquet/date=2026-11-02/n1.parquet"),
        "{stdout}"
    );
    let m: Value =
        serde_json::from_slice(&get(&store, "trip/manifests/n1.json").await.unwrap()).unwrap();
    let after = generated_at(&m, "2026-11-02");
    assert_ne!(before, after);

    // A bucket that does not exist: refused before anything is done, exit non-zero.
    let out = Command::new(exe)
        .args([
            "dump",
            "--date",
            "2026-11-02",
            "--blob-store-url",
            "s3://no-such-bucket/x",
        ])
        .args(["--s3-endpoint", &moto.endpoint, "--data-dir"])
        .arg(dir.path())
        .envs(CREDS)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not usable"), "{stderr}");
}
