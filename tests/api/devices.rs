//! How many devices a server holds: the ceiling (`--max-devices`), the per-key rate
//! of new devices, and deleting a device that should not exist (backend and CLI).

use milepost::backend::proto;
use milepost::backend::{Role, TokenAdmin};
use reqwest::StatusCode;
use serde_json::Value;
use tonic::Code;

use crate::helpers::*;

fn at(min: u32) -> String {
    format!("2026-01-10T10:{min:02}:00Z")
}

/// One speed reading per device named, at minute `min`.
fn body(devices: &[&str], min: u32) -> String {
    devices
        .iter()
        .map(|d| dline(d, "speed", 50.0, &at(min)) + "\n")
        .collect()
}

/// Device names and reading counts `/api/v1/devices` lists, sorted by name.
async fn listed(app: &TestApp) -> Vec<(String, u64)> {
    let (status, v) = app.get("/api/v1/devices").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let mut out: Vec<_> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["device"].as_str().unwrap().to_owned(), num(d, "readings")))
        .collect();
    out.sort();
    out
}

/// `msg` with a backend token.
fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
    milepost::backend::client::authorized(Some(token), msg).unwrap()
}

fn errors(v: &Value) -> Vec<(u64, String)> {
    v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (num(e, "line"), e["error"].as_str().unwrap().to_owned()))
        .collect()
}

