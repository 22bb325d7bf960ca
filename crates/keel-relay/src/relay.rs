//! The daemon: startup recovery, the HTTP/WebSocket server, background loops,
//! and graceful shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use keel_recovery::{
    DirLock, Health, HealthState, RecoveryReport, Shutdown, ShutdownReport, StartOptions,
    Supervisor, SupervisorConfig,
};
use keel_session::SessionStore;

use crate::store::{RelayStore, RelayStoreExt};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::accept::Admitted;
use crate::channels::{BackgroundCtx, Channels};
use crate::config::Config;
use crate::conn::ConnCtx;
use crate::hub::Hub;
use crate::limits::{Budgets, Caps};
use crate::protocol::SUBPROTOCOL;

/// What the HTTP handlers share.
pub(crate) struct Shared {
    conns: Arc<ConnCtx>,
    caps: Arc<Caps>,
    metrics: PrometheusHandle,
}

/// How often histogram samples are folded into their summaries.
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);
const METRICS_UPKEEP_THREAD: &str = "keel-metrics";

fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // A process holds one global recorder; a second relay in the same
            // process (tests) shares it.
            let _ = metrics::set_global_recorder(recorder);
            // Histograms keep every sample until something drains them:
            // without an upkeep, a relay nobody scrapes held 8 bytes per
            // publish forever (the soak's steady RSS growth, ~170 MiB/h at
            // 6,000 publishes/s).
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name(METRICS_UPKEEP_THREAD.into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(METRICS_UPKEEP);
                        upkeep.run_upkeep();
                    }
                });
            handle
        })
        .clone()
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Startup recovery refused (another instance, unreadable database, full disk).
    #[error(transparent)]
    Start(#[from] keel_recovery::StartError),
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The supervisor could not start.
    #[error("cannot start the process supervisor: {0}")]
    Supervisor(std::io::Error),
    /// A JWT key or TLS certificate file could not be used.
    #[error("{0}")]
    Security(String),
    /// Cluster mode could not start (NATS unreachable).
    #[error("{0}")]
    Cluster(String),
}

/// A running relay.
pub struct Relay {
    shared: Arc<Shared>,
    addr: SocketAddr,
    intake: Shutdown,
    server: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    /// Free space, checked until shutdown (it has no stop of its own).
    disk_watch: JoinHandle<()>,
    report: RecoveryReport,
    _lock: DirLock,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Runs startup recovery on the data directory, listens, and starts the
    /// background loops. Health is OPERATIONAL (or DEGRADED) when this returns.
    pub async fn start(config: Config) -> Result<Relay, RelayError> {
        Self::start_with(config, None).await
    }

    /// [`Relay::start`] with an exec helper for supervised children (see
    /// `keel_recovery::SupervisorConfig::exec_helper`).
    pub async fn start_with(
        config: Config,
        exec_helper: Option<(std::path::PathBuf, Vec<std::ffi::OsString>)>,
    ) -> Result<Relay, RelayError> {
        config.validate()?;
        // Key and certificate files are read before anything starts: a bad
        // one is a clear error at start, never a relay that refuses everyone.
        let authority =
            Arc::new(crate::auth::Authority::new(&config.auth).map_err(RelayError::Security)?);
        let tls = crate::tls::acceptor(&config.tls).map_err(RelayError::Security)?;
        let upstream_tls = match &config.upstream_ca_file {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in crate::tls::certificates(path).map_err(RelayError::Security)? {
                    roots.add(cert).map_err(|e| {
                        RelayError::Security(format!(
                            "{}: unusable CA certificate: {e}",
                            path.display()
                        ))
                    })?;
                }
                Some(Arc::new(keel_reconnect::tls_config(roots)))
            }
            None => None,
        };
        let metrics = prometheus();
        crate::catalogue::register();
        let options = StartOptions {
            data_dir: config.data.clone(),
            store: config.store_config(),
        };
        // Cluster mode: the bus is checked before anything is recovered.
        let bus = match &config.cluster.nats_url {
            Some(url) => Some(Arc::new(
                crate::bus::Bus::connect(url, &config.cluster.node_id)
                    .await
                    .map_err(RelayError::Cluster)?,
            )),
            None => None,
        };
        let started = open_store(&config, &options).await?;
        tracing::info!(report = %started.report.summary(), "startup recovery done");
        let (helper, helper_args) = exec_helper.unzip();
        let supervisor = Supervisor::new(SupervisorConfig {
            exec_helper: helper,
            exec_helper_args: helper_args.unwrap_or_default(),
            registry: Some(options.registry_dir()),
            ..Default::default()
        })
        .map_err(RelayError::Supervisor)?;

