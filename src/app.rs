//! Wiring and lifecycle: config → store → writer → listener, and the ordered
//! shutdown (stop accepting → finish in-flight requests → drain and checkpoint the
//! writer → exit) driven by one cancellation token.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::listener::{self, ListenerLimits};
use crate::api::{self, AppState, KeyRing, Limits};
use crate::backend::{Backend, Context, JobLimits, Tokens};
use crate::config::{BlobArgs, ServeArgs};
use crate::export::{BlobStore, DumpSettings, Dumper, Layout};
use crate::jobs::detection::{self, DetectSettings};
use crate::jobs::notify::{self, NotifySettings};
use crate::jobs::{DumpJobs, Retention};
use crate::metrics::Metrics;
use crate::pg::{PgServer, PgSettings};
use crate::store::{AlertStore, DumpSource, Store, Writer, WriterConfig, WriterHandle};
use crate::tls::TlsConfig;

/// A running server.
pub struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    dumper: Arc<Dumper>,
    writer: WriterHandle,
    retention: Option<Retention>,
    metrics: Arc<Metrics>,
    backend_addr: Option<SocketAddr>,
    alerts: Arc<AlertStore>,
    reloader: Reloader,
    pg_addr: Option<SocketAddr>,
}

/// Re-reads what may change while the server runs (SIGHUP): the API keys and the
/// TLS certificate. A source that fails to load keeps what was in use.
#[derive(Clone, Debug)]
pub struct Reloader {
    keys: Arc<KeyRing>,
    /// The public listener's and the PostgreSQL listener's (same files).
    tls: Vec<TlsConfig>,
}

impl Reloader {
    /// Reloads keys and certificate, logging the outcome of each.
    pub fn reload(&self) -> anyhow::Result<()> {
        let keys = self.keys.reload();
        match &keys {
            Ok(n) => tracing::info!(keys = n, "API keys reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "reloading API keys failed; the previous keys stay valid")
            }
        }
        let tls: Result<Vec<()>, _> = self.tls.iter().map(TlsConfig::reload).collect();
        match &tls {
            Ok(done) if done.is_empty() => {}
            Ok(_) => tracing::info!("TLS certificate reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "reloading the TLS certificate failed; the previous one stays in use")
            }
        }
        keys?;
        tls?;
        Ok(())
    }
}

/// Opens and probes the blob store, reads what was dumped to it before and joins the
/// lake. A bad URL, an unreachable store, or a node name or root day files held by
/// another appliance stop the start with the reason.
pub async fn open_dumper(
    blob: &BlobArgs,
    data_dir: &std::path::Path,
    source: DumpSource,
    metrics: Arc<Metrics>,
    max_days_per_run: usize,
) -> anyhow::Result<Dumper> {
    let store = BlobStore::open(&blob.blob_config(data_dir))?;
    let node = blob.node();
    store.probe(&node).await?;
    tracing::info!(
        store = store.display(),
        node,
        shared = blob.shared_lake,
        "dumps go to the blob store"
    );
    let settings = DumpSettings {
        formats: blob.dump_format.formats(),
        layout: Layout {
            node,
            shared: blob.shared_lake,
        },
        work_dir: data_dir.join("dump-tmp"),
        max_days_per_run: max_days_per_run.max(1),
    };
    Ok(Dumper::new(source, store, settings, metrics).await?)
}

/// Everything of a server that runs besides the public listener, stopped by
/// [`Running::stop`] in the one order that is safe: the token first (so nothing new
/// starts), the backend and the background tasks (their database calls end before
/// the writer's last checkpoint), the dump schedule, any dump in progress (its
/// snapshot would keep the writer from checkpointing), and the writer last, which
/// drains its queue, checkpoints and releases the data directory's lock. A start
/// that fails half-way stops what it had started the same way.
struct Running {
    token: CancellationToken,
    pg: Option<PgServer>,
    backend: Option<Backend>,
    /// Detection, webhooks, periodic compaction.
    tasks: TaskTracker,
    jobs: Option<DumpJobs>,
    dumper: Arc<Dumper>,
    writer: Writer,
}

