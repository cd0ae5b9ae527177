//! Faults of the filesystem under the data directory: full while ingesting, read-only
//! at start. Each test mounts a small tmpfs of its own, which needs root (or
//! CAP_SYS_ADMIN); where mounting is not allowed it says so and passes without
//! checking anything.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use milepost::bench::process::ServerProcess;
use reqwest::StatusCode;

use crate::helpers::*;

/// Skips a test that needs a tmpfs, with the reason printed — but only where it
/// cannot run: as root (CI runs as root) or with `CI` set, a failed mount fails the
/// test instead of letting it pass without having run.
fn skip(test: &str, why: &str) -> Option<Tmpfs> {
    let must_run = nix::unistd::geteuid().is_root() || std::env::var_os("CI").is_some();
    assert!(!must_run, "{test}: {why}");
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `64m`), or `None` with the reason printed.
    fn mount(size: &str, test: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self { dir }),
            Ok(o) => skip(
                test,
                &format!(
                    "cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            ),
            Err(e) => skip(test, &format!("no mount(8): {e}")),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, options: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(self.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {options}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the filesystem of `dir` with one file until a write fails; returns it.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
            assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
            break;
        }
    }
    // Smaller pieces into what is left.
    for size in [4096, 512, 1] {
        while f.write_all(&vec![0u8; size]).is_ok() && f.sync_all().is_ok() {}
    }
    path
}

fn start(data: &Path) -> ServerProcess {
    let exe = Path::new(env!("CARGO_BIN_EXE_milepost"));
    ServerProcess::start(
        exe,
        data,
        &["--api-key", KEY, "--dump-schedule", "off"],
        false,
    )
    .expect("server starts")
}

/// `n` readings of `sensor` from second `from` on (2026-11-01 + `from` s).
fn readings(sensor: &str, from: i64, n: i64) -> (String, Vec<i64>) {
    let base = 1_793_491_200; // 2026-11-01T00:00:00Z
    let mut body = String::new();
    let mut keys = Vec::new();
    for i in from..from + n {
        let t = chrono::DateTime::from_timestamp(base + i, 0).unwrap();
        body += &line(sensor, (i % 1000) as f64, &t.to_rfc3339());
        body.push('\n');
        keys.push(i);
    }
    (body, keys)
}