        let listener = listen(config.listen).map_err(|source| RelayError::Listen {
            addr: config.listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| RelayError::Listen {
            addr: config.listen,
            source,
        })?;
        let intake = Shutdown::new();
        let channels = Channels {
            store: started.store.clone(),
            // No replay cache in cluster mode: another node's retention
            // cuts would not reach it.
            hub: Arc::new(Hub::new(
                if bus.is_some() {
                    0
                } else {
                    config.limits.replay_cache()
                },
                config.limits.replay_page_bytes,
            )),
            health: started.health.clone(),
            bus,
        };
        let outbox_ready = Arc::new(Notify::new());
        let limits = &config.limits;
        let budgets = Budgets::new(limits.global_buffer_bytes);
        let conns = Arc::new(ConnCtx::new(
            config.clone(),
            channels.clone(),
            budgets.clone(),
            Arc::default(),
            supervisor,
            intake.token(),
            outbox_ready.clone(),
            authority,
        ));
        let caps = Caps::new(limits);
        let shared = Arc::new(Shared {
            conns: conns.clone(),
            caps: caps.clone(),
            metrics,
        });
        let app = Router::new()
            .route("/ws", get(ws_handler))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_handler))
            .with_state(shared.clone());
        let server = tokio::spawn(crate::accept::run(
            listener,
            app,
            crate::accept::Serving {
                caps,
                header_timeout: Duration::from_millis(limits.header_timeout_ms.max(1)),
                max_header_bytes: limits.max_header_bytes,
                inbound: budgets.inbound.clone(),
                frame_timeout: Duration::from_millis(limits.frame_timeout_ms.max(1)),
                tls,
                send_buffer_bytes: limits.socket_send_buffer_bytes,
            },
            intake.token(),
        ));
        let background_ctx = Arc::new(BackgroundCtx {
            config: config.clone(),
            channels,
            outbox_ready,
            intake: intake.token(),
        });
        let mut background = vec![tokio::spawn(crate::retention::run(background_ctx.clone()))];
        let clustered = background_ctx.channels.bus.is_some();
        if clustered {
            // One node at a time sends upstream: the lock's holder.
            background.extend(crate::cluster::start(
                background_ctx.clone(),
                conns.clone(),
                config.upstream.clone().map(|u| (u, upstream_tls.clone())),
            ));
        } else if let Some(url) = config.upstream.clone() {
            background.push(tokio::spawn(crate::upstream::run(
                background_ctx.clone(),
                url,
                upstream_tls,
            )));
        }
        if let Some(dir) = config.spool.clone() {
            background.push(tokio::spawn(crate::spool::run(background_ctx.clone(), dir)));
        }
        let disk_watch = keel_recovery::watch_disk(
            started.health.clone(),
            options.data_dir.clone(),
            keel_recovery::DiskThresholds {
                low_bytes: config.disk.low_bytes,
                full_bytes: config.disk.full_bytes,
            },
            Duration::from_millis(config.disk.check_interval_ms),
        );
        let _ = started.health.ready(&format!("listening on {addr}")).await;
        // Startup checked the state tables; the message log, whose size has
        // no bound in sessions, is checked while the relay serves. Not
        // awaited at shutdown: a long check must not hold up draining.
        if let Some(store) = started.store.sqlite() {
            drop(tokio::spawn({
                let (path, store, health) =
                    (options.db_path(), store.clone(), started.health.clone());
                async move {
                    keel_recovery::integrity::full_check(&path, &store, &health).await;
                }
            }));
        }
        Ok(Relay {
            shared,
            addr,
            intake,
            server,
            background,
            disk_watch,
            report: started.report,
            _lock: started.lock,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its store.
    pub fn store(&self) -> &RelayStore {
        &self.shared.conns.channels.store
    }

    /// Its health machine.
    pub fn health(&self) -> &Health<RelayStore> {
        &self.shared.conns.channels.health
    }

    /// What startup recovery did.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.report
    }

    /// Shuts down gracefully: health DRAINING, stop accepting, close every
    /// connection with 1001 (sessions become DETACHED), finish in-flight
    /// publishes, stop the loops, terminate children, close the store with
    /// `clean_shutdown` set (left unset if draining took longer than
    /// `shutdown_grace_ms`).
    pub async fn shutdown(self, reason: &str) -> Result<ShutdownReport, keel_session::StoreError> {
        let Relay {
            shared,
            intake,
            server,
            background,
            disk_watch,
            ..
        } = self;
        disk_watch.abort();
        let conns = shared.conns.clone();
        let drain = {
            let conns = conns.clone();
            async move {
                conns.live.wait_zero().await;
                let _ = server.await;
                for task in background {
                    let _ = task.await;
                }
            }
        };
        let report = keel_recovery::graceful_shutdown(
            reason,
            &conns.channels.health,
            &intake,
            drain,
            Duration::from_millis(conns.config.shutdown_grace_ms),
            Some(&conns.supervisor),
            &conns.channels.store,
        )
        .await?;
        // A node that stopped cleanly holds no session: its lease goes, so
        // no survivor waits for it to lapse.
        if report.clean
            && let Some(pg) = crate::cluster::node_store(&conns.channels)
        {
            let _ = pg.leave().await;
        }
        Ok(report)
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    // The default backlog of 128 overflows under connect bursts (shared/baselines.md).
    socket.listen(4096)
}

async fn ws_handler(
    ws: crate::upgrade::Upgrade,
    headers: axum::http::HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(admitted): Extension<Admitted>,
    State(shared): State<Arc<Shared>>,
) -> Response {
    let conns = &shared.conns;
    // A browser says where the page that opens the socket came from; any
    // page a user visits could otherwise drive a relay on their machine.
    let origins: Vec<_> = headers.get_all(axum::http::header::ORIGIN).iter().collect();
    let allowed = match origins.as_slice() {
        [] => true,
        [one] => conns.authority.origin_allowed(one.to_str().ok()),
        // Several: no browser sends that; refused whatever is allowed.
        _ => false,
    };
    if !allowed {
        crate::auth::refused("origin");
        return (
            StatusCode::FORBIDDEN,
            "origin not allowed: add it to [auth] allowed_origins\n",
        )
            .into_response();
    }
    if !conns.channels.health.state().is_serving() || conns.intake.is_stopping() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not serving").into_response();
    }
    let hard_cap = conns.config.limits.max_frame_bytes.saturating_mul(4);
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .max_message_size(Some(hard_cap))
        .max_frame_size(Some(hard_cap));
    let conns = conns.clone();
    ws.on_upgrade(SUBPROTOCOL, config, move |socket| {
        crate::conn::serve(conns, socket, peer.ip(), admitted)
    })
}

