use std::io::Write as _;

use reqwest::StatusCode;

use crate::helpers::*;

const SEED: &str = r#"{"sensor": "speed", "value": 55.5, "timestamp": "2012-04-23T18:25:43.511Z"}
{"sensor": "speed", "value": 60.2, "timestamp": "2012-04-23T18:26:43.511Z"}
{"sensor": "speed", "value": 61.9, "timestamp": "2012-04-23T18:27:43.511Z"}
"#;

#[tokio::test]
async fn seed_sample_is_stored_and_replay_is_all_duplicates() {
    let app = TestApp::spawn().await;
    let (status, body) = app.ingest(SEED).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"], 3);
    assert_eq!(body["duplicates"], 0);
    assert_eq!(body["rejected"], 0);
    assert_eq!(body["errors"].as_array().unwrap().len(), 0);

    let (status, body) = app.ingest(SEED).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((num(&body, "accepted"), num(&body, "duplicates")), (0, 3));

    let (_, latest) = app.get("/api/statistics/latest").await;
    assert_eq!(latest["speed"], 61.9);
    // Microseconds survive, and so do times before the Unix epoch.
    let (_, r) = app
        .ingest(
            [
                line("fuel", 1.0, "2012-04-23T18:25:43.511999Z"),
                line("fuel", 2.0, "1969-12-31T23:59:59.999999Z"),
            ]
            .join("\n"),
        )
        .await;
    assert_eq!(num(&r, "accepted"), 2);
    let dir = app.stop().await;
    let rows = stored_rows(dir.path());
    let speed: Vec<(i64, f64)> = rows
        .iter()
        .filter(|r| r.1 == "speed")
        .map(|r| (r.2, r.3))
        .collect();
    assert_eq!(
        speed,
        [
            (1_335_205_543_511_000, 55.5),
            (1_335_205_603_511_000, 60.2),
            (1_335_205_663_511_000, 61.9)
        ]
    );
    let fuel: Vec<i64> = rows.iter().filter(|r| r.1 == "fuel").map(|r| r.2).collect();
    assert_eq!(fuel, [-1, 1_335_205_543_511_999]);
}

#[tokio::test]
async fn first_write_wins_within_and_across_requests() {
    let app = TestApp::spawn().await;
    let ts = "2024-05-01T10:00:00Z";
    let body = [line("fuel", 40.0, ts), line("fuel", 41.0, ts)].join("\n");
    let (_, r) = app.ingest(body).await;
    assert_eq!((num(&r, "accepted"), num(&r, "duplicates")), (1, 1));
    let (_, r) = app.ingest(line("fuel", 99.0, ts)).await;
    assert_eq!((num(&r, "accepted"), num(&r, "duplicates")), (0, 1));
    // An older reading (late upload) mixed with a newer one.
    let body = [
        line("fuel", 30.0, "2024-05-01T09:00:00Z"),
        line("fuel", 98.0, ts),
        line("fuel", 50.0, "2024-05-01T11:00:00Z"),
    ]
    .join("\n");
    let (_, r) = app.ingest(body).await;
    assert_eq!((num(&r, "accepted"), num(&r, "duplicates")), (2, 1));
    let (_, latest) = app.get("/api/statistics/latest").await;
    assert_eq!(latest["fuel"], 50.0);
    let rows = stored_rows(app.stop().await.path());
    let values: Vec<f64> = rows.iter().map(|r| r.3).collect();
    assert_eq!(values, [30.0, 40.0, 50.0]);
}

