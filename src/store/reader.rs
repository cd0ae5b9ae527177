//! Read side: a pool of DuckDB connections separate from the writer's, plus the
//! in-memory [`Shared`] view for answers that need no query at all.

use std::sync::{Arc, Mutex};

use duckdb::Connection;

use super::{SeriesStats, Shared, StoreError};
use crate::domain::{Catalog, DayWindow, Device, SensorId};

/// What the HTTP layer needs from storage. Methods may block (they run queries):
/// call them from `spawn_blocking`.
pub trait ReadStore: Send + Sync + 'static {
    /// The sensor catalog.
    fn catalog(&self) -> Arc<Catalog>;

    /// Statistics of every series of `device` (empty for an unknown device).
    fn series_of(&self, device: &Device) -> Vec<(SensorId, SeriesStats)>;

    /// Average value per bucket of `window`, `None` for empty buckets.
    fn bucket_averages(
        &self,
        device: &Device,
        sensor: SensorId,
        window: &DayWindow,
    ) -> Result<Vec<Option<f64>>, StoreError>;
}

/// Connections for queries. Idle connections are kept for reuse.
pub struct Reader {
    base: Mutex<Connection>,
    idle: Mutex<Vec<Connection>>,
    shared: Arc<Shared>,
}

const MAX_IDLE: usize = 8;

impl Reader {
    pub(super) fn new(base: Connection, shared: Arc<Shared>) -> Self {
        Self {
            base: Mutex::new(base),
            idle: Mutex::new(Vec::new()),
            shared,
        }
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.idle.lock().expect("pool lock").pop();
        let conn = match conn {
            Some(c) => c,
            None => self.base.lock().expect("base lock").try_clone()?,
        };
        let out = f(&conn);
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
        out
    }
}

impl ReadStore for Reader {
    fn catalog(&self) -> Arc<Catalog> {
        self.shared.catalog()
    }

    fn series_of(&self, device: &Device) -> Vec<(SensorId, SeriesStats)> {
        self.shared
            .device_id(device)
            .map(|id| self.shared.series_of(id))
            .unwrap_or_default()
    }

    fn bucket_averages(
        &self,
        device: &Device,
        sensor: SensorId,
        window: &DayWindow,
    ) -> Result<Vec<Option<f64>>, StoreError> {
        let _span = tracing::debug_span!("bucket_averages", %device, sensor = sensor.0).entered();
        let mut out = vec![None; window.buckets()];
        let Some(device) = self.shared.device_id(device) else {
            return Ok(out);
        };
        // Day starts and bucket widths are whole milliseconds, so `ts_ms` alone decides
        // the bucket, and the filter is on a plain column that zone maps can prune.
        let start_ms = window.start.as_micros().div_euclid(1000);
        let sql = format!(
            "SELECT (ts_ms - {start_ms}) // {width_ms} AS b, avg(value)
             FROM readings
             WHERE device_id = {dev} AND sensor_id = {sensor}
               AND ts_ms >= {start_ms} AND ts_ms < {end_ms}
             GROUP BY b",
            width_ms = window.bucket_micros() / 1000,
            dev = device.0,
            sensor = sensor.0,
            end_ms = window.end.as_micros().div_euclid(1000),
        );
        self.with_conn(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)?)))?;
            for row in rows {
                let (b, avg) = row?;
                if let Some(slot) = out.get_mut(b as usize) {
                    *slot = Some(avg);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }
}
