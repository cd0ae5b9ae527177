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

use poem::http::StatusCode;
use poem::{Endpoint, IntoResponse as _, Request, Response};
use poem_grpc::Code;
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

/// The endpoint that checks every call against its service's policy and its
/// method's rate limit, then hands it on with the [`Caller`] in the request's
/// extensions.
pub struct Authorize<E> {
    inner: E,
    policies: HashMap<String, AuthorizationPolicy>,
    /// `service/method` → its token bucket.
    limits: HashMap<String, Limiter>,
    tokens: Arc<Tokens>,
}

impl<E> Authorize<E> {
    /// Guards `inner` with `policies` (service name → policy) and `limits`
    /// (`service/method` → token bucket).
    pub fn new(
        inner: E,
        policies: HashMap<String, AuthorizationPolicy>,
        limits: HashMap<String, Limiter>,
        tokens: Arc<Tokens>,
    ) -> Self {
        Self {
            inner,
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
}

/// Services that are not ours but are open to every client: reflection.
fn is_open(service: &str) -> bool {
    service.starts_with("grpc.reflection.")
}

/// A trailers-only gRPC error response.
pub fn grpc_error(code: Code, message: &str) -> Response {
    grpc_error_builder(code, message).finish()
}

fn grpc_error_builder(code: Code, message: &str) -> poem::ResponseBuilder {
    // grpc-message is percent-encoded outside printable ASCII.
    let mut encoded = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    Response::builder()
        .status(StatusCode::OK)
        .content_type("application/grpc")
        .header("grpc-status", code.as_u16().to_string())
        .header("grpc-message", encoded)
}

impl<E> Authorize<E> {
    /// The caller of a call of `service`/`method` with `headers`, or the status
    /// and message of the refusal. `Ok(None)`: allowed without a token.
    fn check(
        &self,
        service: &str,
        method: &str,
        headers: &poem::http::HeaderMap,
    ) -> Result<Option<Caller>, (Code, String)> {
        if is_open(service) {
            return Ok(None);
        }
        let Some(policy) = self.policies.get(service) else {
            return Err((Code::Unimplemented, format!("no service '{service}' here")));
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
                Err((
                    Code::Unauthenticated,
                    "a valid backend token is required (authorization: Bearer <token>; \
                     create one with `milepost token create`)"
                        .to_owned(),
                ))
            }
            Err(Refusal::PermissionDenied(role)) => {
                tracing::info!(role = role.as_str(), "refused: role too low");
                Err((
                    Code::PermissionDenied,
                    format!("role '{}' may not call {service}/{method}", role.as_str()),
                ))
            }
        }
    }
}

impl<E: Endpoint> Endpoint for Authorize<E> {
    type Output = Response;

    async fn call(&self, mut req: Request) -> poem::Result<Self::Output> {
        let path = req.uri().path().trim_start_matches('/').to_owned();
        let (service, method) = path.split_once('/').unwrap_or((&path, ""));
        let span = tracing::info_span!("grpc", service = %service, method = %method);
        let caller = match span.in_scope(|| self.check(service, method, req.headers())) {
            Ok(c) => c,
            Err((code, message)) => return Ok(grpc_error(code, &message)),
        };
        if let Err(secs) = self.take(&path) {
            let _in = span.enter();
            tracing::info!(retry_after_secs = secs, "refused: rate limited");
            return Ok(grpc_error_builder(
                Code::ResourceExhausted,
                &format!("{service}/{method} is rate limited: retry in {secs} s"),
            )
            .header("retry-after", secs.to_string())
            .finish());
        }
        if let Some(c) = caller {
            req.extensions_mut().insert(c);
        }
        Ok(self.inner.call(req).instrument(span).await?.into_response())
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
