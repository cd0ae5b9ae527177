//! Alerts (what to watch for steps), the anomalies they find, and how people triage
//! them. Parsed once at the edge (gRPC or CLI) into types that are valid.

use super::names::named_enum;
use super::{BucketWidth, Device, SensorName, Step, StepConfig, Timestamp};

/// What an alert watches and how: valid by construction.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSpec {
    /// Short name people know it by (the webhook subject starts with it).
    pub name: String,
    /// The device watched.
    pub device: Device,
    /// The sensor watched.
    pub sensor: SensorName,
    /// Width of the buckets whose means form the series.
    pub bucket: BucketWidth,
    /// Algorithm, radius, threshold and direction.
    pub step: StepConfig,
    /// Buckets with fewer readings are left out of the series.
    pub min_bucket_readings: u32,
    /// Where new anomalies are POSTed; `None` for no notification.
    pub webhook: Option<url::Url>,
}

/// Why an alert's fields were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AlertSpecError {
    /// Empty or overlong name.
    #[error("name must be 1 to 100 characters")]
    Name,
    /// Webhook that is not an http(s) URL.
    #[error("webhook_url must be an http:// or https:// URL: {0}")]
    Webhook(String),
}

impl AlertSpec {
    /// Checks the parts that the other types do not.
    pub fn new(
        name: &str,
        device: Device,
        sensor: SensorName,
        bucket: BucketWidth,
        step: StepConfig,
        min_bucket_readings: u32,
        webhook: &str,
    ) -> Result<Self, AlertSpecError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(AlertSpecError::Name);
        }
        let webhook = match webhook.trim() {
            "" => None,
            w => {
                let u = url::Url::parse(w).map_err(|e| AlertSpecError::Webhook(e.to_string()))?;
                if !matches!(u.scheme(), "http" | "https") {
                    return Err(AlertSpecError::Webhook(format!("scheme '{}'", u.scheme())));
                }
                Some(u)
            }
        };
        Ok(Self {
            name: name.to_owned(),
            device,
            sensor,
            bucket,
            step,
            min_bucket_readings: min_bucket_readings.max(1),
            webhook,
        })
    }
}

/// A stored alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// Its id.
    pub id: i64,
    /// Starts at 1, grows with each update.
    pub revision: i64,
    /// What it watches.
    pub spec: AlertSpec,
    /// Inactive alerts are kept (their anomalies refer to them) but not run.
    pub active: bool,
    /// When it was created.
    pub created: Timestamp,
    /// When it last changed.
    pub updated: Timestamp,
    /// Background detection has decided every step before this bucket start.
    pub detected_through: Option<Timestamp>,
}

named_enum! {
    /// Where people are with an anomaly.
    pub enum TriageStatus as "triage status" {
        /// Nobody has looked yet.
        Untriaged = "untriaged",
        /// A real change.
        Positive = "positive",
        /// Not a real change.
        Negative = "negative",
        /// Not worth acting on.
        Ignored = "ignored",
    }
}

named_enum! {
    /// What to do about a group of anomalies.
    pub enum GroupAction as "group action" {
        /// Nothing (the default).
        NoAction = "noaction",
        /// Report it.
        Report = "report",
    }
}

/// A step found by an alert, before it is stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FoundStep {
    /// Start of the first bucket after the step.
    pub at: Timestamp,
    /// Start of the window's first bucket.
    pub window_start: Timestamp,
    /// End of the window's last bucket.
    pub window_end: Timestamp,
    /// Mean of the before half.
    pub before_mean: f64,
    /// Mean of the after half.
    pub after_mean: f64,
    /// The algorithm's statistic.
    pub statistic: f64,
    /// Up or down.
    pub step: Step,
}

impl FoundStep {
    /// Percent change from before to after; `None` when before is 0.
    pub fn percent_change(&self) -> Option<f64> {
        (self.before_mean != 0.0)
            .then(|| (self.after_mean - self.before_mean) / self.before_mean.abs() * 100.0)
    }
}

/// A stored anomaly.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    /// Its id.
    pub id: i64,
    /// The alert that found it.
    pub alert_id: i64,
    /// The alert's revision then.
    pub alert_revision: i64,
    /// Device watched.
    pub device: String,
    /// Sensor watched.
    pub sensor: String,
    /// The step.
    pub found: FoundStep,
    /// Triage.
    pub status: TriageStatus,
    /// Triage note.
    pub message: String,
    /// When it was found.
    pub detected: Timestamp,
    /// When it was last triaged.
    pub triaged: Option<Timestamp>,
    /// Who triaged it (the token's name).
    pub triaged_by: Option<String>,
    /// Its group.
    pub group_id: i64,
}

/// Anomalies of one alert whose windows overlap.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyGroup {
    /// Its id.
    pub id: i64,
    /// The alert.
    pub alert_id: i64,
    /// Earliest window start of its anomalies.
    pub start: Timestamp,
    /// Latest window end.
    pub end: Timestamp,
    /// Its anomalies' ids.
    pub anomaly_ids: Vec<i64>,
    /// What to do about it.
    pub action: GroupAction,
}

/// One webhook attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Its id.
    pub id: i64,
    /// The alert.
    pub alert_id: i64,
    /// Where it went.
    pub url: String,
    /// The subject line.
    pub subject: String,
    /// The anomalies it carried.
    pub anomaly_ids: Vec<i64>,
    /// 1 for the first try.
    pub attempt: u32,
    /// Whether the receiver answered 2xx.
    pub ok: bool,
    /// The receiver's status, 0 when none.
    pub status_code: u16,
    /// What went wrong, empty when ok.
    pub error: String,
    /// When.
    pub at: Timestamp,
}

/// Filter of an anomaly listing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnomalyFilter {
    /// Only this alert's.
    pub alert_id: Option<i64>,
    /// Only this device's.
    pub device: Option<String>,
    /// Only this sensor's.
    pub sensor: Option<String>,
    /// Steps at or after.
    pub from: Option<Timestamp>,
    /// Steps before.
    pub to: Option<Timestamp>,
    /// Only this status.
    pub status: Option<TriageStatus>,
    /// At most this many, newest step first.
    pub limit: usize,
}
