//! `milepost alert …`, `milepost anomaly …` and `milepost device …`: the backend's own command-line
//! client, so a self-hoster needs no grpcurl. It talks gRPC with the generated
//! stubs, sending the token as `authorization: Bearer …` on every call.

use clap::{Args, Subcommand};
use tonic::Request;
use tonic::transport::Channel;

use super::{convert, proto};

/// Where the backend is and who is calling.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The backend's URL.
    #[arg(
        long,
        env = "MILEPOST_BACKEND_URL",
        default_value = "http://127.0.0.1:8005"
    )]
    pub backend_url: String,
    /// A backend token (`milepost token create`).
    #[arg(long, env = "MILEPOST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `milepost alert …`.
#[derive(Debug, Clone, Subcommand)]
pub enum AlertCommand {
    /// Create an alert: step detection on one device's sensor.
    Create(AlertCreate),
    /// List alerts.
    List {
        /// Inactive ones too.
        #[arg(long)]
        all: bool,
    },
    /// Stop running an alert (it and its anomalies are kept).
    Deactivate {
        /// The alert's id.
        id: i64,
    },
}

/// Fields of a new alert.
#[derive(Debug, Clone, Args)]
pub struct AlertCreate {
    /// Short name (the webhook subject starts with it).
    #[arg(long)]
    pub name: String,
    /// Device to watch.
    #[arg(long)]
    pub device: String,
    /// Sensor to watch.
    #[arg(long)]
    pub sensor: String,
    /// Bucket width: 1m … 12h, 1d.
    #[arg(long, default_value = "15m")]
    pub bucket: String,
    /// absolute, percent, cohen, original or mannwhitneyu.
    #[arg(long, default_value = "cohen")]
    pub algorithm: String,
    /// Buckets on each side of a step.
    #[arg(long, default_value_t = 10)]
    pub radius: u32,
    /// |d| at least this is a step (for mannwhitneyu: the largest p-value).
    #[arg(long)]
    pub threshold: f64,
    /// up, down or both.
    #[arg(long, default_value = "both")]
    pub direction: String,
    /// Buckets with fewer readings are left out.
    #[arg(long, default_value_t = 1)]
    pub min_bucket_readings: u32,
    /// POST new anomalies here (JSON).
    #[arg(long, default_value = "")]
    pub webhook: String,
}

/// `milepost anomaly …`.
#[derive(Debug, Clone, Subcommand)]
pub enum AnomalyCommand {
    /// List anomalies, newest first.
    List {
        /// Only this alert's.
        #[arg(long)]
        alert: Option<i64>,
        /// Only this device's.
        #[arg(long)]
        device: Option<String>,
        /// Only this sensor's.
        #[arg(long)]
        sensor: Option<String>,
        /// untriaged, positive, negative or ignored.
        #[arg(long)]
        status: Option<String>,
        /// Steps at or after (RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// Steps before (RFC 3339).
        #[arg(long)]
        to: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Set an anomaly's triage status.
    Triage {
        /// The anomaly's id.
        id: i64,
        /// untriaged, positive, negative or ignored.
        #[arg(long)]
        status: String,
        /// A note.
        #[arg(long, default_value = "")]
        message: String,
    },
}

/// `milepost device …`.
#[derive(Debug, Clone, Subcommand)]
pub enum DeviceCommand {
    /// Delete a device that should not exist, with its readings, rollups and
    /// statistics (admin token). Anomalies and alerts naming it are kept; dumps
    /// already written still hold it until their days are dumped again.
    Delete {
        /// The device's name.
        name: String,
        /// Confirms the deletion (it cannot be undone).
        #[arg(long)]
        yes: bool,
    },
}

/// A channel to the backend at `url`, connected on the first call (so a backend that
/// is down is reported by the call, with its status).
pub fn channel(url: &str) -> anyhow::Result<Channel> {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .map(|e| e.connect_lazy())
        .map_err(|e| anyhow::anyhow!("--backend-url {url}: {e}"))
}

/// `msg` with `token`, when there is one, as `authorization: Bearer …`.
pub fn authorized<T>(token: Option<&str>, msg: T) -> anyhow::Result<Request<T>> {
    let mut req = Request::new(msg);
    if let Some(t) = token {
        let value = format!("Bearer {}", t.trim())
            .parse()
            .map_err(|_| anyhow::anyhow!("the token holds characters a header cannot"))?;
        req.metadata_mut().insert("authorization", value);
    }
    Ok(req)
}

fn request<T>(args: &ClientArgs, msg: T) -> anyhow::Result<Request<T>> {
    authorized(args.token.as_deref(), msg)
}

fn fail(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("the backend refused: {:?}: {}", s.code(), s.message())
}

// Names parse into the domain's enums (their one name table) and map to the proto's
// in `convert`, the one place that maps them.
fn algorithm(s: &str) -> anyhow::Result<proto::Algorithm> {
    Ok(convert::algorithm_proto(s.parse()?))
}

fn direction(s: &str) -> anyhow::Result<proto::Direction> {
    Ok(convert::direction_proto(s.parse()?))
}

fn status(s: &str) -> anyhow::Result<proto::TriageStatus> {
    Ok(convert::triage_proto(s.parse()?))
}

/// `ALGORITHM_COHEN` → `cohen`: the proto enum name without its prefix.
fn short(name: Option<&str>) -> String {
    let name = name.unwrap_or("");
    let cut = ["ALGORITHM_", "DIRECTION_", "TRIAGE_STATUS_"]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name);
    cut.to_lowercase()
}

