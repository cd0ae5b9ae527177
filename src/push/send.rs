//! One request of `milepost push`, retried until it is answered for good.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};

use super::PushArgs;

/// What the server said about a request's lines (its `IngestSummary`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Summary {
    /// Readings newly stored.
    #[serde(default)]
    pub accepted: u64,
    /// Readings already stored.
    #[serde(default)]
    pub duplicates: u64,
    /// Lines refused.
    #[serde(default)]
    pub rejected: u64,
    /// The first refused lines.
    #[serde(default)]
    pub errors: Vec<LineError>,
    /// Why the request failed as a whole, part-way.
    #[serde(default)]
    pub error: Option<String>,
}

/// One refused line of a request.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct LineError {
    /// 1-based, in the request.
    pub line: u64,
    /// Why.
    pub error: String,
}

/// How a request ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every line was judged (stored, duplicate or refused).
    Answered(Summary),
    /// Retried for `--give-up-after` without an answer; why the last try failed.
    GaveUp(String),
    /// The server refuses this client altogether (key, URL); why.
    Fatal(String),
}

/// The HTTP client and where it sends.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    ingest: reqwest::Url,
    key: String,
    give_up_after: Duration,
}

/// Longest a `Retry-After` is obeyed for at once, and the backoff's ceiling.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// First backoff after a network error or a 5xx.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

impl Client {
    /// A client for `args.url`'s `/ingest`.
    pub fn new(args: &PushArgs, key: String) -> anyhow::Result<Self> {
        let mut base = args.url.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let ingest = base.join("ingest").context("--url")?;
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // An answer comes once the readings are durable; a server that takes
            // longer than this is retried (the re-send is harmless).
            .timeout(Duration::from_secs(300))
            .user_agent(concat!("milepost-push/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &args.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("{}", ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{} holds no PEM certificate", ca.display()))?
            {
                http = http.add_root_certificate(cert);
            }
        }
        Ok(Self {
            http: http.build()?,
            ingest,
            key,
            give_up_after: args.give_up_after,
        })
    }

    /// Sends `body` until the server has judged every line, then returns its
    /// counts, settled over the attempts (see [`settle`]).
    pub async fn send(&self, body: Vec<u8>, gzip: bool) -> Outcome {
        if body.is_empty() {
            return Outcome::Answered(Summary::default());
        }
        let body = bytes::Bytes::from(body);
        let started = Instant::now();
        let mut earlier_accepted = 0u64;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let mut req = self
                .http
                .post(self.ingest.clone())
                .basic_auth(&self.key, None::<&str>)
                .header(CONTENT_TYPE, "application/x-ndjson")
                .body(body.clone());
            if gzip {
                req = req.header(CONTENT_ENCODING, "gzip");
            }
            let (wait, why) = match req.send().await {
                Err(e) => {
                    let wait = jitter(backoff);
                    backoff = (backoff * 2).min(MAX_WAIT);
                    (wait, format!("{}: {}", self.ingest, error_chain(&e)))
                }
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = resp
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = resp.text().await.unwrap_or_default();
                    let summary = serde_json::from_str::<Summary>(&text).ok();
                    match status {
                        StatusCode::OK | StatusCode::BAD_REQUEST => match summary {
                            Some(s) => return Outcome::Answered(settle(s, earlier_accepted)),
                            None => {
                                return Outcome::Fatal(format!(
                                    "{} answered {status} with something else than ingest counts: {}",
                                    self.ingest,
                                    text.chars().take(200).collect::<String>()
                                ));
                            }
                        },
                        StatusCode::PAYLOAD_TOO_LARGE => match summary {
                            Some(s) if s.error.is_none() => {
                                // Only over-long lines were refused, the rest stored.
                                return Outcome::Answered(settle(s, earlier_accepted));
                            }
                            _ => {
                                return Outcome::Fatal(format!(
                                    "the server refuses requests this large: lower --request-bytes ({})",
                                    text.trim()
                                ));
                            }
                        },
                        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                            return Outcome::Fatal(format!(
                                "the server refused the API key ({status}: {})",
                                text.trim()
                            ));
                        }
                        StatusCode::TOO_MANY_REQUESTS
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::INSUFFICIENT_STORAGE
                        | StatusCode::REQUEST_TIMEOUT => {
                            // Lines stored before the refusal come back as duplicates.
                            earlier_accepted += summary.map_or(0, |s| s.accepted);
                            let wait = match retry_after {
                                Some(d) => jitter_up(d.min(MAX_WAIT)),
                                None => {
                                    let w = jitter(backoff);
                                    backoff = (backoff * 2).min(MAX_WAIT);
                                    w
                                }
                            };
                            (
                                wait,
                                format!("the server answered {status}: {}", text.trim()),
                            )
                        }
                        s if s.is_server_error() => {
                            let wait = jitter(backoff);
                            backoff = (backoff * 2).min(MAX_WAIT);
                            (
                                wait,
                                format!("the server answered {status}: {}", text.trim()),
                            )
                        }
                        _ => {
                            return Outcome::Fatal(format!(
                                "{} answered {status}: {} (is --url a Milepost server?)",
                                self.ingest,
                                text.chars().take(200).collect::<String>()
                            ));
                        }
                    }
                }
            };
            if started.elapsed() + wait > self.give_up_after {
                return Outcome::GaveUp(why);
            }
            tracing::warn!(wait_ms = wait.as_millis() as u64, "{why}; retrying");
            tokio::time::sleep(wait).await;
        }
    }
}

/// The counts of a request's final answer, given that earlier tries of it stored
/// `earlier_accepted` readings (which the final try counted as duplicates): each
/// line counted once, as what happened to it first.
fn settle(mut last: Summary, earlier_accepted: u64) -> Summary {
    last.accepted += earlier_accepted;
    last.duplicates = last.duplicates.saturating_sub(earlier_accepted);
    last
}

/// Full jitter between half and all of `d`, so that many devices a server turned
/// away do not come back in step.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.5..=1.0))
}

/// `d` plus up to a quarter more: never earlier than the server asked.
fn jitter_up(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(1.0..=1.25))
}

/// An error with its causes ("connection refused" is in the source chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retried_request_counts_each_line_once() {
        // First try stored 3 of 5 and was then turned away; the second found those
        // 3 stored, stored the other 2.
        let s = settle(
            Summary {
                accepted: 2,
                duplicates: 3,
                ..Summary::default()
            },
            3,
        );
        assert_eq!((s.accepted, s.duplicates), (5, 0));
    }
}
