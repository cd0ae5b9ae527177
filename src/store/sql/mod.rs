//! SQL for users (SPEC 2.6): read-only queries over a documented relational
//! contract, sandboxed. This is the part that must hold whatever a user types; the
//! HTTP front end (`api::sql`) and the PostgreSQL one (`pg`) are thin over it.
//!
//! **The contract** is six views, made on each user connection as temporary views
//! (defined here, versioned with the binary; nothing is added to the file):
//! `readings(device, sensor, ts, value)`, `rollups_15m(device, sensor, bucket,
//! count, min, max, sum, first, last)` (ended quarter hours only: the live ones the
//! writer still holds are not in it), `devices(device)`, `sensors(name, unit,
//! description, min, max)`, `anomalies(…)` and `dumps(…)`. The views read what is
//! applied to DuckDB, which trails the acknowledged readings by the apply lag.
//!
//! **The sandbox**, by rule rather than by a list of bad words:
//! 1. DuckDB's own parser (`json_serialize_sql`) must read the text as exactly one
//!    `SELECT`; it serializes no other kind of statement, so DML, DDL, `COPY`,
//!    `ATTACH`, `PRAGMA`, `SET`, `INSTALL`/`LOAD`, `EXPORT`, `CALL`, `CHECKPOINT`,
//!    `PREPARE` … are refused whatever they are.
//! 2. Every relation read is a contract view, or a common table expression in
//!    scope, by a plain identifier, unqualified or (a view) in schema `main`, which
//!    is where the catalog lists them and how BI tools write them: no table function (`read_csv`,
//!    `glob`, `read_text`, `range`, `query` …), no file path (`FROM 'x.csv'`, also
//!    not as a CTE's name, which out of its scope DuckDB would read as a file), no
//!    qualified name (the internal tables, other catalogs), no `SHOW`/`DESCRIBE`.
//!    The one exception is the catalog: a query that reads `pg_catalog` or
//!    `information_schema` (what psql, drivers and Grafana ask) runs on a separate
//!    in-memory DuckDB instance that holds the contract's relations as empty
//!    tables and nothing else, with file access off and its settings locked
//!    ([`catalog`]); it may not also read the views.
//! 3. Functions are DuckDB's built-ins, unqualified (or `pg_catalog.`, which sends
//!    the query to the catalog), except those with state or that read the
//!    instance: `nextval`, `currval`, `setseed`, `getvariable`, `getenv`, and
//!    `current_setting` outside the catalog.
//! 4. The connection's `search_path` is only `temp` (where the views are): should a
//!    name get past the rules that is no view or CTE, it finds no internal table.
//! 5. A time limit interrupts DuckDB itself (not just the client, and also when
//!    the client stops taking the result), results are capped in rows and bytes,
//!    at most `max_concurrent` queries run at once, one per client, and each
//!    client's queries get a share of the server's time (`time_share`).
//!
//! **Parameter types** (what drivers such as asyncpg ask before they send
//! values) come from DuckDB's binder on a third, in-memory instance of empty
//! relations, for queries that passed the rules ([`binder`]).

use std::sync::mpsc::{RecvTimeoutError, channel};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use duckdb::Connection;
pub use duckdb::arrow;
use duckdb::arrow::datatypes::SchemaRef;
use duckdb::arrow::record_batch::RecordBatch;
use serde_json::Value;

use super::pool::Pool;
use super::{Shared, StoreError};

mod binder;
mod catalog;
mod names;

pub use binder::ParamType;

/// The relations users may read.
pub const RELATIONS: [&str; 6] = [
    "readings",
    "rollups_15m",
    "devices",
    "sensors",
    "anomalies",
    "dumps",
];

/// The PostgreSQL version Milepost's SQL answers as (its protocol and catalog
/// forms are 16's, so psql and drivers speak to it as to a 16).
pub const SERVER_VERSION: &str = "16.6 (Milepost)";

/// The settings clients may ask for (`SHOW`, `current_setting`), as PostgreSQL
/// names them (lower case), and their values here.
pub const SETTINGS: [(&str, &str); 22] = [
    ("server_version", SERVER_VERSION),
    ("server_version_num", "160006"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("timezone", "UTC"),
    ("datestyle", "ISO, YMD"),
    ("intervalstyle", "postgres"),
    ("standard_conforming_strings", "on"),
    ("integer_datetimes", "on"),
    ("transaction_isolation", "read committed"),
    ("default_transaction_isolation", "read committed"),
    ("transaction_read_only", "on"),
    ("default_transaction_read_only", "on"),
    ("search_path", "main"),
    ("max_identifier_length", "63"),
    ("lc_collate", "C"),
    ("lc_ctype", "C"),
    ("bytea_output", "hex"),
    ("is_superuser", "off"),
    ("application_name", ""),
    ("statement_timeout", "0"),
    ("max_index_keys", "32"),
];

/// The value of setting `name` (lower case) in [`SETTINGS`].
pub fn setting(name: &str) -> Option<&'static str> {
    SETTINGS.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// Built-in functions refused: they keep state or read the instance.
const REFUSED_FUNCTIONS: [&str; 5] = ["nextval", "currval", "setseed", "getvariable", "getenv"];

/// Why a user query did not answer.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// Against the sandbox's rules.
    #[error("{0}")]
    Refused(String),
    /// DuckDB refused or failed the query (its message, position included).
    #[error("{0}")]
    Query(String),
    /// Stopped at the time limit.
    #[error("the query ran longer than {0:?} and was stopped")]
    Timeout(Duration),
    /// Stopped because its client asked (a cancel request, a closed connection).
    #[error("the query was cancelled")]
    Cancelled,
    /// Stopped because its client took none of the result for this long: a
    /// stalled reader must not hold a query's slot.
    #[error("the client took none of the result for {0:?}; the query was stopped")]
    Stalled(Duration),
    /// The result went past the cap.
    #[error("the result is larger than {0}")]
    TooLarge(String),
    /// Every slot for queries stayed taken.
    #[error("too many queries are running; try again shortly")]
    Busy,
    /// The client's own queries took its share of the slots.
    #[error("this client already runs {0} queries at once, its most; try again when one ends")]
    ClientBusy(usize),
    /// The client's queries used up their share of time (see
    /// [`SqlLimits::time_share`]); the budget allows the next one after this long.
    #[error(
        "this client's queries used up their share of the server's time; try again in {} s",
        .0.as_secs().max(1)
    )]
    OverShare(Duration),
    /// All clients' queries together used up the server's share of time for them
    /// (see [`SqlLimits::total_share`]); the next may start after this long.
    #[error(
        "users' queries used up their share of the server's time; try again in {} s",
        .0.as_secs().max(1)
    )]
    ServerOverShare(Duration),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<duckdb::Error> for SqlError {
    fn from(e: duckdb::Error) -> Self {
        Self::Query(e.to_string())
    }
}

/// A value for a query's positional parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlParam {
    /// NULL.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// Text (DuckDB casts it to the type the query needs there).
    Text(String),
    /// A timestamp (UTC).
    Timestamp(chrono::NaiveDateTime),
}

impl SqlParam {
    fn to_duckdb(&self) -> duckdb::types::Value {
        use duckdb::types::Value as D;
        match self {
            Self::Null => D::Null,
            Self::Bool(b) => D::Boolean(*b),
            Self::Int(i) => D::BigInt(*i),
            Self::Float(f) => D::Double(*f),
            Self::Text(s) => D::Text(s.clone()),
            Self::Timestamp(t) => D::Timestamp(
                duckdb::types::TimeUnit::Microsecond,
                t.and_utc().timestamp_micros(),
            ),
        }
    }
}

/// Bounds on user queries.
#[derive(Debug, Clone)]
pub struct SqlLimits {
    /// Longest a query runs.
    pub timeout: Duration,
    /// Most rows of a result.
    pub max_rows: u64,
    /// Most bytes of a result (Arrow's in-memory size).
    pub max_bytes: u64,
    /// Queries at once.
    pub max_concurrent: usize,
    /// Queries at once of one client (a token), so that one client cannot take
    /// every slot.
    pub max_per_client: usize,
    /// How long a query waits for a slot before [`SqlError::Busy`], or for its
    /// client's time budget before [`SqlError::OverShare`].
    pub queue_wait: Duration,
    /// The share of time one client's queries may take over a longer run: each
    /// client has a budget of query time that fills at this many seconds a second
    /// and holds at most [`BUDGET_HELD`] (less if `timeout` is shorter); a query's
    /// time is taken from it when it ends, and a query starts only while it is
    /// positive, so one long query may drive it far below zero. 1 (or more) turns
    /// it off. Without
    /// it, one client looping a heavy query costs live ingest a third of its rate
    /// on two cores, whatever the query's thread priority (docs/performance.md).
    pub time_share: f64,
    /// The share of time all clients' queries together may take: a budget like
    /// each client's, server-wide, so that many tokens cannot add their shares up
    /// to the whole machine. It holds back only clients whose own budget is not
    /// full, so that heavy ones cannot starve someone's occasional query. 1 (or
    /// more) turns it off.
    pub total_share: f64,
}

