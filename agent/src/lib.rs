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
mod intake;
mod limits;
mod meta;
pub mod raw;
mod retry;
mod session;
pub mod status;
pub mod store;
mod sys;
pub mod task;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tidy;

pub use session::result_properties;

use config::Config;
use data_dir::{LockError, lock_data_dir};
use endpoint_wire::AgentState;
use endpoint_wire::registration::RegistrationError;
use limits::{MIN_DRAIN, PRUNE_EVERY};
use meta::MetaKey;
use std::future::Future;
use std::sync::Arc;
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
}

impl AgentError {
    /// The endpoint is not provisioned (or was deprovisioned): the operator must run `service-setup provision`.
    pub fn is_not_provisioned(&self) -> bool {
        matches!(
            self,
            AgentError::Registration(
                RegistrationError::NotProvisioned(..) | RegistrationError::Missing(..)
            )
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
    let link = session::Link::new(config.clone(), store.clone(), state.clone(), workers);
    let mut link = tokio::spawn(link.run(stop_intake.clone(), drain.clone()));

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
        return match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(join) => panic!("link supervisor panicked: {join}"),
        };
    }

    let running = store.counts().borrow().running;
    tracing::info!(running, grace = ?config.grace_period, "shutting down: taking no new tasks, letting running ones finish");
    state.send_replace(AgentState::Draining);
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
    // The process may exit before the writer thread has closed its connection (which would checkpoint): fold
    // the WAL into the database now, so a clean stop leaves `agent.db` complete on its own.
    if let Err(e) = store.checkpoint().await {
        tracing::warn!(error = %e, "cannot checkpoint the database; its WAL file holds the latest commits");
    }
    tracing::info!("stopped");
    Ok(())
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
