//! The durable state of an endpoint: tasks (queued, running, done) and results (pending, published) in one
//! SQLite database in WAL mode with `synchronous=FULL`. The only module that imports rusqlite.
//!
//! [`Store`] is the handle async code holds: every write is a command to the writer thread (`writer`), which
//! group-commits them and replies only after the commit, so "the store said yes" always means "it is on disk";
//! nothing here blocks a tokio worker. `sql` holds each command's statements (the claim policy they follow is
//! `crate::claim`), `checkpointer` the thread that folds the WAL into the database file beside the writer,
//! `schema` the file (pragmas, tables, integrity check, crash recovery), `reader` the
//! read-only connections (the publisher's reads, `endpoint-agent status`). The handle also keeps the counts,
//! notices a full disk, and announces committed results to the publisher.

mod checkpointer;
mod handoff;
mod reader;
mod schema;
mod sql;
mod writer;

#[cfg(test)]
mod tests;

pub use handoff::{Committed, Handoff};
pub use reader::{Reader, RecentFailure, read_status};
pub use schema::Recovery;
pub use sql::QueuedTask;

use crate::claim::Want;
use crate::meta::MetaKey;
use crate::retry::Retryable;
use crate::task::{ClaimedTask, Counts, IngestOutcome, Intake, TaskResult};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use tokio::sync::{oneshot, watch};
use writer::{Command, Op};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "agent.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {0}: {1}")]
    CreateDir(PathBuf, std::io::Error),
    #[error(
        "cannot open database {0}: {1} (if the file is damaged, move it aside; its tasks are not recoverable by the agent)"
    )]
    Open(PathBuf, rusqlite::Error),
    #[error(
        "no database at {0}: no agent has used this data directory (check --data-dir or --endpoint-id)"
    )]
    Missing(PathBuf),
    #[error(
        "database {0} is damaged ({1}): the agent will not start on it and has not changed it; tasks and results acked into it live only there, so keep it (`sqlite3 {0} .recover` may save them), move it aside and start again"
    )]
    Damaged(PathBuf, String),
    #[error("database commit failed: {0}")]
    Commit(String, bool),
    #[error("cannot start the store's writer thread: {0}")]
    Thread(std::io::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the store has shut down")]
    Closed,
}

impl StoreError {
    /// An error opening `path`: a damaged file is told apart from other failures (permissions, disk).
    fn opening(path: &Path, e: rusqlite::Error) -> StoreError {
        let damaged = matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        );
        if damaged {
            StoreError::Damaged(path.to_owned(), e.to_string())
        } else {
            StoreError::Open(path.to_owned(), e)
        }
    }

    /// The disk is full or the database cannot grow: retrying later may succeed.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Commit(_, disk_full) => *disk_full,
            _ => false,
        }
    }
}