impl Running {
    async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        if let Some(pg) = self.pg {
            pg.shutdown().await;
        }
        if let Some(b) = self.backend {
            b.wait().await;
        }
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(j) = self.jobs {
            j.stop().await;
        }
        self.dumper.shutdown().await;
        tracing::info!("background work stopped; draining the writer");
        self.writer
            .shutdown()
            .await
            .context("closing the database")?;
        tracing::info!("database checkpointed and closed");
        Ok(())
    }
}

impl Server {
    /// Opens the database, starts the writer, the jobs and the backend, and binds the
    /// listener. Returns once the server accepts connections. On an error nothing is
    /// left running: what had started is stopped (see [`Running`]) and the data
    /// directory is free again.
    pub async fn start(args: ServeArgs) -> anyhow::Result<Self> {
        crate::jobs::configure_malloc();
        // 1. Open what the server reads and checks; nothing runs yet, so a failure
        //    here drops the store and its lock.
        let storage = crate::store::StoreConfig {
            series_memory: usize::try_from(args.series_memory).unwrap_or(usize::MAX),
            ..args.storage.store_config()
        };
        let store = tokio::task::spawn_blocking(move || Store::open(&storage))
            .await
            .context("opening the database")??;
        let keys = Arc::new(KeyRing::load(
            &args.api_keys,
            args.api_key_file.as_deref(),
            &args.storage.data_dir,
        )?);
        let tls = match (&args.http.tls_cert, &args.http.tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig::load(cert, key, crate::tls::HTTP_ALPN)?),
            _ => None,
        };
        let max_future_skew = chrono::Duration::from_std(args.max_future_skew)
            .context("--max-future-skew is too large")?;
        let reads: Arc<dyn crate::store::ReadStore> = Arc::new(store.reader()?);
        let sql = Arc::new(store.sql_engine(crate::store::sql::SqlLimits {
            timeout: args.sql_timeout,
            time_share: args.sql_time_share,
            total_share: args.sql_total_share,
            ..crate::store::sql::SqlLimits::default()
        })?);
        let alerts = Arc::new(store.alert_store()?);
        let metrics = Arc::new(Metrics::new());
        let dumper = Arc::new(
            open_dumper(
                &args.blob,
                &args.storage.data_dir,
                store.dump_source()?,
                metrics.clone(),
                args.dump_max_days,
            )
            .await?,
        );

        // 2. The writer. From here on a failure stops everything started so far.
        let writer = store.start_writer(WriterConfig {
            queue_capacity: args.queue_capacity,
            queue_timeout: args.queue_timeout,
            metrics: metrics.clone(),
            rollup_merge_rows: usize::try_from(args.rollup_merge_rows).unwrap_or(usize::MAX),
            cluster_rows: args.cluster_rows,
            live_slots_memory: usize::try_from(args.live_slots_memory).unwrap_or(usize::MAX),
            known_keys_memory: usize::try_from(args.known_keys_memory).unwrap_or(usize::MAX),
            live_slots_idle: args.live_slots_idle,
            series_idle: args.series_idle,
            ..WriterConfig::default()
        })?;
        let writer_handle = writer.handle();
        let mut running = Running {
            token: CancellationToken::new(),
            pg: None,
            backend: None,
            tasks: TaskTracker::new(),
            jobs: None,
            dumper: dumper.clone(),
            writer,
        };
        metrics.devices_limit.set(args.max_devices as i64);
        metrics.expose_at_zero(
            reads.catalog().iter().map(|s| s.name.as_str()),
            &api::ingest::STATUSES,
        );
        let retention = args.retention_days.map(|days| Retention { days });

