//! Alerts, anomalies, anomaly groups, webhook deliveries and sensor catalog changes:
//! the backend's small tables (schema version 4).
//!
//! One connection of its own, behind a lock: these tables are written by the
//! backend and the detection job only, never by the readings writer, so the two
//! never conflict. Every method blocks (call from `spawn_blocking`). Times are
//! epoch microseconds in the tables.

use std::sync::{Arc, Mutex};

use duckdb::types::Value;
use duckdb::{Connection, OptionalExt, Row, params};

use super::{Shared, StoreError};
use crate::domain::{
    Alert, AlertSpec, Anomaly, AnomalyFilter, AnomalyGroup, BucketWidth, Catalog, Delivery, Device,
    FoundStep, GroupAction, Sensor, SensorId, SensorName, Timestamp, TriageStatus,
};
use crate::domain::{Algorithm, Direction, Step, StepConfig};

/// Why an alert-store call did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum AlertStoreError {
    /// No such alert, anomaly or group.
    #[error("{0} not found")]
    NotFound(String),
    /// An update named a revision that is no longer current.
    #[error("alert {id} is at revision {current}, not {given}: read it again and retry")]
    StaleRevision {
        /// The alert.
        id: i64,
        /// Its revision now.
        current: i64,
        /// The revision the update named.
        given: i64,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<duckdb::Error> for AlertStoreError {
    fn from(e: duckdb::Error) -> Self {
        Self::Store(StoreError::Duckdb(e))
    }
}

type Result<T> = std::result::Result<T, AlertStoreError>;

/// The backend's tables.
pub struct AlertStore {
    conn: Mutex<Connection>,
    shared: Arc<Shared>,
}

const ALERT_COLUMNS: &str = "id, name, revision, device, sensor, bucket, algorithm, radius, \
     threshold, direction, min_bucket_readings, webhook_url, active, created_us, updated_us, \
     detected_through_us";

const ANOMALY_COLUMNS: &str = "id, alert_id, alert_revision, device, sensor, step_us, \
     window_start_us, window_end_us, before_mean, after_mean, statistic, direction, status, \
     message, detected_us, triaged_us, triaged_by, group_id";

fn corrupt(what: impl std::fmt::Display) -> duckdb::Error {
    duckdb::Error::InvalidParameterName(format!("invalid stored value: {what}"))
}

fn alert_of(r: &Row<'_>) -> duckdb::Result<Alert> {
    let text = |i| r.get::<_, String>(i);
    let algorithm: Algorithm = text(6)?.parse().map_err(corrupt)?;
    let direction: Direction = text(9)?.parse().map_err(corrupt)?;
    let step = StepConfig::new(
        algorithm,
        r.get::<_, i32>(7)? as usize,
        r.get(8)?,
        direction,
    )
    .map_err(corrupt)?;
    let spec = AlertSpec::new(
        &text(1)?,
        Device::parse(&text(3)?).map_err(corrupt)?,
        SensorName::parse(&text(4)?).map_err(corrupt)?,
        BucketWidth::parse(&text(5)?).map_err(corrupt)?,
        step,
        r.get::<_, i32>(10)? as u32,
        &text(11)?,
    )
    .map_err(corrupt)?;
    Ok(Alert {
        id: r.get(0)?,
        revision: r.get(2)?,
        spec,
        active: r.get(12)?,
        created: Timestamp::from_micros(r.get(13)?),
        updated: Timestamp::from_micros(r.get(14)?),
        detected_through: r.get::<_, Option<i64>>(15)?.map(Timestamp::from_micros),
    })
}

fn step_of(s: &str) -> duckdb::Result<Step> {
    match s {
        "up" => Ok(Step::Up),
        "down" => Ok(Step::Down),
        _ => Err(corrupt(s)),
    }
}

fn anomaly_of(r: &Row<'_>) -> duckdb::Result<Anomaly> {
    let ts = |i| r.get::<_, i64>(i).map(Timestamp::from_micros);
    Ok(Anomaly {
        id: r.get(0)?,
        alert_id: r.get(1)?,
        alert_revision: r.get(2)?,
        device: r.get(3)?,
        sensor: r.get(4)?,
        found: FoundStep {
            at: ts(5)?,
            window_start: ts(6)?,
            window_end: ts(7)?,
            before_mean: r.get(8)?,
            after_mean: r.get(9)?,
            statistic: r.get(10)?,
            step: step_of(&r.get::<_, String>(11)?)?,
        },
        status: r.get::<_, String>(12)?.parse().map_err(corrupt)?,
        message: r.get(13)?,
        detected: ts(14)?,
        triaged: r.get::<_, Option<i64>>(15)?.map(Timestamp::from_micros),
        triaged_by: r.get(16)?,
        group_id: r.get(17)?,
    })
}

/// The spec's columns, from `name` to `webhook_url` in table order.
fn spec_values(spec: &AlertSpec) -> [Value; 10] {
    [
        Value::Text(spec.name.clone()),
        Value::Text(spec.device.to_string()),
        Value::Text(spec.sensor.to_string()),
        Value::Text(spec.bucket.to_string()),
        Value::Text(spec.step.algorithm().as_str().to_owned()),
        Value::Int(spec.step.radius() as i32),
        Value::Double(spec.step.threshold()),
        Value::Text(spec.step.direction().as_str().to_owned()),
        Value::Int(spec.min_bucket_readings as i32),
        Value::Text(
            spec.webhook
                .as_ref()
                .map(|u| u.to_string())
                .unwrap_or_default(),
        ),
    ]
}

impl AlertStore {
    pub(super) fn new(conn: Connection, shared: Arc<Shared>) -> Self {
        Self {
            conn: Mutex::new(conn),
            shared,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }

    fn in_tx<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.with(|c| super::in_transaction(c, || f(c)))
    }

    // ------------------------------------------------------------------ alerts

    /// Stores a new alert at revision 1, active.
    pub fn create_alert(&self, spec: &AlertSpec) -> Result<Alert> {
        let now = Timestamp::now().as_micros();
        let id = self.in_tx(|c| {
            let id: i64 = c.query_row("SELECT nextval('alert_ids')", [], |r| r.get(0))?;
            let mut values = vec![Value::BigInt(id)];
            values.extend(spec_values(spec));
            values.extend([Value::BigInt(now), Value::BigInt(now)]);
            c.execute(
                &format!(
                    "INSERT INTO alerts ({ALERT_COLUMNS})
                     VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, true, ?, ?, NULL)"
                ),
                duckdb::params_from_iter(values),
            )?;
            Ok(id)
        })?;
        self.alert(id)
    }

    /// Replaces an alert's spec if `revision` is its current one; the revision
    /// grows by one. Detection starts over for it when the series it watches or
    /// the way it is bucketed changed.
    pub fn update_alert(&self, id: i64, revision: i64, spec: &AlertSpec) -> Result<Alert> {
        self.in_tx(|c| {
            let old = Self::alert_in(c, id)?;
            if old.revision != revision {
                return Err(AlertStoreError::StaleRevision {
                    id,
                    current: old.revision,
                    given: revision,
                });
            }
            let restart = old.spec.device != spec.device
                || old.spec.sensor != spec.sensor
                || old.spec.bucket != spec.bucket;
            c.execute(
                "UPDATE alerts SET name = ?, revision = revision + 1, device = ?, sensor = ?,
                        bucket = ?, algorithm = ?, radius = ?, threshold = ?, direction = ?,
                        min_bucket_readings = ?, webhook_url = ?, updated_us = ?,
                        detected_through_us = CASE WHEN ? THEN NULL ELSE detected_through_us END
                 WHERE id = ?",
                duckdb::params_from_iter(spec_values(spec).into_iter().chain([
                    Value::BigInt(Timestamp::now().as_micros()),
                    Value::Boolean(restart),
                    Value::BigInt(id),
                ])),
            )?;
            Ok(())
        })?;
        self.alert(id)
    }

    fn alert_in(c: &Connection, id: i64) -> Result<Alert> {
        c.query_row(
            &format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ?"),
            [id],
            alert_of,
        )
        .optional()?
        .ok_or_else(|| AlertStoreError::NotFound(format!("alert {id}")))
    }

    /// One alert.
    pub fn alert(&self, id: i64) -> Result<Alert> {
        self.with(|c| Self::alert_in(c, id))
    }

    /// Alerts, by id; inactive ones only when asked.
    pub fn alerts(&self, include_inactive: bool) -> Result<Vec<Alert>> {
        self.with(|c| {
            let sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE active OR ? ORDER BY id");
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map([include_inactive], alert_of)?;
            Ok(rows.collect::<duckdb::Result<Vec<_>>>()?)
        })
    }

    /// Marks an alert inactive (kept, with its anomalies; no longer run).
    pub fn deactivate(&self, id: i64) -> Result<Alert> {
        self.in_tx(|c| {
            Self::alert_in(c, id)?;
            c.execute(
                "UPDATE alerts SET active = false, updated_us = ? WHERE id = ?",
                params![Timestamp::now().as_micros(), id],
            )?;
            Ok(())
        })?;
        self.alert(id)
    }

    /// Records where background detection has settled for an alert.
    pub fn set_detected_through(&self, id: i64, through: Timestamp) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE alerts SET detected_through_us = ? WHERE id = ?",
                params![through.as_micros(), id],
            )?;
            Ok(())
        })
    }

    // ------------------------------------------------------------------ anomalies

    /// Stores the steps `alert` found that are not stored yet (identity: alert and
    /// step bucket), each in the group of this alert whose time range its window
    /// overlaps (widening it) or in a new group. Returns the newly stored ones.
    pub fn record(&self, alert: &Alert, found: &[FoundStep]) -> Result<Vec<Anomaly>> {
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let now = Timestamp::now().as_micros();
        let ids = self.in_tx(|c| {
            let mut ids = Vec::new();
            for f in found {
                let exists: i64 = c.query_row(
                    "SELECT count(*) FROM anomalies WHERE alert_id = ? AND step_us = ?",
                    params![alert.id, f.at.as_micros()],
                    |r| r.get(0),
                )?;
                if exists > 0 {
                    continue;
                }
                let (ws, we) = (f.window_start.as_micros(), f.window_end.as_micros());
                let group: Option<i64> = c
                    .query_row(
                        "SELECT id FROM anomaly_groups
                         WHERE alert_id = ? AND start_us < ? AND ? < end_us
                         ORDER BY id LIMIT 1",
                        params![alert.id, we, ws],
                        |r| r.get(0),
                    )
                    .optional()?;
                let group = match group {
                    Some(g) => {
                        c.execute(
                            "UPDATE anomaly_groups SET start_us = least(start_us, ?),
                                    end_us = greatest(end_us, ?) WHERE id = ?",
                            params![ws, we, g],
                        )?;
                        g
                    }
                    None => {
                        let g: i64 =
                            c.query_row("SELECT nextval('anomaly_group_ids')", [], |r| r.get(0))?;
                        c.execute(
                            "INSERT INTO anomaly_groups VALUES (?, ?, ?, ?, 'noaction')",
                            params![g, alert.id, ws, we],
                        )?;
                        g
                    }
                };
                let id: i64 = c.query_row("SELECT nextval('anomaly_ids')", [], |r| r.get(0))?;
                // Without a webhook there is nothing to notify: born notified.
                let notified = alert.spec.webhook.is_none().then_some(now);
                c.execute(
                    &format!(
                        "INSERT INTO anomalies ({ANOMALY_COLUMNS}, notified_us)
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'untriaged', '', ?, NULL, NULL, ?, ?)"
                    ),
                    params![
                        id,
                        alert.id,
                        alert.revision,
                        alert.spec.device.as_str(),
                        alert.spec.sensor.as_str(),
                        f.at.as_micros(),
                        ws,
                        we,
                        f.before_mean,
                        f.after_mean,
                        f.statistic,
                        f.step.as_str(),
                        now,
                        group,
                        notified,
                    ],
                )?;
                ids.push(id);
            }
            Ok(ids)
        })?;
        ids.into_iter().map(|id| self.anomaly(id)).collect()
    }

    /// One anomaly.
    pub fn anomaly(&self, id: i64) -> Result<Anomaly> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {ANOMALY_COLUMNS} FROM anomalies WHERE id = ?"),
                [id],
                anomaly_of,
            )
            .optional()?
            .ok_or_else(|| AlertStoreError::NotFound(format!("anomaly {id}")))
        })
    }

    /// Anomalies matching `filter`, newest step first.
    pub fn anomalies(&self, filter: &AnomalyFilter) -> Result<Vec<Anomaly>> {
        let mut sql = format!("SELECT {ANOMALY_COLUMNS} FROM anomalies WHERE true");
        let mut args: Vec<Value> = Vec::new();
        if let Some(a) = filter.alert_id {
            sql.push_str(" AND alert_id = ?");
            args.push(Value::BigInt(a));
        }
        if let Some(d) = &filter.device {
            sql.push_str(" AND device = ?");
            args.push(Value::Text(d.clone()));
        }
        if let Some(s) = &filter.sensor {
            sql.push_str(" AND sensor = ?");
            args.push(Value::Text(s.clone()));
        }
        if let Some(t) = filter.from {
            sql.push_str(" AND step_us >= ?");
            args.push(Value::BigInt(t.as_micros()));
        }
        if let Some(t) = filter.to {
            sql.push_str(" AND step_us < ?");
            args.push(Value::BigInt(t.as_micros()));
        }
        if let Some(s) = filter.status {
            sql.push_str(" AND status = ?");
            args.push(Value::Text(s.as_str().to_owned()));
        }
        sql.push_str(&format!(
            " ORDER BY step_us DESC, id DESC LIMIT {}",
            filter.limit.max(1)
        ));
        self.with(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map(duckdb::params_from_iter(args), anomaly_of)?;
            Ok(rows.collect::<duckdb::Result<Vec<_>>>()?)
        })
    }

    /// Sets an anomaly's triage status and message.
    pub fn triage(
        &self,
        id: i64,
        status: TriageStatus,
        message: &str,
        by: &str,
    ) -> Result<Anomaly> {
        let changed = self.with(|c| {
            Ok(c.execute(
                "UPDATE anomalies SET status = ?, message = ?, triaged_us = ?, triaged_by = ?
                 WHERE id = ?",
                params![
                    status.as_str(),
                    message,
                    Timestamp::now().as_micros(),
                    by,
                    id
                ],
            )?)
        })?;
        if changed == 0 {
            return Err(AlertStoreError::NotFound(format!("anomaly {id}")));
        }
        self.anomaly(id)
    }

    /// Groups, of one alert or all, newest first.
    pub fn groups(&self, alert_id: Option<i64>) -> Result<Vec<AnomalyGroup>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT g.id, g.alert_id, g.start_us, g.end_us, g.action,
                        list(a.id ORDER BY a.id)
                 FROM anomaly_groups g LEFT JOIN anomalies a ON a.group_id = g.id
                 WHERE g.alert_id = ? OR CAST(? AS BIGINT) IS NULL
                 GROUP BY ALL ORDER BY g.start_us DESC, g.id DESC",
            )?;
            let rows = stmt.query_map(params![alert_id, alert_id], |r| {
                let ids: Value = r.get(5)?;
                let anomaly_ids = match ids {
                    Value::List(v) => v
                        .into_iter()
                        .filter_map(|x| match x {
                            Value::BigInt(i) => Some(i),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                Ok(AnomalyGroup {
                    id: r.get(0)?,
                    alert_id: r.get(1)?,
                    start: Timestamp::from_micros(r.get(2)?),
                    end: Timestamp::from_micros(r.get(3)?),
                    anomaly_ids,
                    action: r.get::<_, String>(4)?.parse().map_err(corrupt)?,
                })
            })?;
            Ok(rows.collect::<duckdb::Result<Vec<_>>>()?)
        })
    }

    /// Sets a group's action.
    pub fn set_group_action(&self, id: i64, action: GroupAction) -> Result<AnomalyGroup> {
        let changed = self.with(|c| {
            Ok(c.execute(
                "UPDATE anomaly_groups SET action = ? WHERE id = ?",
                params![action.as_str(), id],
            )?)
        })?;
        if changed == 0 {
            return Err(AlertStoreError::NotFound(format!("anomaly group {id}")));
        }
        self.groups(None)?
            .into_iter()
            .find(|g| g.id == id)
            .ok_or_else(|| AlertStoreError::NotFound(format!("anomaly group {id}")))
    }

    // ------------------------------------------------------------------ notifications

    /// Anomalies whose webhook has not had them yet, oldest first.
    pub fn unnotified(&self) -> Result<Vec<Anomaly>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {ANOMALY_COLUMNS} FROM anomalies WHERE notified_us IS NULL
                 ORDER BY alert_id, step_us"
            ))?;
            let rows = stmt.query_map([], anomaly_of)?;
            Ok(rows.collect::<duckdb::Result<Vec<_>>>()?)
        })
    }

    /// Marks anomalies as delivered (or given up on).
    pub fn mark_notified(&self, ids: &[i64]) -> Result<()> {
        let now = Timestamp::now().as_micros();
        self.in_tx(|c| {
            for id in ids {
                c.execute(
                    "UPDATE anomalies SET notified_us = ? WHERE id = ?",
                    params![now, id],
                )?;
            }
            Ok(())
        })
    }

    /// Logs one webhook attempt.
    pub fn log_delivery(&self, d: &Delivery) -> Result<i64> {
        let ids = serde_json::to_string(&d.anomaly_ids).unwrap_or_default();
        self.with(|c| {
            let id: i64 = c.query_row("SELECT nextval('delivery_ids')", [], |r| r.get(0))?;
            c.execute(
                "INSERT INTO deliveries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                params![
                    id,
                    d.alert_id,
                    d.url,
                    d.subject,
                    ids,
                    d.attempt as i32,
                    d.ok,
                    i32::from(d.status_code),
                    d.error,
                    d.at.as_micros(),
                ],
            )?;
            Ok(id)
        })
    }

    /// Webhook attempts, newest first.
    pub fn deliveries(&self, alert_id: Option<i64>, limit: usize) -> Result<Vec<Delivery>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT id, alert_id, url, subject, anomaly_ids, attempt, ok, status_code, error, at_us
                 FROM deliveries WHERE alert_id = ? OR CAST(? AS BIGINT) IS NULL
                 ORDER BY id DESC LIMIT {}",
                limit.max(1)
            ))?;
            let rows = stmt.query_map(params![alert_id, alert_id], |r| {
                Ok(Delivery {
                    id: r.get(0)?,
                    alert_id: r.get(1)?,
                    url: r.get(2)?,
                    subject: r.get(3)?,
                    anomaly_ids: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
                    attempt: r.get::<_, i32>(5)? as u32,
                    ok: r.get(6)?,
                    status_code: r.get::<_, i32>(7)? as u16,
                    error: r.get(8)?,
                    at: Timestamp::from_micros(r.get(9)?),
                })
            })?;
            Ok(rows.collect::<duckdb::Result<Vec<_>>>()?)
        })
    }

    // ------------------------------------------------------------------ sensor catalog

    /// Adds a sensor, or changes the unit, description and range of one; ingest
    /// checks readings against the new catalog from the next request on.
    pub fn upsert_sensor(
        &self,
        name: &SensorName,
        unit: &str,
        description: &str,
        min: Option<f64>,
        max: Option<f64>,
    ) -> Result<Sensor> {
        let _update = self.shared.catalog_update();
        let catalog = self.shared.catalog();
        let id = match catalog.get(name.as_str()) {
            Some(s) => s.id,
            None => {
                let next = catalog.iter().map(|s| s.id.0).max().unwrap_or(0) + 1;
                if next > i16::MAX as u16 {
                    return Err(StoreError::Internal("the sensor catalog is full".into()).into());
                }
                SensorId(next)
            }
        };
        let sensor = Sensor {
            id,
            name: name.clone(),
            unit: unit.to_owned(),
            description: description.to_owned(),
            min,
            max,
        };
        let exists = catalog.get(name.as_str()).is_some();
        self.with(|c| {
            // An UPDATE of the non-key columns, not DELETE + INSERT: DuckDB checks
            // the key of a row deleted and inserted again in one transaction eagerly.
            if exists {
                c.execute(
                    "UPDATE sensors SET unit = ?, description = ?, min_value = ?, max_value = ?
                     WHERE id = ?",
                    params![unit, description, min, max, id.0 as i16],
                )?;
            } else {
                c.execute(
                    "INSERT INTO sensors VALUES (?, ?, ?, ?, ?, ?)",
                    params![id.0 as i16, name.as_str(), unit, description, min, max],
                )?;
            }
            Ok(())
        })?;
        let mut sensors: Vec<Sensor> = catalog.iter().filter(|s| s.id != id).cloned().collect();
        sensors.push(sensor.clone());
        self.shared.set_catalog(Catalog::new(sensors));
        Ok(sensor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn open(dir: &std::path::Path) -> Store {
        crate::store::open_for_tests(dir)
    }

    fn spec(webhook: &str) -> AlertSpec {
        AlertSpec::new(
            "coolant",
            Device::parse("lada").unwrap(),
            SensorName::parse("engine_temperature").unwrap(),
            BucketWidth::Minutes(1),
            StepConfig::new(Algorithm::Absolute, 5, 10.0, Direction::Both).unwrap(),
            1,
            webhook,
        )
        .unwrap()
    }

    fn step(at_min: i64) -> FoundStep {
        let m = |x: i64| Timestamp::from_micros(x * 60_000_000);
        FoundStep {
            at: m(at_min),
            window_start: m(at_min - 5),
            window_end: m(at_min + 5),
            before_mean: 80.0,
            after_mean: 100.0,
            statistic: 20.0,
            step: Step::Up,
        }
    }

    #[test]
    fn parallel_catalog_upserts_get_unique_ids_and_none_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let alerts = store.alert_store().unwrap();
        let builtin = store.shared().catalog().iter().count();
        std::thread::scope(|scope| {
            for i in 0..24 {
                let alerts = &alerts;
                scope.spawn(move || {
                    let name = SensorName::parse(&format!("probe_{i}")).unwrap();
                    alerts
                        .upsert_sensor(&name, "V", "a probe", None, Some(i as f64))
                        .expect("upsert");
                });
            }
        });
        let catalog = store.shared().catalog();
        assert_eq!(catalog.iter().count(), builtin + 24);
        let ids: std::collections::BTreeSet<u16> = catalog.iter().map(|s| s.id.0).collect();
        assert_eq!(ids.len(), builtin + 24, "ids are unique");
        for i in 0..24 {
            let s = catalog.get(&format!("probe_{i}")).expect("in memory");
            assert_eq!(s.max, Some(i as f64));
        }
        drop(alerts);
        drop(store);
        // And in the database.
        let store = open(dir.path());
        assert_eq!(store.shared().catalog().iter().count(), builtin + 24);
    }

    #[test]
    fn steps_are_stored_once_and_grouped_by_overlapping_windows() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let alerts = store.alert_store().unwrap();
        let a = alerts
            .create_alert(&spec("http://127.0.0.1:9/hook"))
            .unwrap();
        assert_eq!((a.id, a.revision, a.active), (1, 1, true));

        let first = alerts.record(&a, &[step(100), step(108)]).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].group_id, first[1].group_id, "windows overlap");
        // Again, with one more far away: only the new one is stored, in a new group.
        let again = alerts
            .record(&a, &[step(100), step(108), step(300)])
            .unwrap();
        assert_eq!(again.len(), 1);
        assert_ne!(again[0].group_id, first[0].group_id);
        let groups = alerts.groups(Some(a.id)).unwrap();
        assert_eq!(groups.len(), 2);
        let wide = groups.iter().find(|g| g.id == first[0].group_id).unwrap();
        assert_eq!(wide.anomaly_ids, vec![first[0].id, first[1].id]);
        assert_eq!(wide.start, step(100).window_start);
        assert_eq!(wide.end, step(108).window_end);

        // All three wait for the webhook until marked.
        assert_eq!(alerts.unnotified().unwrap().len(), 3);
        alerts.mark_notified(&[first[0].id]).unwrap();
        assert_eq!(alerts.unnotified().unwrap().len(), 2);

        // Filters and triage.
        let t = alerts
            .triage(first[1].id, TriageStatus::Negative, "noise", "ops")
            .unwrap();
        assert_eq!(t.triaged_by.as_deref(), Some("ops"));
        let negative = alerts
            .anomalies(&AnomalyFilter {
                status: Some(TriageStatus::Negative),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(negative.len(), 1);
        let late = alerts
            .anomalies(&AnomalyFilter {
                from: Some(step(200).at),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(late.len(), 1);

        // Updates need the current revision.
        let mut changed = spec("");
        changed.name = "coolant-2".into();
        assert!(matches!(
            alerts.update_alert(a.id, 7, &changed),
            Err(AlertStoreError::StaleRevision { current: 1, .. })
        ));
        let b = alerts.update_alert(a.id, 1, &changed).unwrap();
        assert_eq!(
            (b.revision, b.spec.name.as_str(), b.spec.webhook.is_none()),
            (2, "coolant-2", true)
        );
        assert!(!alerts.deactivate(a.id).unwrap().active);
        assert!(alerts.alerts(false).unwrap().is_empty());
        assert_eq!(alerts.alerts(true).unwrap().len(), 1);
    }

    #[test]
    fn the_sensor_catalog_grows_and_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let alerts = store.alert_store().unwrap();
        let oil = SensorName::parse("oil_pressure").unwrap();
        let s = alerts
            .upsert_sensor(&oil, "bar", "Oil pressure", Some(0.0), Some(10.0))
            .unwrap();
        assert_eq!(s.id, SensorId(7));
        let s = alerts
            .upsert_sensor(&oil, "kPa", "Oil pressure", Some(0.0), Some(1000.0))
            .unwrap();
        assert_eq!(s.id, SensorId(7));
        assert_eq!(
            store.shared().catalog().get("oil_pressure").unwrap().unit,
            "kPa"
        );
        // Updating a built-in keeps its id.
        let speed = SensorName::parse("speed").unwrap();
        let s = alerts
            .upsert_sensor(&speed, "mph", "Vehicle speed", None, Some(200.0))
            .unwrap();
        assert_eq!(s.id, SensorId(1));
        drop(alerts);
        drop(store);
        // And it is what the next start reads.
        let store = open(dir.path());
        let c = store.shared().catalog();
        assert_eq!(c.get("speed").unwrap().unit, "mph");
        assert_eq!(c.get("oil_pressure").unwrap().max, Some(1000.0));
    }
}
