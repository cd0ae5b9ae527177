//! Slow, abusive and careless clients, over raw sockets: each is cut off or answered,
//! and never costs anyone else their service.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::helpers::*;

/// Reads one HTTP/1.1 response with a Content-Length body; `None` if the connection
/// was closed or reset first.
fn read_response(s: &mut TcpStream) -> Option<(u16, String)> {
    read_response_with_head(s).map(|(status, _, body)| (status, body))
}

/// The value of header `name` in a response head.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// [`read_response`] with the response head (status line and fields).
fn read_response_with_head(s: &mut TcpStream) -> Option<(u16, String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let status = head.split_whitespace().nth(1)?.parse().ok()?;
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            return Some((status, head, body));
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn post(auth: Option<&str>, body_len: usize) -> Vec<u8> {
    let auth = auth
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    format!(
        "POST /ingest HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/x-ndjson\r\nContent-Length: {body_len}\r\n\r\n"
    )
    .into_bytes()
}

/// True once the server has closed `s` (read returns 0 or fails), waiting up to `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // e.g. a 408 before the close
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// A device with a wrong or missing key sends a large body on a keep-alive
/// connection: it must see its 401 (not "connection reset" or "broken pipe" because
/// the server closed with the body unread), and the connection stays usable.
#[tokio::test(flavor = "multi_thread")]
async fn an_early_401_on_a_large_body_is_received_and_the_connection_stays_usable() {
    let app = TestApp::spawn().await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        let line = line("speed", 1.0, "2026-05-01T00:00:00Z") + "\n";
        let body = line.repeat(5_000_000 / line.len());
        let mut s = TcpStream::connect(&addr).unwrap();
        for (round, auth) in [None, Some("wrong-key"), Some(KEY), None, Some(KEY)]
            .into_iter()
            .enumerate()
        {
            let mut req = post(auth, body.len());
            req.extend_from_slice(body.as_bytes());
            s.write_all(&req)
                .unwrap_or_else(|e| panic!("round {round}: sending failed: {e}"));
            let (status, text) = read_response(&mut s)
                .unwrap_or_else(|| panic!("round {round}: connection closed without an answer"));
            let expected = if auth == Some(KEY) { 200 } else { 401 };
            assert_eq!(status, expected, "round {round}: {text}");
        }
    })
    .await
    .unwrap();
}

