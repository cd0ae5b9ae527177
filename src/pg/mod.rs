//! The PostgreSQL wire listener (`--pg-addr`, off by default): users' SQL for
//! psql, Grafana's PostgreSQL data source, psycopg, asyncpg and other drivers and
//! BI tools, over the same sandbox as `POST /api/v1/sql` (`store::sql`).
//!
//! - **Authentication**: the password is a backend token (`milepost token
//!   create`); the user name is ignored, every role may read and sees every
//!   device. Tokens are stored hashed, so the password must arrive in clear text
//!   (PostgreSQL's `password` method): off loopback the listener therefore
//!   requires TLS (`--tls-cert`/`--tls-key`, the public listener's certificate) and
//!   refuses to start without it unless `--pg-insecure` says otherwise; a client
//!   that does not start TLS there is refused before it sends the token.
//! - **Protocol**: simple and extended queries (prepared statements with
//!   parameters), text and binary results, cancel requests (psql's Ctrl-C stops
//!   the query inside DuckDB). Session statements drivers send (`BEGIN`, `SET
//!   application_name`, `SHOW …`) are answered here ([`session`]).
//! - **Limits**: the sandbox's (time, result size, two queries at once: a third
//!   gets SQLSTATE 53300), and `--pg-max-connections` open connections. A
//!   connection must authenticate within [`STARTUP_DEADLINE`], and one address
//!   may have at most [`MAX_UNAUTHENTICATED_PER_IP`] connections that have not yet:
//!   idle sockets from one place cannot fill the listener for others.

mod encode;
mod handler;
mod session;

use std::collections::HashMap;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::sink::Sink;
use pgwire::api::auth::cleartext::CleartextPasswordAuthStartupHandler;
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::cancel::DefaultCancelHandler;
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::{ClientInfo, ConnectionManager, PgWireConnectionState, PgWireServerHandlers};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::startup::PasswordMessageFamily;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::store::sql::SqlEngine;
use crate::tls::TlsConfig;

/// The server version reported to clients.
pub use crate::store::sql::SERVER_VERSION;

/// How long a connection may take to authenticate (pgwire's own limit is 60 s,
/// PostgreSQL's `authentication_timeout` too); a client's handshake takes
/// milliseconds, and psql asks for a password before it connects again.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(10);

/// Connections from one IP address that have not authenticated yet, at most;
/// more are closed at once. Authenticated ones count only against
/// `--pg-max-connections` (tools on one host keep pools of them).
pub const MAX_UNAUTHENTICATED_PER_IP: usize = 8;

/// Connections not authenticated yet: each has a sender the start-up handler
/// fires when its client authenticates.
type Unauthenticated = Arc<Mutex<HashMap<SocketAddr, oneshot::Sender<()>>>>;

/// Who a token is (its name), if it is a valid backend token: the backend's
/// tokens, wired in by the app.
pub type Authenticate = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// How the listener runs.
#[derive(Clone)]
pub struct PgSettings {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The certificate, when TLS is configured.
    pub tls: Option<TlsConfig>,
    /// Off loopback, serve without TLS anyway (`--pg-insecure`).
    pub insecure: bool,
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
}