impl Default for SqlLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            max_rows: 1_000_000,
            max_bytes: 64 << 20,
            max_concurrent: 2,
            max_per_client: 1,
            queue_wait: Duration::from_secs(1),
            time_share: 0.25,
            total_share: 0.25,
        }
    }
}

/// Where a query that passed the checks runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// On the database's connections, over the contract's views.
    Data,
    /// On the catalog instance (`pg_catalog`, `information_schema`), which holds
    /// the contract's relations as empty tables and nothing else (see [`catalog`]).
    Catalog,
}

/// Schemas that name the catalog.
const CATALOG_SCHEMAS: [&str; 2] = ["pg_catalog", "information_schema"];

/// What a walk over a syntax tree found.
#[derive(Default)]
struct Found {
    /// A catalog relation or a `pg_catalog.` function.
    catalog: bool,
    /// A contract view.
    data: bool,
    /// The first table function.
    table_function: Option<String>,
    /// The first function allowed on the catalog instance only.
    catalog_function: Option<String>,
}

/// Checks `sql` against rules 1–3 (see the module docs), with DuckDB's parser on
/// `conn`, and tells where it runs.
pub fn check(conn: &Connection, sql: &str) -> Result<Route, SqlError> {
    route(&parse(conn, sql)?)
}

/// Rules 1–3 over DuckDB's syntax tree of a query: where it runs, if anywhere.
fn route(tree: &Value) -> Result<Route, SqlError> {
    if tree["error"] == Value::Bool(true) {
        let message = tree["error_message"].as_str().unwrap_or("not a query");
        return Err(if tree["error_type"] == "not implemented" {
            SqlError::Refused(
                "only a read statement (one SELECT, WITH … SELECT, FROM …, VALUES …) may run"
                    .into(),
            )
        } else if tree["error_type"] == "parser" {
            // As DuckDB words its own errors (the PostgreSQL listener reads the kind).
            SqlError::Query(format!("Parser Error: {message}"))
        } else {
            SqlError::Query(message.to_owned())
        });
    }
    let statements = tree["statements"].as_array().map_or(0, Vec::len);
    if statements != 1 {
        return Err(SqlError::Refused(format!(
            "one statement at a time ({statements} given)"
        )));
    }
    let mut found = Found::default();
    walk(&tree["statements"][0], &mut Vec::new(), &mut found)?;
    if found.catalog && found.data {
        return Err(SqlError::Refused(
            "a query reads the catalog (pg_catalog, information_schema) or the data, not both"
                .into(),
        ));
    }
    if found.catalog {
        return Ok(Route::Catalog);
    }
    if let Some(name) = found.table_function {
        return Err(SqlError::Refused(format!(
            "table functions such as {name}() cannot be used: read the views {}",
            RELATIONS.join(", ")
        )));
    }
    if let Some(name) = found.catalog_function {
        return Err(SqlError::Refused(format!("{name}() cannot be used here")));
    }
    Ok(Route::Data)
}

/// DuckDB's syntax tree of `sql` (`json_serialize_sql`), parsed on `conn`.
fn parse(conn: &Connection, sql: &str) -> Result<Value, SqlError> {
    // Cached per connection: planning this statement anew took about half of the
    // parse's 0.8 ms, and a driver's query is parsed three times (its
    // parameters' types, its description, its run).
    let json: String = conn
        .prepare_cached("SELECT json_serialize_sql(?::VARCHAR)")?
        .query_row([sql], |r| r.get(0))?;
    Ok(serde_json::from_str(&json)
        .map_err(|e| StoreError::Internal(format!("DuckDB's syntax tree: {e}")))?)
}

/// The CTE names a node defines (they are in scope in the node and below it, as
/// DuckDB binds them). A name that is not a plain identifier is refused: quoted, it
/// could name a file (`WITH "x.csv" AS …`), and a reference to it out of the CTE's
/// scope would then read that file through DuckDB's replacement scans.
fn defined_ctes(map: &serde_json::Map<String, Value>) -> Result<Vec<String>, SqlError> {
    let Some(entries) = map
        .get("cte_map")
        .and_then(|m| m.get("map"))
        .and_then(Value::as_array)
    else {
        return Ok(Vec::new());
    };
    entries
        .iter()
        .filter_map(|e| e["key"].as_str())
        .map(|k| {
            if plain_identifier(k) {
                Ok(k.to_lowercase())
            } else {
                Err(SqlError::Refused(format!(
                    "a common table expression's name is a plain identifier, not '{k}'"
                )))
            }
        })
        .collect()
}

/// Letters, digits and underscores, not starting with a digit.
fn plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks `node` and everything below it; `scope`: the CTE names of the nodes
/// above.
fn walk(node: &Value, scope: &mut Vec<String>, found: &mut Found) -> Result<(), SqlError> {
    match node {
        Value::Object(map) => {
            let defined = defined_ctes(map)?;
            let outer = scope.len();
            scope.extend(defined);
            let checked = walk_object(map, scope, found);
            scope.truncate(outer);
            checked
        }
        Value::Array(items) => items.iter().try_for_each(|v| walk(v, scope, found)),
        _ => Ok(()),
    }
}

fn walk_object(
    map: &serde_json::Map<String, Value>,
    scope: &mut Vec<String>,
    found: &mut Found,
) -> Result<(), SqlError> {
    match map.get("type").and_then(Value::as_str) {
        Some("BASE_TABLE") => base_table(map, scope, found)?,
        Some("TABLE_FUNCTION") => {
            let name = map["function"]["function_name"].as_str().unwrap_or("?");
            found.table_function.get_or_insert_with(|| name.to_owned());
        }
        Some(t @ ("SHOW_REF" | "COLUMN_DATA" | "DELIM_GET")) => {
            return Err(SqlError::Refused(format!("{t} cannot be used here")));
        }
        _ => {}
    }
    if map.get("class").and_then(Value::as_str) == Some("FUNCTION") {
        function(map, found)?;
    }
    map.values().try_for_each(|v| walk(v, scope, found))
}

/// A non-empty string field of a syntax-tree node.
fn field<'a>(map: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a str> {
    map.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn base_table(
    map: &serde_json::Map<String, Value>,
    scope: &[String],
    found: &mut Found,
) -> Result<(), SqlError> {
    let name = map["table_name"].as_str().unwrap_or_default();
    let lower = name.to_lowercase();
    let schema = field(map, "schema_name").map(str::to_lowercase);
    let catalog = field(map, "catalog_name");
    let in_scope = scope.contains(&lower);
    // `pg_catalog.pg_class`, `information_schema.columns`, and `pg_class` when no
    // CTE of that name is in scope: the catalog instance answers them.
    let catalog_relation = catalog.is_none()
        && match schema.as_deref() {
            Some(s) => CATALOG_SCHEMAS.contains(&s),
            None => !in_scope && lower.starts_with("pg_"),
        };
    if catalog_relation && plain_identifier(name) {
        found.catalog = true;
        return Ok(());
    }
    let known = RELATIONS.contains(&lower.as_str()) || in_scope;
    // `main.readings`, `"main"."readings"`: the schema the catalog lists the
    // relations in, as BI tools qualify every name they generate. It names a
    // contract view only: the connection's search path holds only `temp`, whose
    // schema is `main` too, so DuckDB finds the view there and never the
    // database's table of that name (unit test `qualified_names_read_the_views`).
    let qualified_view =
        schema.as_deref() == Some("main") && RELATIONS.contains(&lower.as_str()) && !in_scope;
    if (schema.is_some() && !qualified_view)
        || catalog.is_some()
        || !plain_identifier(name)
        || !known
    {
        return Err(SqlError::Refused(format!(
            "'{name}' cannot be read: the readable relations are {}",
            RELATIONS.join(", ")
        )));
    }
    found.data |= !in_scope;
    Ok(())
}

