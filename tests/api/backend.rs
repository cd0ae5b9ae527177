//! The internal gRPC backend, black-box: the real server, a real gRPC client from
//! the generated stubs over a socket, tokens made the way an operator makes them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use milepost::backend::proto;
use milepost::backend::{Role, TokenAdmin};
use reqwest::StatusCode;
use serde_json::Value;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::helpers::{OutputWithin as _, TestApp, dline};

use tonic_reflection::pb::v1 as reflection;

struct Tokens {
    viewer: String,
    editor: String,
    admin: String,
}

fn tokens(app: &TestApp) -> Tokens {
    let admin = TokenAdmin::new(app.dir.path());
    Tokens {
        viewer: admin.create(Role::Viewer, "viewer").unwrap().0,
        editor: admin.create(Role::Editor, "editor").unwrap().0,
        admin: admin.create(Role::Admin, "admin").unwrap().0,
    }
}

fn config(app: &TestApp) -> Channel {
    let addr = app.server().backend_addr().expect("backend runs");
    milepost::backend::client::channel(&format!("http://{addr}")).unwrap()
}

fn req<T>(msg: T, token: Option<&str>) -> Request<T> {
    milepost::backend::client::authorized(token, msg).unwrap()
}

/// `rpc!(client.method(message, token))`: the call on a clone of `client` (tonic's
/// clients take `&mut self`; clones share the connection), answered with the message.
macro_rules! rpc {
    ($client:ident . $method:ident ($msg:expr, $tok:expr $(,)?)) => {{
        let mut client = $client.clone();
        let request = req($msg, $tok);
        async move {
            client
                .$method(request)
                .await
                .map(tonic::Response::into_inner)
        }
    }};
}

