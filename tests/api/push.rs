//! `milepost push` against the real server: totals, refusals by file and line, waiting
//! out 503 + Retry-After, a server that starts late, `--delete-after`, stdin, exit
//! statuses.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use milepost::bench::process::ServerProcess;

use crate::helpers::*;

fn start(dir: &Path, extra: &[&str]) -> ServerProcess {
    let exe = Path::new(env!("CARGO_BIN_EXE_milepost"));
    let mut args = vec!["--api-key", KEY];
    args.extend_from_slice(extra);
    ServerProcess::start(exe, &dir.join("data"), &args, false).expect("server starts")
}

fn push(url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_milepost"));
    cmd.args([
        "push",
        "--url",
        url,
        "--api-key",
        KEY,
        "--progress",
        "lines",
    ])
    .args(args)
    .env_remove("MILEPOST_PUSH_API_KEY");
    cmd
}

/// `(accepted, duplicates, rejected)` from push's totals line.
fn totals(out: &Output) -> (u64, u64, u64) {
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains(" accepted, "))
        .unwrap_or_else(|| panic!("no totals in {err}"));
    let n: Vec<u64> = line
        .split([' ', ','])
        .filter_map(|w| w.parse().ok())
        .take(3)
        .collect();
    (n[0], n[1], n[2])
}

fn reading(device: Option<&str>, sensor: &str, value: f64, second: u32) -> String {
    let ts = format!("2026-11-02T10:{:02}:{:02}Z", second / 60, second % 60);
    match device {
        Some(d) => dline(d, sensor, value, &ts),
        None => line(sensor, value, &ts),
    }
}

#[tokio::test]
async fn exact_totals_and_refused_lines_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let buf = dir.path().join("buffer");
    std::fs::create_dir_all(buf.join("older")).unwrap();
    // a.ndjson: 100 good, a duplicate of its line 1 at line 102, a bad line at 101.
    let mut a: String = (0..100)
        .map(|i| reading(None, "speed", i as f64, i) + "\n")
        .collect();
    a += "{\"sensor\":\"warp\",\"value\":1,\"timestamp\":\"2026-11-02T10:00:00Z\"}\n";
    a += &(reading(None, "speed", 0.0, 0) + "\n");
    std::fs::write(buf.join("a.ndjson"), &a).unwrap();
    // older/b.ndjson.gz: the same 100 again (duplicates) and 50 new, gzip; a
    // blank line (line 1) is ignored but counted.
    let mut b = String::from("\n");
    b += &(0..150)
        .map(|i| reading(None, "speed", i as f64, i) + "\n")
        .collect::<String>();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b.as_bytes()).unwrap();
    std::fs::write(buf.join("older/b.ndjson.gz"), gz.finish().unwrap()).unwrap();
    // A hidden file is not sent.
    std::fs::write(buf.join(".partial"), "garbage\n").unwrap();

    // Small requests (~1 KiB), so that line numbers cross request boundaries.
    let out = push(
        &server.base,
        &["--request-bytes", "1KiB", "--device", "truck-1"],
    )
    .arg(&buf)
    .output_within_limit();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(totals(&out), (150, 101, 1), "{err}");
    assert!(err.contains("a.ndjson:101: unknown sensor 'warp'"), "{err}");
    assert!(!err.contains(".partial"), "{err}");

    // Everything went to --device (the lines named none).
    let client = reqwest::Client::new();
    let v = get_json(&client, &format!("{}/api/v1/devices", server.base)).await;
    let devices = v["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{v}");
    assert_eq!(
        (devices[0]["device"].as_str(), num(&devices[0], "readings")),
        (Some("truck-1"), 150)
    );

    // Sent again: all duplicates, still exit 1 for the bad line.
    let out = push(&server.base, &["--device", "truck-1"])
        .arg(buf.join("a.ndjson"))
        .output_within_limit();
    assert_eq!((out.status.code(), totals(&out)), (Some(1), (0, 101, 1)));
}

