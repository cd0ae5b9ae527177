//! Between the wire and the domain: proto messages parsed into domain types (once,
//! here), domain types written back, and every error mapped to a gRPC status in
//! one place.

use tonic::{Code, Status};

use super::proto;
use crate::domain::{
    Alert, AlertSpec, Anomaly, AnomalyGroup, BucketWidth, Delivery, Device, FoundStep, GroupAction,
    SensorName, TimeRange, Timestamp, TriageStatus,
};
use crate::domain::{Algorithm, Direction, Step, StepConfig};
use crate::jobs::detection::DetectError;
use crate::store::AlertStoreError;

/// Why a backend call failed; becomes a gRPC status in [`From`].
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// The request is valid but the state does not allow it (stale revision).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Not available in this server.
    #[error("{0}")]
    Unimplemented(String),
    /// The server cannot do it now (shutting down); retry.
    #[error("{0}")]
    Unavailable(String),
    /// A failure inside the server.
    #[error("{0}")]
    Internal(String),
}

impl BackendError {
    /// A failed dump of `date`: another appliance's object in the way is the lake's
    /// state (FAILED_PRECONDITION, with what to do), anything else a failure here.
    pub fn dump_failed(date: chrono::NaiveDate, e: crate::export::ExportError) -> Self {
        let message = format!("dump of {date} failed: {e}");
        match e {
            crate::export::ExportError::Foreign { .. }
            | crate::export::ExportError::Exists { .. } => {
                BackendError::FailedPrecondition(message)
            }
            _ => BackendError::Internal(message),
        }
    }
}

/// What a caller is told of an internal failure.
pub const INTERNAL_MESSAGE: &str = "internal error; see the server log";

impl From<BackendError> for Status {
    fn from(e: BackendError) -> Self {
        let code = match &e {
            BackendError::InvalidArgument(_) => Code::InvalidArgument,
            BackendError::NotFound(_) => Code::NotFound,
            BackendError::FailedPrecondition(_) => Code::FailedPrecondition,
            BackendError::Unimplemented(_) => Code::Unimplemented,
            BackendError::Unavailable(_) => Code::Unavailable,
            BackendError::Internal(_) => Code::Internal,
        };
        // Like the HTTP API: what failed inside (a database's or a blob store's
        // error text, paths) goes to the log, the caller learns only that it did.
        if code == Code::Internal {
            tracing::error!(error = %e, "backend call failed");
            return Status::new(code, INTERNAL_MESSAGE);
        }
        Status::new(code, e.to_string())
    }
}

impl From<AlertStoreError> for BackendError {
    fn from(e: AlertStoreError) -> Self {
        match e {
            AlertStoreError::NotFound(_) => Self::NotFound(e.to_string()),
            AlertStoreError::StaleRevision { .. } => Self::FailedPrecondition(e.to_string()),
            AlertStoreError::Store(e) => Self::Internal(e.to_string()),
        }
    }
}

impl From<DetectError> for BackendError {
    fn from(e: DetectError) -> Self {
        match e {
            DetectError::UnknownSensor(_) | DetectError::Range(_) => {
                Self::InvalidArgument(e.to_string())
            }
            DetectError::Alerts(e) => e.into(),
            DetectError::Store(e) => Self::Internal(e.to_string()),
        }
    }
}

fn invalid(field: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::InvalidArgument(format!("{field}: {e}"))
}

/// An RFC 3339 time; `None` when empty.
pub fn time(field: &str, s: &str) -> Result<Option<Timestamp>, BackendError> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    Timestamp::parse_rfc3339(s.trim())
        .map(Some)
        .map_err(|e| invalid(field, e))
}

/// A required `[from, to)` range.
pub fn range(from: &str, to: &str) -> Result<TimeRange, BackendError> {
    let from = time("from", from)?.ok_or_else(|| invalid("from", "required"))?;
    let to = time("to", to)?.ok_or_else(|| invalid("to", "required"))?;
    TimeRange::new(from, to).map_err(|e| invalid("range", e))
}

