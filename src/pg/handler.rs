//! The protocol's query handlers over [`SqlEngine`]: the simple protocol (psql)
//! and the extended one (drivers: parse, bind with parameters, describe, execute).
//! Session statements are answered here ([`super::session`]); everything else goes
//! through the sandbox, on a background thread, cancelled when the client sends a
//! cancel request or goes away.

use std::fmt::Debug;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::sink::Sink;
use futures_util::stream::{self, StreamExt};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DataRowEncoder, DescribePortalResponse, DescribeStatementResponse, FieldFormat, FieldInfo,
    QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, SessionExtensions, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use regex::Regex;

use super::encode;
use super::session::{self, Session};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::store::sql::arrow::record_batch::RecordBatch;
use crate::store::sql::{
    CancelOnDrop, Client, ParamType, SqlEngine, SqlError, SqlParam, SqlShape, SqlSummary,
};

/// A statement as the client sent it, with what the listener learnt of it.
#[derive(Debug, Clone)]
pub struct Statement {
    sql: String,
    /// Only comments (pgx's `-- ping`, Grafana's health check): answered as an
    /// empty query.
    empty: bool,
    /// Set when the listener answers it itself.
    session: Option<Session>,
    /// Parameter types as DuckDB's binder infers them (`ts > $1`: a timestamp),
    /// else as the text casts them (`$1::float8`); told to drivers that ask, and
    /// used to read the binary values they then send.
    param_types: Vec<Option<Type>>,
}

impl Statement {
    fn new(sql: &str) -> Self {
        Self {
            sql: sql.to_owned(),
            empty: COMMENTS
                .replace_all(sql, "")
                .trim_matches(|c: char| c == ';' || c.is_whitespace())
                .is_empty(),
            session: session::classify(sql),
            param_types: cast_types(sql),
        }
    }

    /// Whether the sandbox runs it (not answered by the listener itself).
    fn is_query(&self) -> bool {
        !self.empty && self.session.is_none()
    }

    /// With the parameter types DuckDB's binder inferred (`$1` first), where it
    /// could; the casts' types elsewhere.
    fn with_inferred(mut self, inferred: &[Option<ParamType>]) -> Self {
        if self.param_types.len() < inferred.len() {
            self.param_types.resize(inferred.len(), None);
        }
        for (slot, t) in self.param_types.iter_mut().zip(inferred) {
            if let Some(t) = t {
                *slot = Some(pg_param_type(*t));
            }
        }
        self
    }
}

static COMMENTS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?s)--[^\n]*|/\*.*?\*/").expect("comment pattern"));

static CAST: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\$(\d+)\s*::\s*(?:pg_catalog\.)?([a-z_][a-z0-9_ ]*[a-z0-9_])")
        .expect("cast pattern")
});

/// The PostgreSQL type a driver sends a parameter of type `t` as.
fn pg_param_type(t: ParamType) -> Type {
    match t {
        ParamType::Bool => Type::BOOL,
        ParamType::Int => Type::INT8,
        ParamType::Float => Type::FLOAT8,
        ParamType::Text => Type::TEXT,
        ParamType::Timestamp => Type::TIMESTAMP,
        ParamType::Date => Type::DATE,
    }
}

/// The types the text casts its parameters to, for what DuckDB's binder cannot
/// tell (a query on the catalog): drivers that ask the server for parameter
/// types (asyncpg) then send values of those types. The rest are text, which
/// DuckDB casts to what the query needs.
fn cast_types(sql: &str) -> Vec<Option<Type>> {
    let mut types: Vec<Option<Type>> = Vec::new();
    for c in CAST.captures_iter(sql) {
        let Ok(n) = c[1].parse::<usize>() else {
            continue;
        };
        if n == 0 || n > 1024 {
            continue;
        }
        let ty = match c[2].to_ascii_lowercase().split_whitespace().next() {
            Some("double" | "float8" | "float" | "real" | "float4") => Type::FLOAT8,
            Some("bigint" | "int8" | "int" | "integer" | "int4" | "smallint" | "int2") => {
                Type::INT8
            }
            Some("boolean" | "bool") => Type::BOOL,
            Some("timestamp" | "timestamptz" | "datetime") => Type::TIMESTAMP,
            Some("date") => Type::DATE,
            Some("text" | "varchar" | "string") => Type::TEXT,
            _ => continue,
        };
        if types.len() < n {
            types.resize(n, None);
        }
        types[n - 1].get_or_insert(ty);
    }
    types
}