/// Why the listener did not start.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Off loopback without TLS and without `--pg-insecure`.
    #[error(
        "--pg-addr {0} is not a loopback address, and without TLS the tokens clients send \
         as passwords would cross the network in clear text: give --tls-cert and --tls-key, \
         listen on 127.0.0.1, or pass --pg-insecure"
    )]
    NeedsTls(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen on --pg-addr {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The running listener.
pub struct PgServer {
    addr: SocketAddr,
    tls: Option<TlsConfig>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl PgServer {
    /// Binds `settings.addr` and serves until [`PgServer::shutdown`].
    pub async fn start(
        settings: PgSettings,
        engine: Arc<SqlEngine>,
        authenticate: Authenticate,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PgError> {
        let loopback = settings.addr.ip().is_loopback();
        if !loopback && settings.tls.is_none() && !settings.insecure {
            return Err(PgError::NeedsTls(settings.addr));
        }
        let listener = TcpListener::bind(settings.addr)
            .await
            .map_err(|source| PgError::Bind {
                addr: settings.addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| PgError::Bind {
            addr: settings.addr,
            source,
        })?;
        let manager = Arc::new(ConnectionManager::new());
        let handlers = Arc::new(Handlers {
            handler: Arc::new(handler::Handler::new(engine, metrics.clone())),
            startup: Arc::new(Startup {
                require_tls: !loopback && !settings.insecure,
                unauthenticated: Unauthenticated::default(),
                inner: CleartextPasswordAuthStartupHandler::new(
                    TokenAuth(authenticate),
                    parameters(),
                )
                .with_connection_manager(manager.clone()),
            }),
            cancel: Arc::new(DefaultCancelHandler::new(manager)),
        });
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let tls = settings.tls.clone();
        tracing::info!(
            %addr,
            tls = settings.tls.is_some(),
            "PostgreSQL listener listening"
        );
        tracker.spawn(accept(
            listener,
            settings,
            handlers,
            metrics,
            stop.clone(),
            tracker.clone(),
        ));
        Ok(Self {
            addr,
            tls,
            stop,
            tracker,
        })
    }

    /// Where it listens (the port chosen when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its certificate, to reload on SIGHUP.
    pub fn tls(&self) -> Option<TlsConfig> {
        self.tls.clone()
    }

    /// Stops accepting, closes every connection (their queries are cancelled) and
    /// waits for them.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

async fn accept(
    listener: TcpListener,
    settings: PgSettings,
    handlers: Arc<Handlers>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    loop {
        let (socket, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL listener: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "PostgreSQL listener: too many connections, one closed");
            continue;
        };
        let unauthenticated = handlers.startup.unauthenticated.clone();
        let authenticated = {
            let mut waiting = unauthenticated.lock().expect("pg start-ups");
            if waiting.keys().filter(|p| p.ip() == peer.ip()).count() >= MAX_UNAUTHENTICATED_PER_IP
            {
                tracing::warn!(
                    %peer,
                    "PostgreSQL listener: too many connections from one address not yet \
                     authenticated, one closed"
                );
                continue;
            }
            let (tx, rx) = oneshot::channel();
            waiting.insert(peer, tx);
            rx
        };
        let _ = socket.set_nodelay(true);
        let tls = settings.tls.as_ref().map(TlsConfig::acceptor);
        let handlers = handlers.clone();
        let metrics = metrics.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            metrics.pg_connections.inc();
            let span = tracing::debug_span!("pg_connection", %peer);
            let _slot = slot;
            // Fires if the client has not authenticated by the deadline; never after.
            let deadline = async {
                if tokio::time::timeout(STARTUP_DEADLINE, authenticated).await.is_ok() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                // Dropping the connection's future cancels its running query.
                () = stop.cancelled() => {}
                () = deadline => {
                    span.in_scope(|| tracing::debug!("PostgreSQL connection closed: not authenticated in time"));
                }
                served = pgwire::tokio::process_socket(socket, tls, handlers) => {
                    if let Err(e) = served {
                        span.in_scope(|| tracing::debug!(error = %e, "PostgreSQL connection ended"));
                    }
                }
            }
            unauthenticated.lock().expect("pg start-ups").remove(&peer);
            metrics.pg_connections.dec();
        });
    }
}

/// What clients are told at start-up.
fn parameters() -> DefaultServerParameterProvider {
    let mut p = DefaultServerParameterProvider::default();
    p.server_version = SERVER_VERSION.to_owned();
    p.is_superuser = false;
    p.default_transaction_read_only = true;
    p.search_path = crate::store::sql::setting("search_path")
        .unwrap_or("main")
        .to_owned();
    p
}

/// Tokens as passwords.
struct TokenAuth(Authenticate);

impl Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenAuth")
    }
}

#[async_trait]
impl AuthSource for TokenAuth {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        // Tokens are stored hashed: there is no password to hand out.
        Err(PgWireError::InvalidPassword(
            login.user().unwrap_or_default().to_owned(),
        ))
    }

    async fn verify_password(
        &self,
        login: &LoginInfo,
        presented: &[u8],
    ) -> PgWireResult<Option<()>> {
        let user = login.user().unwrap_or_default().to_owned();
        let token = std::str::from_utf8(presented).unwrap_or_default().trim();
        match (self.0)(token) {
            Some(caller) => {
                tracing::info!(%caller, %user, "PostgreSQL client authenticated");
                Ok(None)
            }
            None => {
                tracing::info!(%user, "PostgreSQL client refused: not a valid token");
                Err(PgWireError::InvalidPassword(user))
            }
        }
    }
}

/// Start-up: refuses a client that did not start TLS where TLS is required,
/// before it sends its token; then the clear-text password exchange.
struct Startup<A: AuthSource + 'static> {
    require_tls: bool,
    /// Fired for a connection once its client authenticated.
    unauthenticated: Unauthenticated,
    inner: CleartextPasswordAuthStartupHandler<A, DefaultServerParameterProvider>,
}

#[async_trait]
impl<A: AuthSource + 'static> StartupHandler for Startup<A> {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if self.require_tls && !client.is_secure() {
            return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "FATAL".to_owned(),
                "28000".to_owned(),
                "this listener requires TLS (sslmode=require): the password is a token".to_owned(),
            ))));
        }
        let message = match message {
            // The token decides which client's share of the query slots the
            // connection's queries take (a digest of it is kept, not the token).
            PgWireFrontendMessage::PasswordMessageFamily(family) => {
                let password = family.into_password()?;
                let id = crate::store::sql::Client::of_token(password.password.trim()).id;
                client.session_extensions().insert(handler::ClientId(id));
                PgWireFrontendMessage::PasswordMessageFamily(PasswordMessageFamily::Password(
                    password,
                ))
            }
            other => other,
        };
        self.inner.on_startup(client, message).await?;
        if matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            let waiting = self
                .unauthenticated
                .lock()
                .expect("pg start-ups")
                .remove(&client.socket_addr());
            if let Some(authenticated) = waiting {
                let _ = authenticated.send(());
            }
        }
        Ok(())
    }
}

struct Handlers {
    handler: Arc<handler::Handler>,
    startup: Arc<Startup<TokenAuth>>,
    cancel: Arc<DefaultCancelHandler>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }

    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        self.cancel.clone()
    }
}
