//! `POST /api/v1/sql`: read-only SQL over the views of SPEC 2.6 (the sandbox is
//! `store::sql`), authorized by a backend token (`milepost token create`; every role
//! may read). The answer is decided before its first byte: a query stopped by a
//! limit answers with an error, never with a short result.

use std::sync::Arc;

use bytes::Bytes;

use poem::http::header;
use poem::web::Data;
use poem::{Body, Request, RequestBody};
use poem_openapi::payload::{Binary, Json};
use poem_openapi::registry::{MetaMediaType, MetaRequest, MetaSchema, MetaSchemaRef, Registry};
use poem_openapi::types::Type;
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ApiResponse, ExtractParamOptions, Object, OpenApi,
    ResponseContent,
};
use serde_json::Value;

use super::error::ErrorBody;
use super::readings::{Format, preferred};
use super::{AppState, Tag};
use crate::metrics::StatusLabel;
use crate::store::sql::arrow::array::{Array, ArrayRef};
use crate::store::sql::arrow::datatypes::DataType;
use crate::store::sql::arrow::record_batch::RecordBatch;
use crate::store::sql::arrow::util::display::array_value_to_string;
use crate::store::sql::{CancelOnDrop, Client, SqlEngine, SqlError, SqlParam, SqlSummary};
use output::{Output, Streamed};

mod output;

/// The `/api/v1/sql` endpoint.
pub struct SqlApi;

/// A query with positional parameters (`?` or `$1` in the text).
#[derive(Debug, Clone, Object, serde::Deserialize)]
pub struct SqlBody {
    /// The SQL text: one read statement.
    pub sql: String,
    /// Values of its parameters, in order (strings, numbers, booleans, null).
    #[oai(default)]
    #[serde(default)]
    pub params: Vec<Value>,
}

/// Longest query text taken.
const MAX_BODY: usize = 1 << 20;

/// The raw body of `POST /api/v1/sql`: the SQL text (any content type but JSON, so
/// that `curl --data 'SELECT …'` works), or JSON with parameters. Read after the
/// token is checked.
pub struct SqlRequest(Body);

impl<'a> ApiExtractor<'a> for SqlRequest {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        SqlBody::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        let text = MetaSchemaRef::Inline(Box::new(MetaSchema {
            description: Some(
                "One read statement, e.g. SELECT sensor, avg(value) FROM readings GROUP BY ALL",
            ),
            ..MetaSchema::new("string")
        }));
        Some(MetaRequest {
            description: None,
            content: vec![
                MetaMediaType {
                    content_type: "text/plain",
                    schema: text,
                },
                MetaMediaType {
                    content_type: "application/json",
                    schema: SqlBody::schema_ref(),
                },
            ],
            required: true,
        })
    }

    async fn from_request(
        _request: &'a Request,
        body: &mut RequestBody,
        _opts: ExtractParamOptions<()>,
    ) -> poem::Result<Self> {
        Ok(Self(body.take()?))
    }
}

impl SqlRequest {
    /// The query and its parameters.
    async fn read(self, req: &Request) -> Result<(String, Vec<Value>), SqlError> {
        let bytes = self
            .0
            .into_bytes_limit(MAX_BODY)
            .await
            .map_err(|e| match e {
                poem::error::ReadBodyError::PayloadTooLarge => {
                    SqlError::TooLarge(format!("a query text of {MAX_BODY} bytes"))
                }
                e => SqlError::Refused(format!("the query text: {e}")),
            })?;
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.trim_start().starts_with("application/json"));
        if json {
            let b: SqlBody = serde_json::from_slice(&bytes).map_err(|e| {
                SqlError::Refused(format!(
                    "a JSON body is {{\"sql\": \"…\", \"params\": […]}}: {e}"
                ))
            })?;
            Ok((b.sql, b.params))
        } else {
            let text = String::from_utf8(bytes.to_vec())
                .map_err(|_| SqlError::Refused("the query text is not UTF-8".into()))?;
            Ok((text, Vec::new()))
        }
    }
}

/// A result column.
#[derive(Debug, Clone, Object)]
pub struct SqlColumn {
    /// Its name.
    pub name: String,
    /// Its DuckDB type (`BIGINT`, `DOUBLE`, `VARCHAR`, `TIMESTAMP`, …).
    #[oai(rename = "type")]
    pub type_name: String,
}

/// A result as JSON.
#[derive(Debug, Clone, Object)]
pub struct SqlResult {
    /// The columns, in order.
    pub columns: Vec<SqlColumn>,
    /// The rows, each a list of values in column order (timestamps as RFC 3339 UTC).
    pub rows: Vec<Vec<Value>>,
    /// How many rows.
    pub row_count: u64,
}

