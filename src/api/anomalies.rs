//! `GET /api/v1/anomalies`: the steps background detection found, read-only. Alerts
//! are managed, and anomalies triaged, over the internal backend.

use std::sync::Arc;

use poem::web::Data;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};

use super::error::ApiError;
use super::{AppState, Tag};
use crate::domain::{AnomalyFilter, Timestamp, TriageStatus};

/// The `/api/v1/anomalies` endpoint.
pub struct AnomaliesApi;

/// A step in a sensor's series that an alert found.
#[derive(Debug, Clone, Object)]
pub struct AnomalyInfo {
    /// Its id.
    pub id: i64,
    /// The alert that found it.
    pub alert_id: i64,
    /// Device.
    pub device: String,
    /// Sensor.
    pub sensor: String,
    /// Start of the first bucket after the step (RFC 3339 UTC).
    pub time: String,
    /// `up` or `down`.
    pub direction: String,
    /// Mean of the buckets before the step.
    pub before_mean: f64,
    /// Mean of the buckets after it.
    pub after_mean: f64,
    /// (after − before) / |before| × 100; absent when before is 0.
    #[oai(skip_serializing_if_is_none)]
    pub percent_change: Option<f64>,
    /// The alert algorithm's statistic (d, or a p-value for mannwhitneyu).
    pub statistic: f64,
    /// First bucket start of the window judged (RFC 3339 UTC).
    pub window_start: String,
    /// Last bucket end of the window judged (RFC 3339 UTC).
    pub window_end: String,
    /// `untriaged`, `positive`, `negative` or `ignored`.
    pub status: String,
    /// Triage note.
    pub message: String,
    /// Its anomaly group (anomalies of one alert whose windows overlap).
    pub group_id: i64,
    /// When it was found (RFC 3339 UTC).
    pub detected_at: String,
}

/// Anomalies, newest step first.
#[derive(Debug, Clone, Object)]
pub struct AnomalyList {
    /// At most `limit`.
    pub anomalies: Vec<AnomalyInfo>,
}

fn time(name: &str, v: Option<String>) -> Result<Option<Timestamp>, ApiError> {
    v.map(|s| super::params::time_param(name, &s)).transpose()
}

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Readings")]
impl AnomaliesApi {
    /// Anomalies
    ///
    /// Steps found by the alerts (step detection over bucket means), newest first,
    /// filtered by device, sensor, time of the step and triage status.
    #[oai(path = "/anomalies", method = "get")]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        state: Data<&Arc<AppState>>,
        /// Only this device's.
        device: Query<Option<String>>,
        /// Only this sensor's.
        sensor: Query<Option<String>>,
        /// Steps at or after this time (RFC 3339).
        from: Query<Option<String>>,
        /// Steps before this time (RFC 3339).
        to: Query<Option<String>>,
        /// `untriaged`, `positive`, `negative` or `ignored`.
        status: Query<Option<String>>,
        /// Only this alert's.
        alert: Query<Option<i64>>,
        /// At most this many (1 to 10000).
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "10000"))
        )]
        limit: Query<u32>,
    ) -> Result<Json<AnomalyList>, ApiError> {
        let status = status
            .0
            .map(|s| s.parse::<TriageStatus>())
            .transpose()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let filter = AnomalyFilter {
            alert_id: alert.0,
            device: device.0,
            sensor: sensor.0,
            from: time("from", from.0)?,
            to: time("to", to.0)?,
            status,
            limit: limit.0 as usize,
        };
        let alerts = state.alerts.clone();
        let found = tokio::task::spawn_blocking(move || alerts.anomalies(&filter))
            .await
            .map_err(|_| ApiError::internal())?
            .map_err(|e| {
                tracing::error!(error = %e, "listing anomalies failed");
                ApiError::internal()
            })?;
        Ok(Json(AnomalyList {
            anomalies: found
                .iter()
                .map(|a| AnomalyInfo {
                    id: a.id,
                    alert_id: a.alert_id,
                    device: a.device.clone(),
                    sensor: a.sensor.clone(),
                    time: a.found.at.to_string(),
                    direction: a.found.step.as_str().to_owned(),
                    before_mean: a.found.before_mean,
                    after_mean: a.found.after_mean,
                    percent_change: a.found.percent_change(),
                    statistic: a.found.statistic,
                    window_start: a.found.window_start.to_string(),
                    window_end: a.found.window_end.to_string(),
                    status: a.status.as_str().to_owned(),
                    message: a.message.clone(),
                    group_id: a.group_id,
                    detected_at: a.detected.to_string(),
                })
                .collect(),
        }))
    }
}

fn default_limit() -> u32 {
    1000
}
