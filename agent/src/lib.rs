//! endpoint-agent: runs tasks delivered over RabbitMQ without ever losing one.
//!
//! Data flows one way: broker -> `session` (subscriber) -> `store` -> `executor` -> `store` -> `session`
//! (publisher) -> broker; a first delivery of an instant function is run on arrival and stored with its result
//! in one step. [`run`] wires the parts together and owns the shutdown order: stop consuming, let running tasks
//! finish within the grace period (then kill and requeue them), publish what is pending, close the broker
//! connections, close the database. See docs/ARCHITECTURE.md.
//!
//! Imports run one way, top to bottom (checked by the `tidy` test): this file -> `session` -> `intake`,
//! `executor`, `raw`, `store`, `data_dir` -> `task`, `claim`, `config`, `limits`, `meta`, `retry`, `sys` -> the
//! contract crate (`endpoint_wire`). `status` reads what an agent leaves behind, for `endpoint-agent status`.
//!
//! The API (what the binary, the scenario tests and the bench use): [`run`], [`AgentError`], `config`,
//! `status`, `data_dir`, `store` (its file name, status reads and the handle the bench preloads backlogs with),
//! `task`, `raw` (tests publish malformed messages with it) and [`result_properties`]. Everything else is
//! private to the crate.

mod claim;
pub mod config;
pub mod data_dir;
mod executor;
mod http;
mod intake;
mod limits;
mod meta;
pub mod raw;
mod retry;
mod session;
mod stages;
pub mod status;
pub mod store;
mod sys;
pub mod task;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tidy;

pub use session::{Handback, HandbackError, result_properties};