/// A result in the negotiated format.
#[derive(ResponseContent)]
pub enum SqlContent {
    /// Columns with their types, and rows.
    Json(Json<SqlResult>),
    /// One JSON object per row; a result cut short after streaming began ends
    /// with `{"error": …}`.
    #[oai(content_type = "application/x-ndjson")]
    Ndjson(Binary<Body>),
    /// A header row of column names, then the rows.
    #[oai(content_type = "text/csv; charset=utf-8")]
    Csv(Binary<Body>),
    /// An Arrow IPC stream: DuckDB's own columns and types (pyarrow, polars,
    /// DuckDB and Arrow's other readers take it as it is).
    #[oai(content_type = "application/vnd.apache.arrow.stream")]
    Arrow(Binary<Body>),
    /// A Parquet file (zstd).
    #[oai(content_type = "application/vnd.apache.parquet")]
    Parquet(Binary<Body>),
}

impl SqlContent {
    /// `body` in the streamed format `f`.
    fn streamed(f: Streamed, body: Body) -> Self {
        match f {
            Streamed::Ndjson => Self::Ndjson(Binary(body)),
            Streamed::Csv => Self::Csv(Binary(body)),
            Streamed::Arrow => Self::Arrow(Binary(body)),
            Streamed::Parquet => Self::Parquet(Binary(body)),
        }
    }
}

/// What a result is sent as, by `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SqlFormat {
    /// JSON, NDJSON or CSV.
    Table(Format),
    /// An Arrow IPC stream.
    Arrow,
    /// A Parquet file.
    Parquet,
}

impl SqlFormat {
    /// The most preferred format `accept` allows (JSON when it says nothing).
    fn negotiate(accept: Option<&str>) -> Option<Self> {
        let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
            return Some(Self::Table(Format::Json));
        };
        preferred(accept)
            .into_iter()
            .find_map(|media| match media.to_ascii_lowercase().as_str() {
                "application/vnd.apache.arrow.stream" => Some(Self::Arrow),
                "application/vnd.apache.parquet" | "application/x-parquet" => Some(Self::Parquet),
                other => Format::of_media(other).map(Self::Table),
            })
    }
}

