//! `POST /api/v1/sql`: read-only SQL over the views of SPEC 2.6 (the sandbox is
//! `store::sql`), authorized by a backend token (`milepost token create`; every role
//! may read). The answer is decided before its first byte: a query stopped by a
//! limit answers with an error, never with a short result.

use std::sync::Arc;

use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
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
use crate::store::sql::{CancelOnDrop, Client, SqlError, SqlParam, SqlSummary};
use arrow_ipc::writer::StreamWriter;

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
    /// One JSON object per row.
    #[oai(content_type = "application/x-ndjson")]
    Ndjson(Binary<Vec<u8>>),
    /// A header row of column names, then the rows.
    #[oai(content_type = "text/csv; charset=utf-8")]
    Csv(Binary<Vec<u8>>),
    /// An Arrow IPC stream: DuckDB's own columns and types (pyarrow, polars,
    /// DuckDB and Arrow's other readers take it as it is).
    #[oai(content_type = "application/vnd.apache.arrow.stream")]
    Arrow(Binary<Vec<u8>>),
    /// A Parquet file (zstd).
    #[oai(content_type = "application/vnd.apache.parquet")]
    Parquet(Binary<Vec<u8>>),
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
    /// The result (`X-Row-Count`: its rows).
    #[oai(status = 200)]
    Ok(SqlContent, #[oai(header = "X-Row-Count")] u64),
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
    /// by default); try again after `Retry-After` seconds.
    #[oai(status = 429)]
    TooMany(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
    /// Every slot for queries is taken; try again after `Retry-After` seconds.
    #[oai(status = 503)]
    Busy(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

impl SqlResponse {
    fn error(e: SqlError) -> Self {
        let body = |e: &SqlError| Json(ErrorBody::new(e.to_string()));
        match e {
            SqlError::Refused(_) | SqlError::Query(_) => Self::BadRequest(body(&e)),
            SqlError::Timeout(_) | SqlError::Cancelled => Self::Timeout(body(&e)),
            SqlError::TooLarge(_) => Self::TooLarge(body(&e)),
            SqlError::Busy => Self::Busy(body(&e), 1),
            SqlError::ClientBusy(_) => Self::TooMany(body(&e), 1),
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
    /// Arrow IPC stream or Parquet by `Accept`, whole: a query over a limit (time,
    /// rows, bytes) is answered with an error, never cut short.
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
    // At a low CPU priority, like dumps (see `background`): DuckDB runs most of a
    // query on the calling thread. At the default priority one client looping a
    // GROUP BY over the fleet's readings halved a 2,000-device fleet's rate on 2
    // cores and let the apply lag reach a million readings.
    // A client that goes away stops its query: dropping this future cancels it.
    let client = Client::of_token(token.unwrap_or_default());
    let _on_drop = CancelOnDrop(client.cancel.clone());
    let ran = crate::background::run("milepost-sql", move || {
        engine.collect(&sql, &params, &client)
    })
    .await;
    let (batches, summary) = match ran {
        Some(Ok(done)) => done,
        Some(Err(e)) => return SqlResponse::error(e),
        None => {
            tracing::error!("the query's thread failed");
            return SqlResponse::Internal(Json(ErrorBody::new("internal error")));
        }
    };
    let content = match format {
        SqlFormat::Table(f) => Ok(render(f, &batches, &summary)),
        SqlFormat::Arrow => arrow_stream(&batches, &summary).map(|b| SqlContent::Arrow(Binary(b))),
        SqlFormat::Parquet => {
            parquet_file(&batches, &summary).map(|b| SqlContent::Parquet(Binary(b)))
        }
    };
    match content {
        Ok(content) => SqlResponse::Ok(content, summary.rows),
        Err(e) => {
            tracing::error!(error = %e, "writing a query's result failed");
            SqlResponse::Internal(Json(ErrorBody::new("internal error; see the server log")))
        }
    }
}

/// The result as an Arrow IPC stream.
fn arrow_stream(batches: &[RecordBatch], summary: &SqlSummary) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut writer = StreamWriter::try_new(&mut out, &summary.schema).map_err(|e| e.to_string())?;
    for b in batches {
        writer.write(b).map_err(|e| e.to_string())?;
    }
    writer.finish().map_err(|e| e.to_string())?;
    drop(writer);
    Ok(out)
}

/// The result as a Parquet file, zstd-compressed like the lake's.
fn parquet_file(batches: &[RecordBatch], summary: &SqlSummary) -> Result<Vec<u8>, String> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, summary.schema.clone(), Some(props))
        .map_err(|e| e.to_string())?;
    for b in batches {
        writer.write(b).map_err(|e| e.to_string())?;
    }
    writer.close().map_err(|e| e.to_string())?;
    Ok(out)
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

fn render(format: Format, batches: &[RecordBatch], summary: &SqlSummary) -> SqlContent {
    let fields = summary.schema.fields();
    let names: Vec<String> = fields.iter().map(|f| f.name().clone()).collect();
    let rows = batches
        .iter()
        .flat_map(|b| (0..b.num_rows()).map(move |r| (b, r)));
    match format {
        Format::Json => SqlContent::Json(Json(SqlResult {
            columns: fields
                .iter()
                .map(|f| SqlColumn {
                    name: f.name().clone(),
                    type_name: type_name(f.data_type()),
                })
                .collect(),
            rows: rows
                .map(|(b, r)| b.columns().iter().map(|c| json_value(c, r)).collect())
                .collect(),
            row_count: summary.rows,
        })),
        Format::Ndjson => {
            let mut out = Vec::new();
            for (b, r) in rows {
                let object: serde_json::Map<String, Value> = names
                    .iter()
                    .zip(b.columns())
                    .map(|(n, c)| (n.clone(), json_value(c, r)))
                    .collect();
                serde_json::to_writer(&mut out, &object).expect("JSON into memory");
                out.push(b'\n');
            }
            SqlContent::Ndjson(Binary(out))
        }
        Format::Csv => {
            let mut out = String::new();
            let line = |fields: &mut dyn Iterator<Item = String>, out: &mut String| {
                let cells: Vec<String> = fields.map(|f| csv_field(&f)).collect();
                out.push_str(&cells.join(","));
                out.push('\n');
            };
            line(&mut names.iter().cloned(), &mut out);
            for (b, r) in rows {
                line(
                    &mut b.columns().iter().map(|c| {
                        if null_at(c, r) {
                            String::new()
                        } else {
                            text_value(c, r)
                        }
                    }),
                    &mut out,
                );
            }
            SqlContent::Csv(Binary(out.into_bytes()))
        }
    }
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
