//! Whole-process behaviour with the real binary: SIGTERM, SIGKILL, a second process.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use milepost::bench::process::ServerProcess;

use reqwest::StatusCode;

use crate::helpers::*;

/// Starts the real binary on port 0.
fn start_binary(dir: &Path) -> ServerProcess {
    let exe = Path::new(env!("CARGO_BIN_EXE_milepost"));
    ServerProcess::start(exe, dir, &["--api-key", KEY], false).expect("binary starts")
}

fn batch(from: u32, n: u32) -> String {
    (from..from + n)
        .map(|i| {
            let t = chrono::DateTime::from_timestamp(1_600_000_000 + i as i64, 0).unwrap();
            line("speed", i as f64, &t.to_rfc3339()) + "\n"
        })
        .collect()
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_data_survives() {
    let dir = tempfile::tempdir().unwrap();
    let p = start_binary(dir.path());
    let client = reqwest::Client::new();
    let (status, r) = post_ingest(&client, &p.base, batch(0, 500)).await.unwrap();
    assert_eq!((status, num(&r, "accepted")), (StatusCode::OK, 500));
    let code = tokio::task::spawn_blocking(move || p.terminate().unwrap())
        .await
        .unwrap();
    assert!(code.success(), "exit status {code:?}");
    // Checkpointed: no write-ahead log left behind.
    assert!(!dir.path().join("milepost.duckdb.wal").exists());
    assert_eq!(stored_rows(dir.path()).len(), 500);
}

#[tokio::test]
async fn sigint_stops_as_cleanly_as_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let p = start_binary(dir.path());
    let client = reqwest::Client::new();
    let (status, r) = post_ingest(&client, &p.base, batch(0, 300)).await.unwrap();
    assert_eq!((status, num(&r, "accepted")), (StatusCode::OK, 300));
    send_signal(p.child.id(), "-INT");
    let code = tokio::task::spawn_blocking(move || {
        let mut p = p;
        p.child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(code.success(), "exit status {code:?}");
    assert!(!dir.path().join("milepost.duckdb.wal").exists());
    assert_eq!(stored_rows(dir.path()).len(), 300);
}

#[tokio::test]
async fn sigkill_never_loses_an_acknowledged_reading() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start_binary(dir.path());
    let client = reqwest::Client::new();
    let base = p.base.clone();
    // A writer loop that records what the server acknowledged.
    let writer = tokio::spawn(async move {
        let mut acked = 0u32;
        for i in 0..400u32 {
            match post_ingest(&client, &base, batch(i * 1000, 1000)).await {
                Ok((StatusCode::OK, r)) if num(&r, "accepted") == 1000 => acked = (i + 1) * 1000,
                _ => break,
            }
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    p.child.kill().unwrap(); // SIGKILL, mid-stream
    p.child.wait().unwrap();
    let acked = writer.await.unwrap();
    assert!(acked > 0, "some requests were acknowledged before the kill");

    // The WAL is replayed on the next start; every acknowledged reading is there.
    let app = TestApp::spawn_in(dir, |_| {}).await;
    let (_, s) = app.get("/api/status").await;
    assert!(s["lastIngestTimestamp"].is_string());
    // Replaying everything acknowledged is all duplicates.
    let (status, r) = app.ingest(batch(0, acked)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(num(&r, "duplicates"), acked as u64, "{r}");
    // Statistics come from the rollups, written in the same transactions as the
    // readings: after the crash they still describe exactly what is stored.
    let (status, stats) = app
        .get("/api/v1/sensors/speed/statistics?from=2020-09-13T00:00:00Z&to=2020-10-13T00:00:00Z&bucket=1d")
        .await;
    assert_eq!(status, StatusCode::OK);
    let buckets = stats["buckets"].as_array().unwrap();
    let counted: u64 = buckets.iter().map(|b| num(b, "count")).sum();
    let rows = stored_rows(app.stop().await.path());
    assert_eq!(counted, rows.len() as u64, "{stats}");
    let max = buckets
        .iter()
        .filter_map(|b| b["max"].as_f64())
        .fold(f64::MIN, f64::max);
    assert_eq!(max, rows.iter().map(|r| r.3).fold(f64::MIN, f64::max));
    assert!(rows.len() as u32 >= acked);
    for (i, row) in rows.iter().take(acked as usize).enumerate() {
        assert_eq!(row.3, i as f64);
    }
}

#[tokio::test]
async fn a_second_server_on_the_same_data_dir_is_refused() {
    let app = TestApp::spawn().await;
    let args = milepost::config::ServeArgs::for_tests(app.dir.path().to_owned());
    let err = milepost::app::Server::start(args)
        .await
        .err()
        .expect("refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("another milepost process"), "{msg}");
    // The first one is unaffected.
    let (status, _) = app.ingest(line("speed", 1.0, "2024-01-01T00:00:00Z")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn restart_keeps_everything() {
    let app = TestApp::spawn().await;
    let (_, r) = app.ingest(batch(0, 2000)).await;
    assert_eq!(num(&r, "accepted"), 2000);
    let app = app.restart().await;
    let (_, r) = app.ingest(batch(1000, 2000)).await;
    assert_eq!((num(&r, "accepted"), num(&r, "duplicates")), (1000, 1000));
    let (_, l) = app.get("/api/statistics/latest").await;
    assert_eq!(l["speed"], 2999.0);
}

#[tokio::test]
async fn an_unreplayable_wal_stops_start_up_and_recover_offers_the_safe_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start_binary(dir.path());
    let client = reqwest::Client::new();
    let (status, _) = post_ingest(&client, &p.base, batch(0, 20_000))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    // Acknowledged through Milepost's ingest log; once the flusher has moved the
    // readings into DuckDB (fewer than a row group: through DuckDB's WAL) and the
    // log's segment is gone, they are only in DuckDB's WAL.
    await_applied(&client, &p.base).await;
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let wal = dir.path().join("milepost.duckdb.wal");
    let mut bytes = std::fs::read(&wal).expect("a crash leaves the write-ahead log");
    corrupt_largest_wal_entry(&mut bytes);
    std::fs::write(&wal, &bytes).unwrap();
    let before = std::fs::read(dir.path().join("milepost.duckdb")).unwrap();

    let bin = env!("CARGO_BIN_EXE_milepost");
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output_within_limit();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = run(&["serve", "--listen", "127.0.0.1:0", "--api-key", KEY]);
    assert!(!ok, "start-up must stop: {text}");
    assert!(
        text.contains("write-ahead log") && text.contains("milepost recover"),
        "{text}"
    );
    // Nothing was touched.
    assert_eq!(std::fs::read(&wal).unwrap(), bytes);
    assert_eq!(
        std::fs::read(dir.path().join("milepost.duckdb")).unwrap(),
        before
    );

    let (ok, text) = run(&["recover"]);
    assert!(!ok);
    assert!(
        text.contains("--move-wal") && text.contains("Back up"),
        "{text}"
    );
    assert!(wal.exists(), "diagnosis alone changes nothing");

    let (ok, text) = run(&["recover", "--move-wal"]);
    assert!(ok, "{text}");
    assert!(!wal.exists());
    let kept = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .contains("wal.unreplayable-")
        });
    assert!(kept, "the log is renamed, never deleted");

    let app = TestApp::spawn_in(dir, |_| {}).await;
    let (status, _) = app.ingest(batch(0, 5000)).await;
    assert_eq!(status, StatusCode::OK, "devices can re-send what was lost");
}

/// Waits until DuckDB holds every acknowledged reading (`/metrics`:
/// `milepost_ingest_log_unapplied_readings 0`).
async fn await_applied(client: &reqwest::Client, base: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text
            .lines()
            .any(|l| l == "milepost_ingest_log_unapplied_readings 0")
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ingest log was never applied:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Flips one byte in the middle of the payload of the largest entry of a DuckDB
/// write-ahead log, a change DuckDB always detects on replay.
///
/// After a header, a DuckDB (1.2) log is a chain of entries: size (u64 LE), checksum
/// (u64 LE), payload. Where the damage lands matters: the checksum XORs one hash per
/// 8-byte word, so flipping an even number of equal words (a run of zeros) goes
/// unnoticed and the server starts on a damaged log; a damaged size or header reads as
/// a torn tail and is dropped silently. A test that flipped 64 bytes at a third of the
/// file hit such a run on CI and waited forever for a server that started. One byte
/// changes one word, whose hash is a bijection of it: always a checksum mismatch.
fn corrupt_largest_wal_entry(wal: &mut [u8]) {
    let u64_at = |at: usize| u64::from_le_bytes(wal[at..at + 8].try_into().unwrap());
    // The entries from `start`, when they end exactly at the end of the file.
    let chain = |start: usize| {
        let mut entries = Vec::new();
        let mut at = start;
        while at + 16 <= wal.len() {
            let size = usize::try_from(u64_at(at)).ok()?;
            let end = (at + 16)
                .checked_add(size)
                .filter(|&end| end <= wal.len())?;
            entries.push((at + 16, size));
            at = end;
        }
        (at == wal.len() && entries.len() > 1).then_some(entries)
    };
    let entries = (1..wal.len().min(4096))
        .find_map(chain)
        .expect("the write-ahead log is a chain of size/checksum/payload entries");
    let (payload, size) = entries.into_iter().max_by_key(|&(_, size)| size).unwrap();
    assert!(size > 1000, "the readings are in the log ({size} bytes)");
    wal[payload + size / 2] ^= 0x5a;
}

/// A database file from a newer Milepost, a truncated database file and a write-ahead
/// log of another database are each refused at start with a message that names the
/// file and the safe next step; the files are left exactly as they were.
#[tokio::test(flavor = "multi_thread")]
async fn damaged_newer_or_foreign_files_are_refused_untouched() {
    // A healthy data directory with some readings, stopped cleanly.
    let healthy = tempfile::tempdir().unwrap();
    let p = start_binary(healthy.path());
    let (status, _) = post_ingest(&reqwest::Client::new(), &p.base, batch(0, 100))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    stop_gracefully(p);

    let copy = |name: &str| {
        let dir = healthy.path().parent().unwrap().join(format!(
            "{}-{name}",
            healthy.path().file_name().unwrap().to_string_lossy()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            healthy.path().join("milepost.duckdb"),
            dir.join("milepost.duckdb"),
        )
        .unwrap();
        dir
    };
    let serve = |dir: &Path| {
        let out = serve_command(dir)
            .args(["--api-key", KEY])
            .output_within_limit();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let snapshot = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_file())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().to_string(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .filter(|(n, _)| n.starts_with("milepost.duckdb"))
            .collect();
        files.sort();
        files
    };

    // 1. A schema version from the future.
    let newer = copy("newer");
    {
        let conn = duckdb::Connection::open(newer.join("milepost.duckdb")).unwrap();
        conn.execute_batch(
            "INSERT INTO schema_migrations VALUES (9999, 'from the future', now()::TIMESTAMP)",
        )
        .unwrap();
    }
    let before = snapshot(&newer);
    let (ok, text) = serve(&newer);
    assert!(!ok, "{text}");
    assert!(
        text.contains("9999") && text.contains("milepost.duckdb"),
        "{text}"
    );
    assert_eq!(snapshot(&newer), before, "files changed");

    // 2. A truncated database file.
    let truncated = copy("truncated");
    let db = truncated.join("milepost.duckdb");
    let len = std::fs::metadata(&db).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let before = snapshot(&truncated);
    let (ok, text) = serve(&truncated);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&db.display().to_string()) && text.contains("backup"),
        "{text}"
    );
    assert_eq!(snapshot(&truncated), before, "files changed");

    // 3. The write-ahead log of another database beside ours.
    let foreign = copy("foreign");
    let other = tempfile::tempdir().unwrap();
    {
        let conn = duckdb::Connection::open(other.path().join("other.duckdb")).unwrap();
        conn.execute_batch(
            "PRAGMA disable_checkpoint_on_shutdown; SET wal_autocheckpoint = '1GB';
             CREATE TABLE t (x INTEGER); INSERT INTO t SELECT range FROM range(1000);",
        )
        .unwrap();
    }
    let wal = other.path().join("other.duckdb.wal");
    assert!(wal.exists(), "the other database left its WAL");
    std::fs::copy(&wal, foreign.join("milepost.duckdb.wal")).unwrap();
    let before = snapshot(&foreign);
    let (ok, text) = serve(&foreign);
    assert!(
        !ok,
        "a foreign WAL must not be replayed into our database: {text}"
    );
    assert!(text.contains("milepost recover"), "{text}");
    assert_eq!(snapshot(&foreign), before, "files changed");
}

/// SIGTERM and wait for the exit.
fn stop_gracefully(mut p: ServerProcess) {
    send_signal(p.child.id(), "-TERM");
    assert!(p.child.wait().unwrap().success());
}

/// A start that fails after the writer runs (a bad `--dump-schedule`, a port in use,
/// a backend address in use) stops what it had started: the same process can then
/// start a server on the same data directory, and the readings of the first start
/// are there. The real binary exits 1 with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_that_fails_half_way_frees_the_data_directory() {
    use milepost::app::Server;
    use milepost::config::ServeArgs;

    let app = TestApp::spawn().await;
    let (status, _) = app.ingest(batch(0, 50)).await;
    assert_eq!(status, StatusCode::OK);
    let dir = app.stop().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    type Configure = Box<dyn Fn(&mut ServeArgs)>;
    let failures: [(&str, Configure); 3] = [
        (
            "--dump-schedule",
            Box::new(|a| a.dump_schedule = "every morning".into()),
        ),
        ("cannot listen", Box::new(move |a| a.listen = taken_addr)),
        (
            "",
            Box::new(move |a| {
                a.backend.backend_addr = milepost::config::BackendAddr(Some(taken_addr))
            }),
        ),
    ];
    for (want, configure) in failures {
        let mut args = ServeArgs::for_tests(dir.path().to_owned());
        args.api_keys = vec![KEY.into()];
        args.dump_schedule = "0 0 6 * * *".into();
        configure(&mut args);
        let err = match Server::start(args).await {
            Ok(_) => panic!("started despite '{want}'"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(want), "{err}");
    }
    // The data directory is free, and nothing was lost.
    let app = TestApp::spawn_in(dir, |_| {}).await;
    let (_, status) = app.get("/api/status").await;
    assert!(status["lastIngestTimestamp"].is_string(), "{status}");
    let dir = app.stop().await;
    assert_eq!(stored_rows(dir.path()).len(), 50);

    let out = Command::new(env!("CARGO_BIN_EXE_milepost"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--backend-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--api-key",
            KEY,
            "--dump-schedule",
            "every morning",
            "--data-dir",
        ])
        .arg(dir.path())
        .output_within_limit();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is not a cron schedule"), "{err}");
    drop(taken);
}

/// A mistyped `--data-dir` given to an offline command is an error that names the
/// path, and nothing is created there (it used to create an empty database and
/// report "compacted 0 day(s)").
#[test]
fn offline_commands_refuse_a_data_dir_without_a_database() {
    let parent = tempfile::tempdir().unwrap();
    let typo = parent.path().join("milepost-dta");
    let dir = typo.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_milepost"))
            .args(args)
            .output_within_limit();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            err,
        )
    };
    for args in [
        &["compact", "--data-dir", dir][..],
        &["compact", "--rewrite", "--data-dir", dir],
        &["dump", "--date", "2026-11-01", "--data-dir", dir],
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains("no milepost database at") && err.contains("milepost-dta"),
            "{args:?}: {err}"
        );
        assert!(!typo.exists(), "{args:?} created {}", typo.display());
    }
    // A token may be made before the first start, so `token` writes there, and says
    // that no database is there yet (a mistyped --data-dir's token would fail).
    let (code, token, err) = run(&["token", "--data-dir", dir, "create", "--role", "viewer"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("no milepost database in") && err.contains("milepost-dta"),
        "{err}"
    );
    assert!(token.starts_with("mpt_"), "{token}");
}

/// The offline commands the README names, on a stopped server's data directory:
/// `compact`, `openapi` and `dump --since/--until`.
#[tokio::test(flavor = "multi_thread")]
async fn offline_commands_compact_print_the_spec_and_dump_a_range() {
    let app = TestApp::spawn().await;
    let (status, _) = app.ingest(crate::dumps::three_days()).await;
    assert_eq!(status, StatusCode::OK);
    let dir = app.stop().await;
    let stored = stored_rows(dir.path());
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_milepost"))
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output_within_limit();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, out, err) = run(&["compact"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("compacted 3 day(s), "), "{out}");
    assert_eq!(
        stored_rows(dir.path()),
        stored,
        "compaction keeps every reading"
    );

    let spec = Command::new(env!("CARGO_BIN_EXE_milepost"))
        .arg("openapi")
        .output_within_limit();
    assert!(spec.status.success());
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&spec.stdout).trim(),
        committed.trim()
    );

    let (code, out, err) = run(&[
        "dump",
        "--since",
        "2026-11-01",
        "--until",
        "2026-11-02",
        "--node-name",
        "offline",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "two days, two formats: {out}");
    let dumps = dir.path().join("dumps");
    for day in ["2026-11-01", "2026-11-02"] {
        assert!(dumps.join(format!("{day}.json.gz")).is_file());
        assert!(
            dumps
                .join(format!("parquet/date={day}/offline.parquet"))
                .is_file()
        );
    }
    assert!(!dumps.join("2026-11-03.json.gz").exists(), "past --until");
    let (code, _, err) = run(&["dump", "--since", "2026-11-03", "--until", "2026-11-01"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is after --until"), "{err}");
}

/// `milepost compact --rewrite` on a file made with DuckDB's 256 KiB blocks (as
/// before session 31): refused while a server holds the directory; once stopped, the
/// file is replaced by a 128 KiB-block copy holding every row of every table and
/// every sequence where it was, and the server starts on it and serves the readings.
#[tokio::test(flavor = "multi_thread")]
async fn compact_rewrite_replaces_an_old_file_and_keeps_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("milepost.duckdb");
    {
        let old = duckdb::Connection::open_with_flags(
            &db,
            duckdb::Config::default()
                .with("default_block_size", "262144")
                .unwrap(),
        )
        .unwrap();
        old.execute_batch("CHECKPOINT").unwrap();
    }
    let app = TestApp::spawn_in(dir, |_| {}).await;
    let (status, r) = app.ingest(crate::dumps::three_days()).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let now = chrono::Utc::now().to_rfc3339();
    let (status, _) = app.ingest(line("speed", 3.5, &now)).await;
    assert_eq!(status, StatusCode::OK);
    let rewrite = |dir: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_milepost"))
            .args(["compact", "--rewrite", "--data-dir"])
            .arg(dir)
            .output_within_limit();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = rewrite(app.dir.path());
    assert_eq!(code, Some(1), "refused while the server runs: {err}");
    assert!(err.contains("another milepost process is using"), "{err}");
    let dir = app.stop().await;
    // Compacted first, so that the rewrite below only copies.
    let out = Command::new(env!("CARGO_BIN_EXE_milepost"))
        .args(["compact", "--data-dir"])
        .arg(dir.path())
        .output_within_limit();
    assert!(out.status.success());
    // Sequences moved on, as alerts and anomalies move them.
    let conn = duckdb::Connection::open(&db).unwrap();
    conn.execute_batch("SELECT nextval('alert_ids'), nextval('alert_ids'), nextval('anomaly_ids')")
        .unwrap();
    drop(conn);
    let stored = stored_rows(dir.path());
    let before = dir.path().join("before.duckdb");
    std::fs::copy(&db, &before).unwrap();
    let block_size = |conn: &duckdb::Connection, name: &str| -> i64 {
        conn.query_row(
            &format!(
                "SELECT block_size FROM pragma_database_size() WHERE database_name = '{name}'"
            ),
            [],
            |r| r.get(0),
        )
        .unwrap()
    };

    let (code, out, err) = rewrite(dir.path());
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("256 KiB -> 128 KiB blocks"), "{out}");
    assert!(!dir.path().join("milepost.duckdb.rewrite").exists());
    assert!(!dir.path().join("milepost.duckdb.wal").exists());
    assert!(
        std::fs::metadata(&db).unwrap().len() < std::fs::metadata(&before).unwrap().len(),
        "smaller"
    );
    assert_eq!(stored_rows(dir.path()), stored, "every reading");
    // Every table row for row, every sequence at the same next value.
    let conn = duckdb::Connection::open_in_memory().unwrap();
    conn.execute_batch(&format!(
        "ATTACH '{}' AS a; ATTACH '{}' AS b;",
        before.display(),
        db.display()
    ))
    .unwrap();
    assert_eq!(
        (block_size(&conn, "a"), block_size(&conn, "b")),
        (262_144, 131_072)
    );
    let tables: Vec<String> = conn
        .prepare("SELECT table_name FROM duckdb_tables() WHERE database_name = 'a'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(tables.len() > 10, "{tables:?}");
    for t in &tables {
        let differ: i64 = conn
            .query_row(
                &format!(
                    "SELECT (SELECT count(*) FROM (FROM a.{t} EXCEPT ALL FROM b.{t}))
                          + (SELECT count(*) FROM (FROM b.{t} EXCEPT ALL FROM a.{t}))"
                ),
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(differ, 0, "table {t}");
    }
    for seq in [
        "alert_ids",
        "anomaly_ids",
        "anomaly_group_ids",
        "delivery_ids",
    ] {
        let next = |db: &str| -> i64 {
            conn.query_row(&format!("SELECT nextval('{db}.main.{seq}')"), [], |r| {
                r.get(0)
            })
            .unwrap()
        };
        assert_eq!(next("b"), next("a"), "sequence {seq}");
    }
    drop(conn);

    let app = TestApp::spawn_in(dir, |_| {}).await;
    let (status, latest) = app.get("/api/statistics/latest").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(latest["speed"].as_f64(), Some(3.5), "{latest}");
    let (status, r) = app.ingest(line("speed", 4.5, &now)).await;
    assert_eq!((status, num(&r, "duplicates")), (StatusCode::OK, 1), "{r}");
}