/// Slowloris: 20 connections trickling a header byte every 200 ms are cut off once
/// the header timeout passes, and a normal client is served meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn clients_trickling_their_header_are_cut_off() {
    let app = TestApp::spawn_with(|a| a.http.header_read_timeout = Duration::from_secs(1)).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let slow = tokio::task::spawn_blocking(move || {
        let mut conns: Vec<TcpStream> = (0..20)
            .map(|_| TcpStream::connect(&addr).unwrap())
            .collect();
        let header =
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let started = Instant::now();
        let mut cut = vec![None; conns.len()];
        for &b in header.iter() {
            for (i, c) in conns.iter_mut().enumerate() {
                if cut[i].is_none() && c.write_all(&[b]).is_err() {
                    cut[i] = Some(started.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(200));
            if started.elapsed() > Duration::from_secs(4) {
                break;
            }
        }
        for (i, c) in conns.iter_mut().enumerate() {
            if cut[i].is_none() && closed_within(c, Duration::from_millis(100)) {
                cut[i] = Some(started.elapsed());
            }
        }
        cut
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let cut = slow.await.unwrap();
    for (i, c) in cut.iter().enumerate() {
        let c = c.unwrap_or_else(|| panic!("slow connection {i} was never cut off"));
        assert!(
            c < Duration::from_secs(4),
            "connection {i} cut only after {c:?}"
        );
    }
}

/// One address may hold `--max-connections-per-client` connections; another one gets
/// 503 with `Retry-After` and is closed, and a slot freed is usable again.
#[tokio::test(flavor = "multi_thread")]
async fn connections_per_client_are_capped() {
    let app = TestApp::spawn_with(|a| a.http.max_connections_per_client = 4).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        let get = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
        let mut held: Vec<TcpStream> = (0..4)
            .map(|_| {
                let mut s = TcpStream::connect(&addr).unwrap();
                s.write_all(get).unwrap();
                assert_eq!(read_response(&mut s).unwrap().0, 200);
                s
            })
            .collect();
        let mut fifth = TcpStream::connect(&addr).unwrap();
        fifth.write_all(get).ok();
        let (status, head, body) =
            read_response_with_head(&mut fifth).expect("an answer, not a reset");
        assert_eq!(
            status, 503,
            "a fifth connection from the same address: {body}"
        );
        assert_eq!(header(&head, "retry-after").as_deref(), Some("1"), "{head}");
        assert!(closed_within(&mut fifth, Duration::from_secs(5)));
        drop(held.pop());
        // The freed slot is given back when the server notices the close.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(get).ok();
            if let Some((200, _)) = read_response(&mut s) {
                break;
            }
            assert!(Instant::now() < deadline, "freed slot never usable");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The held ones still work.
        for s in &mut held {
            s.write_all(get).unwrap();
            assert_eq!(read_response(s).unwrap().0, 200);
        }
    })
    .await
    .unwrap();
}

/// A body that stops arriving is answered 408 after `--body-read-timeout`; the whole
/// lines received before the pause are stored, the cut one is not.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_body_gets_408_and_keeps_the_lines_before_the_pause() {
    let app = TestApp::spawn_with(|a| a.http.body_read_timeout = Duration::from_millis(500)).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let (status, text) = tokio::task::spawn_blocking(move || {
        let sent = format!(
            "{}\n{}\n{{\"sensor\":\"speed\",\"val",
            line("speed", 1.0, "2026-05-01T00:00:00Z"),
            line("speed", 2.0, "2026-05-01T00:00:01Z")
        );
        let mut s = TcpStream::connect(&addr).unwrap();
        let mut req = post(Some(KEY), 10_000);
        req.extend_from_slice(sent.as_bytes());
        s.write_all(&req).unwrap();
        let started = Instant::now();
        let r = read_response(&mut s).expect("an answer");
        assert!(started.elapsed() < Duration::from_secs(5));
        r
    })
    .await
    .unwrap();
    assert_eq!(status, 408, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["accepted"], 2, "{v}");
    assert!(v["error"].as_str().unwrap().contains("stalled"), "{v}");
    let (_, page) = app
        .get("/api/v1/sensors/speed/readings?from=2026-05-01T00:00:00Z&to=2026-05-02T00:00:00Z")
        .await;
    assert_eq!(page["readings"].as_array().unwrap().len(), 2, "{page}");
}

/// One address may have `--max-ingest-per-client` ingest requests in flight; one more
/// is answered 429 with `Retry-After` (its body read, so the connection stays usable),
/// other addresses are not affected, and a finished request frees its slot.
#[tokio::test(flavor = "multi_thread")]
async fn ingest_requests_in_flight_per_client_are_capped() {
    let app = TestApp::spawn_with(|a| {
        a.http.max_ingest_per_client = 2;
        a.listen = "0.0.0.0:0".parse().unwrap();
    })
    .await;
    let port = app.base.rsplit(':').next().unwrap().to_owned();
    let addr = format!("127.0.0.1:{port}");
    // Another address: a socket bound to 127.0.0.2 (loopback too) before connecting.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let other = other.connect(addr.parse().unwrap()).await.unwrap();
    let mut other = other.into_std().unwrap();
    other.set_nonblocking(false).unwrap();
    tokio::task::spawn_blocking(move || {
        let first = line("speed", 1.0, "2026-05-01T00:00:00Z") + "\n";
        // Two uploads in flight: headers and a first line sent, the rest to come.
        let mut slow: Vec<TcpStream> = (0..2)
            .map(|_| {
                let mut s = TcpStream::connect(&addr).unwrap();
                let mut req = post(Some(KEY), first.len() * 2);
                req.extend_from_slice(first.as_bytes());
                s.write_all(&req).unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let body = line("speed", 2.0, "2026-05-01T00:00:01Z") + "\n";
        let send_with_head = |s: &mut TcpStream| {
            let mut req = post(Some(KEY), body.len());
            req.extend_from_slice(body.as_bytes());
            s.write_all(&req).unwrap();
            read_response_with_head(s).expect("an answer, not a reset")
        };
        let send = |s: &mut TcpStream| {
            let (status, _, body) = send_with_head(s);
            (status, body)
        };
        let mut third = TcpStream::connect(&addr).unwrap();
        let (status, head, text) = send_with_head(&mut third);
        assert_eq!(status, 429, "{text}");
        assert_eq!(header(&head, "retry-after").as_deref(), Some("1"), "{head}");
        assert!(text.contains("in flight"), "{text}");
        // Another address is not limited by it.
        assert_eq!(send(&mut other).0, 200);
        // The uploads finish; their slots come back; the refused connection works.
        for s in &mut slow {
            s.write_all(first.as_bytes()).unwrap();
            assert_eq!(read_response(s).unwrap().0, 200);
        }
        assert_eq!(send(&mut third).0, 200);
    })
    .await
    .unwrap();
    let (_, page) = app
        .get("/api/v1/sensors/speed/readings?from=2026-05-01T00:00:00Z&to=2026-05-02T00:00:00Z")
        .await;
    assert_eq!(page["readings"].as_array().unwrap().len(), 2, "{page}");
}

/// A header larger than `--max-header-bytes` is refused with 431, and the server
/// keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_header_is_refused() {
    let app = TestApp::spawn_with(|a| a.http.max_header_bytes = 16 * 1024).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let status = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        let big = "a".repeat(100 * 1024);
        // The server may answer and close before it read everything: ignore write errors.
        s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n").as_bytes())
            .ok();
        read_response(&mut s).map(|r| r.0)
    })
    .await
    .unwrap();
    assert_eq!(status, Some(431));
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, reqwest::StatusCode::OK);
}

