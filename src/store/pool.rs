//! Connections cloned from one connection of an instance and kept for reuse: the
//! reader's, user SQL's and the catalog instance's. A connection is used by one
//! thread at a time; opening one costs little, but user SQL's also make their
//! views, so they are kept.

use std::sync::Mutex;

use duckdb::Connection;

use super::StoreError;

/// Prepared statements a pooled connection keeps (see [`Pool::take`]).
const STATEMENT_CACHE: usize = 64;

/// See the module docs.
pub(super) struct Pool {
    base: Mutex<Connection>,
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
    /// Run once on each new connection.
    setup: Option<String>,
}

impl Pool {
    /// Connections like `base`, at most `max_idle` kept.
    pub(super) fn new(base: Connection, max_idle: usize) -> Self {
        Self {
            base: Mutex::new(base),
            idle: Mutex::new(Vec::new()),
            max_idle,
            setup: None,
        }
    }

    /// Each new connection first runs `setup` (e.g. makes temporary views).
    pub(super) fn with_setup(mut self, setup: String) -> Self {
        self.setup = Some(setup);
        self
    }

    /// Runs `f` on an idle connection or a new one, kept afterwards whatever `f`
    /// returned.
    pub(super) fn with<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let conn = self.take()?;
        let out = f(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
        out
    }

    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(c) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(c);
        }
        let c = self
            .base
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_clone()?;
        // Reads prepare their statements once per connection (`prepare_cached`): a
        // page's window, a chart's rollups and raw parts, each shape per sensor and
        // source; duckdb-rs keeps 16 by default, fewer than those shapes.
        c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        if let Some(setup) = &self.setup {
            c.execute_batch(setup)?;
        }
        Ok(c)
    }
}