        // 3. Jobs and the backend, then 4. the public listener, last: once it is
        //    announced, everything else runs.
        let tokens: api::TokenCheck = {
            // Every role may read: any valid token authorizes user SQL.
            let tokens = Tokens::new(&args.storage.data_dir);
            Arc::new(move |t: &str| tokens.authenticate(t).map(|c| c.name))
        };
        let started = async {
            start_jobs(&args, &mut running, &reads, &alerts, retention, &metrics).await?;
            if let Some(addr) = args.pg_addr {
                let tls = match (&args.http.tls_cert, &args.http.tls_key) {
                    (Some(cert), Some(key)) => {
                        Some(TlsConfig::load(cert, key, crate::tls::PG_ALPN)?)
                    }
                    _ => None,
                };
                let settings = PgSettings {
                    addr,
                    tls,
                    insecure: args.pg_insecure,
                    max_connections: args.pg_max_connections,
                };
                running.pg = Some(
                    PgServer::start(settings, sql.clone(), tokens.clone(), metrics.clone()).await?,
                );
            }
            let listen = args.listen_addr();
            let socket = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            anyhow::Ok(socket)
        }
        .await;
        let socket = match started {
            Ok(socket) => socket,
            Err(e) => {
                if let Err(stop) = running.stop().await {
                    tracing::error!(error = %stop, "stopping after a failed start");
                }
                return Err(e);
            }
        };
        let backend_addr = running.backend.as_ref().map(Backend::local_addr);
        let pg_addr = running.pg.as_ref().map(PgServer::local_addr);
        let mut reload_tls: Vec<TlsConfig> = tls.iter().cloned().collect();
        reload_tls.extend(running.pg.as_ref().and_then(PgServer::tls));
        let state = Arc::new(AppState {
            reads,
            alerts: alerts.clone(),
            writer: writer_handle.clone(),
            metrics: metrics.clone(),
            data_dir: crate::store::DataDir::new(&args.storage.data_dir),
            keys: keys.clone(),
            limits: Limits {
                max_body_bytes: args.max_body_bytes,
                max_line_bytes: args.max_line_bytes as usize,
                max_future_skew,
                parse_threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
                body_read_timeout: args.http.body_read_timeout,
                ingest_slots: crate::api::slots::Slots::new(
                    usize::MAX,
                    usize::try_from(args.http.max_ingest_per_client).unwrap_or(usize::MAX),
                ),
            },
            default_device: args.default_device.clone(),
            dumps: Some(dumper.clone()),
            dump_public_url: args.dump_public_url.clone(),
            admission: crate::api::admission::Admission::new(
                crate::api::admission::DeviceLimits {
                    max_devices: args.max_devices,
                    max_devices_per_key: args.max_devices_per_key,
                    new_per_key_per_minute: args.max_new_devices_per_key,
                },
                writer_handle.clone(),
                metrics.clone(),
            ),
            sql: Some(sql),
            tokens: Some(tokens),
        });
        let console =
            (args.console == crate::config::Toggle::On).then(|| api::console::ConsoleSettings {
                base: if args.dashboard_dir.is_some() {
                    "/console/"
                } else {
                    "/"
                },
                key_file: keys.generated_file(),
                tls: tls.is_some(),
                started: std::time::Instant::now(),
            });
        let app = api::app(
            state,
            args.dashboard_dir.clone(),
            args.cors_origins.clone(),
            console,
        );
        let addr = socket.local_addr().unwrap_or_else(|_| args.listen_addr());
        tracing::info!(%addr, tls = tls.is_some(), "public HTTP API listening");
        let limits = ListenerLimits {
            header_read_timeout: args.http.header_read_timeout,
            max_connections: args.http.max_connections.max(1),
            max_connections_per_client: args.http.max_connections_per_client.max(1),
            max_header_bytes: args.http.max_header_bytes as usize,
        };
        let shutdown = running.token.clone();
        let grace = args.shutdown_timeout;
        let listener_tls = tls.clone();
        let task = tokio::spawn(async move {
            let token = running.token.clone();
            let served = listener::serve(socket, listener_tls, app, limits, token, grace).await;
            let stopped = running.stop().await;
            served.context("HTTP server failed")?;
            stopped
        });
        Ok(Self {
            addr,
            shutdown,
            task,
            dumper,
            writer: writer_handle,
            retention,
            metrics,
            backend_addr,
            alerts,
            reloader: Reloader {
                keys,
                tls: reload_tls,
            },
            pg_addr,
        })
    }

    /// One dump run and the retention after it, as the schedule would start them
    /// (tests use this instead of waiting for the clock).
    pub async fn run_jobs_once(&self) {
        crate::jobs::run_once(&self.dumper, &self.writer, self.retention, &self.metrics).await;
    }

    /// The dumper (tests run dumps without waiting for the schedule).
    pub fn dumper(&self) -> Arc<Dumper> {
        self.dumper.clone()
    }

    /// The bound address of the PostgreSQL listener, when it runs.
    pub fn pg_addr(&self) -> Option<SocketAddr> {
        self.pg_addr
    }

    /// The bound address of the internal gRPC backend, when it runs.
    pub fn backend_addr(&self) -> Option<SocketAddr> {
        self.backend_addr
    }

    /// The backend's tables (tests look at what detection stored).
    pub fn alerts(&self) -> Arc<AlertStore> {
        self.alerts.clone()
    }

    /// What SIGHUP reloads.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Token that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task panicked")?
    }

    /// Stops gracefully and waits.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Starts what runs in the background — periodic compaction, the dump schedule,
