//! One tracing span per request, and a completion event at a level that keeps a
//! default (`info`) log quiet: the dashboard polls seven URLs every 10 s, so
//! successful requests are logged at `debug`, server errors at `warn` (their cause
//! is logged where it happened). A `503` is the server asking a client to come back
//! (the writer saturated, users' SQL over its share, a shutdown), counted on
//! `/metrics` by status: a fleet held back by it sends thousands a second, so it is
//! logged at `debug` too, not as a fault.

use std::sync::Arc;
use std::time::Instant;

use poem::{Endpoint, Request, Response};
use tracing::Instrument as _;

/// Middleware function for [`poem::EndpointExt::around`].
pub async fn request<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    // A fleet's small `POST /ingest` requests get a span without fields: the log
    // formats a span's fields when it is created, whether or not anything inside
    // it is logged (3–4 allocations and the formatting, per request). Its name says
    // what they would have, so logs still show the method and path.
    let span = if super::ingest::is_ingest(&req) {
        tracing::info_span!("POST /ingest")
    } else {
        tracing::info_span!(
            "request",
            method = %req.method(),
            path = %req.uri().path(),
        )
    };
    async move {
        let started = Instant::now();
        let resp = ep.get_response(req).await;
        let status = resp.status().as_u16();
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        if is_fault(status) {
            tracing::warn!(status, elapsed_ms, "server error");
        } else {
            tracing::debug!(status, elapsed_ms, "response");
        }
        Ok(resp)
    }
    .instrument(span)
    .await
}

/// Whether a response's status is a server fault worth a warning: every `5xx` but
/// `503`, which is backpressure (see the module docs).
fn is_fault(status: u16) -> bool {
    status >= 500 && status != 503
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backpressure_is_not_logged_as_a_fault() {
        assert!(
            !is_fault(503),
            "503 + Retry-After asks the client to come back"
        );
        assert!(is_fault(500) && is_fault(502) && is_fault(507));
        assert!(!is_fault(200) && !is_fault(429) && !is_fault(499));
    }
}
