//! The types a query's positional parameters take, as DuckDB's binder infers them
//! from where they stand: `ts > $1` a `TIMESTAMP`, `value < $2` a `DOUBLE`,
//! `device = $3` a `VARCHAR`, `LIMIT $4` a `BIGINT`. Drivers that ask the server
//! for parameter types (asyncpg) then send values of those types; without them
//! asyncpg refuses a `datetime` for a bare `$1` ("expected str").
//!
//! duckdb-rs does not expose `duckdb_param_type`, so this is a small instance of
//! its own over the C API: in memory, holding the contract's relations as empty
//! tables with the views' columns (as the catalog instance does), file and
//! network access off, its configuration locked. A statement is prepared there
//! (parsed and bound, never run) only after it passed the sandbox's rules, so
//! binding cannot reach a file either (a table function such as `read_csv` would
//! open its file to learn the columns).

use std::ffi::{CStr, CString};
use std::sync::Mutex;

use duckdb::{Connection, ffi};

use super::{Route, route};
use crate::store::StoreError;

/// A parameter's type, as far as a client's driver needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// `BOOLEAN`.
    Bool,
    /// An integer type.
    Int,
    /// `FLOAT`, `DOUBLE`, `DECIMAL`.
    Float,
    /// `VARCHAR`.
    Text,
    /// `TIMESTAMP` (and its other precisions).
    Timestamp,
    /// `DATE`.
    Date,
}

impl ParamType {
    fn of(t: ffi::DUCKDB_TYPE) -> Option<Self> {
        Some(match t {
            ffi::DUCKDB_TYPE_DUCKDB_TYPE_BOOLEAN => Self::Bool,
            ffi::DUCKDB_TYPE_DUCKDB_TYPE_TINYINT
            | ffi::DUCKDB_TYPE_DUCKDB_TYPE_SMALLINT
            | ffi::DUCKDB_TYPE_DUCKDB_TYPE_INTEGER
            | ffi::DUCKDB_TYPE_DUCKDB_TYPE_BIGINT
            | ffi::DUCKDB_TYPE_DUCKDB_TYPE_UTINYINT
            | ffi::DUCKDB_TYPE_DUCKDB_TYPE_USMALLINT
            | ffi::DUCKDB_TYPE_DUCKDB_TYPE_UINTEGER => Self::Int,
            ffi::DUCKDB_TYPE_DUCKDB_TYPE_FLOAT
            | ffi::DUCKDB_TYPE_DUCKDB_TYPE_DOUBLE
            | ffi::DUCKDB_TYPE_DUCKDB_TYPE_DECIMAL => Self::Float,
            ffi::DUCKDB_TYPE_DUCKDB_TYPE_VARCHAR => Self::Text,
            ffi::DUCKDB_TYPE_DUCKDB_TYPE_TIMESTAMP
            | ffi::DUCKDB_TYPE_DUCKDB_TYPE_TIMESTAMP_S
            | ffi::DUCKDB_TYPE_DUCKDB_TYPE_TIMESTAMP_MS
            | ffi::DUCKDB_TYPE_DUCKDB_TYPE_TIMESTAMP_NS => Self::Timestamp,
            ffi::DUCKDB_TYPE_DUCKDB_TYPE_DATE => Self::Date,
            // Unknown (a bare `SELECT $1`), or a type no driver sends as such
            // (`INTERVAL`, lists): the driver sends text, which DuckDB casts.
            _ => return None,
        })
    }
}

/// A database handle, closed when dropped.
struct RawDb(ffi::duckdb_database);

impl Drop for RawDb {
    fn drop(&mut self) {
        // SAFETY: the handle is open, and every connection to it is closed (the
        // fields of `Handles` before it drop first).
        unsafe { ffi::duckdb_close(&mut self.0) }
    }
}

/// A connection handle, closed when dropped.
struct RawConn(ffi::duckdb_connection);

impl Drop for RawConn {
    fn drop(&mut self) {
        // SAFETY: the handle is open and nobody else uses it now.
        unsafe { ffi::duckdb_disconnect(&mut self.0) }
    }
}

/// The instance's handles, used under the [`Binder`]'s lock only. Fields drop in
/// order: both connections before the database.
struct Handles {
    /// Parses statements for the sandbox's check (`json_serialize_sql`); it does
    /// not own the database.
    conn: Connection,
    /// Prepares statements (`duckdb_param_type` needs the raw statement).
    raw: RawConn,
    _db: RawDb,
}

// SAFETY: DuckDB's database handle may be used from any thread, and a connection
// from one thread at a time, which the `Binder`'s mutex ensures.
unsafe impl Send for Handles {}

/// The in-memory instance that infers parameter types.
pub(super) struct Binder {
    handles: Mutex<Handles>,
}

/// Options of the instance, set before it opens.
const CONFIG: [(&str, &str); 6] = [
    ("enable_external_access", "false"),
    ("autoinstall_known_extensions", "false"),
    ("autoload_known_extensions", "false"),
    ("allow_community_extensions", "false"),
    ("threads", "1"),
    ("max_memory", "16MB"),
];