fn function(map: &serde_json::Map<String, Value>, found: &mut Found) -> Result<(), SqlError> {
    let name = map["function_name"].as_str().unwrap_or_default();
    let lower = name.to_lowercase();
    let schema = field(map, "schema").map(str::to_lowercase);
    let refused = |name: &str| Err(SqlError::Refused(format!("{name}() cannot be used here")));
    if field(map, "catalog").is_some() {
        return refused(name);
    }
    match schema.as_deref() {
        Some("pg_catalog" | "information_schema") => found.catalog = true,
        Some(_) => return refused(name),
        None => {}
    }
    if catalog::CATALOG_FUNCTIONS.contains(&lower.as_str()) {
        found.catalog = true;
    } else if catalog::CATALOG_ONLY_FUNCTIONS.contains(&lower.as_str()) {
        found
            .catalog_function
            .get_or_insert_with(|| name.to_owned());
    } else if REFUSED_FUNCTIONS.contains(&lower.as_str()) {
        return refused(name);
    }
    Ok(())
}

/// The contract's views on a user connection; `db` is the database's catalog name,
/// `rollups_before` a variable set before each query (the writer's live boundary).
/// `now()` and `current_timestamp` answer UTC as a `TIMESTAMP`, the type of the
/// views' times: DuckDB's own are `TIMESTAMP WITH TIME ZONE`, which this build
/// (no ICU) cannot subtract an interval from or compare, so
/// `ts > now() - INTERVAL 1 DAY` would not bind.
fn views(db: &str) -> String {
    format!(
        "CREATE OR REPLACE TEMP VIEW readings AS
             SELECT d.name AS device, s.name AS sensor,
                    make_timestamp(r.ts_ms * 1000 + r.ts_us) AS ts, r.value
             FROM {db}.main.readings r
             JOIN {db}.main.devices d ON d.id = r.device_id
             JOIN {db}.main.sensors s ON s.id = r.sensor_id;
         CREATE OR REPLACE TEMP VIEW rollups_15m AS
             SELECT d.name AS device, s.name AS sensor, make_timestamp(r.slot_ms * 1000) AS bucket,
                    sum(r.readings)::BIGINT AS count, min(r.min_value) AS min,
                    max(r.max_value) AS max, sum(r.sum_value) AS sum,
                    arg_min(r.first_value, r.first_us) AS first,
                    arg_max(r.last_value, r.last_us) AS last
             FROM {db}.main.rollups r
             JOIN {db}.main.devices d ON d.id = r.device_id
             JOIN {db}.main.sensors s ON s.id = r.sensor_id
             WHERE r.slot_ms < getvariable('rollups_before')
             GROUP BY ALL;
         CREATE OR REPLACE TEMP VIEW devices AS
             SELECT name AS device FROM {db}.main.devices;
         CREATE OR REPLACE TEMP VIEW sensors AS
             SELECT name, unit, description, min_value AS min, max_value AS max
             FROM {db}.main.sensors;
         CREATE OR REPLACE TEMP VIEW anomalies AS
             SELECT id, alert_id, device, sensor, make_timestamp(step_us) AS step,
                    make_timestamp(window_start_us) AS window_start,
                    make_timestamp(window_end_us) AS window_end,
                    before_mean, after_mean, statistic, direction, status, message,
                    make_timestamp(detected_us) AS detected
             FROM {db}.main.anomalies;
         CREATE OR REPLACE TEMP VIEW dumps AS
             SELECT day, format, object_key, readings, bytes, sha256, min_ts, max_ts,
                    generated_at
             FROM {db}.main.dumps;
         CREATE OR REPLACE TEMP MACRO now() AS CAST(transaction_timestamp() AS TIMESTAMP);
         CREATE OR REPLACE TEMP MACRO get_current_timestamp()
             AS CAST(transaction_timestamp() AS TIMESTAMP);
         SET search_path = 'temp';"
    )
}

/// What a query returned.
#[derive(Debug, Clone)]
pub struct SqlSummary {
    /// Rows delivered.
    pub rows: u64,
    /// Their size in Arrow's memory.
    pub bytes: u64,
    /// The result's columns (also when it has no rows).
    pub schema: arrow::datatypes::SchemaRef,
    /// How many positional parameters the text has.
    pub params: usize,
}

/// A query's shape, learnt without running it (the PostgreSQL protocol's
/// `Describe`).
#[derive(Debug, Clone)]
pub struct SqlShape {
    /// The result's columns.
    pub schema: arrow::datatypes::SchemaRef,
    /// How many positional parameters the text has.
    pub params: usize,
}

/// Who runs a query: the client it counts against (`max_per_client`), and how to
/// stop it.
#[derive(Clone, Default)]
pub struct Client {
    /// Identifies the client, e.g. a digest of its token.
    pub id: String,
    /// Cancels its query.
    pub cancel: Cancel,
    /// The client's own time limit (PostgreSQL's `statement_timeout`), which can
    /// only shorten [`SqlLimits::timeout`].
    pub timeout: Option<Duration>,
    /// Name unaliased columns as PostgreSQL does (`avg`, `count`, `?column?`;
    /// see [`names`]) rather than as DuckDB does (`avg("value")`): the PostgreSQL
    /// listener's clients take series and field names from them.
    pub postgres_names: bool,
}

impl Client {
    /// A client known by `id`, with a fresh [`Cancel`].
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            cancel: Cancel::default(),
            timeout: None,
            postgres_names: false,
        }
    }

    /// This client with PostgreSQL's column names.
    pub fn with_postgres_names(mut self) -> Self {
        self.postgres_names = true;
        self
    }

    /// This client with its own time limit.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// The client of a token: known by a digest of it (the token itself is kept
    /// nowhere), with a fresh [`Cancel`].
    pub fn of_token(token: &str) -> Self {
        use sha2::Digest as _;
        Self::new(hex::encode(&sha2::Sha256::digest(token.as_bytes())[..12]))
    }
}

/// Stops a query from outside: its client cancelled it or went away. Cheap to
/// clone; [`Cancel::cancel`] on any clone interrupts DuckDB if a query given this
/// token runs, and refuses the queries given it later.
#[derive(Clone, Default)]
pub struct Cancel(Arc<CancelState>);

#[derive(Default)]
struct CancelState {
    cancelled: std::sync::atomic::AtomicBool,
    /// The running query's interrupt.
    running: Mutex<Option<Arc<duckdb::InterruptHandle>>>,
}

impl Cancel {
    /// Stops the running query, and any later one given this token.
    pub fn cancel(&self) {
        self.0
            .cancelled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = &*self.0.running.lock().expect("cancel") {
            h.interrupt();
        }
    }

    /// Whether [`Self::cancel`] was called.
    pub fn cancelled(&self) -> bool {
        self.0.cancelled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Marks `conn`'s query as the one to interrupt until the guard is dropped.
    fn attach(&self, conn: &Connection) -> Result<Attached<'_>, SqlError> {
        *self.0.running.lock().expect("cancel") = Some(conn.interrupt_handle());
        // Checked after the handle is in place: a cancel between the two still
        // interrupts.
        if self.cancelled() {
            *self.0.running.lock().expect("cancel") = None;
            return Err(SqlError::Cancelled);
        }
        Ok(Attached(self))
    }
}

/// Cancels when dropped: held by a request's future, so that a client gone away
/// (the future dropped) stops its query.
pub struct CancelOnDrop(pub Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// See [`Cancel::attach`].
struct Attached<'a>(&'a Cancel);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        *self.0.0.running.lock().expect("cancel") = None;
    }
}

/// A checked query's run: its parameters, mode, client, and the names its
/// columns get instead of DuckDB's (see [`Client::postgres_names`]).
struct Run<'a> {
    params: &'a [SqlParam],
    mode: Mode,
    client: &'a Client,
    names: Option<&'a [String]>,
}

/// `schema` with its columns named `names`, if there is one a column.
fn renamed(schema: &SchemaRef, names: &[String]) -> SchemaRef {
    if names.len() != schema.fields().len() {
        return schema.clone();
    }
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .zip(names)
        .map(|(f, name)| f.as_ref().clone().with_name(name))
        .collect();
    Arc::new(duckdb::arrow::datatypes::Schema::new(fields))
}

/// What [`SqlEngine::execute`] does with a checked query.
#[derive(Clone, Copy)]
enum Mode {
    /// Runs it.
    Run,
    /// Runs it under `LIMIT 0` with NULL parameters, for its columns.
    Describe,
}

