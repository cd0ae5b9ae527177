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
use poem::IntoEndpoint as _;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem_grpc::{Reflection, RouteGrpc};
use prost::Message as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
    task: JoinHandle<std::io::Result<()>>,
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
        let mut route = RouteGrpc::new();
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
            route = service.register(route);
        }
        let route = route.add_service(
            Reflection::new()
                .add_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .build(),
        );
        let endpoint = authz::Authorize::new(route.into_endpoint(), policies, limits, tokens);
        let acceptor = TcpListener::bind(addr.to_string())
            .into_acceptor()
            .await
            .with_context(|| format!("cannot listen on {addr} (--backend-addr)"))?;
        let bound = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .unwrap_or(addr);
        tracing::info!(addr = %bound, "internal gRPC backend listening");
        let task = tokio::spawn(
            poem::Server::new_with_acceptor(acceptor).run_with_graceful_shutdown(
                endpoint,
                stop.cancelled_owned(),
                Some(grace),
            ),
        );
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
            Ok(Err(e)) => tracing::error!(error = %e, "backend listener failed"),
            Err(e) => tracing::error!(error = %e, "backend listener panicked"),
        }
    }
}