/// Makes [`Statement`]s, with their parameters' types; the sandbox checks them
/// when they are described or run.
pub struct Parser {
    engine: Arc<SqlEngine>,
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Statement;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let stmt = Statement::new(sql);
        // No parameters (Grafana's queries come with their values in the text):
        // nothing to infer, and binding costs ~1.3 ms.
        if !stmt.is_query() || !sql.contains(['$', '?']) {
            return Ok(Some(stmt));
        }
        // Binding takes about a millisecond, under a lock shared by every
        // connection: off the async workers.
        let (engine, text) = (self.engine.clone(), sql.to_owned());
        let inferred = tokio::task::spawn_blocking(move || engine.param_types(&text))
            .await
            .unwrap_or_default();
        Ok(Some(stmt.with_inferred(&inferred)))
    }

    fn get_parameter_types(&self, stmt: &Statement) -> PgWireResult<Vec<Type>> {
        Ok(stmt
            .param_types
            .iter()
            .map(|t| t.clone().unwrap_or(Type::TEXT))
            .collect())
    }

    fn get_result_schema(
        &self,
        _stmt: &Statement,
        _format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        // Described by running the sandbox (`Handler::describe`), never from here.
        Ok(Vec::new())
    }
}

/// The listener's handlers, shared by every connection.
pub struct Handler {
    engine: Arc<SqlEngine>,
    parser: Arc<Parser>,
    metrics: Arc<Metrics>,
}

impl Handler {
    pub(super) fn new(engine: Arc<SqlEngine>, metrics: Arc<Metrics>) -> Self {
        Self {
            parser: Arc::new(Parser {
                engine: engine.clone(),
            }),
            engine,
            metrics,
        }
    }

