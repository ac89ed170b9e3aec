//! `pyroshell`: the HTTP API gateway of TVM (`tvm serve`).
//!
//! It owns the HTTP surface of API v1 ([`api`] types, `routes` handlers, an
//! OpenAPI document), API keys, admission control ([`admission`]: a bounded
//! number of VMs within a guest-RAM budget, a bounded queue with a deadline),
//! the warm pool ([`pool`]), image readiness ([`images`]), metrics and the
//! drain on SIGTERM. VMs themselves are `pyrovm`'s: one fresh VM per
//! execution, destroyed afterwards. The server keeps no state; a restart
//! loses only in-flight work, and `Pyrovm::prepare` reaps what a crashed
//! predecessor left. [`client`] is the matching client (`tvm run --server`).
//!
//! The server is Linux-only (its VMs are); [`api`], [`error`], [`sse`],
//! [`wire`], [`admission`] and [`client`] build on every OS for the client
//! side of `tvm` on macOS and Windows.

pub mod admission;
pub mod api;
pub mod client;
#[cfg(target_os = "linux")]
mod compat;
#[cfg(target_os = "linux")]
pub mod config;
#[cfg(target_os = "linux")]
mod conn;
pub mod error;
#[cfg(target_os = "linux")]
mod exec;
#[cfg(target_os = "linux")]
pub mod images;
#[cfg(target_os = "linux")]
pub mod judge0;
#[cfg(target_os = "linux")]
pub mod metrics;
#[cfg(target_os = "linux")]
mod openapi;
#[cfg(target_os = "linux")]
mod piston;
#[cfg(target_os = "linux")]
pub mod pool;
#[cfg(target_os = "linux")]
mod routes;
#[cfg(target_os = "linux")]
mod session;
pub mod sse;
#[cfg(target_os = "linux")]
mod state;
pub mod wire;

#[cfg(target_os = "linux")]
use std::future::Future;
#[cfg(target_os = "linux")]
use std::net::SocketAddr;
#[cfg(target_os = "linux")]
use std::sync::Arc;
#[cfg(target_os = "linux")]
use std::time::Duration;

#[cfg(target_os = "linux")]
use pyrovm::Pyrovm;
#[cfg(target_os = "linux")]
use tokio::sync::watch;
#[cfg(target_os = "linux")]
use tracing::{info, warn};

pub use api::{ExecutionBody, ExecutionResult};
pub use client::ClientError;
#[cfg(target_os = "linux")]
pub use config::{PoolArg, ServeArgs, ServeConfig};
pub use error::ApiError;

#[cfg(target_os = "linux")]
use crate::admission::Admission;
#[cfg(target_os = "linux")]
use crate::config::{Capacity, Host};
#[cfg(target_os = "linux")]
use crate::images::Images;
#[cfg(target_os = "linux")]
use crate::metrics::Metrics;
#[cfg(target_os = "linux")]
use crate::pool::{Pool, RefillCtx};
#[cfg(target_os = "linux")]
use crate::state::{AppState, Lifecycle};

#[cfg(target_os = "linux")]
/// How long connections may linger after the drain before the server returns anyway.
const CONNECTION_LINGER: Duration = Duration::from_secs(5);

#[cfg(target_os = "linux")]
/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is inconsistent with the catalog or unsupported.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Accepting connections failed.
    #[error("server failed")]
    Serve(#[source] std::io::Error),
}

#[cfg(target_os = "linux")]
/// The OpenAPI document of API v1 for a server whose operator maximum
/// limits are `maximum` (what `GET /v1/openapi.json` serves).
pub fn openapi_document(maximum: &tvm_protocol::Limits) -> serde_json::Value {
    openapi::document(maximum)
}

/// Installs a tracing subscriber writing to stderr: human-readable, or JSON
/// lines when `json` (for log shippers). Request ids appear as span fields.
pub fn init_tracing(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "warn".into());
    // Colour codes only for a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

