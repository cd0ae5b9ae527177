//! The hosted services. Each is thin: parse the request (`convert`), call the
//! store or the detection job on the blocking pool, write the answer.

use std::sync::Arc;

use tokio::sync::Notify;
use tonic::service::RoutesBuilder;
use tonic::{Request, Response, Status};

use super::authz::AuthorizationPolicy;
use super::convert::{self, BackendError};
use super::proto;
use super::tokens::{Caller, Role};
use crate::domain::{AlertSpec, AnomalyFilter, Device, SensorName, TimeRange};
use crate::export::Dumper;
use crate::jobs::detection;
use crate::store::{AlertStore, ReadStore, StoreError};

/// A service hosted on the backend: its policy, how it registers, what it is.
pub trait BackendService: Send + Sync + 'static {
    /// Full gRPC name, e.g. `milepost.backend.v1.Alerts`.
    fn name(&self) -> &'static str;

    /// Who may call which method.
    fn policy(&self) -> AuthorizationPolicy;

    /// Adds the service to the router.
    fn register(self: Box<Self>, routes: &mut RoutesBuilder);

    /// The service's description from the compiled protos: its method names.
    fn descriptor(&self) -> Vec<String> {
        super::methods_of(self.name())
    }

    /// Methods behind a token bucket each (the job quota of [`Context::jobs`]),
    /// enforced in front of the service with the authorization.
    fn rate_limited(&self) -> Vec<&'static str> {
        Vec::new()
    }
}

/// What the services share.
pub struct Context {
    /// Readings (for detection).
    pub reads: Arc<dyn ReadStore>,
    /// Alerts, anomalies and the rest.
    pub alerts: Arc<AlertStore>,
    /// Dumps, when the server makes them.
    pub dumper: Option<Arc<Dumper>>,
    /// Wakes the webhook sender.
    pub notify: Arc<Notify>,
    /// Job rate limits.
    pub jobs: JobLimits,
    /// Most steps a dry run returns when the request names no cap.
    pub dry_run_max_results: usize,
    /// The writer, for deleting devices.
    pub writer: crate::store::WriterHandle,
}

/// Token buckets of the job methods.
#[derive(Debug, Clone, Copy)]
pub struct JobLimits {
    /// Calls per minute each job method refills.
    pub per_minute: u32,
    /// Calls that may come at once.
    pub burst: u32,
}

/// Runs `f` on the blocking pool (every store call blocks).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, Status> {
    let current = tracing::Span::current();
    tokio::task::spawn_blocking(move || current.in_scope(f))
        .await
        .map_err(|e| BackendError::Internal(format!("backend task failed: {e}")))?
        .map_err(Status::from)
}

fn caller<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<Caller>()
        .map_or_else(|| "anonymous".to_owned(), |c| c.name.clone())
}

fn roles(r: Role) -> Vec<Role> {
    vec![r]
}

/// Every service, in one place (as the seed's `initialize()`).
pub fn all(ctx: &Arc<Context>) -> Vec<Box<dyn BackendService>> {
    vec![
        Box::new(HelloService),
        Box::new(CatalogService(ctx.clone())),
        Box::new(AlertsService(ctx.clone())),
        Box::new(AnomaliesService(ctx.clone())),
        Box::new(DetectionService(ctx.clone())),
        Box::new(JobsService(ctx.clone())),
        Box::new(DevicesService(ctx.clone())),
    ]
}

macro_rules! hosted {
    ($svc:ty, $server:ident, $name:literal, $policy:expr) => {
        impl BackendService for $svc {
            fn name(&self) -> &'static str {
                $name
            }

            fn policy(&self) -> AuthorizationPolicy {
                $policy
            }

            fn register(self: Box<Self>, routes: &mut RoutesBuilder) {
                routes.add_service(proto::$server::new(*self));
            }
        }
    };
}

// ---------------------------------------------------------------- Hello

/// `Hello.SayHello`: open to all, shows the pattern.
pub struct HelloService;

hosted!(
    HelloService,
    HelloServer,
    "milepost.backend.v1.Hello",
    AuthorizationPolicy {
        allow_unauthenticated: true,
        ..Default::default()
    }
);