    /// Runs `sql` on a background thread, its rows streamed as the client takes
    /// them ([`Streaming`]); the columns once the first batch (or the end) is
    /// there. An error before that is the answer; dropping the rows (a cancel
    /// request, the connection gone, a portal closed) cancels the query.
    async fn run(
        &self,
        sql: &str,
        params: Vec<SqlParam>,
        client: Client,
        format: &Format,
    ) -> PgWireResult<Response> {
        let sql = sql.to_owned();
        let on_drop = CancelOnDrop(client.cancel.clone());
        let mut pending = Pending {
            metrics: self.metrics.clone(),
            started: Instant::now(),
            done: false,
        };
        tracing::debug!(%sql, "pg query");
        let (tx, mut rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
        let engine = self.engine.clone();
        let query = tokio::spawn(async move { engine.run_to(sql, params, client, tx).await });
        let first = rx.recv().await;
        let (schema, query) = match &first {
            Some(batch) => (batch.schema(), Some(query)),
            None => {
                let ended = ended(query).await;
                pending.done = true;
                count(&self.metrics, &ended);
                (ended.map_err(error)?.schema, None)
            }
        };
        let fields = Arc::new(encode::fields(&schema, format));
        let state = Streaming {
            first,
            rx,
            query,
            fields: fields.clone(),
            pending,
            _on_drop: on_drop,
        };
        let rows = stream::unfold(state, Streaming::next).flat_map(stream::iter);
        Ok(Response::Query(QueryResponse::new(fields, rows)))
    }

    /// The shape of `sql` (columns, parameters), by the sandbox.
    async fn describe(
        &self,
        sql: &str,
        params: Vec<SqlParam>,
        client: Client,
    ) -> PgWireResult<SqlShape> {
        let sql = sql.to_owned();
        let _on_drop = CancelOnDrop(client.cancel.clone());
        let described = self
            .engine
            .in_background(move |e| e.describe(&sql, &params, &client))
            .await;
        // A query refused or failing here never runs: counted now. One that
        // passes is counted when it runs.
        if described.is_err() {
            count(&self.metrics, &described);
        }
        described.map_err(error)
    }

    /// Answers `stmt` with `params` for `client`, rows in `format`.
    async fn answer<C: ClientInfo + Sync>(
        &self,
        stmt: &Statement,
        params: Vec<SqlParam>,
        format: &Format,
        client: &C,
    ) -> PgWireResult<Response> {
        if stmt.empty {
            return Ok(Response::EmptyQuery);
        }
        if let Some(s) = &stmt.session {
            return session_response(s, client.session_extensions());
        }
        self.run(&stmt.sql, params, of(client), format).await
    }
}

/// Batches of one result the server holds while its client reads; the rest
/// waits in DuckDB (with `--pg-max-connections` 64 and two queries at once, a
/// collected result could hold the 64 MiB cap twice).
const IN_FLIGHT: usize = 2;

/// How a query's task ended.
async fn ended(
    query: tokio::task::JoinHandle<Result<SqlSummary, SqlError>>,
) -> Result<SqlSummary, SqlError> {
    query.await.unwrap_or_else(|e| {
        Err(SqlError::Store(crate::store::StoreError::Internal(
            format!("the query's task failed: {e}"),
        )))
    })
}

/// A result being streamed: batches as the query produces them (at most
/// [`IN_FLIGHT`] held), encoded a row at a time. A failure after rows were
/// sent ends them with the error, as PostgreSQL's results do, never a short
/// result; dropped, it cancels the query.
struct Streaming {
    first: Option<RecordBatch>,
    rx: tokio::sync::mpsc::Receiver<RecordBatch>,
    query: Option<tokio::task::JoinHandle<Result<SqlSummary, SqlError>>>,
    fields: Arc<Vec<FieldInfo>>,
    pending: Pending,
    _on_drop: CancelOnDrop,
}

impl Streaming {
    async fn next(mut self) -> Option<(encode::Rows, Self)> {
        let batch = match self.first.take() {
            Some(batch) => Some(batch),
            None => self.rx.recv().await,
        };
        if let Some(batch) = batch {
            return Some((encode::Rows::new(vec![batch], self.fields.clone()), self));
        }
        let ended = ended(self.query.take()?).await;
        self.pending.done = true;
        count(&self.pending.metrics, &ended);
        match ended {
            Ok(_) => None,
            Err(e) => Some((encode::Rows::failed(error(e), self.fields.clone()), self)),
        }
    }
}

/// The token digest a connection authenticated with (see `pg::Startup`): its
/// queries count against that client's share of the query slots.
#[derive(Debug, Clone)]
pub struct ClientId(pub String);

/// The session's own `statement_timeout` (`None`: the server's `--sql-timeout`).
#[derive(Debug, Clone, Copy)]
struct StatementTimeout(Option<Duration>);

/// A fresh [`Client`] for one query of `client`'s connection, with the session's
/// time limit and PostgreSQL's column names.
fn of<C: ClientInfo>(client: &C) -> Client {
    let extensions = client.session_extensions();
    let id = extensions
        .get::<ClientId>()
        .map(|c| c.0.clone())
        .unwrap_or_default();
    Client::new(id)
        .with_timeout(extensions.get::<StatementTimeout>().and_then(|t| t.0))
        .with_postgres_names()
}

/// Counts a query by its outcome.
fn count<T>(metrics: &Metrics, ran: &Result<T, SqlError>) {
    let outcome = match ran {
        Ok(_) => "ok",
        Err(SqlError::Refused(_)) => "refused",
        Err(SqlError::Query(_)) => "failed",
        Err(SqlError::Timeout(_) | SqlError::Stalled(_)) => "timeout",
        Err(SqlError::Cancelled) => "cancelled",
        Err(SqlError::TooLarge(_)) => "too_large",
        Err(
            SqlError::Busy
            | SqlError::ClientBusy(_)
            | SqlError::OverShare(_)
            | SqlError::ServerOverShare(_),
        ) => "busy",
        Err(SqlError::Store(_)) => "internal",
    };
    metrics
        .pg_queries
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
}

/// A running query's time, observed when it ends; counted as cancelled if its
/// future is dropped first (a cancel request, a connection gone).
struct Pending {
    metrics: Arc<Metrics>,
    started: Instant,
    done: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let m = &self.metrics;
        m.sql_seconds.observe(self.started.elapsed().as_secs_f64());
        if !self.done {
            count::<()>(m, &Err(SqlError::Cancelled));
        }
    }
}

