//! The PostgreSQL listener (`--pg-addr`) against real clients: psql (Debian's
//! `postgresql-client`), psycopg 3 and asyncpg (`tests/clients/pg_drivers.py`) and
//! pgJDBC with a schema browser's metadata calls (`tests/clients/PgJdbc.java`),
//! in clear text on loopback and over TLS; their answers equal the HTTP API's;
//! the hostile statements of `/api/v1/sql` refused over the wire with nothing
//! changed; psql's Ctrl-C stops a query; off loopback TLS is required.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::*;
use crate::sql::{history, hostile_statements, viewer};

/// A server with the PostgreSQL listener on a free loopback port.
async fn spawn(configure: impl FnOnce(&mut milepost::config::ServeArgs)) -> (TestApp, SocketAddr) {
    let app = TestApp::spawn_with(|a| {
        a.pg_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        configure(a);
    })
    .await;
    let addr = app
        .server()
        .pg_addr()
        .expect("the PostgreSQL listener runs");
    (app, addr)
}

/// psql with `args`, the token as password; `tls`: `disable`, `require`, ….
async fn psql(addr: SocketAddr, token: &str, tls: &str, args: &[&str]) -> Output {
    let psql = crate::tools::ensure_psql();
    tokio::process::Command::new(psql)
        .arg(format!(
            "postgresql://analyst@127.0.0.1:{}/milepost?sslmode={tls}&connect_timeout=10",
            addr.port()
        ))
        .args([
            "--no-psqlrc",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            "VERBOSITY=verbose",
        ])
        .args(args)
        .env("PGPASSWORD", token)
        .env_remove("PGSSLMODE")
        .output()
        .await
        .expect("psql runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The rows psql prints unaligned (`-A -t`), split at `|`.
async fn rows(addr: SocketAddr, token: &str, sql: &str) -> Vec<Vec<String>> {
    let out = psql(addr, token, "disable", &["-A", "-t", "-c", sql]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{sql}: {stderr}");
    stdout
        .lines()
        .map(|l| l.split('|').map(str::to_owned).collect())
        .collect()
}

#[tokio::test]
async fn psql_answers_lists_and_describes_the_contract() {
    let (app, addr) = spawn(|_| {}).await;
    let recent = (chrono::Utc::now() - chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let body = history() + &dline("car-c", "fuel", 31.5, &recent) + "\n";
    assert_eq!(app.ingest(body).await.0, StatusCode::OK);
    let token = viewer(&app);

    // The issue's example, as typed: `now()` is a TIMESTAMP (UTC) like `ts`.
    let got = rows(
        addr,
        &token,
        "SELECT sensor, avg(value) FROM readings WHERE ts > now() - INTERVAL 1 DAY GROUP BY ALL",
    )
    .await;
    assert_eq!(got, [["fuel", "31.5"]]);
    // Columns without an alias are named as PostgreSQL names them.
    let out = psql(
        addr,
        &token,
        "disable",
        &[
            "-A",
            "-c",
            "SELECT sensor, avg(value), count(*), value * 2, ts::DATE FROM readings \
             GROUP BY ALL LIMIT 1",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert_eq!(
        stdout.lines().next(),
        Some("sensor|avg|count|?column?|ts"),
        "{stderr}"
    );

    // `\dt`: the six relations of the contract and nothing internal.
    let out = psql(addr, &token, "disable", &["-A", "-t", "-c", "\\dt"]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let names: Vec<&str> = stdout
        .lines()
        .map(|l| l.split('|').nth(1).unwrap_or_default())
        .collect();
    assert_eq!(
        names,
        [
            "anomalies",
            "devices",
            "dumps",
            "readings",
            "rollups_15m",
            "sensors"
        ],
        "{stdout}"
    );
    // `\d readings`: its columns and types.
    let out = psql(addr, &token, "disable", &["-A", "-t", "-c", "\\d readings"]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let columns: Vec<(&str, &str)> = stdout
        .lines()
        .filter_map(|l| {
            let mut f = l.split('|');
            Some((f.next()?, f.next()?))
        })
        .collect();
    assert_eq!(
        columns,
        [
            ("device", "character varying"),
            ("sensor", "character varying"),
            ("ts", "timestamp without time zone"),
            ("value", "double precision")
        ],
        "{stdout}"
    );
    // `\d+` (storage and options columns), and `\df` lists no stand-in function.
    let out = psql(addr, &token, "disable", &["-A", "-t", "-c", "\\d+ sensors"]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("name|character varying|"), "{stdout}");
    let out = psql(addr, &token, "disable", &["-A", "-t", "-c", "\\df"]).await;
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success() && stdout.trim().is_empty(),
        "{stdout}{stderr}"
    );
    // `\l` names one database, `\dn` one schema.
    let out = psql(addr, &token, "disable", &["-A", "-t", "-c", "\\l"]).await;
    assert!(text(&out).0.starts_with("milepost|"), "{:?}", text(&out));

    // Session statements drivers send are answered; settings stay as they are.
    let got = rows(addr, &token, "SHOW server_version").await;
    assert!(got[0][0].starts_with("16."), "{got:?}");
    let out = psql(
        addr,
        &token,
        "disable",
        &[
            "-c",
            "BEGIN",
            "-c",
            "SET application_name = 'x'",
            "-c",
            "COMMIT",
        ],
    )
    .await;
    assert!(out.status.success(), "{:?}", text(&out));

    // A session's `statement_timeout` stops its queries long before --sql-timeout
    // (30 s here); `SHOW` gives it back.
    let started = Instant::now();
    let out = psql(
        addr,
        &token,
        "disable",
        &[
            "-v",
            "ON_ERROR_STOP=0",
            "-c",
            "SET statement_timeout = '300ms'",
            "-c",
            "SHOW statement_timeout",
            "-c",
            "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert!(
        stdout.contains("300ms") && stderr.contains("57014"),
        "{stdout}{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // Errors name their SQLSTATE; a wrong token is refused.
    let out = psql(addr, &token, "disable", &["-c", "SELECT * FROM series"]).await;
    let (_, stderr) = text(&out);
    assert!(
        !out.status.success() && stderr.contains("42501"),
        "{stderr}"
    );
    let out = psql(addr, "mpt_not-a-token", "disable", &["-c", "SELECT 1"]).await;
    let (_, stderr) = text(&out);
    assert!(
        !out.status.success() && stderr.contains("authentication failed"),
        "{stderr}"
    );
    let out = psql(addr, KEY, "disable", &["-c", "SELECT 1"]).await;
    assert!(!out.status.success(), "an ingest key is no token");
}

/// What `pg_drivers.py` printed, by check and device.
fn answers(stdout: &str, check: &str, device: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["check"] == check && v["device"] == device)
        .unwrap_or_else(|| panic!("no {check} for {device}: {stdout}"))["rows"]
        .as_array()
        .unwrap()
        .clone()
}

/// The client programs the tests run against the listener.
#[derive(Clone, Copy, PartialEq)]
enum Drivers {
    /// psycopg 3 and asyncpg, and Grafana's queries (`tests/clients/pg_drivers.py`).
    Python,
    /// pgJDBC, as the JVM's BI tools use it (`tests/clients/PgJdbc.java`).
    Jdbc,
}

/// `drivers`, with TLS or without; their answers against the API's.
async fn drivers_agree_with_the_api(drivers: Drivers, tls: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::reload::certificate();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    let (app, addr) = spawn(|a| {
        if tls {
            a.http.tls_cert = Some(cert_file.clone());
            a.http.tls_key = Some(key_file.clone());
        }
    })
    .await;
    if tls {
        // The public listener now speaks HTTPS; ingest through it with the CA.
        let ca = reqwest::Certificate::from_pem(cert.as_bytes()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .unwrap();
        let url = app.url("/ingest").replace("http://", "https://");
        let r = client
            .post(url)
            .basic_auth(KEY, None::<&str>)
            .header("content-type", "application/x-ndjson")
            .body(history())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    } else {
        assert_eq!(app.ingest(history()).await.0, StatusCode::OK);
    }
    let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    let mut cmd = match drivers {
        Drivers::Python => {
            let mut cmd =
                tokio::process::Command::new(crate::tools::PG_DRIVERS.bin().join("python3"));
            cmd.arg(clients.join("pg_drivers.py"))
                .arg("127.0.0.1")
                .arg(addr.port().to_string())
                .arg([viewer(&app), viewer(&app), viewer(&app)].join(","));
            cmd
        }
        Drivers::Jdbc => {
            let jar = crate::tools::ensure_pgjdbc();
            // Java 11+ runs a single source file; UTC so that the driver's
            // timestamps are the server's.
            let mut cmd = tokio::process::Command::new("java");
            cmd.arg("-Duser.timezone=UTC")
                .arg("-cp")
                .arg(jar)
                .arg(clients.join("PgJdbc.java"))
                .arg("127.0.0.1")
                .arg(addr.port().to_string())
                .arg(viewer(&app));
            cmd
        }
    };
    if tls {
        cmd.arg(&cert_file);
    }
    let out = cmd.output().await.expect("the client runs");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.lines().any(|l| l.contains("\"done\"")), "{stdout}");

    if tls {
        return;
    }
    for device in ["car-a", "car-b"] {
        // Hourly averages (psycopg and Grafana's panel) = the statistics endpoint.
        let (_, stats) = app
            .get(&format!(
                "/api/v1/sensors/speed/statistics?device={device}&from=2026-03-01T10:00:00Z&to=2026-03-01T13:00:00Z&bucket=1h"
            ))
            .await;
        let buckets = stats["buckets"].as_array().unwrap();
        let hourly = answers(&stdout, "hourly", device);
        assert_eq!(hourly.len(), buckets.len(), "{stats}");
        for (h, b) in hourly.iter().zip(buckets) {
            assert_eq!(h[0], b["start"], "{h} {b}");
            assert_eq!(h[1], b["count"], "{h} {b}");
            assert!((h[2].as_f64().unwrap() - b["avg"].as_f64().unwrap()).abs() < 1e-9);
        }
        if drivers == Drivers::Python {
            let grafana = answers(&stdout, "grafana", device);
            assert_eq!(grafana.len(), buckets.len(), "{stats}");
            for (g, b) in grafana.iter().zip(buckets) {
                assert_eq!(
                    g[0].as_i64().unwrap(),
                    micros(b["start"].as_str().unwrap()) / 1_000_000
                );
                assert!((g[1].as_f64().unwrap() - b["avg"].as_f64().unwrap()).abs() < 1e-9);
            }
        }
        // Raw rows = the NDJSON export.
        let (_, export) = app
            .get_text(&format!(
                "/api/v1/sensors/speed/readings?device={device}&format=ndjson"
            ))
            .await;
        let exported: Vec<(i64, f64)> = export
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    micros(v["timestamp"].as_str().unwrap()),
                    v["value"].as_f64().unwrap(),
                )
            })
            .collect();
        let raw: Vec<(i64, f64)> = answers(&stdout, "raw", device)
            .iter()
            .map(|r| (micros(r[0].as_str().unwrap()), r[1].as_f64().unwrap()))
            .collect();
        assert_eq!(raw, exported);
    }
    // Counted by outcome.
    let m = crate::metrics::scrape(&app).await;
    let count =
        |o: &str| crate::metrics::get(&m, &format!("milepost_pg_queries_total{{outcome=\"{o}\"}}"));
    assert!(count("ok") > 10.0);
    assert!(count("refused") >= 3.0);
    assert!(count("cancelled") >= 1.0);
    if drivers == Drivers::Python {
        assert!(count("cancelled") >= 3.0);
        assert!(count("busy") >= 1.0);
    }
}

#[tokio::test]
async fn psycopg_asyncpg_and_grafanas_queries_agree_with_the_api() {
    drivers_agree_with_the_api(Drivers::Python, false).await;
}

#[tokio::test]
async fn drivers_verify_the_certificate_over_tls() {
    drivers_agree_with_the_api(Drivers::Python, true).await;
}

#[tokio::test]
async fn jdbc_browses_the_schema_and_agrees_with_the_api() {
    drivers_agree_with_the_api(Drivers::Jdbc, false).await;
}

#[tokio::test]
async fn jdbc_verifies_the_certificate_over_tls() {
    drivers_agree_with_the_api(Drivers::Jdbc, true).await;
}

#[tokio::test]
async fn hostile_sql_over_the_wire_is_refused_and_changes_nothing() {
    let (app, addr) = spawn(|a| a.sql_timeout = Duration::from_secs(2)).await;
    assert_eq!(app.ingest(history()).await.0, StatusCode::OK);
    let token = viewer(&app);
    let count = "SELECT count(*) FROM readings";
    let before = rows(addr, &token, count).await;
    let out = tempfile::tempdir().unwrap();
    // `BEGIN TRANSACTION` is a session statement on the wire: answered, no effect.
    let hostile: Vec<String> = hostile_statements(out.path())
        .into_iter()
        .filter(|q| q != "BEGIN TRANSACTION")
        .collect();
    assert!(hostile.len() >= 40);
    for q in &hostile {
        let got = psql(addr, &token, "disable", &["-c", q]).await;
        let (_, stderr) = text(&got);
        assert!(!got.status.success(), "{q}: ran");
        assert!(stderr.contains("ERROR:  "), "{q}: {stderr}");
        let state = stderr.split("ERROR:  ").nth(1).unwrap_or_default();
        assert!(
            [
                "42501", "42601", "0A000", "42704", "42P01", "42883", "42000"
            ]
            .iter()
            .any(|s| state.starts_with(s)),
            "{q}: {stderr}"
        );
    }
    // Bombs are stopped at the time limit with 57014, and the server answers on.
    for bomb in [
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t",
        "SELECT sum(a.value * b.value * c.value * d.value * e.value * f.value)
         FROM readings a, readings b, readings c, readings d, readings e, readings f",
    ] {
        let started = Instant::now();
        let got = psql(addr, &token, "disable", &["-c", bomb]).await;
        let (_, stderr) = text(&got);
        assert!(stderr.contains("57014"), "{bomb}: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(10), "{bomb}");
    }
    // Two bombs took 4 s of the token's 2-s budget (--sql-time-share 0.25): its
    // next query is told when to come back; another token's answers.
    let got = psql(addr, &token, "disable", &["-c", count]).await;
    let (_, stderr) = text(&got);
    assert!(
        stderr.contains("53300") && stderr.contains("share of the server's time"),
        "{stderr}"
    );
    assert_eq!(rows(addr, &viewer(&app), count).await, before);
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    let (status, _) = app
        .ingest(line("speed", 1.0, "2026-03-01T09:00:00Z") + "\n")
        .await;
    assert_eq!(status, StatusCode::OK);
}

/// Many tokens cannot add their shares of time up (`--sql-total-share`): once
/// all tokens' queries together spent the server's, a token within its own share
/// is told when to come back, 503 + Retry-After over HTTP and 53300 on the wire,
/// while a token that ran nothing lately still gets its answer.
#[tokio::test]
async fn tokens_together_are_held_to_the_servers_share() {
    let (app, addr) = spawn(|a| {
        a.sql_timeout = Duration::from_secs(1);
        a.sql_time_share = 0.5;
        a.sql_total_share = 0.25;
    })
    .await;
    let (a, b) = (viewer(&app), viewer(&app));
    let bomb =
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t";
    let post = |token: &str, sql: &str| {
        app.client
            .post(app.url("/api/v1/sql"))
            .bearer_auth(token)
            .body(sql.to_owned())
            .send()
    };
    // a and b each spend their own second (b's budget was full, so the server's
    // spent one did not hold it back): the server's is about -0.75 s.
    for token in [&a, &b] {
        let r = post(token, bomb).await.unwrap();
        assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // a's own budget fills again at 0.5 s a second; the server's at 0.25 does not.
    let r = post(&a, "SELECT 1").await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry = retry_after(&r);
    assert!((2..=4).contains(&retry), "{retry}");
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("users' queries used up their share of the server's time"),
        "{body}"
    );
    let got = psql(addr, &b, "disable", &["-c", "SELECT 1"]).await;
    let (_, stderr) = text(&got);
    assert!(
        !got.status.success()
            && stderr.contains("53300")
            && stderr.contains("users' queries used up their share"),
        "{stderr}"
    );
    // Someone's first question in a while answers, over HTTP and the wire.
    let r = post(&viewer(&app), "SELECT 1 AS one").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(rows(addr, &viewer(&app), "SELECT 2").await, [["2"]]);
}

/// psql's Ctrl-C sends a cancel request: the query stops inside DuckDB long before
/// its time limit, and the two query slots are free again.
#[tokio::test]
async fn ctrl_c_in_psql_stops_the_query() {
    let (app, addr) = spawn(|a| a.sql_timeout = Duration::from_secs(60)).await;
    let token = viewer(&app);
    let bomb =
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t";
    let psql_bin = crate::tools::ensure_psql();
    let mut running = Vec::new();
    // Two clients (a query at a time each): both slots taken.
    for token in [&token, &viewer(&app)] {
        let child = tokio::process::Command::new(&psql_bin)
            .arg(format!(
                "postgresql://analyst@127.0.0.1:{}/milepost?sslmode=disable",
                addr.port()
            ))
            .args(["--no-psqlrc", "-X", "-v", "VERBOSITY=verbose", "-c", bomb])
            .env("PGPASSWORD", token)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        running.push(child);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    for child in &running {
        let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    }
    for child in running {
        let out = child.wait_with_output().await.unwrap();
        let (_, stderr) = text(&out);
        assert!(
            stderr.contains("57014") && stderr.contains("cancel"),
            "{stderr}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // Both slots free: two queries at once answer at once.
    let second = viewer(&app);
    let (a, b) = tokio::join!(
        rows(addr, &token, "SELECT 1"),
        rows(addr, &second, "SELECT 2")
    );
    assert_eq!(
        (a, b),
        (vec![vec!["1".to_owned()]], vec![vec!["2".to_owned()]])
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// Off loopback the token would cross the network in clear text: the listener
/// needs TLS (or `--pg-insecure`), and then refuses clients that do not start it.
#[tokio::test]
async fn off_loopback_the_listener_requires_tls() {
    let plain = tempfile::tempdir().unwrap();
    let mut args = milepost::config::ServeArgs::for_tests(plain.path().to_owned());
    args.pg_addr = Some(SocketAddr::from(([0, 0, 0, 0], 0)));
    let refused = milepost::app::Server::start(args).await;
    let message = format!("{:#}", refused.err().expect("refused without TLS"));
    assert!(message.contains("--pg-insecure"), "{message}");

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::reload::certificate();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let app = TestApp::spawn_with(|a| {
        a.pg_addr = Some(SocketAddr::from(([0, 0, 0, 0], 0)));
        a.http.tls_cert = Some(cert_file.clone());
        a.http.tls_key = Some(key_file.clone());
    })
    .await;
    let addr = app.server().pg_addr().unwrap();
    let token = viewer(&app);
    let out = psql(addr, &token, "disable", &["-c", "SELECT 1"]).await;
    let (_, stderr) = text(&out);
    assert!(
        !out.status.success() && stderr.contains("requires TLS"),
        "{stderr}"
    );
    let out = psql(
        addr,
        &token,
        "require",
        &["-A", "-t", "-c", "SELECT 40 + 2"],
    )
    .await;
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(text(&out).0.trim(), "42");

    // `--pg-insecure`: served in clear text off loopback, as asked.
    let app = TestApp::spawn_with(|a| {
        a.pg_addr = Some(SocketAddr::from(([0, 0, 0, 0], 0)));
        a.pg_insecure = true;
    })
    .await;
    let addr = app.server().pg_addr().unwrap();
    let token = viewer(&app);
    assert_eq!(rows(addr, &token, "SELECT 1").await, [["1"]]);
}

/// `--pg-max-connections`: a connection over the cap is closed at once; the
/// gauge counts the open ones, and a freed place serves the next client.
#[tokio::test]
async fn connections_over_the_cap_are_closed() {
    let (app, addr) = spawn(|a| a.pg_max_connections = 1).await;
    let token = viewer(&app);
    let held = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = crate::metrics::scrape(&app).await;
    assert_eq!(crate::metrics::get(&m, "milepost_pg_connections"), 1.0);
    let out = psql(addr, &token, "disable", &["-c", "SELECT 1"]).await;
    assert!(
        !out.status.success(),
        "served beyond the cap: {:?}",
        text(&out)
    );
    drop(held);
    let started = Instant::now();
    loop {
        let out = psql(addr, &token, "disable", &["-A", "-t", "-c", "SELECT 1"]).await;
        if out.status.success() {
            assert_eq!(text(&out).0.trim(), "1");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            text(&out)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // `\dn`: one schema.
    let out = psql(addr, &token, "disable", &["-A", "-t", "-c", "\\dn"]).await;
    assert_eq!(text(&out).0.trim(), "main|milepost", "{:?}", text(&out));
}

/// Idle sockets that never authenticate: one address holds at most
/// `MAX_UNAUTHENTICATED_PER_IP` of them (the next is closed at once), clients from
/// elsewhere are served meanwhile, and each is closed at `STARTUP_DEADLINE`.
#[tokio::test]
async fn idle_sockets_cannot_lock_the_listener() {
    use milepost::pg::{MAX_UNAUTHENTICATED_PER_IP, STARTUP_DEADLINE};
    use tokio::io::AsyncReadExt;

    let (app, addr) = spawn(|_| {}).await;
    let token = viewer(&app);
    // Every 127/8 address is this host: 127.0.0.2 stands for another machine.
    let from_elsewhere = || async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        socket.connect(addr).await.unwrap()
    };
    /// Whether the server closed `stream` within `wait` (EOF or reset).
    async fn closed(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(wait, stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }
    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..MAX_UNAUTHENTICATED_PER_IP {
        idle.push(from_elsewhere().await);
    }
    let mut one_more = from_elsewhere().await;
    assert!(closed(&mut one_more, Duration::from_secs(5)).await);
    for stream in &mut idle {
        assert!(!closed(stream, Duration::from_millis(50)).await);
    }
    // Others are served meanwhile, and an authenticated connection does not count.
    let out = psql(addr, &token, "disable", &["-A", "-t", "-c", "SELECT 1"]).await;
    assert_eq!(text(&out).0.trim(), "1", "{:?}", text(&out));
    // At the deadline the idle ones are closed, and the address may connect again.
    for stream in &mut idle {
        let left = (STARTUP_DEADLINE + Duration::from_secs(3)).saturating_sub(opened.elapsed());
        assert!(closed(stream, left).await, "still open after the deadline");
    }
    assert!(opened.elapsed() >= STARTUP_DEADLINE - Duration::from_millis(500));
    let mut again = from_elsewhere().await;
    assert!(!closed(&mut again, Duration::from_millis(300)).await);
}

/// A cursor its client stops reading (asyncpg's, a portal fetched in pieces) is
/// stopped at the time limit with 57014, and a limit reached after rows went out
/// ends them with its error (54000), never a short result.
#[tokio::test]
async fn an_idle_cursor_is_stopped_and_a_late_limit_is_an_error() {
    let (app, addr) = spawn(|a| a.sql_timeout = Duration::from_secs(1)).await;
    assert_eq!(app.ingest(history()).await.0, StatusCode::OK);
    let script = r#"
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="analyst",
                                 password=sys.argv[2], database="milepost", ssl=False)
    async with conn.transaction():
        cursor = await conn.cursor("SELECT a.value FROM readings a, readings b, readings c")
        print("first", len(await cursor.fetch(10)), flush=True)
        await asyncio.sleep(2.5)
        try:
            rows = await cursor.fetch(200000)
            print("rest", len(rows))
        except asyncpg.PostgresError as e:
            print("error", e.sqlstate, e)
asyncio.run(main())
"#;
    let python = crate::tools::PG_DRIVERS.bin().join("python3");
    let out = tokio::process::Command::new(python)
        .args(["-c", script, &addr.port().to_string(), &viewer(&app)])
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(stdout.contains("first 10"), "{stdout}{stderr}");
    assert!(
        stdout.contains("error 57014") && stdout.contains("took none of the result"),
        "{stdout}{stderr}"
    );
    // 52⁴ rows: over the 1,000,000-row cap after rows were sent. On a server whose
    // time limit cannot come first: at 1 s, a slow machine (CI) sent fewer than a
    // million rows in time and got 57014 instead.
    drop(app);
    let (app, addr) = spawn(|a| a.sql_timeout = Duration::from_secs(60)).await;
    assert_eq!(app.ingest(history()).await.0, StatusCode::OK);
    let out = psql(
        addr,
        &viewer(&app),
        "disable",
        &[
            "-A",
            "-t",
            "-o",
            "/dev/null",
            "-c",
            "SELECT a.value FROM readings a, readings b, readings c, readings d",
        ],
    )
    .await;
    let (_, stderr) = text(&out);
    assert!(
        !out.status.success() && stderr.contains("54000") && stderr.contains("1000000 rows"),
        "{stderr}"
    );
}