/// User queries: their own connections, at most `max_concurrent` at once.
pub struct SqlEngine {
    /// The queries' connections, each with the contract's views.
    pool: Pool,
    shared: Arc<Shared>,
    catalog: catalog::Catalog,
    /// Infers parameters' types (DuckDB's binder, without the data); opened on
    /// first use (only PostgreSQL drivers ask; ~3 MiB), `None` if it failed to.
    binder: OnceLock<Option<binder::Binder>>,
    /// The contract's relations as empty tables, for the binder.
    tables: String,
    running: Mutex<Running>,
    freed: Condvar,
    limits: SqlLimits,
}

impl SqlEngine {
    pub(super) fn new(
        base: Connection,
        shared: Arc<Shared>,
        limits: SqlLimits,
    ) -> Result<Self, StoreError> {
        let db: String = base.query_row("SELECT current_database()", [], |r| r.get(0))?;
        // Idle connections beyond the slots are never needed.
        let pool = Pool::new(base, limits.max_concurrent.max(1)).with_setup(views(&db));
        let tables = pool.with(catalog::relation_tables)?;
        let catalog = catalog::Catalog::new(&tables)?;
        Ok(Self {
            pool,
            shared,
            catalog,
            binder: OnceLock::new(),
            tables,
            running: Mutex::new(Running::default()),
            freed: Condvar::new(),
            limits,
        })
    }

    /// Runs `sql` if the sandbox allows it, handing the result to `sink` batch by
    /// batch; stops at the first cap reached (the batches given so far stand), or
    /// when `cancel` is cancelled.
    pub fn run(
        &self,
        sql: &str,
        params: &[SqlParam],
        client: &Client,
        sink: &mut dyn FnMut(&RecordBatch) -> Result<(), SqlError>,
    ) -> Result<SqlSummary, SqlError> {
        self.execute(sql, params, Mode::Run, client, sink)
    }

    /// Runs `f` on a thread of its own at a low CPU priority, like dumps (see
    /// `background`): DuckDB runs most of a query on the calling thread, and the
    /// front ends' async tasks must not wait on it.
    pub async fn in_background<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&SqlEngine) -> Result<T, SqlError> + Send + 'static,
    ) -> Result<T, SqlError> {
        let engine = self.clone();
        crate::background::run("milepost-sql", move || f(&engine))
            .await
            .unwrap_or_else(|| {
                Err(SqlError::Store(StoreError::Internal(
                    "the query's thread failed".into(),
                )))
            })
    }

    /// Runs `sql` on a background thread ([`Self::in_background`]), handing its
    /// batches to `tx` as the receiver takes them (the channel's capacity is all
    /// the server holds). A receiver that takes no batch for the time limit stops
    /// the query ([`SqlError::Stalled`]); one dropped cancels it.
    pub async fn run_to(
        self: &Arc<Self>,
        sql: String,
        params: Vec<SqlParam>,
        client: Client,
        tx: tokio::sync::mpsc::Sender<RecordBatch>,
    ) -> Result<SqlSummary, SqlError> {
        let runtime = tokio::runtime::Handle::current();
        let stall = self.time_limit(&client);
        self.in_background(move |e| {
            e.run(&sql, &params, &client, &mut |b| {
                let sent = runtime.block_on(async {
                    // Made inside: a timer needs the runtime's context.
                    tokio::time::timeout(stall, tx.send(b.clone())).await
                });
                match sent {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(SqlError::Cancelled),
                    Err(_) => Err(SqlError::Stalled(stall)),
                }
            })
        })
        .await
    }

    /// A query's time limit: the server's, or the client's own if shorter.
    fn time_limit(&self, client: &Client) -> Duration {
        client
            .timeout
            .map_or(self.limits.timeout, |t| t.min(self.limits.timeout))
    }

    /// [`Self::run`], the result's batches collected.
    pub fn collect(
        &self,
        sql: &str,
        params: &[SqlParam],
        client: &Client,
    ) -> Result<(Vec<RecordBatch>, SqlSummary), SqlError> {
        let mut batches = Vec::new();
        let summary = self.run(sql, params, client, &mut |b| {
            batches.push(b.clone());
            Ok(())
        })?;
        Ok((batches, summary))
    }

    /// The types DuckDB's binder gives the parameters of `sql` (`$1` first), `None`
    /// where it cannot tell; empty when the sandbox would refuse `sql`, it reads
    /// the catalog, or it does not bind. Reads no data, takes no query slot
    /// (a driver asks this when it prepares a statement).
    pub fn param_types(&self, sql: &str) -> Vec<Option<ParamType>> {
        let binder = self.binder.get_or_init(|| {
            binder::Binder::new(&self.tables)
                .inspect_err(|e| tracing::warn!("parameter types will not be inferred: {e}"))
                .ok()
        });
        binder
            .as_ref()
            .map(|b| b.param_types(&catalog::compatible(sql)))
            .unwrap_or_default()
    }

    /// The columns `sql` would answer with and its number of parameters, checked
    /// as [`Self::run`] checks it but without reading any data. `params` are the
    /// values when known (the types of the columns may depend on them); missing
    /// ones are NULL.
    pub fn describe(
        &self,
        sql: &str,
        params: &[SqlParam],
        client: &Client,
    ) -> Result<SqlShape, SqlError> {
        let summary = self.execute(sql, params, Mode::Describe, client, &mut |_| Ok(()))?;
        Ok(SqlShape {
            schema: summary.schema,
            params: summary.params,
        })
    }

    fn execute(
        &self,
        sql: &str,
        params: &[SqlParam],
        mode: Mode,
        client: &Client,
        sink: &mut dyn FnMut(&RecordBatch) -> Result<(), SqlError>,
    ) -> Result<SqlSummary, SqlError> {
        let _span = tracing::debug_span!("user_sql").entered();
        tracing::debug!(sql, "user query");
        let sql = catalog::compatible(sql);
        let cancel = &client.cancel;
        let _slot = self.slot(&client.id, cancel)?;
        // Reused whatever the outcome: a statement runs on its own (auto-commit, a
        // failure rolls it back) and the sandbox lets none change the connection.
        self.pool.with(|conn| {
            let tree = parse(conn, &sql)?;
            let route = route(&tree)?;
            // The tree names the columns as PostgreSQL would, for clients that want it.
            let names = client
                .postgres_names
                .then(|| names::postgres(&tree))
                .flatten();
            let run = Run {
                params,
                mode,
                client,
                names: names.as_deref(),
            };
            match route {
                Route::Data => {
                    // Read-your-writes: readings acknowledged before the query are
                    // applied to DuckDB first (the writer is asked to move the ingest log
                    // now; a short wait).
                    if matches!(mode, Mode::Run) {
                        self.shared.await_visible();
                    }
                    let before = self.shared.rollups_from();
                    conn.execute_batch(&format!(
                        "SET VARIABLE rollups_before = CAST('{before}' AS BIGINT)"
                    ))
                    .map_err(SqlError::from)
                    .and_then(|()| self.watched(conn, &sql, &run, sink))
                }
                Route::Catalog => {
                    let sql = catalog::for_catalog(&sql);
                    self.catalog
                        .pool
                        .with(|c| self.watched(c, &sql, &run, sink))
                }
            }
        })
    }

    /// Runs a checked query on `conn` under the time limit (the client's, if
    /// shorter) and the client's cancel.
    fn watched(
        &self,
        conn: &Connection,
        sql: &str,
        run: &Run<'_>,
        sink: &mut dyn FnMut(&RecordBatch) -> Result<(), SqlError>,
    ) -> Result<SqlSummary, SqlError> {
        let client = run.client;
        let cancel = &client.cancel;
        let attached = cancel.attach(conn)?;
        let (stop, stopped) = channel::<()>();
        let interrupt = conn.interrupt_handle();
        let timeout = self.time_limit(client);
        let watchdog = std::thread::spawn(move || {
            let late = stopped.recv_timeout(timeout) == Err(RecvTimeoutError::Timeout);
            if late {
                interrupt.interrupt();
            }
            late
        });
        let started = Instant::now();
        let result = self.stream(conn, sql, run, sink);
        drop(stop);
        drop(attached);
        let late = watchdog.join().unwrap_or(false);
        match result {
            Err(SqlError::Query(_)) if cancel.cancelled() => Err(SqlError::Cancelled),
            Err(SqlError::Query(_)) if late || started.elapsed() >= timeout => {
                Err(SqlError::Timeout(timeout))
            }
            other => other,
        }
    }

    fn stream(
        &self,
        conn: &Connection,
        sql: &str,
        run: &Run<'_>,
        sink: &mut dyn FnMut(&RecordBatch) -> Result<(), SqlError>,
    ) -> Result<SqlSummary, SqlError> {
        let (params, mode) = (run.params, run.mode);
        let mut stmt = match mode {
            Mode::Run => conn.prepare(sql)?,
            // The text is one checked statement; a newline ends a trailing comment.
            Mode::Describe => conn.prepare(&format!(
                "SELECT * FROM (\n{}\n) AS described LIMIT 0",
                sql.trim_end().trim_end_matches(';')
            ))?,
        };
        let count = stmt.parameter_count();
        let mut values: Vec<duckdb::types::Value> =
            params.iter().map(SqlParam::to_duckdb).collect();
        if matches!(mode, Mode::Describe) {
            values.resize(count, duckdb::types::Value::Null);
        } else if values.len() != count {
            return Err(SqlError::Query(format!(
                "the query has {count} parameters, {} values were given",
                values.len()
            )));
        }
        let (mut rows, mut bytes) = (0u64, 0u64);
        // DuckDB's streaming execution: chunks are produced as they are taken, so
        // neither DuckDB nor the server holds a whole result (`query_arrow`
        // materializes it first: two 900,000-row results over the PostgreSQL
        // protocol took the server 60 MiB higher).
        let mut named: Option<SchemaRef> = None;
        for batch in stmt.stream_arrow(duckdb::params_from_iter(values))? {
            let batch = batch?;
            let batch = match run.names {
                Some(names) => {
                    let schema = named.get_or_insert_with(|| renamed(&batch.schema(), names));
                    RecordBatch::try_new(schema.clone(), batch.columns().to_vec())
                        .map_err(|e| StoreError::Internal(format!("renaming columns: {e}")))?
                }
                None => batch,
            };
            rows += batch.num_rows() as u64;
            bytes += batch.get_array_memory_size() as u64;
            if rows > self.limits.max_rows {
                return Err(SqlError::TooLarge(format!("{} rows", self.limits.max_rows)));
            }
            if bytes > self.limits.max_bytes {
                return Err(SqlError::TooLarge(format!(
                    "{} bytes",
                    self.limits.max_bytes
                )));
            }
            sink(&batch)?;
        }
        Ok(SqlSummary {
            rows,
            bytes,
            schema: match run.names {
                Some(names) => renamed(&stmt.schema(), names),
                None => stmt.schema(),
            },
            params: count,
        })
    }

    /// One of the `max_concurrent` slots, and of `client`'s `max_per_client`,
    /// waited for at most `queue_wait` (less if the query is cancelled meanwhile).
    fn slot(&self, client: &str, cancel: &Cancel) -> Result<Slot<'_>, SqlError> {
        self.await_budget(client, cancel)?;
        let deadline = Instant::now() + self.limits.queue_wait;
        let (all, mine) = (
            self.limits.max_concurrent.max(1),
            self.limits.max_per_client.max(1),
        );
        let mut running = self.running.lock().expect("sql slots");
        loop {
            let own = running.by_client.get(client).copied().unwrap_or(0);
            if running.total < all && own < mine {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(if own >= mine {
                    SqlError::ClientBusy(mine)
                } else {
                    SqlError::Busy
                });
            }
            if cancel.cancelled() {
                return Err(SqlError::Cancelled);
            }
            let step = left.min(Duration::from_millis(50));
            running = self.freed.wait_timeout(running, step).expect("sql slots").0;
        }
        if cancel.cancelled() {
            return Err(SqlError::Cancelled);
        }
        running.total += 1;
        *running.by_client.entry(client.to_owned()).or_default() += 1;
        Ok(Slot {
            engine: self,
            client: client.to_owned(),
            started: Instant::now(),
        })
    }

    /// Waits until `client`'s time budget is positive again, if that is within
    /// `queue_wait`; [`SqlError::OverShare`] with the time to wait otherwise.
    fn await_budget(&self, client: &str, cancel: &Cancel) -> Result<(), SqlError> {
        let (own, all) = {
            let mut running = self.running.lock().expect("sql slots");
            let now = Instant::now();
            let (own, light) = self.budget().map_or((Duration::ZERO, false), |budget| {
                running
                    .budgets
                    .retain(|_, b| b.balance(now, budget) < budget.capacity);
                // Full budgets were dropped just now.
                running
                    .budgets
                    .get(client)
                    .map_or((Duration::ZERO, true), |b| (b.owed(now, budget), false))
            });
            // A client whose own budget is full (nothing beyond its share lately,
            // say someone's occasional question in psql) is not held back by what
            // the heavy ones used; its time still counts against the server's.
            let all = match (self.total_budget(), &running.all) {
                (Some(budget), Some(b)) if !light => b.owed(now, budget),
                _ => Duration::ZERO,
            };
            (own, all)
        };
        if own > self.limits.queue_wait {
            return Err(SqlError::OverShare(own));
        }
        if all > self.limits.queue_wait {
            return Err(SqlError::ServerOverShare(all));
        }
        let owed = own.max(all);
        let until = Instant::now() + owed;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if cancel.cancelled() {
                return Err(SqlError::Cancelled);
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
        Ok(())
    }

    /// A client's time budget's rate and capacity; `None` when it is off.
    fn budget(&self) -> Option<Budget> {
        self.budget_at(self.limits.time_share)
    }

    /// The server-wide time budget's rate and capacity; `None` when it is off.
    fn total_budget(&self) -> Option<Budget> {
        self.budget_at(self.limits.total_share)
    }

    fn budget_at(&self, rate: f64) -> Option<Budget> {
        (rate > 0.0 && rate < 1.0).then(|| Budget {
            rate,
            capacity: self.limits.timeout.min(BUDGET_HELD).as_secs_f64(),
        })
    }
}