/// The answer to a session statement; `session` keeps its `statement_timeout`.
fn session_response(s: &Session, session: &SessionExtensions) -> PgWireResult<Response> {
    Ok(match s {
        Session::Begin => Response::TransactionStart(Tag::new("BEGIN")),
        Session::End(tag) => Response::TransactionEnd(Tag::new(tag)),
        Session::Ack(tag) => Response::Execution(Tag::new(tag)),
        Session::Timeout { limit, tag } => {
            session.insert(StatementTimeout(*limit));
            Response::Execution(Tag::new(tag))
        }
        Session::Show { name, value } => {
            let value = if name == "statement_timeout" {
                session::show_timeout(session.get::<StatementTimeout>().and_then(|t| t.0))
            } else {
                value.clone()
            };
            let fields = Arc::new(vec![show_field(name)]);
            let mut encoder = DataRowEncoder::new(fields.clone());
            encoder.encode_field(&value.as_str())?;
            Response::Query(QueryResponse::new(
                fields,
                stream::iter([Ok(encoder.take_row())]),
            ))
        }
        Session::Refused { code, message } => return Err(user_error(code, message.clone())),
    })
}

fn show_field(name: &str) -> FieldInfo {
    FieldInfo::new(name.to_owned(), None, None, Type::TEXT, FieldFormat::Text)
}

fn user_error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_owned(),
        code.to_owned(),
        message,
    )))
}

/// A sandbox or DuckDB error with its SQLSTATE.
pub(super) fn error(e: SqlError) -> PgWireError {
    let code = match &e {
        SqlError::Refused(_) => "42501",
        SqlError::Query(m) => query_state(m),
        SqlError::Timeout(_) | SqlError::Stalled(_) | SqlError::Cancelled => "57014",
        SqlError::TooLarge(_) => "54000",
        SqlError::Busy
        | SqlError::ClientBusy(_)
        | SqlError::OverShare(_)
        | SqlError::ServerOverShare(_) => "53300",
        SqlError::Store(s) => {
            tracing::error!(error = %s, "pg query failed in the store");
            return user_error("XX000", "internal error; see the server log".into());
        }
    };
    user_error(code, e.to_string())
}

/// The SQLSTATE of a DuckDB error message, by its kind.
fn query_state(message: &str) -> &'static str {
    let kind = message.split(" Error:").next().unwrap_or_default();
    match kind {
        "Parser" => "42601",
        "Catalog" if message.contains("Function") => "42883",
        "Catalog" => "42P01",
        "Binder" if message.contains("column") => "42703",
        "Binder" => "42804",
        "Conversion" | "Invalid Input" => "22P02",
        "Out of Range" => "22003",
        "Division By Zero" => "22012",
        "INTERRUPT" => "57014",
        "Out of Memory" => "53200",
        _ => "42000",
    }
}

/// The portal's parameters as query values, by the type the client gave:
/// numbers, booleans and timestamps as such, the rest as text, which DuckDB casts
/// to what the query needs there. A value of a type the client left to the
/// server is read by the type the server described (binary values need one),
/// or as that text.
fn params(portal: &Portal<Statement>) -> PgWireResult<Vec<SqlParam>> {
    let stmt = &portal.statement;
    (0..portal.parameter_len())
        .map(|i| {
            if portal.parameters[i].is_none() {
                return Ok(SqlParam::Null);
            }
            let declared = stmt
                .parameter_types
                .get(i)
                .cloned()
                .flatten()
                .filter(|t| *t != Type::UNKNOWN);
            let ty = match declared {
                Some(t) => t,
                None if portal.parameter_format.is_binary(i) => stmt
                    .statement
                    .param_types
                    .get(i)
                    .cloned()
                    .flatten()
                    .unwrap_or(Type::TEXT),
                None => Type::TEXT,
            };
            param(portal, i, &ty)
        })
        .collect()
}

fn param(portal: &Portal<Statement>, i: usize, ty: &Type) -> PgWireResult<SqlParam> {
    let v = match *ty {
        Type::BOOL => portal.parameter::<bool>(i, ty)?.map(SqlParam::Bool),
        Type::INT2 => portal
            .parameter::<i16>(i, ty)?
            .map(|v| SqlParam::Int(v.into())),
        Type::INT4 => portal
            .parameter::<i32>(i, ty)?
            .map(|v| SqlParam::Int(v.into())),
        Type::INT8 => portal.parameter::<i64>(i, ty)?.map(SqlParam::Int),
        Type::FLOAT4 => portal
            .parameter::<f32>(i, ty)?
            .map(|v| SqlParam::Float(v.into())),
        Type::FLOAT8 => portal.parameter::<f64>(i, ty)?.map(SqlParam::Float),
        Type::TIMESTAMP => portal
            .parameter::<chrono::NaiveDateTime>(i, ty)?
            .map(SqlParam::Timestamp),
        Type::TIMESTAMPTZ => portal
            .parameter::<chrono::DateTime<chrono::FixedOffset>>(i, ty)?
            .map(|t| SqlParam::Timestamp(t.naive_utc())),
        Type::DATE => portal
            .parameter::<chrono::NaiveDate>(i, ty)?
            .map(|d| SqlParam::Text(d.to_string())),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            portal.parameter::<String>(i, ty)?.map(SqlParam::Text)
        }
        _ if !portal.parameter_format.is_binary(i) => {
            let bytes = portal.parameters[i].as_deref().unwrap_or_default();
            let text = std::str::from_utf8(bytes)
                .map_err(|_| user_error("22021", format!("parameter ${} is not UTF-8", i + 1)))?;
            Some(SqlParam::Text(text.to_owned()))
        }
        _ => {
            return Err(user_error(
                "0A000",
                format!(
                    "parameter ${} is binary {}, which is not supported: send it as text",
                    i + 1,
                    ty.name()
                ),
            ));
        }
    };
    Ok(v.unwrap_or(SqlParam::Null))
}