#[tokio::test]
async fn devices_are_kept_apart_and_bound_keys_police_them() {
    let app = TestApp::spawn().await;
    let ts = "2024-05-01T10:00:00Z";
    let body = [
        line("speed", 10.0, ts),
        dline("car", "speed", 20.0, ts),
        dline("default", "speed", 11.0, ts),
    ]
    .join("\n");
    let (_, r) = app.ingest(body).await;
    assert_eq!((num(&r, "accepted"), num(&r, "duplicates")), (2, 1));

    let body = [line("speed", 30.0, ts), dline("car", "speed", 31.0, ts)].join("\n");
    let (status, r) = app.ingest_as(TRUCK_KEY, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!((num(&r, "accepted"), num(&r, "rejected")), (1, 1));
    assert_eq!(r["errors"][0]["line"], 2);
    assert!(
        r["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("bound to device 'truck'")
    );

    for (device, want) in [("default", 10.0), ("car", 20.0), ("truck", 30.0)] {
        let (_, latest) = app
            .get(&format!("/api/statistics/latest?device={device}"))
            .await;
        assert_eq!(latest["speed"], want, "{device}");
    }
    let (status, _) = app.get("/api/statistics/latest?device=no%20such").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, none) = app.get("/api/statistics/latest?device=ghost").await;
    assert_eq!(none["speed"], 0.0);
}

#[tokio::test]
async fn bad_lines_are_reported_and_good_lines_stored() {
    let app = TestApp::spawn().await;
    let good = |i: u32| line("speed", i as f64, &format!("2024-01-01T00:00:{i:02}Z"));
    let cases: Vec<(String, &str)> = vec![
        (r#"{"sensor":"speed","value":1"#.into(), "malformed JSON"),
        (
            r#"{"sensor":"speed","timestamp":"2024-01-01T00:00:00Z"}"#.into(),
            "missing field `value`",
        ),
        (
            r#"{"value":1,"timestamp":"2024-01-01T00:00:00Z"}"#.into(),
            "missing field `sensor`",
        ),
        (
            line("warp_drive", 1.0, "2024-01-01T00:00:00Z"),
            "unknown sensor",
        ),
        (
            r#"{"sensor":"speed","value":"5","timestamp":"2024-01-01T00:00:00Z"}"#.into(),
            "finite number",
        ),
        (
            r#"{"sensor":"speed","value":null,"timestamp":"2024-01-01T00:00:00Z"}"#.into(),
            "finite number",
        ),
        (
            r#"{"sensor":"speed","value":false,"timestamp":"2024-01-01T00:00:00Z"}"#.into(),
            "finite number",
        ),
        (line("speed", 1.0, "2024-01-01T00:00:00"), "RFC 3339"),
        (line("speed", 1.0, "0001-01-01T00:00:00Z"), "zero time"),
        (line("speed", 1.0, "2999-01-01T00:00:00Z"), "future"),
        (
            line("location_latitude", 91.0, "2024-01-01T00:00:00Z"),
            "valid range",
        ),
    ];
    let mut body = Vec::new();
    for (i, (bad, _)) in cases.iter().enumerate() {
        writeln!(body, "{}", good(i as u32)).unwrap();
        writeln!(body, "{bad}").unwrap();
    }
    // Invalid UTF-8 inside a string, then a truncated last line without newline.
    body.extend_from_slice(
        b"{\"sensor\":\"sp\xc3\x28ed\",\"value\":1,\"timestamp\":\"2024-01-01T00:00:00Z\"}\n",
    );
    body.extend_from_slice(b"{\"sensor\":\"speed\",\"value\":7,\"timesta");
    let (status, r) = app.ingest(body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{r}");
    assert_eq!(num(&r, "accepted"), cases.len() as u64);
    assert_eq!(num(&r, "rejected"), cases.len() as u64 + 2);
    let errors = r["errors"].as_array().unwrap();
    for (i, (_, reason)) in cases.iter().enumerate() {
        let e = &errors[i];
        assert_eq!(e["line"], 2 * i as u64 + 2, "{e}");
        let msg = e["error"].as_str().unwrap();
        assert!(
            msg.contains(reason),
            "line {}: '{msg}' lacks '{reason}'",
            e["line"]
        );
    }
    assert_eq!(errors[cases.len()]["line"], 2 * cases.len() as u64 + 1);
    assert_eq!(errors[cases.len() + 1]["line"], 2 * cases.len() as u64 + 2);
    let rows = stored_rows(app.stop().await.path());
    assert_eq!(rows.len(), cases.len());
}

#[tokio::test]
async fn oversize_lines_are_413_and_the_other_lines_stored() {
    let app = TestApp::spawn_with(|a| a.max_line_bytes = 300).await;
    let long = format!(
        r#"{{"sensor":"speed","value":1,"timestamp":"2024-01-01T00:00:00Z","x":"{}"}}"#,
        "y".repeat(400)
    );
    let body = [
        line("speed", 1.0, "2024-01-01T00:00:01Z"),
        long,
        line("speed", 2.0, "2024-01-01T00:00:02Z"),
    ]
    .join("\n");
    let (status, r) = app.ingest(body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{r}");
    assert_eq!((num(&r, "accepted"), num(&r, "rejected")), (2, 1));
    assert_eq!(r["errors"][0]["line"], 2);
    assert!(
        r["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("longer than the limit of 300 bytes")
    );
    assert_eq!(stored_rows(app.stop().await.path()).len(), 2);
}

#[tokio::test]
async fn empty_and_blank_bodies_are_fine() {
    let app = TestApp::spawn().await;
    for body in ["", "\n\n  \n"] {
        let (status, r) = app.ingest(body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!((num(&r, "accepted"), num(&r, "rejected")), (0, 0));
    }
}

#[tokio::test]
async fn gzip_bodies_and_broken_gzip() {
    let app = TestApp::spawn().await;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(SEED.as_bytes()).unwrap();
    let gz = enc.finish().unwrap();
    let send = |body: Vec<u8>| {
        app.client
            .post(app.url("/ingest"))
            .bearer_auth(KEY)
            .header("content-type", "application/x-ndjson")
            .header("content-encoding", "gzip")
            .body(body)
            .send()
    };
    let (status, r) = json(send(gz).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(num(&r, "accepted"), 3);
    let (status, r) = json(send(SEED.as_bytes().to_vec()).await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{r}");
    assert!(r["error"].as_str().unwrap().contains("gzip"), "{r}");
    assert_eq!(num(&r, "accepted"), 0);
}

#[tokio::test]
async fn wrong_content_type_or_encoding_is_415() {
    let app = TestApp::spawn().await;
    for (ct, ce) in [
        ("text/csv", None),
        ("application/x-www-form-urlencoded", None),
        ("application/json", Some("br")),
    ] {
        let mut req = app
            .client
            .post(app.url("/ingest"))
            .basic_auth(KEY, None::<&str>)
            .header("content-type", ct)
            .body(SEED);
        if let Some(ce) = ce {
            req = req.header("content-encoding", ce);
        }
        let (status, r) = json(req.send().await.unwrap()).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
        assert!(
            r["error"].as_str().unwrap().contains("not supported"),
            "{r}"
        );
    }
    for ct in [
        "application/json",
        "application/x-ndjson; charset=utf-8",
        "application/stream+json",
    ] {
        let req = app
            .client
            .post(app.url("/ingest"))
            .bearer_auth(KEY)
            .header("content-type", ct)
            .body(SEED);
        let (status, _) = json(req.send().await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{ct}");
    }
}

#[tokio::test]
async fn auth_failures_use_the_seed_messages() {
    let app = TestApp::spawn().await;
    let post = || {
        app.client
            .post(app.url("/ingest"))
            .header("content-type", "application/stream+json")
            .body(SEED)
    };
    let (status, r) = json(post().send().await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(r, serde_json::json!({"error": "no credentials provided"}));
    let (status, r) = json(
        post()
            .basic_auth("wrong", None::<&str>)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(r, serde_json::json!({"error": "invalid api key"}));
    let (status, r) = json(post().bearer_auth("wrong").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(r["error"], "invalid api key");
    // Nothing was stored by the refused requests.
    let (_, s) = app.get("/api/status").await;
    assert_eq!(s["lastIngestTimestamp"], serde_json::Value::Null);
}

#[tokio::test]
async fn oversize_body_is_413_and_keeps_what_came_before() {
    let app = TestApp::spawn_with(|a| a.max_body_bytes = 4096).await;
    let body: String = (0..200)
        .map(|i| {
            line(
                "revolution",
                800.0,
                &format!("2024-01-01T00:{:02}:{:02}Z", i / 60, i % 60),
            ) + "\n"
        })
        .collect();
    assert!(body.len() > 4096);
    // Streamed (chunked, no Content-Length) so the limit is hit while reading.
    let stream = futures_util::stream::iter(
        body.as_bytes()
            .chunks(1000)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let (status, r) = app.ingest(reqwest::Body::wrap_stream(stream)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{r}");
    assert!(r["error"].as_str().unwrap().contains("limit"));
    let early = num(&r, "accepted");
    assert!(
        early > 0 && early < 200,
        "lines before the limit are kept: {r}"
    );
    // With Content-Length the request is refused before reading.
    let (status, r) = app.ingest(body.clone()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(num(&r, "accepted"), 0);
    let rows = stored_rows(app.stop().await.path());
    assert_eq!(rows.len() as u64, early);
}

#[tokio::test]
async fn concurrent_clients_get_exact_counts() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    let clients = 8;
    let per_client = 2_000;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0;
            // Every client sends its own readings plus an overlapping shared set.
            for chunk in 0..4 {
                let body: String = (0..per_client / 4)
                    .map(|i| {
                        let n = chunk * (per_client / 4) + i;
                        let own = dline(&format!("dev{c}"), "speed", n as f64, &ts(n));
                        let shared = dline("shared", "fuel", n as f64, &ts(n));
                        format!("{own}\n{shared}\n")
                    })
                    .collect();
                let (status, r) = app.ingest(body).await;
                assert_eq!(status, StatusCode::OK, "{r}");
                accepted += num(&r, "accepted");
            }
            accepted
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, (clients * per_client + per_client) as u64);
    let app = std::sync::Arc::into_inner(app).unwrap();
    let rows = stored_rows(app.stop().await.path());
    assert_eq!(rows.len(), clients * per_client + per_client);
}

/// A history re-sent in small requests, as a reconnecting device or a re-import does:
/// some lines are new (between stored ones), some are written in forms only the full
/// JSON parser takes (escapes, other timestamp notation) for readings already stored.
/// Every reading ends up stored once and the counts add up.
#[tokio::test]
async fn a_history_replayed_in_pieces_is_stored_once() {
    let app = TestApp::spawn().await;
    let (devices, per_series) = (["car-a", "car-b", "car-c"], 3_000);
    let sensors = ["speed", "fuel"];
    let mut first = String::new();
    for d in devices {
        for n in 0..per_series {
            for s in sensors {
                first.push_str(&dline(d, s, n as f64, &ts(n)));
                first.push('\n');
            }
        }
    }
    let (status, r) = app.ingest(first).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let stored = (devices.len() * sensors.len() * per_series) as u64;
    assert_eq!(num(&r, "accepted"), stored);

    let (mut accepted, mut duplicates, mut new) = (0, 0, 0);
    for piece in (0..per_series).step_by(150) {
        for d in devices {
            let mut body = String::new();
            for n in piece..piece + 150 {
                let line = match n % 50 {
                    // A new reading half a second after a stored one.
                    7 => {
                        new += 1;
                        let t = chrono::DateTime::parse_from_rfc3339(&ts(n)).unwrap()
                            + chrono::Duration::milliseconds(500);
                        dline(d, "speed", -1.0, &t.to_rfc3339())
                    }
                    // A stored reading, escaped and with an offset instead of `Z`.
                    11 => {
                        let t = chrono::DateTime::parse_from_rfc3339(&ts(n))
                            .unwrap()
                            .with_timezone(&chrono::FixedOffset::east_opt(3600).unwrap());
                        format!(
                            r#"{{ "device" : "{d}", "timestamp":"{}", "value": 1e0, "sensor":"sp\u0065ed" }}"#,
                            t.to_rfc3339()
                        )
                    }
                    _ => dline(d, "speed", -2.0, &ts(n)),
                };
                body.push_str(&line);
                body.push('\n');
            }
            let (status, r) = app.ingest(body).await;
            assert_eq!(status, StatusCode::OK, "{r}");
            accepted += num(&r, "accepted");
            duplicates += num(&r, "duplicates");
        }
    }
    let replayed = (devices.len() * per_series) as u64;
    assert_eq!((accepted, duplicates), (new, replayed - new));
    // The new readings once more: stored after the replay had read the stored keys
    // of their time range, they must still be found.
    let again: String = devices
        .iter()
        .flat_map(|d| (7..per_series).step_by(50).map(move |n| (d, n)))
        .map(|(d, n)| {
            let t = chrono::DateTime::parse_from_rfc3339(&ts(n)).unwrap()
                + chrono::Duration::milliseconds(500);
            dline(d, "speed", -3.0, &t.to_rfc3339()) + "\n"
        })
        .collect();
    let (status, r) = app.ingest(again).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!((num(&r, "accepted"), num(&r, "duplicates")), (0, new));
    let rows = stored_rows(app.stop().await.path());
    assert_eq!(rows.len() as u64, stored + new);
    // First write wins: no replayed value replaced a stored one.
    assert!(
        rows.iter().all(|r| r.3 >= 0.0 || r.3 == -1.0),
        "a stored value was replaced"
    );
    let mut keys: Vec<_> = rows.iter().map(|r| (&r.0, &r.1, r.2)).collect();
    keys.dedup();
    assert_eq!(keys.len(), rows.len(), "a reading is stored twice");
}

fn ts(n: usize) -> String {
    let t = chrono::DateTime::from_timestamp(1_700_000_000 + n as i64, 0).unwrap();
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A writer that cannot keep up answers 503 with `Retry-After: 1` and the reason,
/// never queueing without bound; the refused requests store nothing and can be sent
/// again. (A queue of one and no wait make a saturated writer out of a few clients.)
#[tokio::test(flavor = "multi_thread")]
async fn a_saturated_writer_answers_503_with_retry_after_1() {
    let app = TestApp::spawn_with(|a| {
        a.queue_capacity = 1;
        a.queue_timeout = std::time::Duration::from_millis(1);
    })
    .await;
    let body = |round: usize, client: usize| -> String {
        (0..20_000)
            .map(|i| {
                let t = chrono::DateTime::from_timestamp(
                    1_700_000_000 + (round * 16 + client) as i64 * 100_000 + i,
                    0,
                )
                .unwrap();
                line("speed", i as f64, &t.to_rfc3339()) + "\n"
            })
            .collect()
    };
    let mut busy = None;
    for round in 0..20 {
        let answers = futures_util::future::join_all((0..16).map(|c| {
            let client = app.client.clone();
            let url = app.url("/ingest");
            let body = body(round, c);
            async move {
                let r = client
                    .post(url)
                    .basic_auth(KEY, None::<&str>)
                    .header("content-type", "application/x-ndjson")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                let retry = r.headers().get("retry-after").cloned();
                (r.status(), retry, r.text().await.unwrap(), body)
            }
        }))
        .await;
        if let Some(a) = answers
            .into_iter()
            .find(|a| a.0 == StatusCode::SERVICE_UNAVAILABLE)
        {
            busy = Some(a);
            break;
        }
    }
    let (_, retry, text, body) = busy.expect("16 clients at once saturate a queue of one");
    assert_eq!(retry.as_ref().and_then(|v| v.to_str().ok()), Some("1"));
    assert!(text.contains("busy"), "{text}");
    // Sent again once the writer has room: every reading of it is new.
    let (status, r) = app.ingest(body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["accepted"], 20_000);
}
