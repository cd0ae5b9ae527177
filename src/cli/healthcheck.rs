//! `milepost healthcheck`: probes `/readyz` of a server on this machine and exits 0
//! when it is ready, 1 otherwise — for container health checks where the image has
//! no shell or curl (the distroless runtime image of `dist/Dockerfile`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;

/// Where the server listens; the same flags and environment as `serve`, so in a
/// container the probe finds the server without arguments.
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// The server's `--listen` address (a wildcard address is probed on loopback).
    #[arg(long, env = "MILEPOST_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// The server's `--port`, if set.
    #[arg(long, env = "MILEPOST_PORT")]
    pub port: Option<u16>,
    /// The server's `--tls-cert`: probe over HTTPS. The certificate is not verified
    /// (the probe connects to the loopback address, which a public certificate does
    /// not name).
    #[arg(long, env = "MILEPOST_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl HealthcheckArgs {
    /// The URL probed.
    pub fn url(&self) -> String {
        let mut addr = self.listen;
        if let Some(p) = self.port {
            addr.set_port(p);
        }
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let scheme = if self.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{addr}/readyz")
    }
}

/// Probes once; `Ok` when the server answered 200.
pub async fn run(args: &HealthcheckArgs) -> anyhow::Result<()> {
    let url = args.url();
    let client = reqwest::Client::builder()
        .timeout(args.timeout)
        .danger_accept_invalid_certs(args.tls_cert.is_some())
        .build()
        .context("building the HTTP client")?;
    let resp = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("{url}: no answer"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{url}: {status} {body}");
    }
    println!("{url}: {status} {body}");
    Ok(())
}