#[test]
fn standard_input_and_delete_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let body: String = (0..30)
        .map(|i| reading(Some("car-1"), "fuel", 50.0, i) + "\n")
        .collect();
    let mut child = push(&server.base, &["-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        (out.status.code(), totals(&out)),
        (Some(0), (30, 0, 0)),
        "{out:?}"
    );

    // --delete-after: the clean file goes, the one with a refused line stays, named.
    let clean = dir.path().join("clean.ndjson");
    let dirty = dir.path().join("dirty.ndjson");
    let good: String = (30..60)
        .map(|i| reading(Some("car-1"), "fuel", 50.0, i) + "\n")
        .collect();
    std::fs::write(&clean, &good).unwrap();
    std::fs::write(
        &dirty,
        format!("{}\nnot json\n", reading(Some("car-1"), "fuel", 1.0, 99)),
    )
    .unwrap();
    let out = push(&server.base, &["--delete-after"])
        .arg(&clean)
        .arg(&dirty)
        .output_within_limit();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        (out.status.code(), totals(&out)),
        (Some(1), (31, 0, 1)),
        "{err}"
    );
    assert!(!clean.exists() && dirty.exists(), "{err}");
    assert!(err.contains(&format!("kept {}", dirty.display())), "{err}");
    assert!(err.contains("dirty.ndjson:2:"), "{err}");
    // Nothing to delete on stdin.
    let out = push(&server.base, &["--delete-after", "-"]).output_within_limit();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn a_busy_server_is_waited_for_as_it_asks() {
    let dir = tempfile::tempdir().unwrap();
    // One queued batch at most, refused after 1 ms: concurrent requests get 503 with
    // Retry-After (1 s).
    let server = start(
        dir.path(),
        &["--queue-capacity", "1", "--queue-timeout", "1ms"],
    );
    let file = dir.path().join("backlog.ndjson");
    let n = 3000;
    let body: String = (0..n)
        .map(|i| reading(Some(&format!("car-{}", i % 7)), "speed", 1.0, i / 7) + "\n")
        .collect();
    std::fs::write(&file, body).unwrap();
    let out = push(
        &server.base,
        &["--concurrency", "16", "--request-bytes", "2KiB"],
    )
    .env("MILEPOST_LOG", "milepost::push=debug")
    .arg(&file)
    .output_within_limit();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        (out.status.code(), totals(&out)),
        (Some(0), (n as u64, 0, 0)),
        "{err}"
    );
    let waits: Vec<u64> = err
        .lines()
        .filter(|l| l.contains("503 Service Unavailable"))
        .filter_map(|l| l.split("wait_ms=").nth(1)?.trim().parse().ok())
        .collect();
    assert!(!waits.is_empty(), "the server never said busy: {err}");
    // Retry-After is 1 s: never sooner.
    assert!(waits.iter().all(|&w| w >= 1000), "{waits:?}");
}

#[test]
fn a_server_that_starts_late_is_retried_and_one_that_never_does_is_given_up_on() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let file = dir.path().join("buffer.ndjson");
    let body: String = (0..20)
        .map(|i| reading(None, "rpm", 900.0, i) + "\n")
        .collect();
    // `rpm` is not a sensor: the seed's name is `revolution`.
    std::fs::write(&file, body.replace("rpm", "revolution")).unwrap();

    // Nothing listens, and push gives up after 1 s: exit 3, the file named.
    let out = push(&url, &["--give-up-after", "1s"])
        .arg(&file)
        .output_within_limit();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("not sent") && err.contains("buffer.ndjson"),
        "{err}"
    );

    // push starts first; the server comes up two seconds later on that port.
    let pusher = push(&url, &[])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let exe = Path::new(env!("CARGO_BIN_EXE_milepost"));
    let _server = ServerProcess::start(
        exe,
        &dir.path().join("data"),
        &["--api-key", KEY, "--port", &port.to_string()],
        false,
    )
    .expect("server starts");
    let out = pusher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        (out.status.code(), totals(&out)),
        (Some(0), (20, 0, 0)),
        "{err}"
    );
    assert!(err.contains("retrying"), "{err}");

    // A wrong key is not retried: exit 3 at once, saying why.
    let out = Command::new(env!("CARGO_BIN_EXE_milepost"))
        .args(["push", "--url", &url, "--api-key", "wrong"])
        .arg(&file)
        .output_within_limit();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("refused the API key"), "{err}");
}