#[tonic::async_trait]
impl proto::Hello for HelloService {
    async fn say_hello(
        &self,
        req: Request<proto::HelloRequest>,
    ) -> Result<Response<proto::HelloResponse>, Status> {
        let text = req.into_inner().text;
        Ok(Response::new(proto::HelloResponse {
            text: format!("Hello, {text}!"),
        }))
    }
}

// ---------------------------------------------------------------- Sensor catalog

/// The sensor catalog: viewers read it, admins change it.
pub struct CatalogService(Arc<Context>);

hosted!(
    CatalogService,
    SensorCatalogServer,
    "milepost.backend.v1.SensorCatalog",
    AuthorizationPolicy {
        service_roles: roles(Role::Admin),
        method_roles: vec![("ListSensors", roles(Role::Viewer))],
        ..Default::default()
    }
);

fn sensor_proto(s: &crate::domain::Sensor) -> proto::Sensor {
    proto::Sensor {
        name: s.name.to_string(),
        unit: s.unit.clone(),
        description: s.description.clone(),
        min_value: s.min,
        max_value: s.max,
    }
}

#[tonic::async_trait]
impl proto::SensorCatalog for CatalogService {
    async fn list_sensors(
        &self,
        _req: Request<proto::ListSensorsRequest>,
    ) -> Result<Response<proto::ListSensorsResponse>, Status> {
        let sensors = self.0.reads.catalog().iter().map(sensor_proto).collect();
        Ok(Response::new(proto::ListSensorsResponse { sensors }))
    }

    async fn upsert_sensor(
        &self,
        req: Request<proto::Sensor>,
    ) -> Result<Response<proto::Sensor>, Status> {
        let s = req.into_inner();
        let name = SensorName::parse(&s.name)
            .map_err(|e| BackendError::InvalidArgument(format!("name: {e}")))?;
        let finite = |v: Option<f64>, what: &str| match v {
            Some(x) if !x.is_finite() => Err(BackendError::InvalidArgument(format!(
                "{what} must be a finite number"
            ))),
            _ => Ok(v),
        };
        let (min, max) = (
            finite(s.min_value, "min_value")?,
            finite(s.max_value, "max_value")?,
        );
        if let (Some(lo), Some(hi)) = (min, max)
            && lo > hi
        {
            return Err(BackendError::InvalidArgument(format!(
                "min_value {lo} is above max_value {hi}"
            ))
            .into());
        }
        if s.unit.chars().count() > 32 || s.description.chars().count() > 200 {
            return Err(BackendError::InvalidArgument(
                "unit is at most 32 characters, description at most 200".into(),
            )
            .into());
        }
        let alerts = self.0.alerts.clone();
        let sensor =
            blocking(move || Ok(alerts.upsert_sensor(&name, &s.unit, &s.description, min, max)?))
                .await?;
        tracing::info!(sensor = %sensor.name, "sensor catalog changed");
        Ok(Response::new(sensor_proto(&sensor)))
    }
}

// ---------------------------------------------------------------- Alerts

/// Alert configurations: viewers read them, editors change them.
pub struct AlertsService(Arc<Context>);

hosted!(
    AlertsService,
    AlertsServer,
    "milepost.backend.v1.Alerts",
    AuthorizationPolicy {
        service_roles: roles(Role::Editor),
        method_roles: vec![
            ("GetAlert", roles(Role::Viewer)),
            ("ListAlerts", roles(Role::Viewer)),
            ("ListDeliveries", roles(Role::Viewer)),
        ],
        ..Default::default()
    }
);

impl AlertsService {
    /// An alert on a sensor the catalog does not have would never see a reading.
    fn known_sensor(&self, spec: AlertSpec) -> Result<AlertSpec, BackendError> {
        if self.0.reads.catalog().get(spec.sensor.as_str()).is_none() {
            return Err(BackendError::InvalidArgument(format!(
                "sensor '{}' is not in the catalog (SensorCatalog.UpsertSensor adds one)",
                spec.sensor
            )));
        }
        Ok(spec)
    }
}