/// Runs startup recovery on the configured store: the data directory's
/// SQLite file (checked, quarantined if damaged) or PostgreSQL (cluster
/// mode; unreachable, or a schema newer than this build, is an error here).
async fn open_store(
    config: &Config,
    options: &StartOptions,
) -> Result<keel_recovery::Started<RelayStore>, keel_recovery::StartError> {
    match config.store.backend.as_str() {
        "postgres" => {
            let pg = keel_session_pg::PgConfig {
                url: config.store.url.clone().unwrap_or_default(),
                node_id: config.cluster.node_id.clone(),
                pool_size: config.store.pool_size,
                ..keel_session_pg::PgConfig::default()
            };
            keel_recovery::start_on(options, async move |_: &std::path::Path| {
                let store = keel_session_pg::PgStore::open(pg).await?;
                Ok((RelayStore::Right(store), None))
            })
            .await
        }
        _ => {
            let (path, store_config) = (options.db_path(), options.store.clone());
            keel_recovery::start_on(options, async move |_: &std::path::Path| {
                let (store, quarantine) =
                    keel_recovery::integrity::open_checked(&path, store_config).await?;
                Ok((RelayStore::Left(store), quarantine))
            })
            .await
        }
    }
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let health = &shared.conns.channels.health;
    let state = health.state();
    let inputs = health.inputs().await;
    let body = serde_json::json!({
        "state": state.as_str(),
        "upstream_reachable": inputs.upstream_reachable,
        "disk": format!("{:?}", inputs.disk).to_lowercase(),
        "database_ok": inputs.database_ok,
        "store": shared.conns.channels.store.backend(),
        "node_id": shared.conns.config.cluster.node_id,
        "bus": match &shared.conns.channels.bus {
            None => "none",
            Some(bus) if bus.reachable() => "connected",
            Some(_) => "disconnected",
        },
        "store_reachable": tokio::time::timeout(
            Duration::from_secs(2),
            shared.conns.channels.store.ping(),
        )
        .await
        .is_ok_and(|r| r.is_ok()),
        "problems": inputs.problems(),
        "connections": shared.conns.live.count(),
        "tcp_connections": shared.caps.open(),
    });
    let code = if state == HealthState::Stopped {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, axum::Json(body)).into_response()
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let state = shared.conns.channels.health.state();
    if state.is_serving() && !shared.conns.intake.is_stopping() {
        (StatusCode::OK, state.as_str()).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, state.as_str()).into_response()
    }
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> Response {
    let channels = &shared.conns.channels;
    let state = channels.health.state();
    for s in [
        HealthState::Starting,
        HealthState::Operational,
        HealthState::Degraded,
        HealthState::Draining,
        HealthState::Stopped,
    ] {
        metrics::gauge!("keel_health", "state" => s.as_str()).set(f64::from(u8::from(s == state)));
    }
    metrics::gauge!("keel_channels_subscribed").set(channels.hub.channel_count() as f64);
    metrics::gauge!("keel_subscriptions").set(channels.hub.subscription_count() as f64);
    let (inbound, outbound) = crate::limits::buffered();
    metrics::gauge!("keel_buffered_bytes", "direction" => "inbound").set(inbound as f64);
    metrics::gauge!("keel_buffered_bytes", "direction" => "outbound").set(outbound as f64);
    metrics::gauge!("keel_buffered_bytes", "direction" => "global")
        .set(shared.conns.budget.held() as f64);
    let w = channels.store.writer_stats();
    metrics::gauge!("keel_store_batches").set(w.batches as f64);
    metrics::gauge!("keel_store_writes").set(w.writes as f64);
    metrics::gauge!("keel_store_failed_batches").set(w.failed_batches as f64);
    metrics::gauge!("keel_store_checkpoints", "kind" => "passive")
        .set(w.passive_checkpoints as f64);
    metrics::gauge!("keel_store_checkpoints", "kind" => "restart").set(w.checkpoints as f64);
    metrics::gauge!("keel_store_admission_waits").set(w.admission_waits as f64);
    metrics::gauge!("keel_store_wal_behind_bytes").set(w.wal_behind_bytes as f64);
    metrics::gauge!("keel_store_wal_bytes").set(w.wal_bytes as f64);
    if let Ok(counts) = channels.store.outbox_counts().await {
        for (state, n) in [
            ("pending", counts.pending),
            ("claimed", counts.claimed),
            ("sent", counts.sent),
            ("dead", counts.dead),
        ] {
            metrics::gauge!("keel_outbox", "state" => state).set(n as f64);
        }
    }
    let mut text = shared.metrics.render();
    text.push_str(&crate::procmetrics::render());
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorder comes with its upkeep: a thread that drains histogram
    /// samples whether or not anyone scrapes `/metrics` (the soak's
    /// growth when it did not exist).
    #[test]
    fn metrics_come_with_their_upkeep() {
        let _ = prometheus();
        let threads = || -> Vec<String> {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|c| c.trim().to_owned())
                .collect()
        };
        // A new thread names itself once it runs: wait for it (bounded).
        for _ in 0..200 {
            if threads().iter().any(|t| t == METRICS_UPKEEP_THREAD) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("no {METRICS_UPKEEP_THREAD} thread: {:?}", threads());
    }
}