fn algorithm(a: i32) -> Result<Algorithm, BackendError> {
    use proto::Algorithm as P;
    Ok(match P::try_from(a).unwrap_or(P::Unspecified) {
        P::Absolute => Algorithm::Absolute,
        P::Percent => Algorithm::Percent,
        P::Cohen => Algorithm::Cohen,
        P::Original => Algorithm::Original,
        P::Mannwhitneyu => Algorithm::MannWhitneyU,
        P::Unspecified => {
            return Err(invalid(
                "algorithm",
                "one of ABSOLUTE, PERCENT, COHEN, ORIGINAL, MANNWHITNEYU is required",
            ));
        }
    })
}

pub(super) fn algorithm_proto(a: Algorithm) -> proto::Algorithm {
    match a {
        Algorithm::Absolute => proto::Algorithm::Absolute,
        Algorithm::Percent => proto::Algorithm::Percent,
        Algorithm::Cohen => proto::Algorithm::Cohen,
        Algorithm::Original => proto::Algorithm::Original,
        Algorithm::MannWhitneyU => proto::Algorithm::Mannwhitneyu,
    }
}

fn direction(d: i32) -> Direction {
    match proto::Direction::try_from(d).unwrap_or(proto::Direction::Unspecified) {
        proto::Direction::Up => Direction::Up,
        proto::Direction::Down => Direction::Down,
        // BOTH is the sensible default of an alert.
        proto::Direction::Both | proto::Direction::Unspecified => Direction::Both,
    }
}

pub(super) fn direction_proto(d: Direction) -> proto::Direction {
    match d {
        Direction::Up => proto::Direction::Up,
        Direction::Down => proto::Direction::Down,
        Direction::Both => proto::Direction::Both,
    }
}

fn step_proto(s: Step) -> proto::Direction {
    match s {
        Step::Up => proto::Direction::Up,
        Step::Down => proto::Direction::Down,
    }
}

/// Parses an alert configuration from the wire.
pub fn alert_spec(c: &proto::AlertConfig) -> Result<AlertSpec, BackendError> {
    let device = Device::parse(&c.device).map_err(|e| invalid("device", e))?;
    let sensor = SensorName::parse(&c.sensor).map_err(|e| invalid("sensor", e))?;
    let bucket = if c.bucket.is_empty() {
        BucketWidth::Minutes(15)
    } else {
        BucketWidth::parse(&c.bucket).map_err(|e| invalid("bucket", e))?
    };
    let step = StepConfig::new(
        algorithm(c.algorithm)?,
        c.radius as usize,
        c.threshold,
        direction(c.direction),
    )
    .map_err(|e| invalid("config", e))?;
    AlertSpec::new(
        &c.name,
        device,
        sensor,
        bucket,
        step,
        c.min_bucket_readings,
        &c.webhook_url,
    )
    .map_err(|e| invalid("config", e))
}

fn opt_time(t: Option<Timestamp>) -> String {
    t.map(|t| t.to_string()).unwrap_or_default()
}

/// An alert for the wire.
pub fn alert_proto(a: &Alert) -> proto::AlertConfig {
    let s = &a.spec;
    proto::AlertConfig {
        id: a.id,
        name: s.name.clone(),
        revision: a.revision,
        device: s.device.to_string(),
        sensor: s.sensor.to_string(),
        bucket: s.bucket.to_string(),
        algorithm: algorithm_proto(s.step.algorithm()) as i32,
        radius: s.step.radius() as u32,
        threshold: s.step.threshold(),
        direction: direction_proto(s.step.direction()) as i32,
        webhook_url: s
            .webhook
            .as_ref()
            .map(|u| u.to_string())
            .unwrap_or_default(),
        active: a.active,
        min_bucket_readings: s.min_bucket_readings,
        created_at: a.created.to_string(),
        updated_at: a.updated.to_string(),
    }
}

