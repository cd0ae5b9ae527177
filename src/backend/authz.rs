//! Authorization: every hosted service declares a policy, and one endpoint in
//! front of all of them enforces it before a request reaches a handler.
//!
//! Deny by default: a method is callable only if its policy names a role for it
//! (or the whole service is open). Rate-limited methods are checked here too, after
//! the caller is known (a refused caller takes no token), so the refusal can carry a
//! `retry-after` entry. No token, or one the token file does not know,
//! is `UNAUTHENTICATED`; a known token whose role is too low is
//! `PERMISSION_DENIED`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use governor::RateLimiter;
use governor::clock::{Clock as _, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use tonic::codegen::http;
use tonic::{Code, Status};
use tracing::Instrument as _;

use super::tokens::{Caller, Role, Tokens};

/// Who may call a service's methods.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuthorizationPolicy {
    /// Every method may be called without a token.
    pub allow_unauthenticated: bool,
    /// Roles that may call every method (each includes the roles above it).
    pub service_roles: Vec<Role>,
    /// Roles per method, replacing `service_roles` for that method.
    pub method_roles: Vec<(&'static str, Vec<Role>)>,
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or an unknown one.
    Unauthenticated,
    /// The token's role may not call this method.
    PermissionDenied(Role),
}

impl AuthorizationPolicy {
    /// Decides a call of `method` by `caller` (`None`: no valid token).
    pub fn decide(&self, method: &str, caller: Option<&Caller>) -> Result<(), Refusal> {
        if self.allow_unauthenticated {
            return Ok(());
        }
        let caller = caller.ok_or(Refusal::Unauthenticated)?;
        let roles = self
            .method_roles
            .iter()
            .find(|(m, _)| *m == method)
            .map_or(&self.service_roles, |(_, r)| r);
        if roles.iter().any(|r| caller.role >= *r) {
            Ok(())
        } else {
            Err(Refusal::PermissionDenied(caller.role))
        }
    }
}

/// A token bucket of one method.
pub type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, NoOpMiddleware>;

/// What every call is checked against: the services' policies, the methods' rate
/// limits and the token file.
pub struct Guard {
    policies: HashMap<String, AuthorizationPolicy>,
    /// `service/method` → its token bucket.
    limits: HashMap<String, Limiter>,
    tokens: Arc<Tokens>,
}

impl Guard {
    /// A guard of `policies` (service name → policy) and `limits` (`service/method` →
    /// token bucket).
    pub fn new(
        policies: HashMap<String, AuthorizationPolicy>,
        limits: HashMap<String, Limiter>,
        tokens: Arc<Tokens>,
    ) -> Self {
        Self {
            policies,
            limits,
            tokens,
        }
    }

    /// Takes a token from the method's bucket; the seconds to wait when empty.
    fn take(&self, path: &str) -> Result<(), u64> {
        let Some(limiter) = self.limits.get(path) else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| {
            let wait: Duration = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs_f64().ceil().max(1.0) as u64
        })
    }

    /// The caller of a call of `service`/`method` with `headers`, or the refusal.
    /// `Ok(None)`: allowed without a token.
    fn check(
        &self,
        service: &str,
        method: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<Caller>, Status> {
        if is_open(service) {
            return Ok(None);
        }
        let Some(policy) = self.policies.get(service) else {
            return Err(Status::unimplemented(format!(
                "no service '{service}' here"
            )));
        };
        let caller = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or(v.strip_prefix("bearer ")))
            .and_then(|t| self.tokens.authenticate(t.trim()));
        match policy.decide(method, caller.as_ref()) {
            Ok(()) => Ok(caller),
            Err(Refusal::Unauthenticated) => {
                tracing::info!("refused: no valid token");
                Err(Status::unauthenticated(
                    "a valid backend token is required (authorization: Bearer <token>; \
                     create one with `milepost token create`)",
                ))
            }
            Err(Refusal::PermissionDenied(role)) => {
                tracing::info!(role = role.as_str(), "refused: role too low");
                Err(Status::permission_denied(format!(
                    "role '{}' may not call {service}/{method}",
                    role.as_str()
                )))
            }
        }
    }

    /// Decides a call of `service`/`method` (its request path `path`): the caller to
    /// hand on, or the status that answers it.
    fn admit(
        &self,
        path: &str,
        service: &str,
        method: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<Caller>, Status> {
        let caller = self.check(service, method, headers)?;
        if let Err(secs) = self.take(path) {
            tracing::info!(retry_after_secs = secs, "refused: rate limited");
            let mut status = Status::new(
                Code::ResourceExhausted,
                format!("{service}/{method} is rate limited: retry in {secs} s"),
            );
            status
                .metadata_mut()
                .insert("retry-after", secs.to_string().parse().expect("digits"));
            return Err(status);
        }
        Ok(caller)
    }
}

/// Services that are not ours but are open to every client: reflection.
fn is_open(service: &str) -> bool {
    service.starts_with("grpc.reflection.")
}

/// The layer that puts [`Authorize`] in front of every service.
#[derive(Clone)]
pub struct AuthorizeLayer(Arc<Guard>);

impl AuthorizeLayer {
    /// Checks every call with `guard`.
    pub fn new(guard: Guard) -> Self {
        Self(Arc::new(guard))
    }
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            guard: self.0.clone(),
        }
    }
}

/// Checks every call against its service's policy and its method's rate limit, then
/// hands it on with the [`Caller`] in the request's extensions (which tonic gives the
/// handler); a refusal is answered here, trailers-only, and never reaches a service.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    guard: Arc<Guard>,
}

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().trim_start_matches('/').to_owned();
        let (service, method) = path.split_once('/').unwrap_or((&path, ""));
        let span = tracing::info_span!("grpc", service = %service, method = %method);
        match span.in_scope(|| self.guard.admit(&path, service, method, req.headers())) {
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
            Ok(caller) => {
                if let Some(c) = caller {
                    req.extensions_mut().insert(c);
                }
                // The clone that was polled ready serves this call (tower's rule).
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(req).await }.instrument(span))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(role: Role) -> Caller {
        Caller {
            name: "t".into(),
            role,
        }
    }

    #[test]
    fn roles_include_the_ones_below_and_methods_override_the_service() {
        let p = AuthorizationPolicy {
            allow_unauthenticated: false,
            service_roles: vec![Role::Editor],
            method_roles: vec![("List", vec![Role::Viewer]), ("Nobody", vec![])],
        };
        assert_eq!(p.decide("Create", None), Err(Refusal::Unauthenticated));
        assert_eq!(
            p.decide("Create", Some(&caller(Role::Viewer))),
            Err(Refusal::PermissionDenied(Role::Viewer))
        );
        assert_eq!(p.decide("Create", Some(&caller(Role::Editor))), Ok(()));
        assert_eq!(p.decide("Create", Some(&caller(Role::Admin))), Ok(()));
        assert_eq!(p.decide("List", Some(&caller(Role::Viewer))), Ok(()));
        assert!(p.decide("Nobody", Some(&caller(Role::Admin))).is_err());
        // Deny by default: a policy that grants nothing.
        let none = AuthorizationPolicy::default();
        assert!(none.decide("Any", Some(&caller(Role::Admin))).is_err());
        let open = AuthorizationPolicy {
            allow_unauthenticated: true,
            ..Default::default()
        };
        assert_eq!(open.decide("Any", None), Ok(()));
    }
}