async fn refused_metric(app: &TestApp, reason: &str) -> u64 {
    let (_, text) = app.get_text("/metrics").await;
    let prefix = format!("milepost_new_devices_refused_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().unwrap())
}

// Several threads: the command line's process is waited for on one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_ceiling_new_devices_are_refused_line_by_line_until_one_is_deleted() {
    let app = TestApp::spawn_with(|a| a.max_devices = 3).await;
    // Four new devices, two lines each: the fourth device's lines are refused, the
    // rest stored.
    let mut two = body(&["a", "b", "c", "d"], 0);
    two += &body(&["a", "b", "c", "d"], 1);
    let (status, v) = app.ingest(two).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!((num(&v, "accepted"), num(&v, "rejected")), (6, 2), "{v}");
    let errs = errors(&v);
    assert_eq!(errs.iter().map(|e| e.0).collect::<Vec<_>>(), [4, 8], "{v}");
    assert!(
        errs[0].1.contains("device 'd' is new") && errs[0].1.contains("--max-devices"),
        "{v}"
    );
    // Known devices go on; another new one does not.
    let (status, v) = app.ingest(body(&["a", "b"], 2)).await;
    assert_eq!((status, num(&v, "accepted")), (StatusCode::OK, 2), "{v}");
    let (status, v) = app.ingest(body(&["e"], 2)).await;
    assert_eq!(
        (status, num(&v, "rejected")),
        (StatusCode::BAD_REQUEST, 1),
        "{v}"
    );
    assert_eq!(refused_metric(&app, "ceiling").await, 2);
    assert_eq!(
        listed(&app).await,
        [("a".into(), 3), ("b".into(), 3), ("c".into(), 2)]
    );

    // Deleting needs an admin token.
    let admin = TokenAdmin::new(app.dir.path());
    let (editor, admin) = (
        admin.create(Role::Editor, "ed").unwrap().0,
        admin.create(Role::Admin, "root").unwrap().0,
    );
    let addr = app.server().backend_addr().unwrap();
    let channel = milepost::backend::client::channel(&format!("http://{addr}")).unwrap();
    let mut devices = proto::DevicesClient::new(channel);
    let delete = |name: &str, token: &str| {
        milepost::backend::client::authorized(
            Some(token),
            proto::DeleteDeviceRequest { name: name.into() },
        )
        .unwrap()
    };
    let code = |r: Result<tonic::Response<proto::DeleteDeviceResponse>, tonic::Status>| {
        r.map_or_else(|s| s.code(), |_| Code::Ok)
    };
    assert_eq!(
        code(devices.delete_device(delete("b", &editor)).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(devices.delete_device(delete("nobody", &admin)).await),
        Code::NotFound
    );
    assert_eq!(
        code(devices.delete_device(delete("not a name", &admin)).await),
        Code::InvalidArgument
    );
    let done = devices
        .delete_device(delete("b", &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((done.readings, done.series), (3, 1));
    assert_eq!(listed(&app).await, [("a".into(), 3), ("c".into(), 2)]);
    let (status, v) = app
        .get("/api/v1/sensors/speed/statistics?device=b&from=2026-01-10T00:00:00Z&to=2026-01-11T00:00:00Z&bucket=1h")
        .await;
    assert_eq!((status, bucket_count_sum(&v)), (StatusCode::OK, 0), "{v}");

    // Room for one new device again.
    let (status, v) = app.ingest(body(&["e"], 3)).await;
    assert_eq!((status, num(&v, "accepted")), (StatusCode::OK, 1), "{v}");
    let (status, _) = app.ingest(body(&["b"], 3)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The command line asks for confirmation, then deletes.
    let bin = env!("CARGO_BIN_EXE_milepost");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(args)
            .env("MILEPOST_BACKEND_URL", format!("http://{addr}"))
            .env("MILEPOST_TOKEN", &admin)
            .output_within_limit();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = cli(&["device", "delete", "e"]);
    assert!(!ok && out.contains("--yes"), "{out}");
    let (ok, out) = cli(&["device", "delete", "e", "--yes"]);
    assert!(
        ok && out.contains("deleted device e: 1 readings of 1 sensors"),
        "{out}"
    );

    // A deleted name comes back as a new device, without its old readings.
    let (status, v) = app.ingest(body(&["b"], 0)).await;
    assert_eq!((status, num(&v, "accepted")), (StatusCode::OK, 1), "{v}");
    let expected = [("a".into(), 3), ("b".into(), 1), ("c".into(), 2)];
    assert_eq!(listed(&app).await, expected);
    let app = app.restart().await;
    assert_eq!(listed(&app).await, expected);
    let dir = app.stop().await;
    let mut per_device = std::collections::BTreeMap::<String, u64>::new();
    for (device, ..) in stored_rows(dir.path()) {
        *per_device.entry(device).or_default() += 1;
    }
    assert_eq!(
        per_device.into_iter().collect::<Vec<_>>(),
        [("a".into(), 3), ("b".into(), 1), ("c".into(), 2)]
    );
}

#[tokio::test]
async fn a_key_bringing_in_new_devices_too_fast_gets_429_for_those_lines_only() {
    let app = TestApp::spawn_with(|a| a.max_new_devices_per_key = 2).await;
    let resp = app
        .client
        .post(app.url("/ingest"))
        .basic_auth(KEY, None::<&str>)
        .header("content-type", "application/x-ndjson")
        .body(body(&["x1", "x2", "x3", "x1"], 0))
        .send()
        .await
        .unwrap();
    let retry = retry_after(&resp);
    let (status, v) = json(resp).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    // A minute's worth is 2: the next token comes in 30 s.
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!((num(&v, "accepted"), num(&v, "rejected")), (2, 1), "{v}");
    let errs = errors(&v);
    assert_eq!(errs[0].0, 3, "{v}");
    assert!(errs[0].1.contains("--max-new-devices-per-key"), "{v}");
    // Known devices are not limited; the retry stores only what was refused once the
    // key has room (here: never within the test), duplicates counted.
    let (status, v) = app.ingest(body(&["x1", "x2"], 1)).await;
    assert_eq!((status, num(&v, "accepted")), (StatusCode::OK, 2), "{v}");
    let (status, v) = app.ingest(body(&["x1", "x2", "x3", "x1"], 0)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!((num(&v, "accepted"), num(&v, "duplicates")), (0, 3), "{v}");
    // Another key has its own allowance.
    let (status, v) = app.ingest_as(TRUCK_KEY, body(&["truck"], 0)).await;
    assert_eq!((status, num(&v, "accepted")), (StatusCode::OK, 1), "{v}");
    assert_eq!(refused_metric(&app, "rate").await, 2);
    app.stop().await;
}

/// Each key may bring in at most `--max-devices-per-key` devices that still exist:
/// beyond it that key's new devices are refused line by line (its known devices, and
/// other keys, go on); a deleted device frees its key's room, and the count survives
/// a restart (it is stored with the devices).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_brings_in_at_most_its_quota_of_devices_across_restarts() {
    const OTHER: &str = "other-fleet-key";
    let quota = |a: &mut milepost::config::ServeArgs| {
        a.max_devices_per_key = 3;
        a.api_keys.push(OTHER.into());
    };
    let app = TestApp::spawn_with(quota).await;
    let (status, v) = app.ingest(body(&["a", "b", "c", "d", "a", "e"], 0)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!((num(&v, "accepted"), num(&v, "rejected")), (3, 2), "{v}");
    let errs = errors(&v);
    assert_eq!(errs.iter().map(|e| e.0).collect::<Vec<_>>(), [4, 6], "{v}");
    assert!(
        errs[0].1.contains("device 'd' is new") && errs[0].1.contains("--max-devices-per-key"),
        "{v}"
    );
    // Another key has its own quota, and writes to the first key's devices freely.
    let (status, v) = app.ingest_as(OTHER, body(&["x", "y", "a", "z"], 1)).await;
    assert_eq!((status, num(&v, "accepted")), (StatusCode::OK, 4), "{v}");
    let (status, v) = app.ingest_as(OTHER, body(&["w"], 1)).await;
    assert_eq!(
        (status, num(&v, "rejected")),
        (StatusCode::BAD_REQUEST, 1),
        "{v}"
    );
    assert_eq!(refused_metric(&app, "key_quota").await, 3);
    assert_eq!(refused_metric(&app, "ceiling").await, 0);

    // Deleting one of the first key's devices gives it room for one.
    let token = app.admin_token();
    let mut devices = proto::DevicesClient::new(app.backend_channel());
    devices
        .delete_device(authed(
            &token,
            proto::DeleteDeviceRequest { name: "b".into() },
        ))
        .await
        .unwrap();
    let (status, v) = app.ingest(body(&["d", "e"], 2)).await;
    assert_eq!(
        (num(&v, "accepted"), num(&v, "rejected")),
        (1, 1),
        "{status} {v}"
    );

    // After a restart (clean, then with the ingest log's records applied at start)
    // each key's devices are still counted.
    let dir = app.stop().await;
    let app = TestApp::spawn_in(dir, quota).await;
    let (status, v) = app.ingest(body(&["f"], 3)).await;
    assert_eq!(
        (status, num(&v, "rejected")),
        (StatusCode::BAD_REQUEST, 1),
        "{v}"
    );
    let (status, v) = app.ingest_as(OTHER, body(&["f"], 3)).await;
    assert_eq!(
        (status, num(&v, "rejected")),
        (StatusCode::BAD_REQUEST, 1),
        "{v}"
    );
    let (status, v) = app.ingest(body(&["a", "c", "d"], 3)).await;
    assert_eq!((status, num(&v, "accepted")), (StatusCode::OK, 3), "{v}");
    let names: Vec<String> = listed(&app).await.into_iter().map(|(d, _)| d).collect();
    assert_eq!(names, ["a", "c", "d", "x", "y", "z"]);
    app.stop().await;
}

/// A large body is parsed on several threads, each asking the gate on its own: the
/// ceiling still holds exactly, and every line of a refused device is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_parsed_in_parallel_keeps_the_ceiling_exactly() {
    let app = TestApp::spawn_with(|a| a.max_devices = 5).await;
    let devices: Vec<String> = (0..20).map(|d| format!("bulk-{d}")).collect();
    let mut body = String::new();
    // ~2 MB: parsed in pieces on every core.
    for i in 0..20_000u32 {
        let d = &devices[(i % 20) as usize];
        let ts = format!(
            "2026-01-10T{:02}:{:02}:{:02}Z",
            i / 3600,
            (i / 60) % 60,
            i % 60
        );
        body += &dline(d, "speed", 50.0, &ts);
        body.push('\n');
    }
    assert!(body.len() > 1024 * 1024);
    let (status, v) = app.ingest(body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{}", v["errors"][0]);
    assert_eq!(
        (num(&v, "accepted"), num(&v, "rejected")),
        (5 * 1000, 15 * 1000),
        "{}",
        v["errors"][0]
    );
    let stored = listed(&app).await;
    assert_eq!(stored.len(), 5, "{stored:?}");
    assert!(stored.iter().all(|(_, n)| *n == 1000), "{stored:?}");
    app.stop().await;
}

/// The real binary says in its log, once a minute at most, that the ceiling refuses
/// devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_says_once_that_the_ceiling_refuses_devices() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let (_proc, base) = spawn_logged(
        serve_command(&dir.path().join("data")).args([
            "--log-format",
            "json",
            "--api-key",
            KEY,
            "--max-devices",
            "1",
        ]),
        &log,
    );
    let client = reqwest::Client::new();
    let (status, _) = post_ingest(&client, &base, body(&["first"], 0))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    for min in 1..4 {
        let (status, v) = post_ingest(&client, &base, body(&["second", "first"], min))
            .await
            .unwrap();
        assert_eq!(
            (status, num(&v, "accepted")),
            (StatusCode::BAD_REQUEST, 1),
            "{v}"
        );
    }
    let text = wait_for_log(&log, "the server holds its limit of devices");
    let warnings: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("the server holds its limit of devices"))
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert_eq!(warnings[0]["level"], "WARN");
    assert_eq!(warnings[0]["fields"]["max_devices"], 1);
}

/// What deleting a device keeps: alerts and anomalies naming it, and the dumps
/// already written, until its day is dumped again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_device_keeps_its_alerts_anomalies_and_written_dumps_until_redumped() {
    let app = TestApp::spawn_with(|a| a.backend.job_burst = 5).await;
    let t0 = chrono::DateTime::parse_from_rfc3339("2026-01-10T00:00:00Z")
        .unwrap()
        .to_utc();
    let (status, v) = app
        .ingest(crate::backend::readings_of("gone", t0, 0, 120))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, _) = app.ingest(body(&["stays"], 0)).await;
    assert_eq!(status, StatusCode::OK);

    let tokens = TokenAdmin::new(app.dir.path());
    let admin = tokens.create(Role::Admin, "root").unwrap().0;
    let addr = app.server().backend_addr().unwrap();
    let channel = milepost::backend::client::channel(&format!("http://{addr}")).unwrap();
    let mut alerts = proto::AlertsClient::new(channel.clone());
    let mut anomalies = proto::AnomaliesClient::new(channel.clone());
    let mut jobs = proto::JobsClient::new(channel.clone());
    let mut devices = proto::DevicesClient::new(channel);
    let alert = proto::AlertConfig {
        device: "gone".into(),
        ..crate::backend::alert_config("gone-temp", "http://127.0.0.1:9/hook")
    };
    let alert = alerts
        .create_alert(authed(&admin, alert))
        .await
        .unwrap()
        .into_inner();
    let found = jobs
        .backfill(authed(
            &admin,
            proto::BackfillRequest {
                alert_id: alert.id,
                from: "2026-01-10T00:00:00Z".into(),
                to: "2026-01-10T02:00:00Z".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(found.new_anomalies >= 1, "{found:?}");
    let list_anomalies = || proto::ListAnomaliesRequest {
        device: "gone".into(),
        limit: 100,
        ..Default::default()
    };
    let before = anomalies
        .list_anomalies(authed(&admin, list_anomalies()))
        .await
        .unwrap()
        .into_inner()
        .anomalies;
    assert!(!before.is_empty());

    let dump = app.dir.path().join("dumps/2026-01-10.json.gz");
    let redump = || proto::RedumpRequest {
        date: "2026-01-10".into(),
    };
    let lines_of = |device: &str| {
        let bytes = std::fs::read(&dump).unwrap();
        crate::dumps::read_json_gz(&bytes)
            .iter()
            .filter(|l| l["device"] == device)
            .count()
    };
    jobs.redump(authed(&admin, redump())).await.unwrap();
    assert_eq!((lines_of("gone"), lines_of("stays")), (720, 1));

    let done = devices
        .delete_device(authed(
            &admin,
            proto::DeleteDeviceRequest {
                name: "gone".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((done.readings, done.series), (720, 1));
    // Kept: the alert, the anomalies, the dump already written.
    let kept = alerts
        .get_alert(authed(&admin, proto::AlertId { id: alert.id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.device, "gone");
    let after = anomalies
        .list_anomalies(authed(&admin, list_anomalies()))
        .await
        .unwrap()
        .into_inner()
        .anomalies;
    assert_eq!(after.len(), before.len());
    assert_eq!(lines_of("gone"), 720);
    // Dumped again, the day no longer holds it.
    jobs.redump(authed(&admin, redump())).await.unwrap();
    assert_eq!((lines_of("gone"), lines_of("stays")), (0, 1));
    app.stop().await;
}
