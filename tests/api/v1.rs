//! `/api/v1`: statistics against expectations computed here from the generated data,
//! keyset pagination under concurrent ingest, exports parsed by real parsers, the
//! GeoJSON track, validation, CORS and revalidation.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, TimeZone, Timelike};
use chrono_tz::Tz;
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{KEY, TestApp, dline, json, line, micros, num};

/// Deterministic readings: (µs since epoch, value). About every 37 s, with
/// microsecond jitter, over `days` days from `start`.
fn series(start: &str, days: i64, seed: u64) -> Vec<(i64, f64)> {
    let start = DateTime::parse_from_rfc3339(start)
        .unwrap()
        .timestamp_micros();
    let end = start + days * 86_400_000_000;
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    let mut out = Vec::new();
    let mut t = start;
    while t < end {
        // Two decimals so the NDJSON text round-trips exactly.
        out.push((t, (next() % 20_000) as f64 / 100.0));
        t += 37_000_000 + (next() % 1_000_000) as i64;
    }
    out
}

fn rfc3339(micros: i64) -> String {
    DateTime::from_timestamp_micros(micros)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn body_of(sensor: &str, rows: &[(i64, f64)]) -> String {
    rows.iter()
        .map(|(t, v)| line(sensor, *v, &rfc3339(*t)) + "\n")
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Agg {
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    first: f64,
    last: f64,
}

/// Groups `rows` (in time order) within `[from, to)` by `key`.
fn expected(
    rows: &[(i64, f64)],
    from: i64,
    to: i64,
    key: impl Fn(i64) -> i64,
) -> BTreeMap<i64, Agg> {
    let mut out: BTreeMap<i64, Agg> = BTreeMap::new();
    for &(t, v) in rows.iter().filter(|(t, _)| (from..to).contains(t)) {
        out.entry(key(t))
            .and_modify(|a| {
                a.count += 1;
                a.min = a.min.min(v);
                a.max = a.max.max(v);
                a.sum += v;
                a.last = v;
            })
            .or_insert(Agg {
                count: 1,
                min: v,
                max: v,
                sum: v,
                first: v,
                last: v,
            });
    }
    out
}

fn f(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no {field} in {v}"))
}

async fn statistics(app: &TestApp, query: &str) -> Value {
    let (status, body) = app
        .get(&format!("/api/v1/sensors/speed/statistics?{query}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{query}: {body}");
    body
}

fn assert_matches(body: &Value, want: &BTreeMap<i64, Agg>, what: &str) {
    let got: Vec<&Value> = body["buckets"].as_array().unwrap().iter().collect();
    assert_eq!(got.len(), want.len(), "{what}: bucket count");
    for (b, (start, a)) in got.iter().zip(want) {
        assert_eq!(micros(b["start"].as_str().unwrap()), *start, "{what}: {b}");
        assert_eq!(num(b, "count"), a.count, "{what}: {b}");
        assert_eq!(f(b, "min"), a.min, "{what}: {b}");
        assert_eq!(f(b, "max"), a.max, "{what}: {b}");
        assert_eq!(f(b, "first"), a.first, "{what}: {b}");
        assert_eq!(f(b, "last"), a.last, "{what}: {b}");
        let avg = a.sum / a.count as f64;
        assert!(
            (f(b, "avg") - avg).abs() < 1e-9 * avg.abs().max(1.0),
            "{what}: {b}"
        );
    }
}

/// Start of the local calendar day of `t` in `tz`, µs.
fn local_day(t: i64, tz: Tz) -> i64 {
    let local = DateTime::from_timestamp_micros(t)
        .unwrap()
        .with_timezone(&tz);
    let midnight = local.date_naive().and_hms_opt(0, 0, 0).unwrap();
    tz.from_local_datetime(&midnight)
        .earliest()
        .unwrap()
        .timestamp_micros()
}

/// Start of the local clock hour of `t` in `tz`, µs.
fn local_hour(t: i64, tz: Tz) -> i64 {
    let local = DateTime::from_timestamp_micros(t)
        .unwrap()
        .with_timezone(&tz);
    let hour = local.date_naive().and_hms_opt(local.hour(), 0, 0).unwrap();
    tz.from_local_datetime(&hour)
        .earliest()
        .unwrap()
        .timestamp_micros()
}

#[tokio::test]
async fn statistics_match_aggregates_computed_from_the_data() {
    let app = TestApp::spawn().await;
    // Four days around the spring daylight-saving change in Europe (29 March 2026).
    let rows = series("2026-03-27T00:00:00Z", 4, 1);
    let (status, _) = app.ingest(body_of("speed", &rows)).await;
    assert_eq!(status, StatusCode::OK);

    // 1h and 15m in UTC, over a range with unaligned ends.
    let (from, to) = ("2026-03-27T05:20:00Z", "2026-03-29T17:05:00.5Z");
    for (bucket, w) in [("1h", 3_600_000_000i64), ("15m", 900_000_000)] {
        let body = check(&app, &rows, (from, to), &format!("bucket={bucket}"), |t| {
            t - t.rem_euclid(w)
        })
        .await;
        assert_eq!(body["tz"], "UTC");
    }

    // Calendar days in Berlin: the 29th has 23 hours.
    let berlin: Tz = "Europe/Berlin".parse().unwrap();
    let range = ("2026-03-26T23:00:00Z", "2026-03-30T22:00:00Z");
    let body = check(&app, &rows, range, "bucket=1d&tz=Europe/Berlin", |t| {
        local_day(t, berlin)
    })
    .await;
    let b = &body["buckets"][2];
    assert_eq!(b["start"], "2026-03-28T23:00:00Z");
    assert_eq!(b["end"], "2026-03-29T22:00:00Z");

    // Hours in a zone half an hour off UTC.
    let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
    let range = ("2026-03-28T00:00:00Z", "2026-03-29T00:00:00Z");
    let body = check(&app, &rows, range, "bucket=1h&tz=Asia/Kolkata", |t| {
        local_hour(t, kolkata)
    })
    .await;
    assert_eq!(body["buckets"][1]["start"], "2026-03-28T00:30:00Z");
}

/// Readings up to now and on into the next hours: the writer holds the rollups of
/// live (and future) quarter hours in memory and statistics read those from the
/// readings; every bucket must still be exact, before and after a restart.
#[tokio::test]
async fn statistics_cover_live_and_future_readings() {
    let mut app = TestApp::spawn().await;
    let start = chrono::Utc::now().timestamp_micros() - 2 * 3_600_000_000;
    // One day from two hours ago: within the default 24 h future skew.
    let rows = series(&rfc3339(start), 1, 7);
    let (status, _) = app.ingest(body_of("speed", &rows)).await;
    assert_eq!(status, StatusCode::OK);
    let from = rfc3339(start - 3_600_000_000);
    let to = rfc3339(start + 25 * 3_600_000_000);
    for round in ["running", "restarted"] {
        for (bucket, w) in [("1h", 3_600_000_000i64), ("15m", 900_000_000)] {
            let params = format!("bucket={bucket}");
            check(&app, &rows, (&from, &to), &params, |t| t - t.rem_euclid(w)).await;
        }
        if round == "running" {
            app = app.restart().await;
        }
    }
}

/// Asks for statistics over `range` with `params` and compares every bucket with the
/// aggregates of `rows` grouped by `key` (a reading's bucket start).
async fn check(
    app: &TestApp,
    rows: &[(i64, f64)],
    (from, to): (&str, &str),
    params: &str,
    key: impl Fn(i64) -> i64,
) -> Value {
    let body = statistics(app, &format!("from={from}&to={to}&{params}")).await;
    let want = expected(rows, micros(from), micros(to), key);
    assert!(want.len() > 3, "the range holds data in several buckets");
    assert_matches(&body, &want, params);
    body
}

#[tokio::test]
async fn empty_buckets_are_filled_as_asked() {
    let app = TestApp::spawn().await;
    let lines = [
        line("speed", 10.0, "2026-05-01T00:10:00Z"),
        line("speed", 20.0, "2026-05-01T00:50:00Z"),
        line("speed", 40.0, "2026-05-01T03:30:00Z"),
    ];
    app.ingest(lines.join("\n")).await;
    let q = "from=2026-05-01T00:00:00Z&to=2026-05-01T04:00:00Z&bucket=1h";
    let buckets = |b: &Value| b["buckets"].as_array().unwrap().clone();

    let none = buckets(&statistics(&app, q).await);
    assert_eq!(none.len(), 2);
    assert_eq!(none[0]["avg"], 15.0);
    assert_eq!(none[0]["first"], 10.0);
    assert_eq!(none[0]["last"], 20.0);

    let null = buckets(&statistics(&app, &format!("{q}&fill=null")).await);
    assert_eq!(null.len(), 4);
    assert_eq!(null[1]["count"], 0);
    assert!(null[1]["avg"].is_null() && null[2]["min"].is_null());
    assert_eq!(null[2]["start"], "2026-05-01T02:00:00Z");

    let zero = buckets(&statistics(&app, &format!("{q}&fill=zero")).await);
    assert_eq!(
        (zero[1]["count"].clone(), zero[1]["max"].clone()),
        (0.into(), 0.0.into())
    );

    let prev = buckets(&statistics(&app, &format!("{q}&fill=previous")).await);
    for b in &prev[1..3] {
        assert_eq!(b["count"], 0);
        assert_eq!(b["avg"], 20.0, "{b}");
        assert_eq!(b["first"], 20.0, "{b}");
    }
    assert_eq!(prev[3]["avg"], 40.0);
}

#[tokio::test]
async fn devices_and_sensors_list_their_readings() {
    let app = TestApp::spawn().await;
    let body = [
        dline("truck", "speed", 50.0, "2026-05-01T10:00:00Z"),
        dline("truck", "speed", 60.0, "2026-05-01T11:00:00.25Z"),
        dline("truck", "fuel", 70.0, "2026-05-01T09:00:00Z"),
        line("speed", 5.0, "2026-04-01T00:00:00Z"),
    ]
    .join("\n");
    app.ingest(body).await;

    let (status, devices) = app.get("/api/v1/devices").await;
    assert_eq!(status, StatusCode::OK);
    let devices = devices["devices"].as_array().unwrap();
    let truck = devices.iter().find(|d| d["device"] == "truck").unwrap();
    assert_eq!(truck["readings"], 3);
    assert_eq!(truck["first"], "2026-05-01T09:00:00Z");
    assert_eq!(truck["last"], "2026-05-01T11:00:00.250Z");
    let default = devices.iter().find(|d| d["device"] == "default").unwrap();
    assert_eq!(default["readings"], 1);

    let (_, list) = app.get("/api/v1/sensors?device=truck").await;
    assert_eq!(list["device"], "truck");
    let sensors = list["sensors"].as_array().unwrap();
    assert_eq!(sensors.len(), 6, "every catalogued sensor: {list}");
    let speed = sensors.iter().find(|s| s["name"] == "speed").unwrap();
    assert_eq!(speed["unit"], "km/h");
    assert_eq!(speed["readings"], 2);
    assert_eq!(speed["last_value"], 60.0);
    assert_eq!(speed["first"], "2026-05-01T10:00:00Z");
    let lat = sensors
        .iter()
        .find(|s| s["name"] == "location_latitude")
        .unwrap();
    assert_eq!(
        (lat["min"].clone(), lat["max"].clone()),
        ((-90.0).into(), 90.0.into())
    );
    assert_eq!(lat["readings"], 0);
    assert!(lat["last"].is_null() && lat["last_value"].is_null());

    let (_, nobody) = app.get("/api/v1/sensors?device=ghost").await;
    assert!(
        nobody["sensors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["readings"] == 0)
    );
}

/// Timestamps of every page of `query`, following `next_cursor`.
async fn all_pages(app: &TestApp, query: &str) -> (Vec<i64>, usize) {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut url = format!("/api/v1/sensors/speed/readings?{query}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = app.get(&url).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages += 1;
        for r in page["readings"].as_array().unwrap() {
            out.push(micros(r["timestamp"].as_str().unwrap()));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return (out, pages),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_return_every_reading_once_while_ingest_continues() {
    let app = TestApp::spawn().await;
    let rows = series("2026-02-01T00:00:00Z", 2, 7);
    app.ingest(body_of("speed", &rows)).await;
    let before: Vec<i64> = rows.iter().map(|r| r.0).collect();

    // Meanwhile: newer readings of the same sensor, and late ones of another.
    let client = app.client.clone();
    let url = app.url("/ingest");
    let writer = tokio::spawn(async move {
        for round in 0..20i64 {
            let t0 = micros("2026-02-03T00:00:00Z") + round * 100_000_000;
            let body: String = (0..100)
                .flat_map(|i| {
                    let t = rfc3339(t0 + i * 1_000_000);
                    [line("speed", 1.0, &t), line("fuel", 2.0, &t)]
                })
                .collect::<Vec<_>>()
                .join("\n");
            let resp = client
                .post(&url)
                .basic_auth(KEY, None::<&str>)
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
    });
    let (seen, pages) = all_pages(&app, "limit=333").await;
    writer.await.unwrap();

    assert!(pages > 10, "{pages} pages");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing: no repeats"
    );
    let seen_set: HashSet<i64> = seen.iter().copied().collect();
    assert!(
        before.iter().all(|t| seen_set.contains(t)),
        "every reading stored before paging began"
    );

    // Once ingest is done, a fresh walk returns exactly what is stored, and the
    // page boundaries do not matter.
    let (all, _) = all_pages(&app, "limit=1000").await;
    assert_eq!(all.len(), before.len() + 2000);
    let (window, _) = all_pages(
        &app,
        "limit=7&from=2026-02-01T12:00:00Z&to=2026-02-01T13:00:00Z",
    )
    .await;
    let want: Vec<i64> = before
        .iter()
        .copied()
        .filter(|t| (micros("2026-02-01T12:00:00Z")..micros("2026-02-01T13:00:00Z")).contains(t))
        .collect();
    assert_eq!(window, want);
}

#[tokio::test]
async fn ndjson_and_csv_exports_parse_and_round_trip() {
    let app = TestApp::spawn().await;
    let mut rows = series("2026-06-01T00:00:00Z", 3, 3);
    rows.push((micros("2026-06-04T00:00:00.123456Z"), -0.5));
    app.ingest(body_of("speed", &rows)).await;
    // Another sensor and device must not leak into the export.
    app.ingest(dline("truck", "speed", 1.0, "2026-06-02T00:00:00Z"))
        .await;

    let resp = app
        .client
        .get(app.url("/api/v1/sensors/speed/readings"))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    assert!(resp.headers().get("x-next-cursor").is_none());
    let text = resp.text().await.unwrap();
    let parsed: Vec<(i64, f64)> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["sensor"], "speed");
            assert!(v.get("device").is_none(), "{v}");
            (micros(v["timestamp"].as_str().unwrap()), f(&v, "value"))
        })
        .collect();
    assert_eq!(parsed, rows);

    let csv_text = app
        .get_text("/api/v1/sensors/speed/readings?format=csv")
        .await
        .1;
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    assert_eq!(reader.headers().unwrap(), vec!["timestamp", "value"]);
    let from_csv: Vec<(i64, f64)> = reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            (micros(&r[0]), r[1].parse().unwrap())
        })
        .collect();
    assert_eq!(from_csv, rows);

    // An NDJSON export is an ingest body: importing it elsewhere stores the same.
    let other = TestApp::spawn().await;
    let (status, summary) = other.ingest(text).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(num(&summary, "accepted"), rows.len() as u64);

    // A page in CSV carries its continuation in a header.
    let resp = app
        .client
        .get(app.url("/api/v1/sensors/speed/readings?limit=10"))
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    let cursor = resp.headers()["x-next-cursor"].to_str().unwrap().to_owned();
    assert_eq!(resp.text().await.unwrap().lines().count(), 11);
    let (_, next) = app
        .get(&format!(
            "/api/v1/sensors/speed/readings?limit=1&cursor={cursor}"
        ))
        .await;
    assert_eq!(
        micros(next["readings"][0]["timestamp"].as_str().unwrap()),
        rows[10].0
    );
}

#[tokio::test]
async fn the_track_is_valid_geojson_within_max_points() {
    let app = TestApp::spawn().await;
    // 3000 positions once a second along a curve, longitude 200 ms after latitude,
    // plus latitudes without a partner.
    let t0 = micros("2026-07-01T08:00:00Z");
    let mut lines = Vec::new();
    let mut pairs = Vec::new();
    for i in 0..3000i64 {
        let (lat, lon) = (
            48.0 + i as f64 * 1e-4,
            11.0 + ((i as f64) / 300.0).sin() * 0.01,
        );
        let t = t0 + i * 1_000_000;
        lines.push(line("location_latitude", lat, &rfc3339(t)));
        lines.push(line("location_longitude", lon, &rfc3339(t + 200_000)));
        pairs.push((t, lon, lat));
    }
    lines.push(line("location_latitude", 1.0, &rfc3339(t0 + 5_000_000_000)));
    app.ingest(lines.join("\n")).await;

    let range = "from=2026-07-01T00:00:00Z&to=2026-07-02T00:00:00Z";
    let resp = app
        .client
        .get(app.url(&format!("/api/v1/location/track?{range}&max_points=100")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/geo+json");
    let (status, geo) = json(resp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(geo["type"], "FeatureCollection");
    let feature = &geo["features"][0];
    assert_eq!(feature["type"], "Feature");
    assert_eq!(feature["geometry"]["type"], "LineString");
    let coords = feature["geometry"]["coordinates"].as_array().unwrap();
    let times = feature["properties"]["timestamps"].as_array().unwrap();
    assert!(
        coords.len() <= 100 && coords.len() >= 50,
        "{}",
        coords.len()
    );
    assert_eq!(coords.len(), times.len());
    assert_eq!(feature["properties"]["source_points"], 3000);
    for c in coords {
        let (lon, lat) = (c[0].as_f64().unwrap(), c[1].as_f64().unwrap());
        assert!((-180.0..=180.0).contains(&lon) && (-90.0..=90.0).contains(&lat));
        // (serde_json's default float parsing may be one ulp off.)
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(
            pairs.iter().any(|p| close(p.1, lon) && close(p.2, lat)),
            "{c} is a real pair"
        );
    }
    let ts: Vec<i64> = times.iter().map(|t| micros(t.as_str().unwrap())).collect();
    assert!(ts.windows(2).all(|w| w[0] < w[1]));
    assert_eq!((ts[0], *ts.last().unwrap()), (pairs[0].0, pairs[2999].0));

    // Enough room: every pair, in order.
    let (_, all) = app
        .get(&format!("/api/v1/location/track?{range}&max_points=5000"))
        .await;
    assert_eq!(
        all["features"][0]["geometry"]["coordinates"]
            .as_array()
            .unwrap()
            .len(),
        3000
    );
    // Nothing in range: an empty collection.
    let (_, none) = app
        .get("/api/v1/location/track?from=2020-01-01T00:00:00Z&to=2020-01-02T00:00:00Z")
        .await;
    assert_eq!(
        none,
        serde_json::json!({"type": "FeatureCollection", "features": []})
    );
}

#[tokio::test]
async fn every_bad_parameter_is_a_clear_4xx() {
    let app = TestApp::spawn().await;
    app.ingest(line("speed", 1.0, "2026-05-01T00:00:00Z")).await;
    let s = "/api/v1/sensors/speed";
    for (path, status, says) in [
        (
            format!("{s}/statistics?bucket=7m"),
            400,
            "unknown bucket '7m'",
        ),
        (
            format!("{s}/statistics?from=2026-05-02T00:00:00Z&to=2026-05-01T00:00:00Z"),
            400,
            "must be before",
        ),
        (
            format!("{s}/statistics?from=yesterday"),
            400,
            "from: timestamp must be RFC 3339",
        ),
        (
            format!("{s}/statistics?tz=Mars/Base"),
            400,
            "unknown time zone",
        ),
        (format!("{s}/statistics?fill=maybe"), 400, "fill"),
        (
            format!("{s}/statistics?from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z&bucket=1m"),
            400,
            "more than the limit of 10000",
        ),
        (format!("{s}/readings?cursor=abc"), 400, "invalid cursor"),
        (
            format!("{s}/readings?limit=0"),
            400,
            "limit must be between 1 and 100000",
        ),
        (
            format!("{s}/readings?limit=100001"),
            400,
            "limit must be between",
        ),
        (format!("{s}/readings?limit=-1"), 400, "limit"),
        (
            format!("{s}/readings?format=xml"),
            400,
            "unknown format 'xml'",
        ),
        (format!("{s}/readings?device=a%20b"), 400, "invalid device"),
        (
            "/api/v1/sensors/warp/readings".into(),
            404,
            "unknown sensor 'warp'",
        ),
        (
            "/api/v1/sensors/warp/statistics".into(),
            404,
            "unknown sensor 'warp'",
        ),
        (
            "/api/v1/location/track?max_points=1".into(),
            400,
            "max_points must be between 2",
        ),
        (
            "/api/v1/location/track?tolerance_ms=999999".into(),
            400,
            "tolerance_ms",
        ),
    ] {
        let (got, body) = app.get(&path).await;
        assert_eq!(got.as_u16(), status, "{path}: {body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{path}: {msg}");
    }
    // Odd but valid requests answer 200, never a 5xx.
    for path in [
        format!(
            "{s}/statistics?from=2011-12-28T00:00:00Z&to=2012-01-02T00:00:00Z&bucket=1d&tz=Pacific/Apia"
        ),
        format!(
            "{s}/statistics?from=9999-12-30T00:00:00Z&to=9999-12-31T23:59:59Z&bucket=1d&tz=Pacific/Kiritimati"
        ),
        format!("{s}/statistics?from=0001-01-01T00:00:00Z&to=0001-01-02T00:00:00Z&bucket=1m"),
        format!(
            "{s}/readings?from=0001-01-01T00:00:00Z&to=9999-12-31T23:59:59.999999Z&limit=100000"
        ),
        "/api/v1/location/track?from=0001-01-01T00:00:00Z&to=9999-12-31T23:59:59Z".to_owned(),
    ] {
        let (got, body) = app.get(&path).await;
        assert_eq!(got, StatusCode::OK, "{path}: {body}");
    }
    // A cursor of another sensor is refused, not misread.
    let (_, page) = app.get("/api/v1/sensors/speed/readings?limit=1").await;
    assert!(
        page["next_cursor"].is_null(),
        "one reading, one page: {page}"
    );
    let resp = app
        .client
        .get(app.url(&format!("{s}/readings")))
        .header("accept", "image/png")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_ACCEPTABLE);
}

#[tokio::test]
async fn statistics_revalidate_with_etags() {
    let app = TestApp::spawn().await;
    app.ingest(line("speed", 1.0, "2026-05-01T00:10:00Z")).await;
    let url = app
        .url("/api/v1/sensors/speed/statistics?from=2026-05-01T00:00:00Z&to=2026-05-02T00:00:00Z");
    let first = app.client.get(&url).send().await.unwrap();
    assert_eq!(first.headers()["cache-control"], "no-cache");
    let etag = first.headers()["etag"].clone();
    let again = app
        .client
        .get(&url)
        .header("if-none-match", etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    // A late upload into the range changes the answer and its tag.
    app.ingest(line("speed", 3.0, "2026-05-01T00:20:00Z")).await;
    let changed = app
        .client
        .get(&url)
        .header("if-none-match", etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
    assert_ne!(changed.headers()["etag"], etag);
}

#[tokio::test]
async fn cors_only_for_configured_origins() {
    let app = TestApp::spawn_with(|a| a.cors_origins = vec!["https://charts.example".into()]).await;
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/ingest"))
        .header("origin", "https://charts.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "https://charts.example");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert!(
        h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization")
    );

    let get = |origin: &'static str| {
        app.client
            .get(app.url("/api/v1/devices"))
            .header("origin", origin)
            .send()
    };
    let allowed = get("https://charts.example").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://charts.example"
    );
    assert!(
        allowed.headers()["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("etag")
    );
    let other = get("https://evil.example").await.unwrap();
    assert_eq!(
        other.status(),
        StatusCode::OK,
        "same-origin style requests still work"
    );
    assert!(other.headers().get("access-control-allow-origin").is_none());

    let plain = TestApp::spawn().await;
    let resp = plain
        .client
        .get(plain.url("/api/v1/devices"))
        .header("origin", "https://charts.example")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn cors_origin_star_allows_any_origin() {
    let app = TestApp::spawn_with(|a| a.cors_origins = vec!["*".into()]).await;
    for origin in ["https://a.example", "http://127.0.0.1:3000"] {
        let resp = app
            .client
            .get(app.url("/api/statistics/latest"))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let allowed = resp.headers()["access-control-allow-origin"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(allowed == "*" || allowed == origin, "{origin}: {allowed}");
    }
    // Without --cors-origin there are no CORS headers at all.
    let plain = TestApp::spawn().await;
    let resp = plain
        .client
        .get(plain.url("/api/statistics/latest"))
        .header("origin", "https://a.example")
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}