/// The most query time a client's budget holds: a dashboard's refresh (ten
/// panels' queries of a second each at once) runs without waiting, a loop of
/// queries is held to its share within seconds.
pub const BUDGET_HELD: Duration = Duration::from_secs(10);

/// A client's time budget's terms: seconds gained a second, seconds held at most.
#[derive(Clone, Copy)]
struct Budget {
    rate: f64,
    capacity: f64,
}

/// A client's time budget, as of `at`.
struct Balance {
    seconds: f64,
    at: Instant,
}

impl Balance {
    /// The balance at `now`, refilled since `at`.
    fn balance(&self, now: Instant, budget: Budget) -> f64 {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * budget.rate;
        (self.seconds + gained).min(budget.capacity)
    }

    /// How long until the balance is positive.
    fn owed(&self, now: Instant, budget: Budget) -> Duration {
        let balance = self.balance(now, budget);
        if balance > 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-balance / budget.rate) + Duration::from_millis(1)
        }
    }
}

/// Queries running, in all and by client, and the clients' time budgets (those
/// not full), and the server-wide one (once a query ended).
#[derive(Default)]
struct Running {
    total: usize,
    by_client: std::collections::HashMap<String, usize>,
    budgets: std::collections::HashMap<String, Balance>,
    all: Option<Balance>,
}

