//! The optional HTTP endpoint (`--http ADDR`, config `http_addr`; off by default): `/metrics` (Prometheus,
//! `metrics`), `/healthz` (the process and its store answer), `/readyz` (connected and consuming, or standing
//! by on purpose), `/` (the status page, `page`) and `/api/status` (the same data as JSON, `snapshot`).
//!
//! `run` binds it right after the store opens (a bind failure is a start error, before anything runs) and
//! serves it on the tokio runtime until `run` returns. It only reads: counts and conditions from the agent's
//! watches, the link flags from the metrics, and the database through a read-only connection of its own on a
//! blocking thread, so no request ever holds up intake, the slots or the publisher. `/healthz` alone asks the
//! store's writer something, a no-op, to prove it answers.

pub(crate) mod metrics;
mod page;
mod snapshot;

use crate::config::Config;
use crate::store::Store;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use endpoint_wire::{AgentState, WorkerCounts};
use snapshot::App;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

/// How long the store's writer may take to answer `/healthz`'s no-op before the agent counts as unhealthy: a
/// group commit takes milliseconds, a busy one tens.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// The HTTP address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve HTTP on {addr} (--http / http_addr): {source}; {hint}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
    hint: &'static str,
}

/// The bound listener, ready for [`serve`].
pub(crate) struct Listener(TcpListener);

/// Binds `addr` if it is set (and creates the metrics registry, so recording starts before any task comes).
pub(crate) async fn bind(addr: Option<SocketAddr>) -> Result<Option<Listener>, BindError> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = TcpListener::bind(addr).await.map_err(|source| {
        let hint = match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                "another process listens there (`ss -ltnp` shows which): choose another port or stop it"
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "this host has no such address: use one of its own, such as 127.0.0.1"
            }
            std::io::ErrorKind::PermissionDenied => {
                "ports below 1024 need privileges: use a port above 1024"
            }
            _ => "check the address, or leave --http out to run without HTTP",
        };
        BindError { addr, source, hint }
    })?;
    metrics::init();
    tracing::info!(addr = %addr, "serving HTTP: /metrics /healthz /readyz /api/status and the status page at /");
    Ok(Some(Listener(listener)))
}

/// Serves the endpoints on `listener` until the returned guard drops (when `run` returns).
pub(crate) fn serve(
    listener: Listener,
    config: &Arc<Config>,
    store: &Store,
    state: &watch::Sender<AgentState>,
    workers: &watch::Receiver<BTreeMap<String, WorkerCounts>>,
    consuming: &Arc<AtomicBool>,
) -> DropGuard {
    let stop = CancellationToken::new();
    let app = Arc::new(App {
        config: config.clone(),
        store: store.clone(),
        state: state.subscribe(),
        workers: workers.clone(),
        metrics: metrics::init(),
        consuming: consuming.clone(),
        reader: Arc::new(Mutex::new(None)),
        throughput: Mutex::default(),
    });
    let router = Router::new()
        .route("/", get(status_page))
        .route("/api/status", get(api_status))
        .route("/metrics", get(prometheus))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(app.clone());
    tokio::spawn(sample_throughput(app, stop.clone()));
    let shutdown = stop.clone().cancelled_owned();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener.0, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "the HTTP server stopped");
        }
    });
    stop.drop_guard()
}

/// Samples the counters into the throughput ring every [`snapshot::SAMPLE_EVERY`].
async fn sample_throughput(app: Arc<App>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(snapshot::SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        app.throughput
            .lock()
            .expect("never poisoned")
            .sample(app.metrics);
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

const TEXT: &str = "text/plain; charset=utf-8";

async fn prometheus(State(app): State<Arc<App>>) -> Response {
    let counts = *app.store.counts().borrow();
    let workers = app.workers.borrow().clone();
    let text = app.metrics.encode(&metrics::Gauges {
        slots: app.config.workers,
        counts,
        disk_full: app.store.disk_full().borrow().is_some(),
        consuming: app.consuming(),
        state: app.reported_state(),
        workers: &workers,
    });
    respond(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        text,
    )
}

/// 200 while the store's writer answers a no-op (it stores nothing and claims nothing) within
/// [`HEALTH_TIMEOUT`]; 503 otherwise.
async fn healthz(State(app): State<Arc<App>>) -> Response {
    match tokio::time::timeout(HEALTH_TIMEOUT, app.store.finish_and_claim(Vec::new(), 0)).await {
        Ok(Ok(_)) => respond(StatusCode::OK, TEXT, "ok\n".into()),
        Ok(Err(e)) => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            format!("the store fails: {e}\n"),
        ),
        Err(_) => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            format!("the store's writer did not answer within {HEALTH_TIMEOUT:?}\n"),
        ),
    }
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    match app.conditions(snapshot::readiness) {
        Ok(why) => respond(StatusCode::OK, TEXT, format!("ready: {why}\n")),
        Err(why) => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn api_status(State(app): State<Arc<App>>) -> Response {
    let snapshot = app.snapshot().await;
    let json = serde_json::to_string_pretty(&snapshot).expect("a snapshot always serializes");
    respond(StatusCode::OK, "application/json", json)
}

async fn status_page(State(app): State<Arc<App>>) -> Response {
    let snapshot = app.snapshot().await;
    respond(
        StatusCode::OK,
        "text/html; charset=utf-8",
        page::render(&snapshot),
    )
}
