//! The one place where errors become HTTP responses: always JSON `{"error": "..."}`.

use poem::Response;
use poem::http::StatusCode;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};

use crate::store::StoreError;

/// Body of every error response.
#[derive(Debug, Clone, Object)]
#[oai(example)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
}

impl poem_openapi::types::Example for ErrorBody {
    fn example() -> Self {
        Self::new("unknown sensor 'warp'")
    }
}

impl ErrorBody {
    /// An error body with `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            error: message.into(),
        }
    }
}

/// Errors of the read endpoints, documented in the OpenAPI spec.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// Something the client sent is invalid.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The sensor named in the path is not in the catalog.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// None of the media types in `Accept` can be produced.
    #[oai(status = 406)]
    NotAcceptable(Json<ErrorBody>),
    /// Storage failed; details are in the server log.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
}

impl ApiError {
    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest(Json(ErrorBody::new(message)))
    }

    /// A 404 with `message`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(Json(ErrorBody::new(message)))
    }

    /// A 406 with `message`.
    pub fn not_acceptable(message: impl Into<String>) -> Self {
        Self::NotAcceptable(Json(ErrorBody::new(message)))
    }

    /// A 500 whose details went to the log.
    pub fn internal() -> Self {
        Self::Internal(Json(ErrorBody::new("internal error; see the server log")))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage error");
        Self::internal()
    }
}

/// A JSON error response.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    Response::builder()
        .status(status)
        .content_type("application/json; charset=utf-8")
        .body(body)
}

/// Turns every error that reached the top (ours, poem's routing and parameter errors,
/// poem-openapi's content-type errors) into a JSON body with the right status.
pub async fn to_json(err: poem::Error) -> Response {
    // Our own `ApiError`s arrive here already rendered as JSON: keep their message.
    if err.is_from_response() {
        return err.into_response();
    }
    let status = err.status();
    let message = match status {
        StatusCode::NOT_FOUND => "not found".to_owned(),
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed".to_owned(),
        _ => err.to_string(),
    };
    if status.is_server_error() {
        tracing::error!(error = %err, "request failed");
    }
    json_error(status, &message)
}