/// Text after a tab, or nothing for an empty value.
fn tail(label: &str, v: &str) -> String {
    if v.is_empty() {
        String::new()
    } else {
        format!("\t{label}{v}")
    }
}

fn print_alert(a: &proto::AlertConfig) {
    let alg = short(
        proto::Algorithm::try_from(a.algorithm)
            .ok()
            .map(|x| x.as_str_name()),
    );
    let dir = short(
        proto::Direction::try_from(a.direction)
            .ok()
            .map(|x| x.as_str_name()),
    );
    println!(
        "{id}\t{name}\trev {rev}\t{device}/{sensor}\t{bucket} {alg} r={radius} t={threshold} {dir}\t{state}{hook}",
        id = a.id,
        name = a.name,
        rev = a.revision,
        device = a.device,
        sensor = a.sensor,
        bucket = a.bucket,
        radius = a.radius,
        threshold = a.threshold,
        state = if a.active { "active" } else { "inactive" },
        hook = tail("webhook ", &a.webhook_url),
    );
}

fn print_anomaly(a: &proto::Anomaly) {
    let dir = short(
        proto::Direction::try_from(a.direction)
            .ok()
            .map(|x| x.as_str_name()),
    );
    let st = short(
        proto::TriageStatus::try_from(a.status)
            .ok()
            .map(|x| x.as_str_name()),
    );
    let pct = a
        .percent_change
        .map(|p| format!(" ({p:+.1} %)"))
        .unwrap_or_default();
    println!(
        "{id}\talert {alert}\t{device}/{sensor}\t{at}\t{dir}\t{b:.4} → {af:.4}{pct}\t{st}{msg}",
        id = a.id,
        alert = a.alert_id,
        device = a.device,
        sensor = a.sensor,
        at = a.step_at,
        b = a.before_mean,
        af = a.after_mean,
        msg = tail("", &a.message),
    );
}

/// Runs `milepost alert …`.
pub async fn alert(args: &ClientArgs, cmd: AlertCommand) -> anyhow::Result<()> {
    let mut client = proto::AlertsClient::new(channel(&args.backend_url)?);
    match cmd {
        AlertCommand::Create(c) => {
            let msg = proto::AlertConfig {
                name: c.name,
                device: c.device,
                sensor: c.sensor,
                bucket: c.bucket,
                algorithm: algorithm(&c.algorithm)? as i32,
                radius: c.radius,
                threshold: c.threshold,
                direction: direction(&c.direction)? as i32,
                webhook_url: c.webhook,
                min_bucket_readings: c.min_bucket_readings,
                ..Default::default()
            };
            let a = client
                .create_alert(request(args, msg)?)
                .await
                .map_err(fail)?
                .into_inner();
            print_alert(&a);
        }
        AlertCommand::List { all } => {
            let r = client
                .list_alerts(request(
                    args,
                    proto::ListAlertsRequest {
                        include_inactive: all,
                        ..Default::default()
                    },
                )?)
                .await
                .map_err(fail)?
                .into_inner();
            for a in &r.alerts {
                print_alert(a);
            }
        }
        AlertCommand::Deactivate { id } => {
            let a = client
                .deactivate_alert(request(args, proto::AlertId { id })?)
                .await
                .map_err(fail)?
                .into_inner();
            print_alert(&a);
        }
    }
    Ok(())
}

/// Runs `milepost anomaly …`.
pub async fn anomaly(args: &ClientArgs, cmd: AnomalyCommand) -> anyhow::Result<()> {
    let mut client = proto::AnomaliesClient::new(channel(&args.backend_url)?);
    match cmd {
        AnomalyCommand::List {
            alert,
            device,
            sensor,
            status: st,
            from,
            to,
            limit,
        } => {
            let msg = proto::ListAnomaliesRequest {
                alert_id: alert.unwrap_or(0),
                device: device.unwrap_or_default(),
                sensor: sensor.unwrap_or_default(),
                from: from.unwrap_or_default(),
                to: to.unwrap_or_default(),
                status: st
                    .as_deref()
                    .map(status)
                    .transpose()?
                    .map_or(0, |s| s as i32),
                limit,
            };
            let r = client
                .list_anomalies(request(args, msg)?)
                .await
                .map_err(fail)?
                .into_inner();
            for a in &r.anomalies {
                print_anomaly(a);
            }
        }
        AnomalyCommand::Triage {
            id,
            status: st,
            message,
        } => {
            let msg = proto::TriageRequest {
                id,
                status: status(&st)? as i32,
                message,
            };
            let a = client
                .triage_anomaly(request(args, msg)?)
                .await
                .map_err(fail)?
                .into_inner();
            print_anomaly(&a);
        }
    }
    Ok(())
}

/// Runs `milepost device …`.
pub async fn device(args: &ClientArgs, cmd: DeviceCommand) -> anyhow::Result<()> {
    let mut client = proto::DevicesClient::new(channel(&args.backend_url)?);
    match cmd {
        DeviceCommand::Delete { name, yes } => {
            if !yes {
                anyhow::bail!(
                    "deleting device '{name}' removes all its readings and cannot be undone: \
                     add --yes to confirm"
                );
            }
            let r = client
                .delete_device(request(
                    args,
                    proto::DeleteDeviceRequest { name: name.clone() },
                )?)
                .await
                .map_err(fail)?
                .into_inner();
            println!(
                "deleted device {name}: {} readings of {} sensors",
                r.readings, r.series
            );
        }
    }
    Ok(())
}