fn code<T: std::fmt::Debug>(r: Result<T, Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn fast_jobs(a: &mut milepost::config::ServeArgs) {
    a.backend.detect_debounce = Duration::from_millis(100);
    a.backend.webhook_backoff = Duration::from_millis(50);
}

async fn backend_app() -> TestApp {
    TestApp::spawn_with(fast_jobs).await
}

pub(crate) fn alert_config(name: &str, webhook: &str) -> proto::AlertConfig {
    proto::AlertConfig {
        name: name.into(),
        device: "lada".into(),
        sensor: "engine_temperature".into(),
        bucket: "1m".into(),
        algorithm: proto::Algorithm::Absolute as i32,
        radius: 5,
        threshold: 10.0,
        direction: proto::Direction::Up as i32,
        webhook_url: webhook.into(),
        ..Default::default()
    }
}

/// One reading every 10 s from `start_min` to `end_min` (minutes after `t0`):
/// 80 °C before minute 60, 100 °C from it on.
fn readings(t0: chrono::DateTime<chrono::Utc>, start_min: i64, end_min: i64) -> String {
    readings_of("lada", t0, start_min, end_min)
}

/// [`readings`] of `device`.
pub(crate) fn readings_of(
    device: &str,
    t0: chrono::DateTime<chrono::Utc>,
    start_min: i64,
    end_min: i64,
) -> String {
    let mut body = String::new();
    for s in (start_min * 60..end_min * 60).step_by(10) {
        let t = t0 + chrono::Duration::seconds(s);
        let v = if s < 60 * 60 { 80.0 } else { 100.0 } + [0.0, 0.5, -0.5][(s / 10 % 3) as usize];
        body.push_str(&dline(
            device,
            "engine_temperature",
            v,
            &t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ));
        body.push('\n');
    }
    body
}

/// Background detection passes so far (`/metrics`).
async fn detection_passes(app: &TestApp) -> u64 {
    let metrics = app.get_text("/metrics").await.1;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("milepost_detection_pass_duration_seconds_count "))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Waits until a detection pass has run after `before` passes (the pass the last
/// ingest set off: the server was idle before it), instead of sleeping and hoping.
async fn await_detection_pass(app: &TestApp, before: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while detection_passes(app).await <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "no detection pass ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn recent_hour_start() -> chrono::DateTime<chrono::Utc> {
    use chrono::{DurationRound, Utc};
    (Utc::now() - chrono::Duration::hours(4))
        .duration_trunc(chrono::Duration::hours(1))
        .unwrap()
}

#[tokio::test]
async fn every_service_enforces_its_policy() {
    let app = backend_app().await;
    let t = tokens(&app);
    let (viewer, editor, admin) = (
        Some(t.viewer.as_str()),
        Some(t.editor.as_str()),
        Some(t.admin.as_str()),
    );

    // Hello: open to all.
    let hello = proto::HelloClient::new(config(&app));
    let r = rpc!(hello.say_hello(
        proto::HelloRequest {
            text: "World".into(),
        },
        None,
    ))
    .await
    .unwrap();
    assert_eq!(r.text, "Hello, World!");

    // Sensor catalog: viewer reads, admin writes.
    let catalog = proto::SensorCatalogClient::new(config(&app));
    let list = |tok| rpc!(catalog.list_sensors(proto::ListSensorsRequest {}, tok));
    assert_eq!(code(list(None).await), Code::Unauthenticated);
    assert_eq!(
        code(list(Some("mpt_not-a-token")).await),
        Code::Unauthenticated
    );
    assert_eq!(list(viewer).await.unwrap().sensors.len(), 6);
    let oil = proto::Sensor {
        name: "oil_pressure".into(),
        unit: "bar".into(),
        description: "Engine oil pressure".into(),
        min_value: Some(0.0),
        max_value: Some(10.0),
    };
    let upsert = |tok| rpc!(catalog.upsert_sensor(oil.clone(), tok));
    assert_eq!(code(upsert(None).await), Code::Unauthenticated);
    assert_eq!(code(upsert(viewer).await), Code::PermissionDenied);
    assert_eq!(code(upsert(editor).await), Code::PermissionDenied);
    assert_eq!(upsert(admin).await.unwrap().unit, "bar");
    // Ingest knows the new sensor and its range at once.
    let (status, body) = app
        .ingest(format!(
            "{}\n{}\n",
            dline("lada", "oil_pressure", 3.5, "2026-11-01T10:00:00Z"),
            dline("lada", "oil_pressure", 12.0, "2026-11-01T10:00:01Z")
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["accepted"], 1, "{body}");
    assert!(
        body["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("outside the valid range 0..10"),
        "{body}"
    );
    let mut bad = oil.clone();
    bad.min_value = Some(20.0);
    let e = rpc!(catalog.upsert_sensor(bad, admin)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Alerts: viewer reads, editor writes.
    let alerts = proto::AlertsClient::new(config(&app));
    let create = |tok| rpc!(alerts.create_alert(alert_config("brake-temp", ""), tok));
    assert_eq!(code(create(None).await), Code::Unauthenticated);
    assert_eq!(code(create(viewer).await), Code::PermissionDenied);
    let a = create(editor).await.unwrap();
    assert_eq!((a.revision, a.active), (1, true));
    let got = rpc!(alerts.get_alert(proto::AlertId { id: a.id }, viewer))
        .await
        .unwrap();
    assert_eq!(got.name, "brake-temp");
    assert_eq!(
        code(rpc!(alerts.get_alert(proto::AlertId { id: a.id }, None)).await),
        Code::Unauthenticated
    );
    let listed = rpc!(alerts.list_alerts(proto::ListAlertsRequest::default(), viewer))
        .await
        .unwrap();
    assert_eq!(listed.alerts.len(), 1);
    let mut update = got.clone();
    update.threshold = 12.0;
    assert_eq!(
        code(rpc!(alerts.update_alert(update.clone(), viewer)).await),
        Code::PermissionDenied
    );
    let updated = rpc!(alerts.update_alert(update.clone(), editor))
        .await
        .unwrap();
    assert_eq!((updated.revision, updated.threshold), (2, 12.0));
    // The same revision again is stale.
    let e = rpc!(alerts.update_alert(update, editor)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let mut unknown = alert_config("x", "");
    unknown.sensor = "tyre_pressure".into();
    let e = rpc!(alerts.create_alert(unknown, editor))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not in the catalog"), "{e:?}");
    let mut invalid = alert_config("x", "");
    invalid.radius = 0;
    let e = rpc!(alerts.create_alert(invalid, editor))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        code(rpc!(alerts.deactivate_alert(proto::AlertId { id: a.id }, viewer)).await),
        Code::PermissionDenied
    );
    let off = rpc!(alerts.deactivate_alert(proto::AlertId { id: a.id }, editor))
        .await
        .unwrap();
    assert!(!off.active);
    let deliveries =
        |tok| rpc!(alerts.list_deliveries(proto::ListDeliveriesRequest::default(), tok));
    assert_eq!(code(deliveries(None).await), Code::Unauthenticated);
    assert!(deliveries(viewer).await.unwrap().deliveries.is_empty());

    // Anomalies: viewer reads, editor triages.
    let anomalies = proto::AnomaliesClient::new(config(&app));
    let list = |tok| rpc!(anomalies.list_anomalies(proto::ListAnomaliesRequest::default(), tok));
    assert_eq!(code(list(None).await), Code::Unauthenticated);
    assert!(list(viewer).await.unwrap().anomalies.is_empty());
    let triage = |tok| {
        rpc!(anomalies.triage_anomaly(
            proto::TriageRequest {
                id: 999,
                status: proto::TriageStatus::Positive as i32,
                message: "real".into(),
            },
            tok,
        ))
    };
    assert_eq!(code(triage(viewer).await), Code::PermissionDenied);
    assert_eq!(code(triage(editor).await), Code::NotFound);
    assert_eq!(
        code(rpc!(anomalies.get_anomaly(proto::AnomalyId { id: 999 }, viewer)).await),
        Code::NotFound
    );
    let groups = |tok| rpc!(anomalies.list_groups(proto::ListGroupsRequest::default(), tok));
    assert_eq!(code(groups(None).await), Code::Unauthenticated);
    assert!(groups(viewer).await.unwrap().groups.is_empty());
    let action = |tok| {
        rpc!(anomalies.set_group_action(
            proto::SetGroupActionRequest {
                id: 999,
                action: proto::GroupAction::Report as i32,
            },
            tok,
        ))
    };
    assert_eq!(code(action(viewer).await), Code::PermissionDenied);
    assert_eq!(code(action(editor).await), Code::NotFound);

    // Detection: editor.
    let detection = proto::DetectionClient::new(config(&app));
    let dry = |tok| {
        rpc!(detection.dry_run(
            proto::DryRunRequest {
                config: Some(alert_config("dry", "")),
                from: "2026-11-01T00:00:00Z".into(),
                to: "2026-11-02T00:00:00Z".into(),
                max_results: 0,
            },
            tok,
        ))
    };
    assert_eq!(code(dry(None).await), Code::Unauthenticated);
    assert_eq!(code(dry(viewer).await), Code::PermissionDenied);
    assert_eq!(dry(editor).await.unwrap().anomalies.len(), 0);

    // Jobs: Redump is admin's, Backfill editor's; each behind a token bucket
    // (default: one call, then two a minute).
    let jobs = proto::JobsClient::new(config(&app));
    let redump = |tok| {
        rpc!(jobs.redump(
            proto::RedumpRequest {
                date: "2026-11-01".into(),
            },
            tok,
        ))
    };
    assert_eq!(code(redump(None).await), Code::Unauthenticated);
    assert_eq!(code(redump(editor).await), Code::PermissionDenied);
    let dumped = redump(admin).await.unwrap();
    let json = dumped.objects.iter().find(|o| o.format == "json").unwrap();
    assert_eq!(json.readings, 1, "{dumped:?}");
    let e = redump(admin).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let msg = e.message();
    let secs: u64 = msg
        .split("retry in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no retry hint in {msg:?}"));
    assert!((1..=30).contains(&secs), "{msg}");
    // The hint is also a `retry-after` entry of the status' metadata.
    let retry: u64 = e
        .metadata()
        .get("retry-after")
        .unwrap_or_else(|| panic!("no retry-after in {e:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry, secs, "{e:?}");
    assert!((1..=30).contains(&retry), "{retry}");
    let backfill = |tok| {
        rpc!(jobs.backfill(
            proto::BackfillRequest {
                alert_id: a.id,
                from: "2026-11-01T00:00:00Z".into(),
                to: "2026-11-02T00:00:00Z".into(),
            },
            tok,
        ))
    };
    assert_eq!(code(backfill(viewer).await), Code::PermissionDenied);
    assert_eq!(backfill(editor).await.unwrap().found, 0);
    assert_eq!(code(backfill(editor).await), Code::ResourceExhausted);

    // The backend is not on the public listener.
    let status = app
        .client
        .post(app.url("/milepost.backend.v1.Hello/SayHello"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test]
async fn reflection_lists_every_service_and_describes_its_methods() {
    use futures_util::StreamExt as _;
    use prost::Message as _;
    use reflection::server_reflection_request::MessageRequest;
    use reflection::server_reflection_response::MessageResponse;

    let app = backend_app().await;
    let mut client =
        reflection::server_reflection_client::ServerReflectionClient::new(config(&app));
    let ask = |m: MessageRequest| reflection::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let requests = futures_util::stream::iter(vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "milepost.backend.v1.Alerts".into(),
        )),
    ]);
    let mut answers = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(first)) = answers.next().await else {
        panic!("no answer")
    };
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("{first:?}")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for s in [
        "Alerts",
        "Anomalies",
        "Detection",
        "Devices",
        "Hello",
        "Jobs",
        "SensorCatalog",
    ] {
        assert!(
            names.contains(&format!("milepost.backend.v1.{s}")),
            "{s} missing from {names:?}"
        );
    }
    let Some(Ok(second)) = answers.next().await else {
        panic!("no answer")
    };
    let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else {
        panic!("{second:?}")
    };
    let file =
        prost_types::FileDescriptorProto::decode(&files.file_descriptor_proto[0][..]).unwrap();
    // The older v1alpha service answers too (grpcurl falls back to it).
    let mut alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
            config(&app),
        );
    let mut answers = alpha
        .server_reflection_info(futures_util::stream::iter([
            tonic_reflection::pb::v1alpha::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(
                    tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                        String::new(),
                    ),
                ),
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(listed)) = answers.next().await else {
        panic!("no v1alpha answer")
    };
    assert!(
        format!("{listed:?}").contains("milepost.backend.v1.Jobs"),
        "{listed:?}"
    );
    let alerts = file.service.iter().find(|s| s.name() == "Alerts").unwrap();
    let methods: Vec<&str> = alerts.method.iter().map(|m| m.name()).collect();
    assert!(
        methods.contains(&"CreateAlert") && methods.contains(&"ListDeliveries"),
        "{methods:?}"
    );
    app.stop().await;
}

/// A webhook receiver: answers 503 to the first POST, then 200; keeps the bodies.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    webhook_receiver_refusing(1).await
}

/// A webhook receiver that answers 503 to the first `refusals` POSTs, then 204.
async fn webhook_receiver_refusing(refusals: usize) -> (String, Arc<Mutex<Vec<Value>>>) {
    use poem::listener::{Acceptor, Listener};
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let seen = got.clone();
    let endpoint = poem::Route::new().at(
        "/hook",
        poem::post(poem::endpoint::make(move |req: poem::Request| {
            let seen = seen.clone();
            async move {
                let mut req = req;
                let body: Value = req.take_body().into_json().await.unwrap();
                let mut seen = seen.lock().unwrap();
                seen.push(body);
                if seen.len() <= refusals {
                    poem::http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    poem::http::StatusCode::NO_CONTENT
                }
            }
        })),
    );
    let acceptor = poem::listener::TcpListener::bind("127.0.0.1:0")
        .into_acceptor()
        .await
        .unwrap();
    let addr = *acceptor.local_addr()[0].as_socket_addr().unwrap();
    tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(endpoint));
    (format!("http://{addr}/hook"), got)
}

/// The delivery log, as a viewer reads it.
async fn deliveries(alerts: &proto::AlertsClient<Channel>, viewer: &str) -> Vec<proto::Delivery> {
    rpc!(alerts.list_deliveries(proto::ListDeliveriesRequest::default(), Some(viewer)))
        .await
        .unwrap()
        .deliveries
}

async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}")
}

