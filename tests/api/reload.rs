//! SIGHUP on the real binary: API keys and the TLS certificate rotate without a
//! restart; keys never reach the log. HTTPS is spoken by a real rustls client
//! against certificates the test generates (rcgen).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use crate::helpers::{Proc, line, listening_addr, send_signal, serve_command, wait_for_log};

/// A self-signed certificate for 127.0.0.1: (certificate PEM, key PEM).
pub(crate) fn certificate() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A TLS connection that trusts only `ca_pem` and offers the ALPN `protocols`.
async fn tls_connect(
    addr: &str,
    ca_pem: &str,
    protocols: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut config = config;
    config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// One HTTPS request over a fresh connection that trusts only `ca_pem`.
async fn https(addr: &str, ca_pem: &str, request: String) -> std::io::Result<(u16, String)> {
    let mut tls = tls_connect(addr, ca_pem, &[]).await?;
    tls.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.ok();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_owned();
    Ok((status, body))
}

fn ingest_request(key: &str, second: u32) -> String {
    let body = line("speed", 1.0, &format!("2026-05-01T00:00:{second:02}Z")) + "\n";
    format!(
        "POST /ingest HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/x-ndjson\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rotates_keys_and_certificate_and_keys_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (old_key, new_key) = ("rotate-old-7f3a9c2e", "rotate-new-b81d04aa");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{old_key}\n")).unwrap();
    let (cert1, key1) = certificate();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, &cert1).unwrap();
    std::fs::write(&key_path, &key1).unwrap();
    let log = dir.path().join("server.log");
    let child = serve_command(&dir.path().join("data"))
        .args(["--log-format", "json", "--log", "debug"])
        .arg("--api-key-file")
        .arg(&keys)
        .arg("--tls-cert")
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    let addr = listening_addr(&wait_for_log(&log, "public HTTP API listening"));

    // HTTPS with the first certificate; the old key works, the new one not yet.
    let (status, body) = https(&addr, &cert1, ingest_request(old_key, 1))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _) = https(&addr, &cert1, ingest_request(new_key, 2))
        .await
        .unwrap();
    assert_eq!(status, 401);

    // HTTP/2 is offered by ALPN.
    let h2 = tls_connect(&addr, &cert1, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    drop(h2);
    // A keep-alive connection opened now, with one answered request on it.
    let mut kept = tls_connect(&addr, &cert1, &[b"http/1.1"]).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
        let mut b = [0u8; 512];
        let n = kept.read(&mut b).await.unwrap();
        assert!(n > 0, "closed before answering");
        seen.extend_from_slice(&b[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));

    // Rotate both, then SIGHUP.
    let (cert2, key2) = certificate();
    std::fs::write(&keys, format!("# rotated\n{new_key}\n")).unwrap();
    std::fs::write(&cert_path, &cert2).unwrap();
    std::fs::write(&key_path, &key2).unwrap();
    send_signal(proc.0.id(), "-HUP");
    wait_for_log(&log, "TLS certificate reloaded");

    // The connection opened before keeps its session (and certificate).
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    kept.read_to_end(&mut rest).await.ok();
    let rest = String::from_utf8_lossy(&rest).to_string();
    assert!(rest.contains("HTTP/1.1 200"), "{rest}");

    let (status, body) = https(&addr, &cert2, ingest_request(new_key, 3))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _) = https(&addr, &cert2, ingest_request(old_key, 4))
        .await
        .unwrap();
    assert_eq!(
        status, 401,
        "a removed key must be refused on the next request"
    );
    assert!(
        https(&addr, &cert1, ingest_request(new_key, 5))
            .await
            .is_err(),
        "new connections must get the new certificate"
    );

    // A broken key file on the next SIGHUP keeps the keys in use.
    std::fs::write(&keys, "bad key with spaces\n").unwrap();
    send_signal(proc.0.id(), "-HUP");
    wait_for_log(&log, "reloading API keys failed");
    let (status, _) = https(&addr, &cert2, ingest_request(new_key, 6))
        .await
        .unwrap();
    assert_eq!(status, 200);

    // The container health probe speaks HTTPS to it.
    let probe = |cert: &Path| {
        Command::new(env!("CARGO_BIN_EXE_milepost"))
            .args(["healthcheck", "--listen", &addr, "--tls-cert"])
            .arg(cert)
            .env_remove("MILEPOST_PORT")
            .output()
            .unwrap()
    };
    let out = probe(&cert_path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("200"));

    // SIGTERM: a clean exit.
    send_signal(proc.0.id(), "-TERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    let out = probe(&cert_path);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a stopped server is not healthy"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    for secret in [old_key, new_key, "bad key with spaces"] {
        assert!(!text.contains(secret), "a key reached the log: {secret}");
    }
    // Requests did get logged (so the check above looked at a real log).
    assert!(text.contains("/ingest"), "{text}");
}
