//! `ETag` + `Cache-Control: no-cache` on successful GETs under `/api`, and `304 Not
//! Modified` when the client already has the same body. The dashboard polls every 10 s;
//! late uploads still change past days, so revalidation instead of a long `max-age`.
//! Only bodies of known size are tagged: a streamed body (a raw-readings export can be
//! gigabytes) passes through untouched instead of being buffered to hash it.

use http_body::Body as _;
use http_body_util::combinators::BoxBody;
use poem::http::{Method, StatusCode, header};
use poem::{Body, Endpoint, IntoResponse, Request, Response};
use sha2::{Digest, Sha256};

/// Middleware function for [`poem::EndpointExt::around`].
pub async fn revalidate<E: Endpoint>(
    ep: std::sync::Arc<E>,
    req: Request,
) -> poem::Result<Response> {
    let cacheable = req.method() == Method::GET && req.uri().path().starts_with("/api/");
    let if_none_match = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut resp = ep.call(req).await?.into_response();
    if !cacheable || resp.status() != StatusCode::OK {
        return Ok(resp);
    }
    let body = BoxBody::from(resp.take_body());
    if body.size_hint().exact().is_none() {
        resp.set_body(Body::from(body));
        return Ok(resp);
    }
    let body = Body::from(body).into_bytes().await?;
    let digest = Sha256::digest(&body);
    let etag = format!("\"{}\"", hex::encode(&digest[..12]));
    let matches = if_none_match.is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().trim_start_matches("W/") == etag || t.trim() == "*")
    });
    let headers = resp.headers_mut();
    headers.insert(header::ETAG, etag.parse().expect("hex is a valid header"));
    headers.insert(
        header::CACHE_CONTROL,
        "no-cache".parse().expect("valid header"),
    );
    if matches {
        headers.remove(header::CONTENT_TYPE);
        headers.remove(header::CONTENT_LENGTH);
        resp.set_status(StatusCode::NOT_MODIFIED);
        return Ok(resp);
    }
    resp.set_body(body);
    Ok(resp)
}