impl Binder {
    /// Opens the instance with `tables` (the contract's relations as `CREATE
    /// TABLE` statements).
    pub(super) fn new(tables: &str) -> Result<Self, StoreError> {
        let failed = |what: &str| StoreError::Internal(format!("parameter binder: {what}"));
        let mut db: ffi::duckdb_database = std::ptr::null_mut();
        // SAFETY: every pointer handed to DuckDB is valid for the call (C strings
        // live to its end); the config is destroyed once the database is open, as
        // the C API allows, and an error message is freed with `duckdb_free`.
        unsafe {
            let mut config: ffi::duckdb_config = std::ptr::null_mut();
            if ffi::duckdb_create_config(&mut config) != ffi::DuckDBSuccess {
                return Err(failed("no config"));
            }
            for (name, value) in CONFIG {
                let (n, v) = (cstring(name)?, cstring(value)?);
                if ffi::duckdb_set_config(config, n.as_ptr(), v.as_ptr()) != ffi::DuckDBSuccess {
                    ffi::duckdb_destroy_config(&mut config);
                    return Err(failed(&format!("setting {name}")));
                }
            }
            let mut error: *mut std::os::raw::c_char = std::ptr::null_mut();
            let opened = ffi::duckdb_open_ext(std::ptr::null(), &mut db, config, &mut error);
            ffi::duckdb_destroy_config(&mut config);
            if opened != ffi::DuckDBSuccess {
                let message = if error.is_null() {
                    "cannot open".to_owned()
                } else {
                    let m = CStr::from_ptr(error).to_string_lossy().into_owned();
                    ffi::duckdb_free(error.cast());
                    m
                };
                return Err(failed(&message));
            }
        }
        let db = RawDb(db);
        let mut raw: ffi::duckdb_connection = std::ptr::null_mut();
        // SAFETY: `db` is open (and closed by `RawDb` on every path from here).
        if unsafe { ffi::duckdb_connect(db.0, &mut raw) } != ffi::DuckDBSuccess {
            return Err(failed("cannot connect"));
        }
        let raw = RawConn(raw);
        // SAFETY: as above; this connection does not close the database.
        let conn = unsafe { Connection::open_from_raw(db.0) }?;
        let handles = Handles { conn, raw, _db: db };
        // The views' `now()`: a `TIMESTAMP`, so that `ts > now() - $1` binds as
        // it runs. The macros are the raw connection's, where statements are
        // prepared.
        handles.execute(tables)?;
        handles.execute(
            "CREATE OR REPLACE TEMP MACRO now() AS CAST(transaction_timestamp() AS TIMESTAMP);
             CREATE OR REPLACE TEMP MACRO get_current_timestamp()
                 AS CAST(transaction_timestamp() AS TIMESTAMP);
             SET lock_configuration = true;",
        )?;
        Ok(Self {
            handles: Mutex::new(handles),
        })
    }

    /// The types of the parameters of `sql` (`$1` first), `None` for those the
    /// binder cannot tell; empty when `sql` is not a query over the contract's
    /// relations that the sandbox allows, or does not bind (the query's real run
    /// reports why).
    pub(super) fn param_types(&self, sql: &str) -> Vec<Option<ParamType>> {
        let handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        match super::parse(&handles.conn, sql).and_then(|tree| route(&tree)) {
            Ok(Route::Data) => handles.prepare(sql).unwrap_or_default(),
            Ok(Route::Catalog) | Err(_) => Vec::new(),
        }
    }
}

impl Handles {
    /// Runs `sql` (statements without results) on the raw connection.
    fn execute(&self, sql: &str) -> Result<(), StoreError> {
        let text = cstring(sql)?;
        // SAFETY: the connection is open and used under the lock (or before the
        // `Binder` exists); the result is destroyed whatever the outcome.
        unsafe {
            let mut result: ffi::duckdb_result = std::mem::zeroed();
            let state = ffi::duckdb_query(self.raw.0, text.as_ptr(), &mut result);
            let error = (state != ffi::DuckDBSuccess).then(|| {
                let e = ffi::duckdb_result_error(&mut result);
                if e.is_null() {
                    "failed".to_owned()
                } else {
                    CStr::from_ptr(e).to_string_lossy().into_owned()
                }
            });
            ffi::duckdb_destroy_result(&mut result);
            match error {
                Some(e) => Err(StoreError::Internal(format!("parameter binder: {e}"))),
                None => Ok(()),
            }
        }
    }

    /// Prepares `sql` and reads its parameters' types; `None` when it does not
    /// prepare.
    fn prepare(&self, sql: &str) -> Option<Vec<Option<ParamType>>> {
        let text = CString::new(sql).ok()?;
        // SAFETY: as in `execute`; the statement is destroyed before returning,
        // and parameter indexes run over 1..=nparams as the C API numbers them.
        unsafe {
            let mut stmt: ffi::duckdb_prepared_statement = std::ptr::null_mut();
            let state = ffi::duckdb_prepare(self.raw.0, text.as_ptr(), &mut stmt);
            let types = (state == ffi::DuckDBSuccess).then(|| {
                (1..=ffi::duckdb_nparams(stmt))
                    .map(|i| ParamType::of(ffi::duckdb_param_type(stmt, i)))
                    .collect()
            });
            ffi::duckdb_destroy_prepare(&mut stmt);
            types
        }
    }
}

fn cstring(s: &str) -> Result<CString, StoreError> {
    CString::new(s).map_err(|_| StoreError::Internal("a NUL byte in SQL text".into()))
}