/// A taken slot, given back when dropped, its time taken from the client's budget.
struct Slot<'a> {
    engine: &'a SqlEngine,
    client: String,
    started: Instant,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut running = self.engine.running.lock().expect("sql slots");
        let now = Instant::now();
        let used = now.saturating_duration_since(self.started).as_secs_f64();
        if let Some(budget) = self.engine.total_budget() {
            let balance = running
                .all
                .as_ref()
                .map_or(budget.capacity, |b| b.balance(now, budget));
            running.all = Some(Balance {
                seconds: balance - used,
                at: now,
            });
        }
        if let Some(budget) = self.engine.budget() {
            let balance = running
                .budgets
                .get(&self.client)
                .map_or(budget.capacity, |b| b.balance(now, budget));
            running.budgets.insert(
                self.client.clone(),
                Balance {
                    seconds: balance - used,
                    at: now,
                },
            );
        }
        running.total -= 1;
        if let Some(n) = running.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                running.by_client.remove(&self.client);
            }
        }
        self.engine.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    /// A store with 3 devices × 2 sensors × 20 readings a minute apart.
    fn store(dir: &std::path::Path) -> Store {
        let store = crate::store::open_for_tests(dir);
        let mut sql =
            String::from("INSERT INTO devices VALUES (0, 'car-0'), (1, 'car-1'), (2, 'car-2');");
        for d in 0..3 {
            for s in [1, 4] {
                for i in 0..20i64 {
                    let ts = 1_790_000_000_000 + i * 60_000;
                    sql += &format!(
                        "INSERT INTO received_readings VALUES ({d}, {s}, {ts}, 0, {}.5);",
                        d * 100 + i
                    );
                }
            }
        }
        store.conn.execute_batch(&sql).unwrap();
        store
    }

    /// A query that never ends by itself.
    const BOMB: &str =
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t";

    fn limits() -> SqlLimits {
        SqlLimits {
            timeout: Duration::from_secs(10),
            ..SqlLimits::default()
        }
    }

    /// Runs `sql`, the result as rows of strings.
    fn rows(engine: &SqlEngine, sql: &str) -> Result<Vec<Vec<String>>, SqlError> {
        // Each text its own client: the tests of the global cap send different ones.
        rows_of(engine, sql, sql)
    }

    /// [`rows`] as client `client`.
    /// Runs [`BOMB`] once for each of `clients` in turn: each times out after
    /// spending a whole `--sql-timeout` of the budgets.
    fn time_out(engine: &SqlEngine, clients: &[&str]) {
        for client in clients {
            let r = rows_of(engine, BOMB, client);
            assert!(matches!(r, Err(SqlError::Timeout(_))), "{r:?}");
        }
    }

    fn rows_of(engine: &SqlEngine, sql: &str, client: &str) -> Result<Vec<Vec<String>>, SqlError> {
        let mut out = Vec::new();
        engine.run(sql, &[], &Client::new(client), &mut |b| {
            for r in 0..b.num_rows() {
                out.push(
                    (0..b.num_columns())
                        .map(|c| {
                            duckdb::arrow::util::display::array_value_to_string(b.column(c), r)
                                .unwrap_or_default()
                        })
                        .collect(),
                );
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn counts(store: &Store) -> Vec<i64> {
        [
            "readings", "devices", "sensors", "series", "rollups", "meta", "dumps",
        ]
        .iter()
        .map(|t| {
            store
                .conn
                .query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0))
                .unwrap()
        })
        .collect()
    }

    #[test]
    fn read_queries_answer_through_the_views() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let engine = store.sql_engine(limits()).unwrap();
        let got = rows(
            &engine,
            "SELECT device, sensor, count(*), min(ts), max(value) FROM readings
             GROUP BY ALL ORDER BY ALL",
        )
        .unwrap();
        assert_eq!(got.len(), 6);
        assert_eq!(
            got[0],
            [
                "car-0",
                "engine_temperature",
                "20",
                "2026-09-21T14:13:20",
                "19.5"
            ]
        );
        for sql in [
            "WITH t AS (SELECT * FROM readings WHERE device = 'car-1') SELECT count(*) FROM t",
            "FROM readings SELECT count(*) WHERE device = 'car-1'",
            "SELECT count(*) FROM (SELECT * FROM readings JOIN sensors ON sensors.name = readings.sensor) WHERE device = 'car-1'",
            "SELECT sum(n) FROM (SELECT count(*) OVER (PARTITION BY sensor) AS n FROM readings WHERE device = 'car-1' QUALIFY row_number() OVER (PARTITION BY sensor) = 1)",
        ] {
            assert_eq!(rows(&engine, sql).unwrap(), [["40"]], "{sql}");
        }
        assert_eq!(
            rows(&engine, "SELECT * FROM devices ORDER BY 1")
                .unwrap()
                .len(),
            3
        );
        assert_eq!(rows(&engine, "VALUES (1, 'a')").unwrap(), [["1", "a"]]);
        // CTEs in their scopes: chained, in a subquery, both sides of a UNION.
        for sql in [
            "WITH a AS (SELECT 1 AS x), b AS (SELECT x FROM a) SELECT * FROM b",
            "WITH a AS (SELECT 1 AS x) SELECT (SELECT max(x) FROM a)",
            "WITH a AS (SELECT 1 AS x) SELECT * FROM a UNION SELECT * FROM a",
            "SELECT * FROM (WITH a AS (SELECT 1 AS x) SELECT * FROM a)",
            "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 1) SELECT * FROM t",
        ] {
            assert_eq!(rows(&engine, sql).unwrap(), [["1"]], "{sql}");
        }
        // Ended quarter hours only: none before the writer's boundary is set.
        assert_eq!(
            rows(&engine, "SELECT count(*) FROM rollups_15m").unwrap(),
            [["0"]]
        );
    }

    /// At least forty statements that would read files, change data or settings,
    /// load code or reach internal tables: each refused with a reason, and nothing
    /// changed (row counts, files).
    #[test]
    fn hostile_statements_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let engine = store.sql_engine(limits()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let o = out.path().display();
        let before = counts(&store);
        let secrets = tempfile::tempdir().unwrap();
        let secret = secrets.path().join("secret.csv");
        std::fs::write(&secret, "password\nhunter2\n").unwrap();
        let secret = secret.display();
        let hostile = [
            format!("SELECT * FROM '{secret}'"),
            format!("SELECT (WITH \"{secret}\" AS (SELECT 1) SELECT 1) AS a, * FROM '{secret}'"),
            format!("COPY readings TO '{o}/a.csv'"),
            format!("COPY (SELECT * FROM readings) TO '{o}/b.parquet' (FORMAT parquet)"),
            format!("EXPORT DATABASE '{o}/export'"),
            format!("ATTACH '{o}/other.duckdb' AS other"),
            "ATTACH ':memory:' AS m".into(),
            "DETACH milepost".into(),
            "USE memory".into(),
            "INSTALL httpfs".into(),
            "LOAD httpfs".into(),
            "SET memory_limit = '10GB'".into(),
            "SET enable_external_access = true".into(),
            "RESET search_path".into(),
            "PRAGMA database_list".into(),
            "PRAGMA enable_profiling".into(),
            "CALL checkpoint()".into(),
            "CHECKPOINT".into(),
            "VACUUM".into(),
            "BEGIN TRANSACTION".into(),
            "PREPARE p AS SELECT 1".into(),
            "CREATE TABLE x AS SELECT 1".into(),
            "CREATE TEMP TABLE x (a INTEGER)".into(),
            "CREATE OR REPLACE TEMP VIEW readings AS SELECT 1".into(),
            "CREATE MACRO m(a) AS a".into(),
            "CREATE SEQUENCE s".into(),
            "DROP VIEW readings".into(),
            "DROP TABLE milepost.main.readings".into(),
            "ALTER TABLE milepost.main.readings ADD COLUMN x INTEGER".into(),
            "INSERT INTO milepost.main.readings VALUES (0, 1, 0, 0, 0)".into(),
            "UPDATE milepost.main.readings SET value = 0".into(),
            "DELETE FROM milepost.main.readings".into(),
            "DELETE FROM readings".into(),
            "TRUNCATE readings".into(),
            "SELECT 1; DELETE FROM milepost.main.readings".into(),
            "SELECT 1; SELECT 2".into(),
            "SELECT * FROM read_csv('/etc/passwd')".into(),
            "SELECT * FROM read_text('/etc/passwd')".into(),
            "SELECT * FROM read_blob('/etc/passwd')".into(),
            "SELECT * FROM read_json_auto('/etc/hosts')".into(),
            "SELECT * FROM read_parquet('/tmp/*.parquet')".into(),
            "SELECT * FROM glob('/*')".into(),
            "SELECT * FROM '/etc/passwd'".into(),
            format!("SELECT * FROM '{o}/x.csv'"),
            "SELECT * FROM range(1000000000000)".into(),
            "SELECT * FROM query('SELECT * FROM milepost.main.series')".into(),
            "SELECT * FROM duckdb_settings()".into(),
            "SELECT * FROM duckdb_tables()".into(),
            "SELECT * FROM series".into(),
            "SELECT * FROM main.series".into(),
            "SELECT * FROM milepost.main.series".into(),
            "SELECT * FROM milepost.main.alerts".into(),
            "SELECT * FROM temp.main.readings".into(),
            "SELECT (SELECT count(*) FROM milepost.main.alerts)".into(),
            "SELECT * FROM readings WHERE device IN (SELECT url FROM deliveries)".into(),
            "SELECT getenv('HOME')".into(),
            "SELECT current_setting('temp_directory')".into(),
            "SELECT getvariable('rollups_before')".into(),
            "SELECT nextval('s')".into(),
            "SELECT setseed(0.5)".into(),
            "SELECT main.abs(1)".into(),
            "DESCRIBE readings".into(),
            "SHOW TABLES".into(),
            "SUMMARIZE readings".into(),
            "SELECT * FROM (DESCRIBE readings)".into(),
            "SELECT list_transform([1], x -> (SELECT count(*) FROM milepost.main.series))".into(),
            // A CTE's name used out of its scope: a file path, an internal table.
            "SELECT (WITH \"/etc/passwd\" AS (SELECT 1) SELECT 1) AS a, * FROM '/etc/passwd'"
                .into(),
            "WITH \"/etc/hosts\" AS (SELECT 1) SELECT * FROM \"/etc/hosts\"".into(),
            "SELECT (WITH series AS (SELECT 1) SELECT 1) AS a, * FROM series".into(),
            "SELECT * FROM (WITH alerts AS (SELECT 1) SELECT 1) t, alerts".into(),
        ];
        assert!(hostile.len() >= 40);
        for sql in &hostile {
            let r = rows(&engine, sql);
            assert!(
                matches!(r, Err(SqlError::Refused(_) | SqlError::Query(_))),
                "{sql}: {r:?}"
            );
        }
        assert_eq!(counts(&store), before);
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
        // Still answering.
        assert_eq!(
            rows(&engine, "SELECT count(*) FROM readings").unwrap(),
            [["120"]]
        );
    }

    #[test]
    fn a_runaway_query_is_stopped_and_a_large_result_capped() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let engine = store
            .sql_engine(SqlLimits {
                timeout: Duration::from_millis(500),
                max_rows: 50,
                ..SqlLimits::default()
            })
            .unwrap();
        let started = Instant::now();
        let r = rows(&engine, BOMB);
        assert!(matches!(r, Err(SqlError::Timeout(_))), "{r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let r = rows(&engine, "SELECT * FROM readings");
        assert!(matches!(r, Err(SqlError::TooLarge(_))), "{r:?}");
        assert_eq!(
            rows(&engine, "SELECT count(*) FROM readings").unwrap(),
            [["120"]]
        );
    }

    #[test]
    fn queries_over_the_concurrency_cap_are_told_to_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let engine = Arc::new(
            store
                .sql_engine(SqlLimits {
                    timeout: Duration::from_secs(2),
                    max_concurrent: 1,
                    queue_wait: Duration::from_millis(100),
                    ..SqlLimits::default()
                })
                .unwrap(),
        );
        let long = {
            let engine = engine.clone();
            std::thread::spawn(move || rows(&engine, BOMB))
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(matches!(rows(&engine, "SELECT 1"), Err(SqlError::Busy)));
        assert!(matches!(long.join().unwrap(), Err(SqlError::Timeout(_))));
        assert_eq!(rows(&engine, "SELECT 1").unwrap(), [["1"]]);
    }

    /// A client's queries get their share of time: once its budget is spent, its
    /// next query waits for it (within `queue_wait`) or is told when to come back,
    /// while another client's queries run at once.
    #[test]
    fn a_client_gets_its_share_of_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        // Each client's budget alone (the server-wide one is off).
        let engine = |time_share: f64, queue_wait_ms: u64| {
            store
                .sql_engine(SqlLimits {
                    timeout: Duration::from_secs(1),
                    time_share,
                    total_share: 1.0,
                    queue_wait: Duration::from_millis(queue_wait_ms),
                    ..SqlLimits::default()
                })
                .unwrap()
        };
        // A budget of 1 s filling at 0.25 s a second: two 1-s queries leave -0.75 s,
        // three seconds to wait, more than the 0.5 s a query may wait.
        let strict = engine(0.25, 500);
        time_out(&strict, &["a"; 2]);
        match rows_of(&strict, "SELECT 1", "a") {
            Err(SqlError::OverShare(wait)) => assert!(
                wait > Duration::from_millis(2500) && wait < Duration::from_millis(3500),
                "{wait:?}"
            ),
            other => panic!("{other:?}"),
        }
        let started = Instant::now();
        assert_eq!(rows_of(&strict, "SELECT 1", "b").unwrap(), [["1"]]);
        assert!(started.elapsed() < Duration::from_millis(400));
        // Filling at 0.5 s a second the same two leave a second to wait: within the
        // 2 s a query may wait, so the next query waits and answers.
        let patient = engine(0.5, 2000);
        time_out(&patient, &["a"; 2]);
        let started = Instant::now();
        assert_eq!(rows_of(&patient, "SELECT 1", "a").unwrap(), [["1"]]);
        let waited = started.elapsed();
        assert!(
            waited > Duration::from_millis(800) && waited < Duration::from_millis(1800),
            "{waited:?}"
        );
        // At a share of 1 there is no budget.
        let free = engine(1.0, 100);
        time_out(&free, &["a"; 3]);
    }

    /// Many clients cannot add their shares up: the server-wide budget holds back
    /// a client that is within its own share, but not one whose budget is full.
    #[test]
    fn clients_together_get_the_servers_share() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let engine = |total_share: f64| {
            store
                .sql_engine(SqlLimits {
                    timeout: Duration::from_secs(1),
                    time_share: 0.5,
                    total_share,
                    queue_wait: Duration::from_millis(500),
                    ..SqlLimits::default()
                })
                .unwrap()
        };
        // Budgets of 1 s. "a" and "b" each spend their own second (b's own budget
        // was full, so it ran although a had spent the server's); together they
        // leave the server's at about -0.75 s (it refilled during b's query):
        // three seconds to wait at 0.25 s a second.
        let shared = engine(0.25);
        time_out(&shared, &["a", "b"]);
        std::thread::sleep(Duration::from_millis(200));
        // a's own budget is positive again (0.5 s a second), the server's is not.
        match rows_of(&shared, "SELECT 1", "a") {
            Err(SqlError::ServerOverShare(wait)) => assert!(
                wait > Duration::from_millis(2300) && wait < Duration::from_millis(3500),
                "{wait:?}"
            ),
            other => panic!("{other:?}"),
        }
        // Someone's first question in a while still answers at once.
        let started = Instant::now();
        assert_eq!(rows_of(&shared, "SELECT 1", "c").unwrap(), [["1"]]);
        assert!(started.elapsed() < Duration::from_millis(400));
        // Off at a share of 1: the same steps leave a free to go on.
        let free = engine(1.0);
        time_out(&free, &["a", "b"]);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(rows_of(&free, "SELECT 1", "a").unwrap(), [["1"]]);
    }

    /// One client gets its share of the slots, not all of them: its next query
    /// is told to wait for its own, while another client's runs.
    #[test]
    fn one_client_cannot_take_every_slot() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let engine = Arc::new(
            store
                .sql_engine(SqlLimits {
                    timeout: Duration::from_secs(2),
                    queue_wait: Duration::from_millis(100),
                    ..SqlLimits::default()
                })
                .unwrap(),
        );
        let greedy = Client::new("greedy");
        let long = {
            let (engine, greedy) = (engine.clone(), greedy.clone());
            std::thread::spawn(move || engine.collect(BOMB, &[], &greedy))
        };
        std::thread::sleep(Duration::from_millis(300));
        let again = engine.collect("SELECT 1", &[], &Client::new("greedy"));
        assert!(matches!(again, Err(SqlError::ClientBusy(1))), "{again:?}");
        let other = engine.collect("SELECT 1", &[], &Client::new("other"));
        assert_eq!(other.unwrap().1.rows, 1);
        greedy.cancel.cancel();
        assert!(matches!(long.join().unwrap(), Err(SqlError::Cancelled)));
        let again = engine.collect("SELECT 1", &[], &Client::new("greedy"));
        assert_eq!(again.unwrap().1.rows, 1);
    }

    /// The catalog answers with the contract and nothing else: no internal
    /// table, not its own stand-ins; it reads no file and mixes with no data.
    #[test]
    fn the_catalog_lists_the_contract_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let engine = store.sql_engine(limits()).unwrap();
        let mut contract: Vec<[String; 1]> = RELATIONS.iter().map(|r| [r.to_string()]).collect();
        contract.sort();
        for sql in [
            "SELECT relname FROM pg_catalog.pg_class WHERE relkind = 'r' ORDER BY 1",
            "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n \
             ON n.oid = c.relnamespace WHERE n.nspname !~ '^pg_' \
             AND n.nspname <> 'information_schema' ORDER BY 1",
            "SELECT table_name FROM information_schema.tables ORDER BY 1",
        ] {
            let got = rows(&engine, sql).unwrap();
            assert_eq!(got, contract, "{sql}");
        }
        let got = rows(
            &engine,
            "SELECT column_name, data_type FROM information_schema.columns \
             WHERE table_name = 'readings' ORDER BY ordinal_position",
        )
        .unwrap();
        assert_eq!(
            got,
            [
                ["device", "character varying"],
                ["sensor", "character varying"],
                ["ts", "timestamp without time zone"],
                ["value", "double precision"]
            ]
        );
        // Column types by PostgreSQL's oids, as drivers map them (pgJDBC read
        // DuckDB's own type ids as oids: DOUBLE came out as int4), and named back.
        let got = rows(
            &engine,
            "SELECT a.attname, a.atttypid, t.typname, pg_catalog.format_type(a.atttypid, a.atttypmod)
             FROM pg_catalog.pg_attribute a
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
             WHERE c.relname = 'dumps' AND a.attname IN ('day', 'readings', 'sha256', 'min_ts')
             ORDER BY a.attnum",
        )
        .unwrap();
        assert_eq!(
            got,
            [
                ["day", "1082", "date", "date"],
                ["readings", "20", "int8", "bigint"],
                ["sha256", "1043", "varchar", "character varying"],
                ["min_ts", "1114", "timestamp", "timestamp without time zone"],
            ]
        );
        // The stand-ins' schema is not listed, nor are the stand-in functions;
        // pgJDBC's forms run: `'pg_class'::regclass`, `_pg_expandarray`.
        for sql in [
            "SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname LIKE 'pg_compat%'",
            "SELECT proname FROM pg_catalog.pg_proc WHERE proname = 'quote_ident'",
            "SELECT d.description FROM pg_catalog.pg_description d \
             WHERE d.classoid = 'pg_class'::regclass",
            "SELECT (information_schema._pg_expandarray(i.indkey)).n FROM pg_catalog.pg_index i",
        ] {
            assert!(rows(&engine, sql).unwrap().is_empty(), "{sql}");
        }
        // pg_settings: what the listener reports, none of DuckDB's settings.
        assert_eq!(
            rows(
                &engine,
                "SELECT setting FROM pg_catalog.pg_settings \
                 WHERE name IN ('max_index_keys', 'memory_limit', 'temp_directory')"
            )
            .unwrap(),
            [["32"]]
        );
        // Settings: the stand-in's answers there, refused beside the data.
        assert_eq!(
            rows(
                &engine,
                "SELECT current_setting('search_path'), current_setting('temp_directory') \
                 FROM pg_catalog.pg_namespace LIMIT 1"
            )
            .unwrap(),
            [["main", ""]]
        );
        for refused in [
            "SELECT current_setting('search_path')",
            "SELECT * FROM readings JOIN pg_catalog.pg_class ON true",
            "SELECT * FROM information_schema.tables, milepost.main.series",
        ] {
            let r = rows(&engine, refused);
            assert!(matches!(r, Err(SqlError::Refused(_))), "{refused}: {r:?}");
        }
        // The catalog instance has no file access.
        let r = rows(
            &engine,
            "SELECT * FROM pg_catalog.pg_class, read_csv('/etc/passwd')",
        );
        assert!(
            matches!(&r, Err(SqlError::Query(m)) if m.contains("disabled")),
            "{r:?}"
        );
    }

    #[test]
    fn qualified_names_read_the_views() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let engine = store.sql_engine(limits()).unwrap();
        // BI tools qualify what they generate with the schema the catalog lists.
        let plain = rows(&engine, "SELECT * FROM readings ORDER BY ALL").unwrap();
        for sql in [
            "SELECT * FROM main.readings ORDER BY ALL",
            r#"SELECT "main"."readings"."device", "main"."readings"."sensor",
                      "main"."readings"."ts", "main"."readings"."value"
               FROM "main"."readings" ORDER BY ALL"#,
        ] {
            assert_eq!(rows(&engine, sql).unwrap(), plain, "{sql}");
        }
        let got = rows(
            &engine,
            "SELECT count(*) FROM main.readings r JOIN main.devices d USING (device)",
        )
        .unwrap();
        assert_eq!(got, [["120"]]);
        // Only the contract's names: the internal tables stay out of reach.
        for refused in [
            "SELECT * FROM main.series",
            "SELECT * FROM main.rollups",
            "SELECT * FROM milepost.main.readings",
            "SELECT * FROM temp.main.readings",
            "WITH readings AS (SELECT 1) SELECT * FROM main.readings",
        ] {
            let r = rows(&engine, refused);
            assert!(matches!(r, Err(SqlError::Refused(_))), "{refused}: {r:?}");
        }
    }

    #[test]
    fn parameter_types_are_inferred_where_the_parameters_stand() {
        use ParamType::*;
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let engine = store.sql_engine(limits()).unwrap();
        let cases: [(&str, &[Option<ParamType>]); 7] = [
            (
                "SELECT * FROM readings WHERE ts > $1 AND value < $2 AND device = $3 LIMIT $4",
                &[Some(Timestamp), Some(Float), Some(Text), Some(Int)],
            ),
            (
                "SELECT count(*) FROM main.readings r JOIN devices USING (device)
                 WHERE r.ts BETWEEN $2 AND $1 AND sensor IN ($3, 'speed')",
                &[Some(Timestamp), Some(Timestamp), Some(Text)],
            ),
            ("SELECT $1::BIGINT + 1, $2::DATE", &[Some(Int), Some(Date)]),
            (
                "SELECT * FROM anomalies WHERE status = $1 OR $2",
                &[Some(Text), Some(Bool)],
            ),
            // Untyped where it stands, or an interval: the driver sends text.
            ("SELECT $1", &[None]),
            (
                "SELECT count(*) FROM readings WHERE ts > now() - $1",
                &[None],
            ),
            // The catalog's queries are typed by their casts (the listener's).
            (
                "SELECT relname FROM pg_catalog.pg_class WHERE relname = $1",
                &[],
            ),
        ];
        for (sql, want) in cases {
            assert_eq!(engine.param_types(sql), want, "{sql}");
        }
        // Nothing the sandbox refuses is bound: binding a table function would
        // open its file.
        for refused in [
            "SELECT * FROM read_csv('/etc/passwd') WHERE column0 = $1",
            "SELECT * FROM series WHERE readings > $1",
            "DELETE FROM readings WHERE value > $1",
            "SELECT * FROM readings WHERE nope > $1",
        ] {
            assert_eq!(engine.param_types(refused), [], "{refused}");
        }
    }

    #[test]
    fn a_query_is_described_without_reading_and_cancelled_from_outside() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let engine = Arc::new(store.sql_engine(limits()).unwrap());
        let shape = engine
            .describe(
                "SELECT device, value FROM readings WHERE value > $1 AND device = $2;",
                &[],
                &Client::default(),
            )
            .unwrap();
        let names: Vec<&str> = shape
            .schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!((names, shape.params), (vec!["device", "value"], 2));
        // Described like any query: the sandbox first.
        assert!(matches!(
            engine.describe("SELECT * FROM series", &[], &Client::default()),
            Err(SqlError::Refused(_))
        ));
        let client = Client::default();
        let cancel = client.cancel.clone();
        let running = {
            let (engine, client) = (engine.clone(), client.clone());
            std::thread::spawn(move || engine.run(BOMB, &[], &client, &mut |_| Ok(())))
        };
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        cancel.cancel();
        let r = running.join().unwrap();
        assert!(matches!(r, Err(SqlError::Cancelled)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // A cancelled token refuses what it is given later.
        assert!(matches!(
            engine.run("SELECT 1", &[], &client, &mut |_| Ok(())),
            Err(SqlError::Cancelled)
        ));
    }

    /// Spill files are capped (`--temp-limit`): DuckDB holds the cap, and a user
    /// query cannot read or change it.
    #[test]
    fn spill_files_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&crate::store::StoreConfig {
            temp_limit: Some("8MB".into()),
            ..crate::store::config_for_tests(dir.path())
        })
        .unwrap();
        let limit: String = store
            .conn
            .query_row(
                "SELECT current_setting('max_temp_directory_size')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(limit, "7.6 MiB");
        let engine = store.sql_engine(limits()).unwrap();
        for sql in [
            "SET max_temp_directory_size = '1TB'",
            "SELECT current_setting('max_temp_directory_size')",
        ] {
            assert!(
                matches!(rows(&engine, sql), Err(SqlError::Refused(_))),
                "{sql}"
            );
        }
    }
}
