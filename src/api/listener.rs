//! The public listener: accepts connections and serves the API on each with hyper,
//! with the limits an appliance on the open internet needs and poem's own server
//! does not offer (its connections have no header timeout: 20 clients sending one
//! header byte per second were all still connected after 75 s).
//!
//! - a request's header must arrive within `header_read_timeout` (slowloris);
//! - at most `max_connections` connections, and `max_connections_per_client` from one
//!   IP address; a connection over either gets one `503` with `Retry-After` and is
//!   closed (a client at its cap cannot starve the others, and the accept loop never
//!   stalls);
//! - headers larger than `max_header_bytes` are answered 431 by hyper;
//! - optional TLS (see [`super::tls`]);
//! - graceful shutdown: on the token, no new connections; each connection finishes
//!   the request in flight and closes; after `grace`, whatever is left is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use poem::http::uri::Scheme;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Endpoint, EndpointExt, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::slots::Slots;
use crate::tls::TlsConfig;

/// Limits of the public listener.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// Longest time a request's header may take to arrive (also how long an idle
    /// keep-alive connection is kept).
    pub header_read_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections from one IP address at most.
    pub max_connections_per_client: usize,
    /// Largest request header (request line and fields).
    pub max_header_bytes: usize,
}

/// Serves `ep` on `listener` until `shutdown`, then lets connections finish their
/// request for up to `grace`.
pub async fn serve<E>(
    listener: TcpListener,
    tls: Option<TlsConfig>,
    ep: E,
    limits: ListenerLimits,
    shutdown: CancellationToken,
    grace: Duration,
) -> std::io::Result<()>
where
    E: Endpoint + 'static,
{
    let ep: Arc<dyn poem::endpoint::DynEndpoint<Output = Response>> =
        Arc::new(poem::endpoint::ToDynEndpoint(ep.map_to_response()));
    let local = listener.local_addr()?;
    let connections = Slots::new(limits.max_connections, limits.max_connections_per_client);
    let tracker = TaskTracker::new();
    let limits = Arc::new(limits);
    let refusals = Arc::new(tokio::sync::Semaphore::new(REFUSALS_AT_ONCE));
    loop {
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = connections.take(peer.ip()) else {
            // Over the limit: one 503 with Retry-After (a device retries later rather
            // than seeing a reset), from a small pool of its own; beyond that, closed.
            match refusals.clone().try_acquire_owned() {
                Ok(permit) if tls.is_none() => {
                    let timeout = limits.header_read_timeout.min(Duration::from_secs(5));
                    tracker.spawn(async move {
                        refuse(socket, timeout).await;
                        drop(permit);
                    });
                }
                _ => drop(socket),
            }
            tracing::debug!(%peer, "connection refused: at the connection limit");
            continue;
        };
        socket.set_nodelay(true).ok();
        let ep = ep.clone();
        let limits = limits.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _slot = slot;
            match tls {
                None => connection(socket, local, peer, Scheme::HTTP, ep, &limits, shutdown).await,
                Some(tls) => match tls.accept(socket, limits.header_read_timeout).await {
                    Ok(stream) => {
                        connection(stream, local, peer, Scheme::HTTPS, ep, &limits, shutdown).await
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                },
            }
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            open = connections.in_use(),
            "connections still open after the shutdown grace period; dropping them"
        );
    }
    Ok(())
}

type DynEp = Arc<dyn poem::endpoint::DynEndpoint<Output = Response>>;

/// Connections over the limits answered 503 at the same time, at most.
const REFUSALS_AT_ONCE: usize = 64;

/// Reads one request (within `timeout`), answers 503 with `Retry-After`, closes.
async fn refuse(socket: tokio::net::TcpStream, timeout: Duration) {
    let service = hyper::service::service_fn(|_req| async {
        let resp = super::error::json_error(
            poem::http::StatusCode::SERVICE_UNAVAILABLE,
            "too many connections (from this address, or in total); retry later",
        );
        let mut resp = poem::http::Response::from(resp);
        resp.headers_mut().insert(
            poem::http::header::RETRY_AFTER,
            poem::http::HeaderValue::from_static("1"),
        );
        Ok::<_, std::convert::Infallible>(resp)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .keep_alive(false)
        .serve_connection(TokioIo::new(socket), service);
    tokio::time::timeout(timeout * 2, conn).await.ok();
}

/// One connection: HTTP/1.1 (or HTTP/2 with prior knowledge) until the client
/// closes it, a limit ends it, or the server shuts down.
async fn connection<S>(
    io: S,
    local: SocketAddr,
    peer: SocketAddr,
    scheme: Scheme,
    ep: DynEp,
    limits: &ListenerLimits,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let local = LocalAddr(local.into());
    let remote = RemoteAddr(peer.into());
    let service = hyper::service::service_fn(move |req| {
        let ep = ep.clone();
        let req = poem::Request::from((req, local.clone(), remote.clone(), scheme.clone()));
        async move {
            let resp = match ep.call(req).await {
                Ok(r) => r,
                Err(e) => e.into_response(),
            };
            Ok::<_, std::convert::Infallible>(poem::http::Response::from(resp))
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper answers 431 to a header that does not fit its read buffer; the buffer
        // also bounds body chunks, which stay ≥ 64 KiB with the default limit.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            return;
        }
        _ = shutdown.cancelled() => {}
    }
    // Finish the request in flight, then close (the grace period bounds this).
    conn.as_mut().graceful_shutdown();
    conn.await.ok();
}