#[tonic::async_trait]
impl proto::Alerts for AlertsService {
    async fn create_alert(
        &self,
        req: Request<proto::AlertConfig>,
    ) -> Result<Response<proto::AlertConfig>, Status> {
        let spec = self.known_sensor(convert::alert_spec(req.get_ref())?)?;
        let alerts = self.0.alerts.clone();
        let alert = blocking(move || Ok(alerts.create_alert(&spec)?)).await?;
        tracing::info!(alert = alert.id, name = %alert.spec.name, "alert created");
        Ok(Response::new(convert::alert_proto(&alert)))
    }

    async fn update_alert(
        &self,
        req: Request<proto::AlertConfig>,
    ) -> Result<Response<proto::AlertConfig>, Status> {
        let c = req.into_inner();
        let spec = self.known_sensor(convert::alert_spec(&c)?)?;
        let alerts = self.0.alerts.clone();
        let alert = blocking(move || Ok(alerts.update_alert(c.id, c.revision, &spec)?)).await?;
        Ok(Response::new(convert::alert_proto(&alert)))
    }

    async fn get_alert(
        &self,
        req: Request<proto::AlertId>,
    ) -> Result<Response<proto::AlertConfig>, Status> {
        let id = req.into_inner().id;
        let alerts = self.0.alerts.clone();
        let alert = blocking(move || Ok(alerts.alert(id)?)).await?;
        Ok(Response::new(convert::alert_proto(&alert)))
    }

    async fn list_alerts(
        &self,
        req: Request<proto::ListAlertsRequest>,
    ) -> Result<Response<proto::ListAlertsResponse>, Status> {
        let r = req.into_inner();
        let alerts = self.0.alerts.clone();
        let list = blocking(move || Ok(alerts.alerts(r.include_inactive)?)).await?;
        let alerts = list
            .iter()
            .filter(|a| r.device.is_empty() || a.spec.device.as_str() == r.device)
            .filter(|a| r.sensor.is_empty() || a.spec.sensor.as_str() == r.sensor)
            .map(convert::alert_proto)
            .collect();
        Ok(Response::new(proto::ListAlertsResponse { alerts }))
    }

    async fn deactivate_alert(
        &self,
        req: Request<proto::AlertId>,
    ) -> Result<Response<proto::AlertConfig>, Status> {
        let id = req.into_inner().id;
        let alerts = self.0.alerts.clone();
        let alert = blocking(move || Ok(alerts.deactivate(id)?)).await?;
        Ok(Response::new(convert::alert_proto(&alert)))
    }

    async fn list_deliveries(
        &self,
        req: Request<proto::ListDeliveriesRequest>,
    ) -> Result<Response<proto::ListDeliveriesResponse>, Status> {
        let r = req.into_inner();
        let alerts = self.0.alerts.clone();
        let alert = (r.alert_id != 0).then_some(r.alert_id);
        let limit = if r.limit == 0 { 100 } else { r.limit as usize };
        let list = blocking(move || Ok(alerts.deliveries(alert, limit.min(10_000))?)).await?;
        Ok(Response::new(proto::ListDeliveriesResponse {
            deliveries: list.iter().map(convert::delivery_proto).collect(),
        }))
    }
}

// ---------------------------------------------------------------- Anomalies

/// Anomalies and their groups: viewers read, editors triage.
pub struct AnomaliesService(Arc<Context>);

hosted!(
    AnomaliesService,
    AnomaliesServer,
    "milepost.backend.v1.Anomalies",
    AuthorizationPolicy {
        service_roles: roles(Role::Viewer),
        method_roles: vec![
            ("TriageAnomaly", roles(Role::Editor)),
            ("SetGroupAction", roles(Role::Editor)),
        ],
        ..Default::default()
    }
);

#[tonic::async_trait]
impl proto::Anomalies for AnomaliesService {
    async fn list_anomalies(
        &self,
        req: Request<proto::ListAnomaliesRequest>,
    ) -> Result<Response<proto::ListAnomaliesResponse>, Status> {
        let r = req.into_inner();
        let filter = AnomalyFilter {
            alert_id: (r.alert_id != 0).then_some(r.alert_id),
            device: (!r.device.is_empty()).then_some(r.device),
            sensor: (!r.sensor.is_empty()).then_some(r.sensor),
            from: convert::time("from", &r.from)?,
            to: convert::time("to", &r.to)?,
            status: convert::triage(r.status),
            limit: if r.limit == 0 {
                1000
            } else {
                (r.limit as usize).min(10_000)
            },
        };
        let alerts = self.0.alerts.clone();
        let list = blocking(move || Ok(alerts.anomalies(&filter)?)).await?;
        Ok(Response::new(proto::ListAnomaliesResponse {
            anomalies: list.iter().map(convert::anomaly_proto).collect(),
        }))
    }