use config::Config;
use data_dir::{LockError, lock_data_dir};
use endpoint_wire::AgentState;
use endpoint_wire::registration::RegistrationError;
use limits::{MIN_DRAIN, PRUNE_EVERY};
use meta::MetaKey;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use store::{Store, StoreError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why the agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    #[error("cannot prepare the tasks' working directories in {0}: {1}")]
    WorkDir(std::path::PathBuf, std::io::Error),
    /// A hand-back stopped part way.
    #[error(
        "hand-back stopped (what was handed back is marked; the rest stays queued on disk; run it again): {0}"
    )]
    Handback(#[from] HandbackError),
    /// The `--http` address cannot be bound.
    #[error(transparent)]
    Http(#[from] http::BindError),
}

impl AgentError {
    /// The endpoint is not provisioned (or was deprovisioned): the operator must run `service-setup provision`.
    pub fn is_not_provisioned(&self) -> bool {
        matches!(
            self,
            AgentError::Registration(
                RegistrationError::NotProvisioned(..) | RegistrationError::Missing(..)
            ) | AgentError::Handback(HandbackError::Registration(
                RegistrationError::NotProvisioned(..) | RegistrationError::Missing(..)
            ))
        )
    }

    /// Another agent holds the data directory.
    pub fn is_data_dir_locked(&self) -> bool {
        matches!(self, AgentError::Lock(LockError::Held { .. }))
    }
}

/// Runs the agent until `shutdown` resolves, then stops in order (see the module doc). Returns an error only
/// when it cannot start: the data directory is taken or damaged, or the endpoint is not provisioned.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let _lock = lock_data_dir(&config.data_dir)?;
    let (store, recovery) = Store::open(&config.data_dir, config.max_attempts)?;
    let http_listener = http::bind(config.http_addr).await?;
    if recovery.requeued > 0 || recovery.given_up > 0 {
        tracing::warn!(
            requeued = recovery.requeued,
            given_up = recovery.given_up,
            "found tasks that were running when the agent last stopped: rerunning them (failing those that reached max_attempts)"
        );
    }
    let counts = *store.counts().borrow();
    tracing::info!(
        endpoint = %config.endpoint_id,
        data_dir = %config.data_dir.display(),
        workers = config.workers,
        queued = counts.queued,
        results_pending = counts.results_pending,
        "starting"
    );
    let config = Arc::new(config);
    let run_times = Arc::new(claim::RunTimes::default());
    let (state, _) = tokio::sync::watch::channel(AgentState::Running);
    let stop_intake = CancellationToken::new();
    // Stops the subscriber only: cancelled by quiet (the slots and the publisher go on) or with `stop_intake`.
    let stop_consuming = stop_intake.child_token();
    let consuming = Arc::new(AtomicBool::new(false));
    store.record(MetaKey::Quiet, String::new()).await;
    let kill = CancellationToken::new();
    let drain = CancellationToken::new();

    let sandbox = match executor::Sandbox::prepare(&config.data_dir) {
        Ok(s) => Arc::new(s),
        Err(e) => return Err(AgentError::WorkDir(config.data_dir.join("work"), e)),
    };
    let pools = executor::Pools::start(&config, &sandbox)
        .map_err(|e| AgentError::WorkDir(config.data_dir.join(executor::pool::SOCKET), e))?;
    let workers = match &pools {
        Some(p) => p.counts(),
        None => tokio::sync::watch::channel(Default::default()).1,
    };
    let record_workers = tokio::spawn(record_workers(store.clone(), workers.clone()));
    let _http =
        http_listener.map(|l| http::serve(l, &config, &store, &state, &workers, &consuming));
    let places = Arc::new(executor::Places {
        sandbox,
        pools: pools.clone(),
    });
    let executors = TaskTracker::new();
    for _ in 0..config.workers {
        executors.spawn(executor::worker(
            config.clone(),
            store.clone(),
            run_times.clone(),
            places.clone(),
            stop_intake.clone(),
            kill.clone(),
        ));
    }
    executors.close();
    let maintenance = tokio::spawn(prune_forever(store.clone(), config.result_retention));
    let disk_watch = tokio::spawn(record_disk_full(store.clone()));
    let link = session::Link::new(
        config.clone(),
        store.clone(),
        state.clone(),
        workers,
        consuming.clone(),
    );
    let mut link = tokio::spawn(link.run(stop_consuming.clone(), drain.clone()));
    let quiet = tokio::spawn(quiet_on_signal(
        store.clone(),
        state.clone(),
        stop_consuming,
        consuming,
    ));
    let reload = tokio::spawn(reload_on_signal(config.clone()));
    let watchdog = tokio::spawn(notify_watchdog());
    sys::sd_notify(&format!(
        "READY=1\nSTATUS=serving {} ({} slots)",
        config.endpoint_id, config.workers
    ));

    tokio::pin!(shutdown);
    let early = tokio::select! {
        _ = &mut shutdown => None,
        r = &mut link => Some(r),
    };
    if let Some(r) = early {
        // The link only ends early on a registration error no retry can fix.
        stop_intake.cancel();
        kill.cancel();
        executors.wait().await;
        if let Some(pools) = &pools {
            pools.shutdown().await;
        }
        maintenance.abort();
        disk_watch.abort();
        record_workers.abort();
        quiet.abort();
        reload.abort();
        watchdog.abort();
        return match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(join) => panic!("link supervisor panicked: {join}"),
        };
    }

    let running = store.counts().borrow().running;
    tracing::info!(running, grace = ?config.grace_period, "shutting down: taking no new tasks, letting running ones finish");
    state.send_replace(AgentState::Draining);
    sys::sd_notify("STOPPING=1\nSTATUS=stopping: letting running tasks finish, publishing results");
    stop_intake.cancel();
    if tokio::time::timeout(config.grace_period, executors.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "grace period over: killing running tasks; they run again at the next start"
        );
        kill.cancel();
        executors.wait().await;
    }
    // The slots are done: pool workers finished their tasks (or were killed with them); now they stop.
    if let Some(pools) = &pools {
        pools.shutdown().await;
    }
    drain.cancel();
    let drain_limit = config.grace_period.max(MIN_DRAIN);
    if tokio::time::timeout(drain_limit, &mut link).await.is_err() {
        let pending = store.counts().borrow().results_pending;
        tracing::warn!(
            pending,
            "could not publish every result before stopping; they are published at the next start"
        );
        link.abort();
    }
    maintenance.abort();
    disk_watch.abort();
    record_workers.abort();
    quiet.abort();
    reload.abort();
    if config.handback_on_stop {
        // For a host that will not return: what it holds without a result goes back to the broker.
        match session::hand_back(&config, &store).await {
            Ok(h) => tracing::info!(
                tasks_handed_back = h.tasks_handed_back,
                results_published = h.results_published,
                "handback_on_stop: tasks on disk are back in the broker"
            ),
            Err(e) => tracing::error!(
                error = %e,
                "handback_on_stop: hand-back stopped part way; the rest stays queued on disk: run `endpoint-agent handback` on this data directory"
            ),
        }
    }
    watchdog.abort();
    // The process may exit before the writer thread has closed its connection (which would checkpoint): fold
    // the WAL into the database now, so a clean stop leaves `agent.db` complete on its own.
    if let Err(e) = store.checkpoint().await {
        tracing::warn!(error = %e, "cannot checkpoint the database; its WAL file holds the latest commits");
    }
    crate::stages::report();
    tracing::info!("stopped");
    Ok(())
}

/// Quiet, on SIGTSTP (as Sidekiq operators know it; `endpoint-agent quiet` sends it): the subscriber cancels its
/// consumer and closes its connection, so a standby takes the queue at once and what this agent held unacked
/// goes back to the broker; the slots run what is on disk and the publisher sends the results; the process
/// stays up until SIGTERM. Heartbeats say `quiet` (with role standby) and `endpoint-agent status` says since
/// when. A second SIGTSTP changes nothing.
async fn quiet_on_signal(
    store: Store,
    state: tokio::sync::watch::Sender<AgentState>,
    stop_consuming: CancellationToken,
    consuming: Arc<AtomicBool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut tstp = match signal(SignalKind::from_raw(sys::SIGTSTP)) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTSTP: quiet is not available");
            return;
        }
    };
    loop {
        if tstp.recv().await.is_none() {
            return;
        }
        if stop_consuming.is_cancelled() {
            tracing::info!("SIGTSTP received: already quiet");
            continue;
        }
        let queued = store.counts().borrow().queued;
        tracing::info!(
            queued,
            "SIGTSTP received: quiet: consuming nothing new (a standby takes the queue), finishing what is on disk; stop with SIGTERM"
        );
        consuming.store(false, Ordering::Relaxed);
        stop_consuming.cancel();
        state.send_replace(AgentState::Quiet);
        store
            .record(
                MetaKey::Quiet,
                format!("since {}", endpoint_wire::now_rfc3339()),
            )
            .await;
    }
}