/// A gzip bomb: 10 MB on the wire that inflates to 10 GB (100 copies of a gzip member
/// of 100 MB of zeros, which a decoder must read as one body). The real server reads
/// it as a stream, refuses it with 413 once the decompressed body passes
/// `--max-body-bytes`, and its memory stays bounded.
#[tokio::test(flavor = "multi_thread")]
async fn a_gzip_bomb_is_refused_with_413_in_bounded_memory() {
    use std::io::Write as _;
    let member = {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..100 {
            enc.write_all(&zeros).unwrap();
        }
        enc.finish().unwrap()
    };
    let bomb = member.repeat(100);
    assert!(bomb.len() < 12_000_000, "{}", bomb.len());

    let dir = tempfile::tempdir().unwrap();
    let mut server = milepost::bench::process::ServerProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_milepost")),
        dir.path(),
        &[
            "--api-key",
            KEY,
            "--max-body-bytes",
            "256MiB",
            "--dump-schedule",
            "off",
        ],
        false,
    )
    .unwrap();
    let resp = reqwest::Client::new()
        .post(format!("{}/ingest", server.base))
        .bearer_auth(KEY)
        .header("Content-Type", "application/x-ndjson")
        .header("Content-Encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::PAYLOAD_TOO_LARGE);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("exceeds"),
        "{body}"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    println!("gzip bomb: server peak RSS {} MiB", peak_kib / 1024);
    assert!(
        peak_kib < 200 * 1024,
        "peak RSS {} MiB while refusing a gzip bomb",
        peak_kib / 1024
    );
    // Still serving.
    let ok = reqwest::get(format!("{}/readyz", server.base))
        .await
        .unwrap();
    assert!(ok.status().is_success());
    server.child.kill().ok();
    server.child.wait().ok();
}

/// A connection to `addr` from the loopback address `from` (127.0.0.0/8 is all this
/// machine's), as a blocking stream.
async fn connect_from(from: &str, addr: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

/// `--max-connections` caps connections in total, whatever address they come from:
/// three clients on three addresses fill it, a fourth on a fourth address gets 503
/// with `Retry-After: 1` and is closed; when one leaves, a new one is served.
#[tokio::test(flavor = "multi_thread")]
async fn connections_in_total_are_capped() {
    let app = TestApp::spawn_with(|a| a.http.max_connections = 3).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let get = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut held = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        held.push(connect_from(from, &addr).await);
    }
    let fourth = connect_from("127.0.0.5", &addr).await;
    tokio::task::spawn_blocking(move || {
        for s in &mut held {
            s.write_all(get).unwrap();
            assert_eq!(read_response(s).unwrap().0, 200);
        }
        let mut fourth = fourth;
        fourth.write_all(get).ok();
        let (status, head, body) =
            read_response_with_head(&mut fourth).expect("an answer, not a reset");
        assert_eq!(status, 503, "a fourth connection in total: {body}");
        assert_eq!(header(&head, "retry-after").as_deref(), Some("1"), "{head}");
        assert!(closed_within(&mut fourth, Duration::from_secs(5)));
        drop(held.pop());
    })
    .await
    .unwrap();
    // The freed slot is given back when the server notices the close.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = connect_from("127.0.0.6", &addr).await;
        let status = tokio::task::spawn_blocking(move || {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                .ok();
            read_response(&mut s).map(|r| r.0)
        })
        .await
        .unwrap();
        if status == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