#[async_trait]
impl SimpleQueryHandler for Handler {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let stmt = Statement::new(query);
        Ok(vec![
            self.answer(&stmt, Vec::new(), &Format::UnifiedText, client)
                .await?,
        ])
    }
}

#[async_trait]
impl ExtendedQueryHandler for Handler {
    type Statement = Statement;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    async fn do_describe_statement<C>(
        &self,
        client: &mut C,
        target: &StoredStatement<Statement>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let stmt = &target.statement;
        if stmt.empty {
            return Ok(DescribeStatementResponse::new(Vec::new(), Vec::new()));
        }
        if let Some(s) = &stmt.session {
            return Ok(DescribeStatementResponse::new(
                Vec::new(),
                session_fields(s),
            ));
        }
        let shape = self.describe(&stmt.sql, Vec::new(), of(client)).await?;
        let types = (0..shape.params.max(target.parameter_types.len()))
            .map(|i| {
                target
                    .parameter_types
                    .get(i)
                    .cloned()
                    .flatten()
                    .filter(|t| *t != Type::UNKNOWN)
                    .or_else(|| stmt.param_types.get(i).cloned().flatten())
                    .unwrap_or(Type::TEXT)
            })
            .collect();
        Ok(DescribeStatementResponse::new(
            types,
            encode::fields(&shape.schema, &Format::UnifiedText),
        ))
    }

    async fn do_describe_portal<C>(
        &self,
        client: &mut C,
        portal: &Portal<Statement>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let stmt = &portal.statement.statement;
        if let Some(s) = &stmt.session {
            return Ok(DescribePortalResponse::new(session_fields(s)));
        }
        if stmt.empty {
            return Ok(DescribePortalResponse::new(Vec::new()));
        }
        let shape = self
            .describe(&stmt.sql, params(portal)?, of(client))
            .await?;
        Ok(DescribePortalResponse::new(encode::fields(
            &shape.schema,
            &portal.result_column_format,
        )))
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let values = params(portal)?;
        self.answer(
            &portal.statement.statement,
            values,
            &portal.result_column_format,
            client,
        )
        .await
    }
}

/// The row description of a session statement's answer.
fn session_fields(s: &Session) -> Vec<FieldInfo> {
    match s {
        Session::Show { name, .. } => vec![show_field(name)],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_types_come_from_casts() {
        assert_eq!(
            cast_types("SELECT * FROM readings WHERE value > $2::DOUBLE AND device = $1"),
            [None, Some(Type::FLOAT8)]
        );
        assert_eq!(
            cast_types("WHERE ts > $1::timestamp AND n < $3 :: pg_catalog.int8"),
            [Some(Type::TIMESTAMP), None, Some(Type::INT8)]
        );
        assert!(cast_types("SELECT $1").is_empty());
    }

    #[test]
    fn duckdb_errors_get_their_sqlstate() {
        assert_eq!(
            query_state("Parser Error: syntax error at or near \"SELEC\""),
            "42601"
        );
        assert_eq!(
            query_state("Catalog Error: Table with name nope does not exist!"),
            "42P01"
        );
        assert_eq!(
            query_state("Binder Error: Referenced column \"x\" not found"),
            "42703"
        );
        assert_eq!(
            query_state("Conversion Error: Could not convert string 'a' to INT32"),
            "22P02"
        );
        assert_eq!(query_state("something else"), "42000");
    }
}