#[cfg(target_os = "linux")]
/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = int.recv() => info!("SIGINT received"),
            }
        }
        _ => {
            warn!("cannot install signal handlers; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(target_os = "linux")]
/// Serves API v1 until SIGTERM or SIGINT, then drains: new executions get
/// 503, in-flight ones get `drain_grace_ms` to finish, pool VMs are destroyed.
/// Prints `tvm serve: listening on http://ADDR` to stderr once bound.
pub async fn serve(config: ServeConfig, vmm: Arc<Pyrovm>) -> Result<(), ServeError> {
    serve_until(config, vmm, shutdown_signal()).await
}

#[cfg(target_os = "linux")]
/// [`serve`], draining when `shutdown` resolves instead of on signals.
pub async fn serve_until(
    config: ServeConfig,
    vmm: Arc<Pyrovm>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate(vmm.catalog()).map_err(ServeError::Config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(ServeError::Serve)?;

    // Capacity is sized for the largest default-limits VM, so the derived VM count holds for every runtime.
    let typical_mib = vmm
        .catalog()
        .runtimes()
        .iter()
        .filter(|r| r.unavailable.is_none())
        .filter_map(|r| pool::default_memory_mib(&vmm, r))
        .max()
        .unwrap_or(512);
    let cap = Capacity::derive(&config, Host::detect(), typical_mib);
    let admission = Arc::new(Admission::new(
        cap.max_vms,
        cap.memory_budget_mib,
        config.queue_capacity,
        Duration::from_millis(config.queue_timeout_ms),
    ));
    let wanted = config.pool_targets(vmm.catalog());
    // Keep one VM of room for pool misses, unless the operator allowed only one VM.
    let targets = pool::fit_targets(&wanted, cap.max_vms, usize::from(cap.max_vms > 1));
    if targets != wanted {
        warn!(?wanted, fitted = ?targets, max_vms = cap.max_vms, "pool sizes reduced to fit capacity");
    }
    let metrics = Arc::new(Metrics::default());
    // Connections may use the descriptors left after the server's own and the VMs'.
    let fd_limit = conn::raise_fd_limit();
    let fd_room = fd_limit.saturating_sub(conn::reserved_fds(cap.max_vms)).max(16) as usize;
    if fd_room < config.max_connections {
        warn!(fd_limit, max_connections = fd_room, "connection cap lowered to fit the descriptor limit");
    }
    let conns = Arc::new(conn::ConnLimits::new(
        config.max_connections.min(fd_room),
        config.max_connections_per_ip.min(config.max_connections),
    ));
    if !config.listen.ip().is_loopback() && config.allowed_hosts.is_empty() {
        warn!(listen = %config.listen, "not on loopback and no allowed hosts: any Host header is accepted");
    }
    let images = Arc::new(Images::scan(vmm.clone()));
    let pool = Arc::new(
        Pool::new(&vmm, &targets, Duration::from_millis(config.pool_max_idle_ms)).warm_up_vms(config.pool_warm_up),
    );
    let life = Arc::new(Lifecycle::new());
    let st = Arc::new(AppState {
        vmm: vmm.clone(),
        config: config.clone(),
        admission: admission.clone(),
        pool: pool.clone(),
        images: images.clone(),
        metrics: metrics.clone(),
        life: life.clone(),
        conns: conns.clone(),
        parses: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_parses)),
        openapi: openapi::document(vmm.catalog().maximum()),
    });

    // Background work stops when the drain starts.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let mut background = Vec::new();
    if config.build_images {
        background.push(tokio::spawn(images.clone().build_missing(stop_rx.clone())));
    }
    let ctx = RefillCtx { vmm: vmm.clone(), admission, images, metrics: metrics.clone(), pool: pool.clone() };
    for rp in pool.pools().iter().filter(|p| p.target() > 0) {
        background.push(tokio::spawn(pool::refill_loop(ctx.clone(), rp.clone(), stop_rx.clone())));
    }

    eprintln!(
        "tvm serve: listening on http://{addr} (max {} VMs, {} MiB guest RAM, accel {})",
        cap.max_vms,
        cap.memory_budget_mib,
        vmm.accel().kind().as_str()
    );
    info!(%addr, max_vms = cap.max_vms, budget_mib = cap.memory_budget_mib, ?targets, "serving");

    let grace = Duration::from_millis(config.drain_grace_ms);
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let drain = {
        let life = life.clone();
        let pool = pool.clone();
        let stop_tx = stop_tx.clone();
        async move {
            shutdown.await;
            info!(in_flight = life.in_flight(), grace_ms = grace.as_millis() as u64, "draining");
            life.start_drain();
            stop_tx.send_replace(true);
            // Idle pool VMs are of no further use; their capacity goes to queued requests.
            pool.clear();
            if tokio::time::timeout(grace, life.wait_idle()).await.is_err() {
                warn!(in_flight = life.in_flight(), "grace period over; aborting executions still running");
                life.hard_stop();
            }
            let _ = drained_tx.send(());
        }
    };
    let app = routes::router(st);
    let hygiene = Hygiene {
        header_timeout: Duration::from_millis(config.header_timeout_ms),
        idle_timeout: Duration::from_millis(config.idle_timeout_ms),
        conns,
        metrics: metrics.clone(),
    };
    let outcome = serve_connections(listener, app, hygiene, drain, drained_rx).await;
    life.hard_stop();
    stop_tx.send_replace(true);
    for task in background {
        // Refill loops destroy their VMs on the way out; image builds give up.
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    pool.clear();
    info!("server stopped");
    outcome
}

#[cfg(target_os = "linux")]
/// Connection limits and timeouts (see [`conn`]).
struct Hygiene {
    header_timeout: Duration,
    idle_timeout: Duration,
    conns: Arc<conn::ConnLimits>,
    metrics: Arc<Metrics>,
}

#[cfg(target_os = "linux")]
/// How long HTTP/2 waits for a keep-alive ping's answer before closing.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

#[cfg(target_os = "linux")]
/// Accepts connections until `drain` resolves, then waits for open ones
/// (for [`CONNECTION_LINGER`] after `drained`). hyper's own connection
/// loop rather than `axum::serve`: only it can time out a client that
/// never finishes its request headers (slowloris), and only here can each
/// connection get a watchdog ([`conn::watchdog`]) and a place under the
/// connection caps.
/// Answers a connection over the caps with a 503 in the error shape (best
/// effort, without waiting: the socket buffer takes it or it is lost) and
/// closes it.
fn refuse_connection(stream: &tokio::net::TcpStream, why: conn::Refusal, metrics: &Metrics, max: usize) {
    let (reason, message) = match why {
        conn::Refusal::Total => ("over_limit", format!("the server has its maximum of {max} connections open")),
        conn::Refusal::PerIp => ("over_ip_limit", "this client address has its maximum of connections open".into()),
    };
    metrics.connection_closed(reason);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let _ = stream.try_write(&conn::error_response_bytes(503, "too_many_connections", &message, &id));
    tracing::debug!(request_id = %id, reason, "connection refused");
}

#[cfg(target_os = "linux")]
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    hygiene: Hygiene,
    drain: impl Future<Output = ()> + Send + 'static,
    drained: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), ServeError> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;

    let Hygiene { header_timeout, idle_timeout, conns, metrics } = hygiene;
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    // Pings find dead peers of long streams; the watchdog closes idle ones.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some((idle_timeout / 2).max(Duration::from_millis(50))))
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_concurrent_streams(64);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut drain = std::pin::pin!(drain);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of fds or a connection reset before accept: not fatal; back off briefly.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut drain => break,
        };
        let slot = match conns.try_open(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                refuse_connection(&stream, why, &metrics, conns.max());
                continue;
            }
        };
        let act = conn::Activity::new();
        let io = conn::TrackedIo::new(stream, act.clone(), metrics.clone(), peer);
        let service = conn::Tracked::new(app.clone(), act.clone());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service).into_owned();
        let conn = graceful.watch(conn);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                },
                why = conn::watchdog(act, idle_timeout) => {
                    tracing::debug!(%peer, why, "connection closed by the server");
                    metrics.connection_closed(why);
                }
            }
        });
    }
    drop(listener);
    let lingering = async {
        let _ = drained.await;
        tokio::time::sleep(CONNECTION_LINGER).await;
    };
    tokio::select! {
        _ = graceful.shutdown() => {}
        // A client that keeps a connection open (slow body, idle stream) must not hold the exit hostage.
        _ = lingering => warn!("connections still open after the drain; closing them"),
    }
    Ok(())
}