    async fn get_anomaly(
        &self,
        req: Request<proto::AnomalyId>,
    ) -> Result<Response<proto::Anomaly>, Status> {
        let id = req.into_inner().id;
        let alerts = self.0.alerts.clone();
        let a = blocking(move || Ok(alerts.anomaly(id)?)).await?;
        Ok(Response::new(convert::anomaly_proto(&a)))
    }

    async fn triage_anomaly(
        &self,
        req: Request<proto::TriageRequest>,
    ) -> Result<Response<proto::Anomaly>, Status> {
        let by = caller(&req);
        let r = req.into_inner();
        let status = convert::triage(r.status).ok_or_else(|| {
            BackendError::InvalidArgument(
                "status: one of UNTRIAGED, POSITIVE, NEGATIVE, IGNORED is required".into(),
            )
        })?;
        if r.message.chars().count() > 2000 {
            return Err(
                BackendError::InvalidArgument("message is at most 2000 characters".into()).into(),
            );
        }
        let alerts = self.0.alerts.clone();
        let a = blocking(move || Ok(alerts.triage(r.id, status, &r.message, &by)?)).await?;
        Ok(Response::new(convert::anomaly_proto(&a)))
    }

    async fn list_groups(
        &self,
        req: Request<proto::ListGroupsRequest>,
    ) -> Result<Response<proto::ListGroupsResponse>, Status> {
        let id = req.into_inner().alert_id;
        let alerts = self.0.alerts.clone();
        let groups = blocking(move || Ok(alerts.groups((id != 0).then_some(id))?)).await?;
        Ok(Response::new(proto::ListGroupsResponse {
            groups: groups.iter().map(convert::group_proto).collect(),
        }))
    }

    async fn set_group_action(
        &self,
        req: Request<proto::SetGroupActionRequest>,
    ) -> Result<Response<proto::AnomalyGroup>, Status> {
        let r = req.into_inner();
        let action = convert::group_action(r.action)?;
        let alerts = self.0.alerts.clone();
        let g = blocking(move || Ok(alerts.set_group_action(r.id, action)?)).await?;
        Ok(Response::new(convert::group_proto(&g)))
    }
}

// ---------------------------------------------------------------- Detection

/// Dry runs: editors (they cost CPU).
pub struct DetectionService(Arc<Context>);

hosted!(
    DetectionService,
    DetectionServer,
    "milepost.backend.v1.Detection",
    AuthorizationPolicy {
        service_roles: roles(Role::Editor),
        ..Default::default()
    }
);

#[tonic::async_trait]
impl proto::Detection for DetectionService {
    async fn dry_run(
        &self,
        req: Request<proto::DryRunRequest>,
    ) -> Result<Response<proto::DryRunResponse>, Status> {
        let r = req.into_inner();
        let config = r
            .config
            .ok_or_else(|| BackendError::InvalidArgument("config is required".into()))?;
        let spec = convert::alert_spec(&config)?;
        let range = convert::range(&r.from, &r.to)?;
        let cap = match r.max_results {
            0 => self.0.dry_run_max_results,
            n => (n as usize).min(self.0.dry_run_max_results.max(1)),
        };
        let reads = self.0.reads.clone();
        let (spec, run) = blocking(move || {
            let run = detection::dry_run(reads.as_ref(), &spec, range, cap)?;
            Ok((spec, run))
        })
        .await?;
        Ok(Response::new(proto::DryRunResponse {
            anomalies: run
                .steps
                .iter()
                .map(|f| convert::found_proto(&spec, f))
                .collect(),
            buckets: run.buckets as u64,
            truncated: run.truncated,
        }))
    }
}

// ---------------------------------------------------------------- Jobs

/// Re-dump and backfill, each behind its own token bucket. Redump is admin's;
/// backfill, which only adds anomalies, editor's.
pub struct JobsService(Arc<Context>);