/// Answers of `POST /api/v1/sql`.
#[derive(ApiResponse)]
pub enum SqlResponse {
    /// The result (`X-Row-Count`: its rows, when it is sent whole; a result of
    /// more than 1 MiB in NDJSON, CSV, Arrow or Parquet is streamed, announced by
    /// `Trailer: X-Row-Count`, and ends with an `X-Row-Count` trailer for a
    /// request that accepts trailers, `TE: trailers`).
    #[oai(status = 200)]
    Ok(
        SqlContent,
        #[oai(header = "X-Row-Count")] Option<u64>,
        #[oai(header = "Trailer")] Option<String>,
    ),
    /// Not a query the sandbox runs, or DuckDB refused it (its message, with the
    /// position).
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No valid backend token (`Authorization: Bearer TOKEN`).
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// None of the media types in `Accept` can be produced.
    #[oai(status = 406)]
    NotAcceptable(Json<ErrorBody>),
    /// Stopped at the time limit (`--sql-timeout`).
    #[oai(status = 408)]
    Timeout(Json<ErrorBody>),
    /// The result is over the cap in rows or bytes, or the query text over 1 MiB.
    #[oai(status = 413)]
    TooLarge(Json<ErrorBody>),
    /// Storage failed; details are in the server log.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// This token's queries already take its share of the slots (one at a time
    /// by default), or used up its share of time (`--sql-time-share`); try again
    /// after `Retry-After` seconds.
    #[oai(status = 429)]
    TooMany(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
    /// Every slot for queries is taken, or all clients' queries together used up
    /// their share of the server's time (`--sql-total-share`); try again after
    /// `Retry-After` seconds.
    #[oai(status = 503)]
    Busy(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

impl SqlResponse {
    fn error(e: SqlError) -> Self {
        let body = |e: &SqlError| Json(ErrorBody::new(e.to_string()));
        match e {
            SqlError::Refused(_) | SqlError::Query(_) => Self::BadRequest(body(&e)),
            SqlError::Timeout(_) | SqlError::Stalled(_) | SqlError::Cancelled => {
                Self::Timeout(body(&e))
            }
            SqlError::TooLarge(_) => Self::TooLarge(body(&e)),
            SqlError::Busy => Self::Busy(body(&e), 1),
            SqlError::ClientBusy(_) => Self::TooMany(body(&e), 1),
            SqlError::OverShare(wait) => {
                let seconds = wait.as_secs().max(1).try_into().unwrap_or(u32::MAX);
                Self::TooMany(body(&e), seconds)
            }
            SqlError::ServerOverShare(wait) => {
                let seconds = wait.as_secs().max(1).try_into().unwrap_or(u32::MAX);
                Self::Busy(body(&e), seconds)
            }
            SqlError::Store(s) => {
                tracing::error!(error = %s, "user query failed in the store");
                Self::Internal(Json(ErrorBody::new("internal error; see the server log")))
            }
        }
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Sql")]
impl SqlApi {
    /// SQL
    ///
    /// Runs one read-only SQL statement (DuckDB's dialect) over the views
    /// `readings(device, sensor, ts, value)`, `rollups_15m(device, sensor, bucket,
    /// count, min, max, sum, first, last)`, `devices(device)`, `sensors(name, unit,
    /// description, min, max)`, `anomalies` and `dumps`; nothing else is readable,
    /// and nothing can be changed. Authenticate with a backend token
    /// (`Authorization: Bearer TOKEN`). The result comes as JSON, NDJSON, CSV, an
    /// Arrow IPC stream or Parquet by `Accept`. Over 1 MiB the last four are
    /// streamed, ending with an `X-Row-Count` trailer (`TE: trailers`); a limit
    /// (time, rows, bytes, a reader that stalls) reached after streaming began
    /// ends NDJSON with an `{"error"}` record and breaks the others' connection,
    /// never a short result that reads as whole. Each token runs one query at a
    /// time, within its share of the server's time (`--sql-time-share`).
    #[oai(path = "/sql", method = "post")]
    async fn sql(
        &self,
        state: Data<&Arc<AppState>>,
        req: &Request,
        body: SqlRequest,
    ) -> SqlResponse {
        let started = std::time::Instant::now();
        let answer = respond(&state, req, body).await;
        let m = &state.metrics;
        m.sql_seconds.observe(started.elapsed().as_secs_f64());
        m.sql_requests
            .get_or_create(&StatusLabel {
                status: answer.status(),
            })
            .inc();
        answer
    }
}

impl SqlResponse {
    /// The HTTP status of the answer (for the metrics).
    fn status(&self) -> u16 {
        match self {
            Self::Ok(..) => 200,
            Self::BadRequest(_) => 400,
            Self::Unauthorized(_) => 401,
            Self::NotAcceptable(_) => 406,
            Self::Timeout(_) => 408,
            Self::TooLarge(_) => 413,
            Self::Internal(_) => 500,
            Self::TooMany(..) => 429,
            Self::Busy(..) => 503,
        }
    }
}

/// Answers one request (see [`SqlApi::sql`]).
async fn respond(state: &Arc<AppState>, req: &Request, body: SqlRequest) -> SqlResponse {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let caller = token.and_then(|t| (state.tokens.as_ref()?)(t));
    let Some(caller) = caller else {
        return SqlResponse::Unauthorized(Json(ErrorBody::new(
            "a backend token is required: Authorization: Bearer TOKEN (milepost token create)",
        )));
    };
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let Some(format) = SqlFormat::negotiate(accept) else {
        return SqlResponse::NotAcceptable(Json(ErrorBody::new(
            "the result can be application/json, application/x-ndjson, text/csv, \
             application/vnd.apache.arrow.stream or application/vnd.apache.parquet",
        )));
    };
    let (sql, params) = match body.read(req).await {
        Ok(read) => read,
        Err(e) => return SqlResponse::error(e),
    };
    let params = match params.iter().map(param).collect::<Result<Vec<_>, _>>() {
        Ok(p) => p,
        Err(e) => return SqlResponse::error(e),
    };
    let Some(engine) = state.sql.clone() else {
        return SqlResponse::error(SqlError::Refused("SQL is not enabled here".into()));
    };
    tracing::debug!(%caller, "user query");
    // A client that goes away stops its query: dropping the future, or the body
    // it streams, cancels it.
    let client = Client::of_token(token.unwrap_or_default());
    let on_drop = CancelOnDrop(client.cancel.clone());
    let streamed = match format {
        SqlFormat::Table(Format::Json) => None,
        SqlFormat::Table(Format::Ndjson) => Some(Streamed::Ndjson),
        SqlFormat::Table(Format::Csv) => Some(Streamed::Csv),
        SqlFormat::Arrow => Some(Streamed::Arrow),
        SqlFormat::Parquet => Some(Streamed::Parquet),
    };
    match streamed {
        Some(f) => stream(engine, sql, params, client, on_drop, f).await,
        None => whole_json(engine, sql, params, client).await,
    }
}

/// A JSON answer: typed, whole.
async fn whole_json(
    engine: Arc<SqlEngine>,
    sql: String,
    params: Vec<SqlParam>,
    client: Client,
) -> SqlResponse {
    let ran = engine
        .in_background(move |e| e.collect(&sql, &params, &client))
        .await;
    match ran {
        Ok((batches, summary)) => {
            SqlResponse::Ok(json(&batches, &summary), Some(summary.rows), None)
        }
        Err(e) => SqlResponse::error(e),
    }
}

/// A result up to this size is sent whole, with `X-Row-Count`; a larger one is
/// streamed as DuckDB produces it.
const WHOLE: usize = 1 << 20;

/// Batches a query has produced and not yet sent; DuckDB waits beyond.
const IN_FLIGHT: usize = 2;

/// An answer in a streamed format: whole if it is small, else streamed, so the
/// server holds a couple of batches of it at a time. Every error up to the first
/// byte sent is a status; a limit reached later ends the stream with an error
/// record (NDJSON) or a broken connection (the others), never a short result
/// that looks whole.
async fn stream(
    engine: Arc<SqlEngine>,
    sql: String,
    params: Vec<SqlParam>,
    client: Client,
    on_drop: CancelOnDrop,
    format: Streamed,
) -> SqlResponse {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<RecordBatch>(IN_FLIGHT);
    let query = tokio::spawn(async move { engine.run_to(sql, params, client, tx).await });
    let failed = |e: String| {
        tracing::error!(error = %e, "writing a query's result failed");
        SqlResponse::Internal(Json(ErrorBody::new("internal error; see the server log")))
    };
    let mut head = Vec::new();
    let mut output: Option<Output> = None;
    while head.len() < WHOLE {
        let Some(batch) = rx.recv().await else {
            // The query ended within the first MiB: whole, with its row count.
            let summary = match query.await {
                Ok(Ok(summary)) => summary,
                Ok(Err(e)) => return SqlResponse::error(e),
                Err(e) => return failed(e.to_string()),
            };
            let out = match output {
                Some(out) => out,
                None => match Output::start(format, &summary.schema, &mut head) {
                    Ok(out) => out,
                    Err(e) => return failed(e),
                },
            };
            if let Err(e) = out.finish(&mut head) {
                return failed(e);
            }
            let content = SqlContent::streamed(format, Body::from(head));
            return SqlResponse::Ok(content, Some(summary.rows), None);
        };
        let out = match &mut output {
            Some(out) => out,
            None => match Output::start(format, &batch.schema(), &mut head) {
                Ok(out) => output.insert(out),
                Err(e) => return failed(e),
            },
        };
        if let Err(e) = out.batch(&batch, &mut head) {
            return failed(e);
        }
    }
    let state = Streaming {
        head: Some(head),
        rx,
        query: Some(query),
        output,
        rows: None,
        _on_drop: on_drop,
    };
    let frames = futures_util::stream::unfold(state, Streaming::next);
    // The stream is not `Sync` (a Parquet writer), which poem's body needs; it is
    // only ever polled by one task.
    let body = http_body_util::combinators::BoxBody::new(http_body_util::StreamBody::new(
        sync_wrapper::SyncStream::new(frames),
    ));
    SqlResponse::Ok(
        SqlContent::streamed(format, Body::from(body)),
        None,
        Some(ROW_COUNT.into()),
    )
}

/// The trailer that ends a streamed result with its row count.
const ROW_COUNT: &str = "X-Row-Count";

/// A result being streamed; dropped (the client gone), it cancels the query.
struct Streaming {
    head: Option<Vec<u8>>,
    rx: tokio::sync::mpsc::Receiver<RecordBatch>,
    query: Option<tokio::task::JoinHandle<Result<SqlSummary, SqlError>>>,
    output: Option<Output>,
    /// The row count, once the result ended whole: sent as the last frame.
    rows: Option<u64>,
    _on_drop: CancelOnDrop,
}

/// A frame of a streamed body.
type BodyFrame = std::io::Result<http_body::Frame<Bytes>>;

fn data(bytes: Vec<u8>) -> BodyFrame {
    Ok(http_body::Frame::data(bytes.into()))
}

impl Streaming {
    async fn next(mut self) -> Option<(BodyFrame, Self)> {
        if let Some(head) = self.head.take() {
            return Some((data(head), self));
        }
        if self.output.is_none() {
            // hyper sends trailers to HTTP/2 clients, and to HTTP/1.1 ones that
            // asked (`TE: trailers`); to others the body simply ends.
            let rows = self.rows.take()?;
            let mut trailers = poem::http::HeaderMap::new();
            trailers.insert(ROW_COUNT, poem::http::HeaderValue::from(rows));
            return Some((Ok(http_body::Frame::trailers(trailers)), self));
        }
        let mut out = Vec::new();
        let output = self.output.as_mut()?;
        if let Some(batch) = self.rx.recv().await {
            return match output.batch(&batch, &mut out) {
                Ok(()) => Some((data(out), self)),
                Err(e) => self.cut(e),
            };
        }
        let ended = self.query.take()?.await;
        match ended {
            Ok(Ok(summary)) => {
                let output = self.output.take()?;
                match output.finish(&mut out) {
                    Ok(()) => {
                        self.rows = Some(summary.rows);
                        Some((data(out), self))
                    }
                    Err(e) => self.cut(e),
                }
            }
            Ok(Err(e)) => self.cut(e.to_string()),
            Err(e) => self.cut(e.to_string()),
        }
    }

    /// Ends the stream after `error`: with an error record where the format has
    /// one, else by failing the body (the connection breaks).
    fn cut(mut self, error: String) -> Option<(BodyFrame, Self)> {
        tracing::info!(%error, "a streamed query result was cut short");
        let output = self.output.take()?;
        match output.error_record(&error) {
            Some(record) => Some((data(record), self)),
            None => Some((Err(std::io::Error::other(error)), self)),
        }
    }
}

/// A JSON parameter as a query's.
fn param(v: &Value) -> Result<SqlParam, SqlError> {
    Ok(match v {
        Value::Null => SqlParam::Null,
        Value::Bool(b) => SqlParam::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SqlParam::Int(i),
            None => SqlParam::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => SqlParam::Text(s.clone()),
        Value::Array(_) | Value::Object(_) => {
            return Err(SqlError::Refused(
                "parameters are strings, numbers, booleans or null".into(),
            ));
        }
    })
}

/// The result as typed JSON.
fn json(batches: &[RecordBatch], summary: &SqlSummary) -> SqlContent {
    let fields = summary.schema.fields();
    SqlContent::Json(Json(SqlResult {
        columns: fields
            .iter()
            .map(|f| SqlColumn {
                name: f.name().clone(),
                type_name: type_name(f.data_type()),
            })
            .collect(),
        rows: batches
            .iter()
            .flat_map(|b| (0..b.num_rows()).map(move |r| (b, r)))
            .map(|(b, r)| b.columns().iter().map(|c| json_value(c, r)).collect())
            .collect(),
        row_count: summary.rows,
    }))
}

/// DuckDB's name of an Arrow type as DuckDB hands it out.
fn type_name(t: &DataType) -> String {
    match t {
        DataType::Null => "NULL".into(),
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Int8 => "TINYINT".into(),
        DataType::Int16 => "SMALLINT".into(),
        DataType::Int32 => "INTEGER".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::UInt8 => "UTINYINT".into(),
        DataType::UInt16 => "USMALLINT".into(),
        DataType::UInt32 => "UINTEGER".into(),
        DataType::UInt64 => "UBIGINT".into(),
        DataType::Float32 => "FLOAT".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "VARCHAR".into(),
        DataType::Date32 | DataType::Date64 => "DATE".into(),
        DataType::Timestamp(_, None) => "TIMESTAMP".into(),
        DataType::Timestamp(_, Some(_)) => "TIMESTAMP WITH TIME ZONE".into(),
        DataType::Decimal128(p, s) => format!("DECIMAL({p},{s})"),
        other => format!("{other}"),
    }
}

/// Whether a cell is NULL (a column of type NULL has no null buffer to say so).
fn null_at(c: &ArrayRef, r: usize) -> bool {
    *c.data_type() == DataType::Null || c.is_null(r)
}

/// A cell as text: timestamps as RFC 3339 UTC.
fn text_value(c: &ArrayRef, r: usize) -> String {
    let s = array_value_to_string(c, r).unwrap_or_default();
    match c.data_type() {
        DataType::Timestamp(_, None) => format!("{s}Z"),
        _ => s,
    }
}

/// A cell as JSON: numbers and booleans as such, the rest as text.
fn json_value(c: &ArrayRef, r: usize) -> Value {
    if null_at(c, r) {
        return Value::Null;
    }
    let s = text_value(c, r);
    match c.data_type() {
        DataType::Boolean => Value::Bool(s == "true"),
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => s
            .parse::<serde_json::Number>()
            .map_or(Value::String(s), Value::Number),
        DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::String(s), Value::Number),
        _ => Value::String(s),
    }
}

/// A CSV field, quoted when it must be.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}