/// step detection and its webhooks — and the internal gRPC backend, each recorded in
/// `running` as soon as it runs, so a failure of a later one stops it again.
async fn start_jobs(
    args: &ServeArgs,
    running: &mut Running,
    reads: &Arc<dyn crate::store::ReadStore>,
    alerts: &Arc<AlertStore>,
    retention: Option<Retention>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<()> {
    let token = running.token.clone();
    let writer = running.writer.handle();
    if !args.compact_interval.is_zero() {
        running.tasks.spawn(crate::jobs::compact_periodically(
            writer.clone(),
            args.compact_interval,
            args.compact_settle,
            token.clone(),
        ));
    }
    running.tasks.spawn(crate::jobs::trim_memory_periodically(
        crate::jobs::TRIM_EVERY,
        crate::api::release_body_buffers,
        token.clone(),
    ));
    if !args.dump_schedule.trim().eq_ignore_ascii_case("off") {
        running.jobs = Some(
            DumpJobs::start(
                &args.dump_schedule,
                running.dumper.clone(),
                writer.clone(),
                retention,
                metrics.clone(),
                token.clone(),
            )
            .await?,
        );
    }
    // Step detection after commits, and the webhooks of what it finds.
    let wake_notifier = Arc::new(tokio::sync::Notify::new());
    running.tasks.spawn(detection::run_background(
        writer.clone(),
        reads.clone(),
        alerts.clone(),
        DetectSettings {
            debounce: args.backend.detect_debounce,
        },
        wake_notifier.clone(),
        metrics.clone(),
        token.clone(),
    ));
    running.tasks.spawn(notify::run(
        alerts.clone(),
        NotifySettings {
            attempts: args.backend.webhook_attempts,
            backoff: args.backend.webhook_backoff,
            ..NotifySettings::default()
        },
        wake_notifier.clone(),
        metrics.clone(),
        token.clone(),
    ));
    if let Some(addr) = args.backend.backend_addr.0 {
        let ctx = Arc::new(Context {
            reads: reads.clone(),
            alerts: alerts.clone(),
            dumper: Some(running.dumper.clone()),
            notify: wake_notifier,
            jobs: JobLimits {
                per_minute: args.backend.job_rate_per_minute,
                burst: args.backend.job_burst,
            },
            dry_run_max_results: args.backend.dry_run_max_results.max(1),
            writer: running.writer.handle(),
        });
        let tokens = Arc::new(Tokens::new(&args.storage.data_dir));
        running.backend =
            Some(Backend::start(addr, ctx, tokens, token, args.shutdown_timeout).await?);
    }
    Ok(())
}

/// SIGINT/SIGTERM handlers, installed before start-up so that a signal arriving
/// while the database opens still means "shut down gracefully", not "die".
pub struct ShutdownSignal {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    /// Installs the handlers.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    /// Completes on SIGINT or SIGTERM.
    pub async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = self.term.recv() => {},
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
