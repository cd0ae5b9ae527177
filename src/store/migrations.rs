//! Ordered SQL migrations from `schema/migrations`, compiled into the binary and
//! recorded in `schema_migrations`.

use duckdb::Connection;

use super::StoreError;

/// Every migration this binary knows, in order: (version, name, SQL).
pub(super) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../schema/migrations/0001_init.sql"),
    ),
    (
        2,
        "rollups",
        include_str!("../../schema/migrations/0002_rollups.sql"),
    ),
    (
        3,
        "dumps",
        include_str!("../../schema/migrations/0003_dumps.sql"),
    ),
    (
        4,
        "alerts",
        include_str!("../../schema/migrations/0004_alerts.sql"),
    ),
    (
        5,
        "device_owners",
        include_str!("../../schema/migrations/0005_device_owners.sql"),
    ),
    (
        6,
        "reading_mantissas",
        include_str!("../../schema/migrations/0006_reading_mantissas.sql"),
    ),
    (
        7,
        "uncompacted_days",
        include_str!("../../schema/migrations/0007_uncompacted_days.sql"),
    ),
];

/// Newest schema version this binary knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Brings the schema up to date, each migration in its own transaction. A database
/// from a newer binary is refused before anything is written.
pub fn apply(conn: &Connection, path: &std::path::Path) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    BIGINT PRIMARY KEY,
            name       VARCHAR NOT NULL,
            applied_at TIMESTAMP NOT NULL
        )",
    )?;
    let current: i64 = conn.query_row(
        "SELECT coalesce(max(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    if current > latest_version() {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: current,
            known: latest_version(),
        });
    }
    let pending: Vec<_> = MIGRATIONS.iter().filter(|m| m.0 > current).collect();
    for &&(version, name, sql) in &pending {
        let _span = tracing::info_span!("migration", version, name).entered();
        super::in_transaction(conn, || {
            conn.execute_batch(sql)?;
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, make_timestamp(?))",
                duckdb::params![version, name, chrono::Utc::now().timestamp_micros()],
            )
        })?;
        tracing::info!(version, name, "applied migration");
    }
    if !pending.is_empty() {
        // The schema goes into the database file now, not only into the write-ahead
        // log: if a later log cannot be replayed, the schema is not lost with it.
        conn.execute_batch("CHECKPOINT")?;
    }
    Ok(())
}
