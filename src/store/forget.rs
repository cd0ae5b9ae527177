//! Deleting a device that should not exist: its readings, rollups, series statistics
//! and name, in one transaction. The writer calls it between commits, after moving
//! everything acknowledged into DuckDB, and then forgets the device in memory.
//!
//! Anomalies and alert configurations name devices as text and are history or an
//! operator's settings: they are kept. Dumps already written still hold the device's
//! readings until their days are dumped again.

use duckdb::Connection;

use super::StoreError;
use crate::domain::DeviceId;

/// What deleting a device removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeletedDevice {
    /// Readings deleted.
    pub readings: u64,
    /// Series (sensors with readings) it had.
    pub series: u64,
}

/// Deletes every row of `device`.
pub(super) fn delete_device(
    conn: &Connection,
    device: DeviceId,
) -> Result<DeletedDevice, StoreError> {
    let _span = tracing::info_span!("delete_device", device = device.0).entered();
    let d = device.0 as i32;
    let done = super::in_transaction(conn, || {
        let (readings, series): (i64, i64) = conn.query_row(
            "SELECT count(*), count(DISTINCT sensor_id) FROM readings WHERE device_id = ?",
            [d],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        for table in [
            "received_readings",
            "compacted_readings",
            "rollups",
            "series",
            "device_owners",
        ] {
            conn.execute(&format!("DELETE FROM {table} WHERE device_id = ?"), [d])?;
        }
        conn.execute("DELETE FROM devices WHERE id = ?", [d])?;
        Ok::<_, StoreError>(DeletedDevice {
            readings: readings as u64,
            series: series as u64,
        })
    })?;
    // Frees the deleted blocks now when it can (as retention does).
    if let Err(e) = conn.execute_batch("CHECKPOINT") {
        tracing::debug!(error = %e, "checkpoint after deleting a device deferred");
    }
    Ok(done)
}
