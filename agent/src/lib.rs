//! endpoint-agent: runs tasks delivered over RabbitMQ without ever losing one.
//!
//! Data flows one way: broker -> `subscriber` -> `store` -> `executor` -> `store` -> `publisher` -> broker
//! (a first delivery of an instant function is run on arrival and stored with its result in one step).
//! [`run`] wires them together and owns the shutdown order: stop consuming, let running tasks finish within
//! the grace period (then kill and requeue them), publish what is pending, close the broker connections,
//! close the database. See docs/ARCHITECTURE.md.

pub mod config;
pub mod connection;
pub mod executor;
mod publisher;
pub mod raw;
pub mod status;
pub mod store;
mod subscriber;
pub mod wire;

pub use publisher::result_properties;

/// Unit tests' scratch directories, removed when dropped.
#[cfg(test)]
pub(crate) struct TestDir(PathBuf);

#[cfg(test)]
impl TestDir {
    /// A directory path (not created) under the system temp dir, unique by the process id and a counter.
    pub(crate) fn new(name: &str) -> TestDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ea-unit-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TestDir(dir)
    }
}

#[cfg(test)]
impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

use config::Config;
use connection::{Link, RegistrationError};
use executor::Signals;
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use store::{Store, StoreError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wire::AgentState;

/// File in the data directory that one running agent holds locked.
pub const LOCK_FILE: &str = "agent.lock";

/// Why the agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "another endpoint-agent (pid {pid}) is using data directory {dir}: stop it, or give this one its own --data-dir"
    )]
    DataDirLocked { dir: PathBuf, pid: String },
    #[error("cannot lock data directory {0}: {1}")]
    Lock(PathBuf, std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registration(#[from] RegistrationError),
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
}

/// Holds the data directory for this process; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] File);

/// Takes the data directory's lock, or says which process holds it.
pub fn lock_data_dir(dir: &Path) -> Result<DirLock, AgentError> {
    std::fs::create_dir_all(dir).map_err(|e| AgentError::Lock(dir.to_owned(), e))?;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| AgentError::Lock(dir.to_owned(), e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .trim()
                .to_owned();
            return Err(AgentError::DataDirLocked {
                dir: dir.to_owned(),
                pid,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(AgentError::Lock(dir.to_owned(), e)),
    }
    use std::io::Write;
    let _ = file.set_len(0);
    let _ = (&file).write_all(std::process::id().to_string().as_bytes());
    Ok(DirLock(file))
}

/// The pid recorded by the agent holding `dir`'s lock, or `None` if no agent holds it. Writes nothing.
pub fn lock_holder(dir: &Path) -> Option<String> {
    let path = dir.join(LOCK_FILE);
    let file = File::open(&path).ok()?;
    match file.try_lock_shared() {
        Ok(()) => None,
        Err(_) => Some(
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .trim()
                .to_owned(),
        ),
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
    let signals = Arc::new(Signals::default());
    let (state, _) = tokio::sync::watch::channel(AgentState::Running);
    let stop_intake = CancellationToken::new();
    let kill = CancellationToken::new();
    let drain = CancellationToken::new();

    let executors = TaskTracker::new();
    for _ in 0..config.workers {
        executors.spawn(executor::worker(
            config.clone(),
            store.clone(),
            signals.clone(),
            stop_intake.clone(),
            kill.clone(),
        ));
    }
    executors.close();
    let maintenance = tokio::spawn(prune_forever(store.clone(), config.result_retention));
    let disk_watch = tokio::spawn(record_disk_full(store.clone()));
    let link = Link {
        config: config.clone(),
        store: store.clone(),
        signals: signals.clone(),
        state: state.clone(),
        sessions: std::sync::atomic::AtomicU64::new(0),
    };
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
        maintenance.abort();
        disk_watch.abort();
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
    drain.cancel();
    let drain_limit = config.grace_period.max(Duration::from_secs(5));
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
        connection::record_link(&store, connection::DISK_FULL, value).await;
        if full.changed().await.is_err() {
            return;
        }
    }
}

/// Deletes published results (and their tasks) older than the retention, once a minute.
async fn prune_forever(store: Store, retention: Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let before = wire::now_ms().saturating_sub(retention.as_millis() as u64);
        match store.prune(before).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pruned = n, "pruned published results past retention"),
            Err(e) => tracing::warn!(error = %e, "cannot prune published results"),
        }
    }
}