impl Retryable for StoreError {
    /// A full disk is logged once, by the store handle, when it begins (and again when it ends).
    fn reported_where_it_arose(&self) -> bool {
        self.is_disk_full()
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A write the store did not commit, with what the caller gave it (`items`), so that trying again needs no copy.
/// `items` is `None` only if the store went away without answering (the writer thread is gone).
#[derive(Debug)]
pub struct NotStored<I> {
    pub error: StoreError,
    pub items: Option<I>,
}

impl<I> std::fmt::Display for NotStored<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl<I> Retryable for NotStored<I> {
    fn reported_where_it_arose(&self) -> bool {
        self.error.reported_where_it_arose()
    }
}

/// Where the writer answers a command that carries items: the value, or the items back with the error.
type GiveBack<T, I> = oneshot::Sender<Result<T, NotStored<I>>>;

/// Handle to the writer thread. Cheap to clone; the thread stops when the last handle is dropped.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Command>,
    counts: watch::Receiver<Counts>,
    /// `since <time>: <error>` while writes that need space fail (disk full), else `None`.
    disk_full: Arc<watch::Sender<Option<String>>>,
    /// Results committed, handed to the publisher with its wake-up.
    handoff: Arc<Handoff>,
    dir: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the database in `dir`, recovers tasks left running by a crash, and starts the
    /// writer thread.
    pub fn open(dir: &Path, max_attempts: u32) -> Result<(Store, Recovery), StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::CreateDir(dir.to_owned(), e))?;
        let path = dir.join(DB_FILE);
        schema::check_integrity(&path)?;
        schema::create_private(&path).map_err(|e| StoreError::CreateDir(dir.to_owned(), e))?;
        let mut conn = schema::open_db(&path).map_err(|e| StoreError::opening(&path, e))?;
        let recovery = schema::recover(&mut conn, max_attempts).map_err(|e| match e {
            StoreError::Sqlite(e) => StoreError::opening(&path, e),
            e => e,
        })?;
        let counts = schema::read_counts(&conn)?;
        let (counts_tx, counts_rx) = watch::channel(counts);
        let checkpoints = checkpointer::open(&path).map_err(|e| StoreError::opening(&path, e))?;
        let (commits_tx, commits_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpointer::run(checkpoints, commits_rx))
            .map_err(StoreError::Thread)?;
        let (tx, rx) = mpsc::channel();
        let handoff = Arc::new(Handoff::default());
        let writer_handoff = handoff.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer::run(conn, rx, counts_tx, &writer_handoff, commits_tx))
            .map_err(StoreError::Thread)?;
        Ok((
            Store {
                tx,
                counts: counts_rx,
                disk_full: Arc::new(watch::channel(None).0),
                handoff,
                dir: dir.to_owned(),
            },
            recovery,
        ))
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Run(make(reply)))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Commits what intake made of a batch of deliveries: new tasks queued, rejected and already-run tasks
    /// stored with their results (handed to the publisher). Ids already on disk are left alone.
    pub async fn ingest(&self, items: Vec<Intake>) -> Result<IngestOutcome, StoreError> {
        self.try_ingest(items).await.map_err(|n| n.error)
    }

    /// [`Store::ingest`], giving the items back if they were not committed (to try again without a copy).
    pub async fn try_ingest(
        &self,
        items: Vec<Intake>,
    ) -> Result<IngestOutcome, NotStored<Vec<Intake>>> {
        let grows = !items.is_empty();
        let r = self.give_back(items, Op::Ingest).await;
        self.note_space(r.as_ref().map_err(|n| &n.error), grows);
        r
    }

    /// Stores `finished` (each task marked done with its result, handed to the publisher) and claims up to
    /// `want` queued tasks (their attempts counted), all in one commit. Returns the claimed tasks, possibly none.
    pub async fn finish_and_claim(
        &self,
        finished: Vec<TaskResult>,
        want: impl Into<Want>,
    ) -> Result<Vec<ClaimedTask>, StoreError> {
        self.try_finish_and_claim(finished, want)
            .await
            .map_err(|n| n.error)
    }

    /// [`Store::finish_and_claim`], giving the results back if they were not committed.
    pub async fn try_finish_and_claim(
        &self,
        finished: Vec<TaskResult>,
        want: impl Into<Want>,
    ) -> Result<Vec<ClaimedTask>, NotStored<Vec<TaskResult>>> {
        let want = want.into();
        let grows = !finished.is_empty();
        let r = self
            .give_back(finished, |finished, reply| {
                Op::FinishAndClaim(finished, want, reply)
            })
            .await;
        self.note_space(r.as_ref().map_err(|n| &n.error), grows);
        r
    }

    /// Sends a command that carries `items` and waits for its answer; the items come back on every failure the
    /// writer answers (and when it cannot be reached at all).
    async fn give_back<T, I>(
        &self,
        items: I,
        make: impl FnOnce(I, GiveBack<T, I>) -> Op,
    ) -> Result<T, NotStored<I>> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Run(make(items, reply))).is_err() {
            // The writer is gone: nothing can be stored any more.
            return Err(NotStored {
                error: StoreError::Closed,
                items: None,
            });
        }
        rx.await.unwrap_or(Err(NotStored {
            error: StoreError::Closed,
            items: None,
        }))
    }

    /// Claims up to `want` tasks, waiting until at least one can be claimed; the claim is committed in the same
    /// transaction as whatever made it possible (typically the ingest of new tasks), so a new task costs no
    /// commit of its own before it runs. Cancel-safe: tasks claimed for a dropped call go back to the queue
    /// without counting an attempt.
    pub fn wait_and_claim(&self, want: impl Into<Want>) -> WaitingClaim {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Command::Park(want.into(), reply)).is_ok();
        WaitingClaim {
            rx,
            sent,
            tx: self.tx.clone(),
        }
    }

    /// Disk-full bookkeeping, fed by the writes that need space (new tasks, results): set and logged at the
    /// first failure for lack of space, cleared and logged by the next such write that commits.
    fn note_space<T>(&self, r: Result<T, &StoreError>, grows: bool) {
        match r {
            Err(e) if e.is_disk_full() => {
                self.disk_full.send_if_modified(|s| {
                    if s.is_some() {
                        return false;
                    }
                    tracing::error!(
                        error = %e,
                        data_dir = %self.dir.display(),
                        "disk full: the database cannot grow; new tasks stay in the broker (not acked), finished results wait in memory; free space in the data directory and the agent resumes by itself"
                    );
                    *s = Some(format!("since {}: {e}", endpoint_wire::now_rfc3339()));
                    true
                });
            }
            Ok(_) if grows => {
                self.disk_full.send_if_modified(|s| {
                    let was = s.take();
                    if let Some(was) = &was {
                        tracing::info!(was = %was, "the database takes writes again: resuming intake");
                    }
                    was.is_some()
                });
            }
            _ => {}
        }
    }

    /// `Some("since <time>: <error>")` while the database cannot grow; `changed()` wakes at every change.
    pub fn disk_full(&self) -> watch::Receiver<Option<String>> {
        self.disk_full.subscribe()
    }

    /// The results committed since the publisher last took them, and its wake-up (one permit per commit that
    /// stored results), so the publisher need neither poll nor read them back.
    pub fn handoff(&self) -> Arc<Handoff> {
        self.handoff.clone()
    }

    /// Puts running tasks back in the queue without counting their attempt (shutdown, or claimed and not run).
    pub async fn requeue(&self, task_ids: Vec<String>) -> Result<(), StoreError> {
        if task_ids.is_empty() {
            return Ok(());
        }
        self.call(|r| Op::Requeue(task_ids, r)).await
    }

    /// Puts running tasks back in the queue with their attempt counted: their run was lost (a pool worker died
    /// under them), so the next claim counts the next attempt.
    pub async fn retry(&self, task_ids: Vec<String>) -> Result<(), StoreError> {
        if task_ids.is_empty() {
            return Ok(());
        }
        self.call(|r| Op::Retry(task_ids, r)).await
    }

    pub async fn mark_published(&self, ids: Vec<i64>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.call(|r| Op::MarkPublished(ids, r)).await
    }

    /// Marks queued tasks handed back (republished to the broker and confirmed): never run here.
    pub async fn mark_handed_back(&self, task_ids: Vec<String>) -> Result<(), StoreError> {
        if task_ids.is_empty() {
            return Ok(());
        }
        self.call(|r| Op::MarkHandedBack(task_ids, r)).await
    }

    /// Deletes results published before `before_ms` and their tasks; returns how many.
    pub async fn prune(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.call(|r| Op::Prune(before_ms, r)).await
    }

    /// Records a fact for `endpoint-agent status` (such as the broker link's state).
    pub async fn set_meta(&self, key: MetaKey, value: String) -> Result<(), StoreError> {
        self.call(|r| Op::SetMeta(key, value, r)).await
    }

    /// [`Store::set_meta`], best effort: the facts are only for display, so a failure is logged at debug level.
    pub async fn record(&self, key: MetaKey, value: String) {
        if let Err(e) = self.set_meta(key, value).await {
            tracing::debug!(error = %e, key = key.as_str(), "cannot record a fact for status");
        }
    }

    /// Copies every committed page from the WAL into the database file and empties the WAL, on a connection of
    /// its own (a checkpoint cannot run inside the writer's transactions). For a clean stop, once nothing writes.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        let path = self.dir.join(DB_FILE);
        tokio::task::spawn_blocking(move || schema::checkpoint(&path))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Counts as of the last commit; `changed()` on the receiver wakes on every commit that moved them.
    pub fn counts(&self) -> watch::Receiver<Counts> {
        self.counts.clone()
    }
}

/// The future of [`Store::wait_and_claim`]. Dropping it before it is ready gives back whatever the writer
/// claimed for it in the meantime (requeued, attempt not counted): a claim is never lost with its caller.
pub struct WaitingClaim {
    rx: oneshot::Receiver<Result<Vec<ClaimedTask>, StoreError>>,
    sent: bool,
    tx: mpsc::Sender<Command>,
}

impl std::future::Future for WaitingClaim {
    type Output = Result<Vec<ClaimedTask>, StoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if !self.sent {
            return std::task::Poll::Ready(Err(StoreError::Closed));
        }
        std::pin::Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StoreError::Closed)))
    }
}

impl Drop for WaitingClaim {
    fn drop(&mut self) {
        // After `close` the writer cannot send any more (it requeues what it claimed itself); what it sent
        // before is still here to take back.
        self.rx.close();
        if let Ok(Ok(tasks)) = self.rx.try_recv()
            && !tasks.is_empty()
        {
            let (reply, _) = oneshot::channel();
            let ids = tasks.into_iter().map(|t| t.task_id).collect();
            let _ = self.tx.send(Command::Run(Op::Requeue(ids, reply)));
        }
    }
}