/// A step found by a dry run (not stored: id 0).
pub fn found_proto(spec: &AlertSpec, f: &FoundStep) -> proto::Anomaly {
    proto::Anomaly {
        device: spec.device.to_string(),
        sensor: spec.sensor.to_string(),
        ..step_proto_fields(f)
    }
}

/// The fields of an anomaly that describe its step.
fn step_proto_fields(f: &FoundStep) -> proto::Anomaly {
    proto::Anomaly {
        step_at: f.at.to_string(),
        window_start: f.window_start.to_string(),
        window_end: f.window_end.to_string(),
        before_mean: f.before_mean,
        after_mean: f.after_mean,
        statistic: f.statistic,
        direction: step_proto(f.step) as i32,
        status: proto::TriageStatus::Untriaged as i32,
        percent_change: f.percent_change(),
        ..Default::default()
    }
}

/// A stored anomaly for the wire.
pub fn anomaly_proto(a: &Anomaly) -> proto::Anomaly {
    proto::Anomaly {
        id: a.id,
        alert_id: a.alert_id,
        device: a.device.clone(),
        sensor: a.sensor.clone(),
        status: triage_proto(a.status) as i32,
        message: a.message.clone(),
        detected_at: a.detected.to_string(),
        triaged_at: opt_time(a.triaged),
        triaged_by: a.triaged_by.clone().unwrap_or_default(),
        group_id: a.group_id,
        ..step_proto_fields(&a.found)
    }
}

/// A triage status from the wire; `None` for UNSPECIFIED.
pub fn triage(s: i32) -> Option<TriageStatus> {
    use proto::TriageStatus as P;
    match P::try_from(s).unwrap_or(P::Unspecified) {
        P::Unspecified => None,
        P::Untriaged => Some(TriageStatus::Untriaged),
        P::Positive => Some(TriageStatus::Positive),
        P::Negative => Some(TriageStatus::Negative),
        P::Ignored => Some(TriageStatus::Ignored),
    }
}

pub(super) fn triage_proto(s: TriageStatus) -> proto::TriageStatus {
    match s {
        TriageStatus::Untriaged => proto::TriageStatus::Untriaged,
        TriageStatus::Positive => proto::TriageStatus::Positive,
        TriageStatus::Negative => proto::TriageStatus::Negative,
        TriageStatus::Ignored => proto::TriageStatus::Ignored,
    }
}

/// A group action from the wire.
pub fn group_action(a: i32) -> Result<GroupAction, BackendError> {
    match proto::GroupAction::try_from(a).unwrap_or(proto::GroupAction::Unspecified) {
        proto::GroupAction::Noaction => Ok(GroupAction::NoAction),
        proto::GroupAction::Report => Ok(GroupAction::Report),
        proto::GroupAction::Unspecified => Err(invalid("action", "NOACTION or REPORT")),
    }
}

/// A group for the wire.
pub fn group_proto(g: &AnomalyGroup) -> proto::AnomalyGroup {
    proto::AnomalyGroup {
        id: g.id,
        alert_id: g.alert_id,
        start: g.start.to_string(),
        end: g.end.to_string(),
        anomaly_ids: g.anomaly_ids.clone(),
        action: match g.action {
            GroupAction::NoAction => proto::GroupAction::Noaction,
            GroupAction::Report => proto::GroupAction::Report,
        } as i32,
    }
}

/// A delivery for the wire.
pub fn delivery_proto(d: &Delivery) -> proto::Delivery {
    proto::Delivery {
        id: d.id,
        alert_id: d.alert_id,
        url: d.url.clone(),
        subject: d.subject.clone(),
        anomaly_ids: d.anomaly_ids.clone(),
        attempt: d.attempt,
        ok: d.ok,
        status_code: u32::from(d.status_code),
        error: d.error.clone(),
        at: d.at.to_string(),
    }
}