/// The readings `/api/v1/devices` counts for the (one) device of the server at `base`.
async fn device_readings(client: &reqwest::Client, base: &str) -> u64 {
    let (_, page) = json(
        client
            .get(format!("{base}/api/v1/devices"))
            .basic_auth(KEY, None::<&str>)
            .send()
            .await
            .unwrap(),
    )
    .await;
    num(&page["devices"][0], "readings")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_answered_507_and_ingest_resumes_when_space_returns() {
    let Some(fs) = Tmpfs::mount("48m", "disk full") else {
        return;
    };
    let data = fs.path().join("data");
    let mut p = start(&data);
    let client = reqwest::Client::new();
    let (status, _) = post_ingest(&client, &p.base, readings("speed", 0, 1000).0)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let mut acked: BTreeSet<i64> = (0..1000).collect();

    let filler = fill(fs.path());
    // Big requests (committed to DuckDB directly) and small ones (through the ingest
    // log) until both have been refused a few times.
    let mut unacked: Vec<(String, Vec<i64>)> = Vec::new();
    let mut answers: Vec<StatusCode> = Vec::new();
    let mut next = 1000;
    let started = Instant::now();
    while answers.iter().filter(|s| s.as_u16() == 507).count() < 6 {
        assert!(started.elapsed() < Duration::from_secs(60), "{answers:?}");
        let n = if answers.len().is_multiple_of(2) {
            20_000
        } else {
            3
        };
        let (body, keys) = readings("speed", next, n);
        next += n;
        let resp = client
            .post(format!("{}/ingest", p.base))
            .basic_auth(KEY, None::<&str>)
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await
            .expect("an answer, never a dropped connection");
        let status = resp.status();
        let retry_after = resp.headers().get("retry-after").cloned();
        let text = resp.text().await.unwrap();
        answers.push(status);
        match status.as_u16() {
            200 => acked.extend(keys),
            507 => {
                assert_eq!(
                    retry_after.as_ref().and_then(|v| v.to_str().ok()),
                    Some("30"),
                    "507 with Retry-After: 30"
                );
                assert!(text.contains("disk"), "{text}");
                unacked.push((body, keys));
            }
            other => panic!("{other} while the disk is full: {text}"),
        }
    }
    let child = &mut p.child;
    assert!(child.try_wait().unwrap().is_none(), "the server died");

    // Space returns: the same server accepts again, and everything refused can be
    // sent again and is stored.
    std::fs::remove_file(filler).unwrap();
    for (body, keys) in unacked {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, r) = post_ingest(&client, &p.base, body.clone()).await.unwrap();
            if status == StatusCode::OK {
                acked.extend(keys);
                break;
            }
            assert_eq!(status.as_u16(), 507, "{r}");
            assert!(
                Instant::now() < deadline,
                "still refused after space returned"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(device_readings(&client, &p.base).await, acked.len() as u64);
    send_signal(child.id(), "-TERM");
    assert!(child.wait().unwrap().success());

    // After a restart: exactly the acknowledged readings.
    let rows = stored_rows(&data);
    let stored: BTreeSet<i64> = rows
        .iter()
        .map(|r| r.2 / 1_000_000 - 1_793_491_200)
        .collect();
    assert_eq!(rows.len(), stored.len(), "stored twice");
    assert_eq!(stored, acked);
    eprintln!(
        "disk full: {} answers while full ({} × 507, the rest 200), {} readings stored",
        answers.len(),
        answers.iter().filter(|s| s.as_u16() == 507).count(),
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_data_dir_stops_start_up_with_a_clear_message() {
    let Some(fs) = Tmpfs::mount("16m", "read-only data dir") else {
        return;
    };
    // A data directory with readings, then the filesystem goes read-only.
    let data = fs.path().join("data");
    let mut p = start(&data);
    let (status, _) = post_ingest(&reqwest::Client::new(), &p.base, readings("fuel", 0, 100).0)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    send_signal(p.child.id(), "-TERM");
    assert!(p.child.wait().unwrap().success());
    fs.remount("ro");

    // `serve` on `dir` exits non-zero naming the directory and the cause.
    let refused = |dir: &Path| {
        let out = serve_command(dir)
            .args(["--api-key", KEY])
            .output_within_limit();
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.contains(&dir.display().to_string()) && text.contains("read-only"),
            "{text}"
        );
    };
    let before = std::fs::read(data.join("milepost.duckdb")).unwrap();
    refused(&data);
    assert_eq!(std::fs::read(data.join("milepost.duckdb")).unwrap(), before);
    // A data directory that does not exist yet on a read-only filesystem.
    refused(&fs.path().join("fresh"));
    fs.remount("rw");
}

/// `milepost compact --rewrite` without the disk for its copy fails with the reason,
/// and the database is as it was: no partial copy left, every reading served.
#[tokio::test(flavor = "multi_thread")]
async fn a_rewrite_without_room_for_its_copy_leaves_the_database_as_it_was() {
    let Some(fs) = Tmpfs::mount("48m", "rewrite on a full disk") else {
        return;
    };
    let data = fs.path().join("data");
    let p = start(&data);
    let client = reqwest::Client::new();
    for part in 0..4 {
        let (body, _) = readings("speed", part * 100_000, 100_000);
        let (status, r) = post_ingest(&client, &p.base, body).await.unwrap();
        assert_eq!((status, num(&r, "accepted")), (StatusCode::OK, 100_000));
    }
    assert!(p.terminate().unwrap().success());
    let rewrite = |more: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_milepost"))
            .arg("compact")
            .args(more)
            .arg("--data-dir")
            .arg(&data)
            .output_within_limit()
    };
    // Compacted while there is room (compaction needs some too), so that only the
    // copy lacks it below.
    assert!(rewrite(&[]).status.success());
    let stored = stored_rows(&data);
    let db = data.join("milepost.duckdb");
    let size = std::fs::metadata(&db).unwrap().len();
    assert!(
        size > 2 << 20,
        "{size} bytes: too small to need the room below"
    );
    // Room for the offline open and close, not for a copy.
    let filler = fill(fs.path());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - (1 << 20)).unwrap();
    drop(f);
    let out = rewrite(&["--rewrite"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        !data.join("milepost.duckdb.rewrite").exists(),
        "partial copy left"
    );
    assert!(!data.join("milepost.duckdb.rewrite.wal").exists());
    assert_eq!(stored_rows(&data), stored, "the database as it was");

    // With room, the same command succeeds, and the server serves every reading.
    std::fs::remove_file(filler).unwrap();
    let out = rewrite(&["--rewrite"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stored_rows(&data), stored);
    let p = start(&data);
    assert_eq!(device_readings(&client, &p.base).await, 400_000);
}

/// A disk found full at start (after a crash, so both logs must be applied): the
/// server refuses to start and says the disk is full — not the steps for a log
/// DuckDB cannot replay, which would move it aside and drop what it holds — and once
/// there is room, every acknowledged reading is there.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_at_start_is_named_and_loses_nothing() {
    let Some(fs) = Tmpfs::mount("48m", "full disk at start") else {
        return;
    };
    let data = fs.path().join("data");
    let mut p = start(&data);
    let client = reqwest::Client::new();
    // A big request (DuckDB's write-ahead log) and small ones (the ingest log).
    let (status, _) = post_ingest(&client, &p.base, readings("speed", 0, 100_000).0)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    for k in 0..3 {
        let (status, _) = post_ingest(&client, &p.base, readings("fuel", k * 3, 3).0)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    assert!(data.join("milepost.duckdb.wal").exists());

    let filler = fill(fs.path());
    let out = serve_command(&data)
        .args(["--api-key", KEY])
        .output_within_limit();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.to_lowercase()
            .contains("the disk holding the data directory is full"),
        "{err}"
    );
    assert!(!err.contains("milepost recover"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_milepost"))
        .args(["recover", "--data-dir"])
        .arg(&data)
        .output_within_limit();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("free space, then start milepost"), "{said}");
    assert!(!said.contains("--move-wal"), "{said}");

    std::fs::remove_file(filler).unwrap();
    let p = start(&data);
    assert_eq!(device_readings(&client, &p.base).await, 100_009);
}