#[tokio::test]
async fn a_step_ingested_over_http_is_found_once_grouped_triaged_and_notified() {
    let app = backend_app().await;
    let t = tokens(&app);
    let (hook, received) = webhook_receiver().await;
    let alerts = proto::AlertsClient::new(config(&app));
    let alert = rpc!(alerts.create_alert(alert_config("brake-temp", &hook), Some(&t.editor)))
        .await
        .unwrap();

    // 80 °C for an hour, then 100 °C, streamed ten minutes per request.
    let t0 = recent_hour_start();
    for m in (0..90).step_by(10) {
        let (status, body) = app.ingest(readings(t0, m, m + 10)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let list = async || {
        let (s, v) = app
            .get("/api/v1/anomalies?device=lada&sensor=engine_temperature")
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["anomalies"].as_array().cloned().filter(|a| !a.is_empty())
    };
    let found = wait_for("an anomaly", list).await;
    assert_eq!(found.len(), 1, "{found:?}");
    let a = &found[0];
    let step_at =
        (t0 + chrono::Duration::minutes(60)).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    assert_eq!(a["time"], step_at.as_str(), "{a}");
    assert_eq!(a["direction"], "up");
    assert_eq!(a["alert_id"], alert.id);
    assert!(
        (a["before_mean"].as_f64().unwrap() - 80.0).abs() < 1e-9,
        "{a}"
    );
    assert!(
        (a["after_mean"].as_f64().unwrap() - 100.0).abs() < 1e-9,
        "{a}"
    );
    assert!(
        (a["percent_change"].as_f64().unwrap() - 25.0).abs() < 1e-9,
        "{a}"
    );
    assert_eq!(a["status"], "untriaged");

    // The webhook: refused once (503), retried, delivered; both attempts logged.
    let bodies = wait_for("two webhook attempts", async || {
        let v = received.lock().unwrap().clone();
        (v.len() >= 2).then_some(v)
    })
    .await;
    assert_eq!(
        bodies[1]["subject"],
        "[brake-temp]: 1 anomaly in engine_temperature"
    );
    assert_eq!(bodies[1]["anomalies"][0]["time"], step_at.as_str());
    assert_eq!(bodies[1]["anomalies"][0]["before"], 80.0);
    assert_eq!(bodies[1]["anomalies"][0]["after"], 100.0);
    let log = wait_for("the delivery log", async || {
        let d = deliveries(&alerts, &t.viewer).await;
        (d.len() >= 2).then_some(d)
    })
    .await;
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log[0].ok && log[0].attempt == 2 && log[0].status_code == 204,
        "{log:?}"
    );
    assert!(
        !log[1].ok && log[1].attempt == 1 && log[1].status_code == 503,
        "{log:?}"
    );
    let metrics = app.get_text("/metrics").await.1;
    for line in [
        "milepost_anomalies_found_total 1",
        "milepost_webhook_deliveries_ok_total 1",
        "milepost_webhook_deliveries_failed_total 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics");
    }

    // More data after it, and a backfill over everything: still one anomaly.
    let passes = detection_passes(&app).await;
    let (status, _) = app.ingest(readings(t0, 90, 120)).await;
    assert_eq!(status, StatusCode::OK);
    await_detection_pass(&app, passes).await;
    let jobs = proto::JobsClient::new(config(&app));
    let filled = rpc!(jobs.backfill(
        proto::BackfillRequest {
            alert_id: alert.id,
            from: t0.to_rfc3339(),
            to: (t0 + chrono::Duration::hours(3)).to_rfc3339(),
        },
        Some(&t.editor),
    ))
    .await
    .unwrap();
    assert_eq!((filled.found, filled.new_anomalies), (1, 0), "{filled:?}");
    let again = list().await.unwrap();
    assert_eq!(again.len(), 1, "{again:?}");

    // Its group, and triage.
    let anomalies = proto::AnomaliesClient::new(config(&app));
    let groups = rpc!(anomalies.list_groups(
        proto::ListGroupsRequest { alert_id: alert.id },
        Some(&t.viewer),
    ))
    .await
    .unwrap();
    assert_eq!(groups.groups.len(), 1);
    let id = a["id"].as_i64().unwrap();
    assert_eq!(groups.groups[0].anomaly_ids, vec![id]);
    let g = rpc!(anomalies.set_group_action(
        proto::SetGroupActionRequest {
            id: groups.groups[0].id,
            action: proto::GroupAction::Report as i32,
        },
        Some(&t.editor),
    ))
    .await
    .unwrap();
    assert_eq!(g.action, proto::GroupAction::Report as i32);
    let triaged = rpc!(anomalies.triage_anomaly(
        proto::TriageRequest {
            id,
            status: proto::TriageStatus::Positive as i32,
            message: "thermostat stuck".into(),
        },
        Some(&t.editor),
    ))
    .await
    .unwrap();
    assert_eq!(triaged.triaged_by, "editor");
    let (_, v) = app.get("/api/v1/anomalies?status=positive").await;
    assert_eq!(v["anomalies"][0]["message"], "thermostat stuck");
    let (_, v) = app.get("/api/v1/anomalies?status=untriaged").await;
    assert_eq!(v["anomalies"].as_array().unwrap().len(), 0);
    let (s, v) = app.get("/api/v1/anomalies?status=sideways").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // A dry run over the same data finds the same step and stores nothing.
    let detection = proto::DetectionClient::new(config(&app));
    let dry = rpc!(detection.dry_run(
        proto::DryRunRequest {
            config: Some(alert_config("what-if", "")),
            from: t0.to_rfc3339(),
            to: (t0 + chrono::Duration::hours(2)).to_rfc3339(),
            max_results: 0,
        },
        Some(&t.editor),
    ))
    .await
    .unwrap();
    assert_eq!(dry.anomalies.len(), 1, "{dry:?}");
    assert_eq!(dry.anomalies[0].step_at, step_at);
    assert_eq!(dry.anomalies[0].id, 0);
    assert_eq!(dry.buckets, 120);
    let all =
        rpc!(anomalies.list_anomalies(proto::ListAnomaliesRequest::default(), Some(&t.viewer)))
            .await
            .unwrap();
    assert_eq!(all.anomalies.len(), 1);

    // Everything survives a restart, and detection does not find the step again.
    let app = TestApp::spawn_in(app.stop().await, fast_jobs).await;
    let passes = detection_passes(&app).await;
    let (status, _) = app.ingest(readings(t0, 120, 130)).await;
    assert_eq!(status, StatusCode::OK);
    await_detection_pass(&app, passes).await;
    let (_, v) = app.get("/api/v1/anomalies").await;
    assert_eq!(v["anomalies"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(received.lock().unwrap().len(), 2, "no second notification");
    app.stop().await;
}

// Multi-threaded: the CLI runs as a blocking child process while the server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_client_manages_tokens_alerts_and_anomalies() {
    let app = backend_app().await;
    let bin = env!("CARGO_BIN_EXE_milepost");
    let addr = app.server().backend_addr().unwrap();
    let run = |args: &[&str], token: Option<&str>| {
        let mut cmd = std::process::Command::new(bin);
        cmd.args(args)
            .env("MILEPOST_BACKEND_URL", format!("http://{addr}"))
            .env("MILEPOST_DATA_DIR", app.dir.path())
            .env_remove("MILEPOST_TOKEN");
        if let Some(t) = token {
            cmd.env("MILEPOST_TOKEN", t);
        }
        let out = cmd.output_within_limit();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A token made while the server runs works at once.
    let (ok, token, err) = run(
        &["token", "create", "--role", "editor", "--name", "ops"],
        None,
    );
    assert!(ok && !err.contains("no milepost database"), "{err}");
    let token = token.trim().to_owned();
    assert!(token.starts_with("mpt_"), "{token}");
    let (ok, list, _) = run(&["token", "list"], None);
    assert!(
        ok && list.contains("editor") && list.contains("ops") && !list.contains(&token),
        "{list}"
    );

    let (ok, _, err) = run(&["alert", "list"], None);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let create = [
        "alert",
        "create",
        "--name",
        "coolant",
        "--device",
        "lada",
        "--sensor",
        "engine_temperature",
        "--bucket",
        "5m",
        "--algorithm",
        "cohen",
        "--radius",
        "4",
        "--threshold",
        "3",
        "--direction",
        "up",
    ];
    let (ok, out, err) = run(&create, Some(&token));
    assert!(ok, "{err}");
    assert!(
        out.contains("coolant") && out.contains("lada/engine_temperature"),
        "{out}"
    );
    let id = out.split('\t').next().unwrap().trim().to_owned();
    let (ok, out, _) = run(&["alert", "list"], Some(&token));
    assert!(
        ok && out.contains("coolant") && out.contains("active"),
        "{out}"
    );
    let (ok, out, err) = run(&["alert", "deactivate", &id], Some(&token));
    assert!(ok && out.contains("inactive"), "{out}{err}");
    let (ok, out, _) = run(&["alert", "list"], Some(&token));
    assert!(ok && !out.contains("coolant"), "{out}");
    let (ok, out, _) = run(&["alert", "list", "--all"], Some(&token));
    assert!(ok && out.contains("coolant"), "{out}");
    let (ok, out, err) = run(&["anomaly", "list"], Some(&token));
    assert!(ok && out.is_empty(), "{out}{err}");
    let (ok, _, err) = run(
        &["anomaly", "triage", "7", "--status", "positive"],
        Some(&token),
    );
    assert!(!ok && err.contains("NotFound"), "{err}");
    let (ok, _, err) = run(
        &["anomaly", "triage", "7", "--status", "maybe"],
        Some(&token),
    );
    assert!(!ok && err.contains("unknown triage status"), "{err}");

    // Revoked: refused on the next call.
    let (ok, _, err) = run(&["token", "revoke", "ops"], None);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["alert", "list"], Some(&token));
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    app.stop().await;
}

/// An internal failure (here the blob store: a file where the lake's `parquet/`
/// folder should be) reaches a gRPC caller as INTERNAL with a generic message, as
/// over HTTP: no error text of a store, no path of the server's.
#[tokio::test]
async fn internal_errors_reach_the_caller_without_their_details() {
    let app = backend_app().await;
    let t = tokens(&app);
    let (status, _) = app
        .ingest(dline("lada", "speed", 50.0, "2026-11-01T10:00:00Z") + "\n")
        .await;
    assert_eq!(status, StatusCode::OK);
    let lake = app.dir.path().join("dumps");
    std::fs::write(lake.join("parquet"), b"not a folder").unwrap();

    let jobs = proto::JobsClient::new(config(&app));
    let e = rpc!(jobs.redump(
        proto::RedumpRequest {
            date: "2026-11-01".into(),
        },
        Some(&t.admin),
    ))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert_eq!(e.message(), "internal error; see the server log");
    let dir = app.dir.path().display().to_string();
    assert!(!format!("{e:?}").contains(&dir), "{e:?}");
}

/// `--dry-run-max-results` caps what a dry run returns, whatever the caller asks,
/// and `truncated` says that more steps were found.
#[tokio::test]
async fn dry_runs_are_capped_by_the_server_setting() {
    let app = TestApp::spawn_with(|a| {
        fast_jobs(a);
        a.backend.dry_run_max_results = 2;
    })
    .await;
    let t = tokens(&app);
    let t0 = recent_hour_start() - chrono::Duration::hours(4);
    // A step up every 40 minutes for four hours: six of them.
    let mut body = String::new();
    for s in (0..4 * 3600).step_by(10) {
        let v = if (s / 1200) % 2 == 0 { 80.0 } else { 100.0 };
        let ts =
            (t0 + chrono::Duration::seconds(s)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        body.push_str(&dline("lada", "engine_temperature", v, &ts));
        body.push('\n');
    }
    let (status, _) = app.ingest(body).await;
    assert_eq!(status, StatusCode::OK);
    let detection = proto::DetectionClient::new(config(&app));
    let dry = |max_results| {
        rpc!(detection.dry_run(
            proto::DryRunRequest {
                config: Some(alert_config("what-if", "")),
                from: t0.to_rfc3339(),
                to: (t0 + chrono::Duration::hours(4)).to_rfc3339(),
                max_results,
            },
            Some(&t.editor),
        ))
    };
    for (asked, got) in [(0, 2), (1, 1), (50, 2)] {
        let r = dry(asked).await.unwrap();
        assert_eq!(r.anomalies.len(), got, "asked {asked}: {r:?}");
        assert!(r.truncated, "asked {asked}: six steps were there");
    }
    app.stop().await;
}

/// `--webhook-attempts` running out: a receiver that always refuses gets exactly that
/// many POSTs, each in the delivery log and the failure counter, and then the
/// anomalies are marked done, so nothing more is sent.
#[tokio::test]
async fn a_webhook_that_always_fails_is_tried_webhook_attempts_times_then_given_up() {
    let app = TestApp::spawn_with(|a| {
        fast_jobs(a);
        a.backend.webhook_attempts = 3;
    })
    .await;
    let t = tokens(&app);
    let (hook, received) = webhook_receiver_refusing(usize::MAX).await;
    let alerts = proto::AlertsClient::new(config(&app));
    rpc!(alerts.create_alert(alert_config("dead-hook", &hook), Some(&t.editor)))
        .await
        .unwrap();
    let t0 = recent_hour_start();
    let (status, _) = app.ingest(readings(t0, 0, 90)).await;
    assert_eq!(status, StatusCode::OK);
    let store = app.server().alerts();
    wait_for("the notification to be given up", async || {
        let done = !received.lock().unwrap().is_empty() && store.unnotified().unwrap().is_empty();
        done.then_some(())
    })
    .await;
    assert_eq!(
        received.lock().unwrap().len(),
        3,
        "exactly --webhook-attempts POSTs"
    );
    let log = deliveries(&alerts, &t.viewer).await;
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(log.iter().all(|d| !d.ok && d.status_code == 503), "{log:?}");
    let (_, metrics) = app.get_text("/metrics").await;
    assert!(
        metrics.contains("milepost_webhook_deliveries_failed_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("milepost_webhook_deliveries_ok_total 0"),
        "{metrics}"
    );
    app.stop().await;
}
