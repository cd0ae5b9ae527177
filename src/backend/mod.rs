//! The internal backend (SPEC 5): gRPC services on `--backend-addr` (loopback by
//! default), never on the public listener.
//!
//! - [`services`]: every hosted service implements [`BackendService`] — its
//!   authorization policy, its registration, its descriptor — and is listed once in
//!   [`services::all`], like the seed's `initialize()`.
//! - [`authz`]: one endpoint in front of all services checks each call's bearer
//!   token against the service's policy; deny by default.
//! - [`tokens`]: hashed tokens in the data directory (`milepost token …`).
//! - [`convert`]: proto ↔ domain, and errors → gRPC status codes in one place.
//! - [`client`]: the command-line client (`milepost alert …`, `milepost anomaly …`).
//!
//! Server reflection is on, so `grpcurl -plaintext 127.0.0.1:8005 list` names every
//! service and `describe` shows their methods.

pub mod authz;
pub mod client;
pub mod convert;
pub mod proto;
pub mod services;
pub mod tokens;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prost::Message as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;

pub use services::{BackendService, Context, JobLimits};
pub use tokens::{Role, TokenAdmin, Tokens};

/// Method names of the service `full_name` (`package.Service`) in the compiled
/// protos; empty when there is no such service.
pub fn methods_of(full_name: &str) -> Vec<String> {
    let Ok(set) = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET) else {
        return Vec::new();
    };
    set.file
        .iter()
        .flat_map(|f| {
            let package = f.package().to_owned();
            f.service.iter().map(move |s| (package.clone(), s))
        })
        .find(|(p, s)| format!("{p}.{}", s.name()) == full_name)
        .map(|(_, s)| s.method.iter().map(|m| m.name().to_owned()).collect())
        .unwrap_or_default()
}

/// The running backend listener.
pub struct Backend {
    addr: SocketAddr,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Backend {
    /// Binds `addr` and serves every service until `stop`.
    pub async fn start(
        addr: SocketAddr,
        ctx: Arc<Context>,
        tokens: Arc<Tokens>,
        stop: CancellationToken,
        grace: Duration,
    ) -> anyhow::Result<Self> {
        let mut routes = RoutesBuilder::default();
        let mut policies = HashMap::new();
        let mut limits = HashMap::new();
        let quota = governor::Quota::per_minute(
            std::num::NonZeroU32::new(ctx.jobs.per_minute.max(1)).expect("at least 1"),
        )
        .allow_burst(std::num::NonZeroU32::new(ctx.jobs.burst.max(1)).expect("at least 1"));
        for service in services::all(&ctx) {
            let methods = service.descriptor();
            anyhow::ensure!(
                !methods.is_empty(),
                "service {} is not in the compiled protos",
                service.name()
            );
            let policy = service.policy();
            for (m, _) in &policy.method_roles {
                anyhow::ensure!(
                    methods.iter().any(|x| x == m),
                    "the policy of {} names a method it does not have: {m}",
                    service.name()
                );
            }
            for m in service.rate_limited() {
                anyhow::ensure!(
                    methods.iter().any(|x| x == m),
                    "{} rate-limits a method it does not have: {m}",
                    service.name()
                );
                limits.insert(
                    format!("{}/{m}", service.name()),
                    governor::RateLimiter::direct(quota),
                );
            }
            policies.insert(service.name().to_owned(), policy);
            service.register(&mut routes);
        }
        // Both reflection versions: grpcurl asks for v1 and falls back to v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        };
        routes
            .add_service(reflection().build_v1().context("server reflection")?)
            .add_service(reflection().build_v1alpha().context("server reflection")?);
        let guard = authz::Guard::new(policies, limits, tokens);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--backend-addr)"))?;
        let bound = listener.local_addr().unwrap_or(addr);
        tracing::info!(addr = %bound, "internal gRPC backend listening");
        // Small calls answer at once: no Nagle delay on the HTTP/2 frames.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |conn| {
                if let Ok(c) = &conn {
                    let _ = c.set_nodelay(true);
                }
                conn
            },
        );
        let server = tonic::transport::Server::builder()
            .layer(authz::AuthorizeLayer::new(guard))
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
        // After `stop`, calls in flight get `grace` to finish, then the listener ends.
        let task = tokio::spawn(async move {
            tokio::select! {
                served = server => served.context("backend listener"),
                () = async {
                    stop.cancelled().await;
                    tokio::time::sleep(grace).await;
                } => {
                    tracing::warn!(?grace, "backend calls still running after the grace period");
                    Ok(())
                }
            }
        });
        Ok(Self { addr: bound, task })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the listener to stop (after the token given to `start` fired).
    pub async fn wait(self) {
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = format!("{e:#}"), "backend listener failed"),
            Err(e) => tracing::error!(error = %e, "backend listener panicked"),
        }
    }
}