impl BackendService for JobsService {
    fn name(&self) -> &'static str {
        "milepost.backend.v1.Jobs"
    }

    fn policy(&self) -> AuthorizationPolicy {
        AuthorizationPolicy {
            service_roles: roles(Role::Admin),
            method_roles: vec![("Backfill", roles(Role::Editor))],
            ..Default::default()
        }
    }

    fn register(self: Box<Self>, routes: &mut RoutesBuilder) {
        routes.add_service(proto::JobsServer::new(*self));
    }

    fn rate_limited(&self) -> Vec<&'static str> {
        vec!["Redump", "Backfill"]
    }
}

#[tonic::async_trait]
impl proto::Jobs for JobsService {
    async fn redump(
        &self,
        req: Request<proto::RedumpRequest>,
    ) -> Result<Response<proto::RedumpResponse>, Status> {
        let date = chrono::NaiveDate::parse_from_str(req.get_ref().date.trim(), "%Y-%m-%d")
            .map_err(|e| BackendError::InvalidArgument(format!("date (YYYY-MM-DD): {e}")))?;
        if date >= chrono::Utc::now().date_naive() {
            return Err(BackendError::InvalidArgument(format!(
                "{date} has not finished yet (UTC): only finished days are dumped"
            ))
            .into());
        }
        let Some(dumper) = self.0.dumper.clone() else {
            return Err(BackendError::Unimplemented(
                "this server makes no dumps (no blob store)".into(),
            )
            .into());
        };
        let records = dumper
            .dump_day(date)
            .await
            .map_err(|e| BackendError::dump_failed(date, e))?;
        Ok(Response::new(proto::RedumpResponse {
            objects: records
                .iter()
                .map(|r| proto::DumpedObject {
                    format: r.format.as_str().to_owned(),
                    key: r.key.clone(),
                    readings: r.readings,
                    bytes: r.bytes,
                    sha256: r.sha256.clone(),
                })
                .collect(),
        }))
    }

    async fn backfill(
        &self,
        req: Request<proto::BackfillRequest>,
    ) -> Result<Response<proto::BackfillResponse>, Status> {
        let r = req.into_inner();
        let range: TimeRange = convert::range(&r.from, &r.to)?;
        let (reads, alerts) = (self.0.reads.clone(), self.0.alerts.clone());
        let done = blocking(move || {
            let alert = alerts.alert(r.alert_id)?;
            let (_, done) = detection::backfill(reads.as_ref(), &alerts, &alert, range)?;
            Ok(done)
        })
        .await?;
        if done.new > 0 {
            self.0.notify.notify_one();
        }
        Ok(Response::new(proto::BackfillResponse {
            buckets: done.buckets as u64,
            found: done.found as u32,
            new_anomalies: done.new as u32,
        }))
    }
}

// ---------------------------------------------------------------- Devices

/// Deleting devices that should not exist: admin's.
pub struct DevicesService(Arc<Context>);

hosted!(
    DevicesService,
    DevicesServer,
    "milepost.backend.v1.Devices",
    AuthorizationPolicy {
        service_roles: roles(Role::Admin),
        ..Default::default()
    }
);

#[tonic::async_trait]
impl proto::Devices for DevicesService {
    async fn delete_device(
        &self,
        req: Request<proto::DeleteDeviceRequest>,
    ) -> Result<Response<proto::DeleteDeviceResponse>, Status> {
        let name = req.get_ref().name.trim();
        let device =
            Device::parse(name).map_err(|e| BackendError::InvalidArgument(format!("name: {e}")))?;
        tracing::info!(caller = %caller(&req), device = %device, "deleting a device");
        let done = self
            .0
            .writer
            .delete_device(device.clone())
            .await
            .map_err(|e| match e {
                StoreError::WriterGone => {
                    BackendError::Unavailable("the server is shutting down".into())
                }
                e => BackendError::Internal(e.to_string()),
            })?
            .ok_or_else(|| BackendError::NotFound(format!("no device '{device}'")))?;
        Ok(Response::new(proto::DeleteDeviceResponse {
            readings: done.readings,
            series: done.series,
        }))
    }
}
