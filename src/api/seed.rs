//! The read endpoints the cloud-lada dashboard polls, with the seed's exact shapes.

use std::sync::Arc;

use chrono::Duration;
use poem_openapi::Object;

use super::AppState;
use super::error::ApiError;
use crate::domain::{Day, Device, SensorId};

/// Newest value of each car sensor; 0 where there is none.
#[derive(Debug, Clone, PartialEq, Object)]
#[oai(rename_all = "camelCase", example)]
pub struct LatestStatistics {
    /// Sensor `speed`, km/h.
    pub speed: f64,
    /// Sensor `fuel`, %.
    pub fuel: f64,
    /// Sensor `engine_temperature`, °C.
    pub engine_temperature: f64,
    /// Sensor `revolution`, rpm (the seed's field name is plural).
    pub revolutions: f64,
}

/// Newest position; 0 where there is none.
#[derive(Debug, Clone, PartialEq, Object)]
pub struct LatestLocation {
    /// Newest `location_latitude`.
    pub latitude: f64,
    /// Newest `location_longitude`.
    pub longitude: f64,
}

/// Average of one 15-minute bucket.
#[derive(Debug, Clone, PartialEq, Object)]
#[oai(example)]
pub struct Statistic {
    /// Sensor name.
    pub sensor: String,
    /// Average value in the bucket; 0 when it has no readings.
    pub value: f64,
    /// Start of the bucket, RFC 3339 UTC (`Z`).
    pub timestamp: String,
}

impl poem_openapi::types::Example for Statistic {
    fn example() -> Self {
        Self {
            sensor: "speed".into(),
            value: 57.85,
            timestamp: "2012-04-23T18:15:00Z".into(),
        }
    }
}

/// When data was last ingested.
#[derive(Debug, Clone, PartialEq, Object)]
#[oai(rename_all = "camelCase")]
pub struct Status {
    /// Timestamp of the newest stored reading (RFC 3339 UTC), `null` when there is none.
    #[oai(nullable)]
    pub last_ingest_timestamp: Option<String>,
}

fn latest_of(state: &AppState, device: &Device, names: &[&str]) -> Vec<f64> {
    let catalog = state.reads.catalog();
    let series = state.reads.series_of(device);
    names
        .iter()
        .map(|name| {
            catalog
                .get(name)
                .and_then(|s| series.iter().find(|(id, _)| *id == s.id))
                .map_or(0.0, |(_, st)| st.last_value)
        })
        .collect()
}

impl poem_openapi::types::Example for LatestStatistics {
    fn example() -> Self {
        Self {
            speed: 61.9,
            fuel: 44.5,
            engine_temperature: 88.0,
            revolutions: 2100.0,
        }
    }
}

/// `GET /api/statistics/latest`.
pub fn latest(state: &AppState, device: &Device) -> LatestStatistics {
    let v = latest_of(
        state,
        device,
        &["speed", "fuel", "engine_temperature", "revolution"],
    );
    LatestStatistics {
        speed: v[0],
        fuel: v[1],
        engine_temperature: v[2],
        revolutions: v[3],
    }
}

/// `GET /api/location/latest`.
pub fn location(state: &AppState, device: &Device) -> LatestLocation {
    let v = latest_of(state, device, &["location_latitude", "location_longitude"]);
    LatestLocation {
        latitude: v[0],
        longitude: v[1],
    }
}

/// `GET /api/status`.
pub fn status(state: &AppState, device: &Device) -> Status {
    let last = state
        .reads
        .series_of(device)
        .iter()
        .map(|(_, s)| s.last)
        .max();
    Status {
        last_ingest_timestamp: last.map(|t| t.to_string()),
    }
}

/// `GET /api/statistics/sensor/{sensor}/date/{date}`.
pub async fn day_chart(
    state: &Arc<AppState>,
    device: Device,
    sensor: &str,
    date: &str,
    tz: Option<&str>,
) -> Result<Vec<Statistic>, ApiError> {
    let catalog = state.reads.catalog();
    let sensor_id: SensorId = catalog
        .get(sensor)
        .map(|s| s.id)
        .ok_or_else(|| ApiError::bad_request(format!("unknown sensor '{sensor}'")))?;
    let day = Day::parse(date).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let buckets = Arc::new(day.buckets(super::params::tz_param(tz)?, Duration::minutes(15)));
    let reads = state.reads.clone();
    let b = buckets.clone();
    let stats = super::blocking(move || reads.bucket_stats(&device, sensor_id, &b)).await?;
    Ok(stats
        .iter()
        .enumerate()
        .map(|(i, agg)| Statistic {
            sensor: sensor.to_owned(),
            value: agg.avg().unwrap_or(0.0),
            timestamp: buckets.start(i).to_string(),
        })
        .collect())
}