/// On SIGHUP, reads the config file again (see [`Config::reload`]): function changes apply to tasks not yet
/// started; an invalid file is logged and the running config kept; settings that need a restart say so.
async fn reload_on_signal(config: Arc<Config>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: the config cannot be reloaded");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let file = config.origin.as_ref().map(|o| o.file.display().to_string());
        match config.reload() {
            Ok(r) => {
                for line in &r.need_restart {
                    tracing::warn!(file, "SIGHUP: {line}");
                }
                tracing::info!(
                    file,
                    applied = ?r.applied,
                    "SIGHUP: config reloaded; function changes apply to tasks not yet started"
                );
            }
            Err(e) => tracing::error!(
                file,
                error = %e,
                "SIGHUP: the config file is not valid: kept the running config; fix the file and send SIGHUP again"
            ),
        }
    }
}

/// Sends systemd's watchdog a `WATCHDOG=1` at half its interval, while the runtime runs (if the unit asks).
async fn notify_watchdog() {
    let Some(every) = sys::watchdog_every() else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        sys::sd_notify("WATCHDOG=1");
    }
}

/// Asks the agent holding `data_dir` to quiet (SIGTSTP). Returns its pid; an error says why not (no agent
/// holds the directory, or the signal could not be sent).
pub fn quiet(data_dir: &std::path::Path) -> Result<u32, String> {
    let pid = data_dir::lock_holder(data_dir).ok_or_else(|| {
        format!(
            "no agent is running on {}: nothing to quiet",
            data_dir.display()
        )
    })?;
    let pid: u32 = pid.parse().map_err(|_| {
        format!(
            "the lock file in {} names no pid ({pid:?})",
            data_dir.display()
        )
    })?;
    sys::send_quiet(pid).map_err(|e| format!("cannot signal the agent (pid {pid}): {e}"))?;
    Ok(pid)
}

/// `endpoint-agent handback`: publishes the results pending in `config`'s data directory, then republishes every
/// task it holds without a result (queued, or running when an agent crashed) to the endpoint's tasks queue and
/// marks it handed back. Refuses while an agent holds the directory.
pub async fn handback(config: Config) -> Result<Handback, AgentError> {
    let _lock = lock_data_dir(&config.data_dir)?;
    let (store, recovery) = Store::open(&config.data_dir, config.max_attempts)?;
    if recovery.requeued > 0 {
        tracing::info!(
            requeued = recovery.requeued,
            "tasks that were running when the agent died are queued again: they are handed back too"
        );
    }
    let counts = *store.counts().borrow();
    tracing::info!(
        queued = counts.queued,
        results_pending = counts.results_pending,
        "handing back: publishing pending results, then republishing queued tasks"
    );
    let config = Arc::new(config);
    let done = session::hand_back(&config, &store).await;
    if let Err(e) = store.checkpoint().await {
        tracing::warn!(error = %e, "cannot checkpoint the database; its WAL file holds the latest commits");
    }
    Ok(done?)
}

/// Records the disk-full condition for `endpoint-agent status` whenever it changes. Best effort: while the
/// disk is full the record itself may not fit (the heartbeat's `disk_full` state and the log still say so).
async fn record_disk_full(store: Store) {
    let mut full = store.disk_full();
    loop {
        let value = full.borrow_and_update().clone().unwrap_or_default();
        store.record(MetaKey::DiskFull, value).await;
        if full.changed().await.is_err() {
            return;
        }
    }
}

/// Records the pool workers per function for `endpoint-agent status` whenever they change (best effort).
async fn record_workers(
    store: Store,
    mut workers: tokio::sync::watch::Receiver<
        std::collections::BTreeMap<String, endpoint_wire::WorkerCounts>,
    >,
) {
    loop {
        let value = serde_json::to_string(&*workers.borrow_and_update()).unwrap_or_default();
        store.record(MetaKey::Workers, value).await;
        if workers.changed().await.is_err() {
            return;
        }
    }
}

/// Deletes published results (and their tasks) older than the retention, at every [`PRUNE_EVERY`].
async fn prune_forever(store: Store, retention: Duration) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tick.tick().await;
        let before = endpoint_wire::now_ms().saturating_sub(retention.as_millis() as u64);
        match store.prune(before).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pruned = n, "pruned published results past retention"),
            Err(e) => tracing::warn!(error = %e, "cannot prune published results"),
        }
    }
}
