//! The durable state of an endpoint: tasks (queued, running, done) and results (pending, published) in one
//! SQLite database in WAL mode with `synchronous=FULL`. The only module that imports rusqlite.
//!
//! One writer thread owns the connection. Callers send commands over a channel; the thread takes every
//! command waiting, runs them all in one transaction (each under its own savepoint, so one failure does not
//! undo the others) and commits once: group commit, so the cost of an fsync is shared by everything that
//! arrived while the previous one ran. A command's reply is sent only after its commit, so "the store said
//! yes" always means "it is on disk". Async callers await the reply; nothing here blocks a tokio worker.

use crate::wire::Status;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use tokio::sync::{oneshot, watch};

/// A task accepted from the broker, ready to be queued.
#[derive(Clone, Debug, PartialEq)]
pub struct NewTask {
    pub task_id: String,
    pub function: String,
    pub payload: Vec<u8>,
    pub timeout_ms: Option<u64>,
}

/// What the subscriber hands the store for one delivery.
#[derive(Clone, Debug, PartialEq)]
pub enum Intake {
    Task(NewTask),
    /// Bad input with a task id: recorded as done with a `rejected` result, never run.
    Rejected {
        task_id: String,
        function: String,
        reason: String,
    },
    /// A task already run on arrival (see `executor::run_on_arrival`): recorded as done with its result.
    Ran {
        function: String,
        result: TaskResult,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    pub queued: u64,
    pub rejected: u64,
    /// Tasks that came with their result ([`Intake::Ran`]).
    pub ran: u64,
    /// Task ids already on disk (a redelivery, or the same id submitted twice): not run again.
    pub duplicates: u64,
}

/// A task claimed for execution; `attempts` counts this run.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedTask {
    pub task_id: String,
    pub function: String,
    pub payload: Vec<u8>,
    pub timeout_ms: Option<u64>,
    pub attempts: u32,
}

/// A finished task's result, as stored and later published.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskResult {
    pub task_id: String,
    pub status: Status,
    pub exit_code: Option<i32>,
    pub attempts: u32,
    pub duration_ms: u64,
    pub body: Vec<u8>,
}

/// How many tasks and results are in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub queued: u64,
    pub running: u64,
    pub done: u64,
    pub results_pending: u64,
}

/// What opening the store found left over from the previous run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Tasks that were running when the agent died, queued again.
    pub requeued: u64,
    /// Tasks that were running when the agent died `max_attempts` times: failed, not run again.
    pub given_up: u64,
}

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

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Command {
    Ingest(Vec<Intake>, Reply<IngestOutcome>),
    /// Stores finished results and claims up to `want` queued tasks, in one transaction.
    FinishAndClaim(Vec<TaskResult>, Want, Reply<Vec<ClaimedTask>>),
    /// Claims up to `want` tasks as soon as one can be claimed: parked in the writer until a later batch
    /// (an ingest, a requeue, the end of a quarantine) makes one claimable, then claimed in that batch.
    WaitAndClaim(Want, Reply<Vec<ClaimedTask>>),
    /// Puts tasks interrupted by shutdown (or claimed but not started) back in the queue, not counting the run
    /// as an attempt.
    Requeue(Vec<String>, Reply<()>),
    MarkPublished(Vec<i64>, Reply<()>),
    Prune(u64, Reply<u64>),
    SetMeta(String, String, Reply<()>),
}

/// Handle to the writer thread. Cheap to clone; the thread stops when the last handle is dropped.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Command>,
    counts: watch::Receiver<Counts>,
    /// `since <time>: <error>` while writes that need space fail (disk full), else `None`.
    disk_full: std::sync::Arc<watch::Sender<Option<String>>>,
    dir: PathBuf,
}

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "agent.db";

impl Store {
    /// Opens (creating if needed) the database in `dir`, recovers tasks left running by a crash, and starts the
    /// writer thread.
    pub fn open(dir: &Path, max_attempts: u32) -> Result<(Store, Recovery), StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::CreateDir(dir.to_owned(), e))?;
        let path = dir.join(DB_FILE);
        check_integrity(&path)?;
        let mut conn = open_db(&path).map_err(|e| StoreError::opening(&path, e))?;
        let recovery = recover(&mut conn, max_attempts).map_err(|e| match e {
            StoreError::Sqlite(e) => StoreError::opening(&path, e),
            e => e,
        })?;
        let counts = read_counts(&conn)?;
        let (counts_tx, counts_rx) = watch::channel(counts);
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(conn, rx, counts_tx))
            .map_err(StoreError::Thread)?;
        Ok((
            Store {
                tx,
                counts: counts_rx,
                disk_full: std::sync::Arc::new(watch::channel(None).0),
                dir: dir.to_owned(),
            },
            recovery,
        ))
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub async fn ingest(&self, items: Vec<Intake>) -> Result<IngestOutcome, StoreError> {
        let grows = !items.is_empty();
        let r = self.call(|r| Command::Ingest(items, r)).await;
        self.note_space(&r, grows);
        r
    }

    /// Stores `finished` (each task marked done with its result) and claims up to `want` queued tasks (their
    /// attempts counted), all in one commit. Returns the claimed tasks, possibly none.
    pub async fn finish_and_claim(
        &self,
        finished: Vec<TaskResult>,
        want: impl Into<Want>,
    ) -> Result<Vec<ClaimedTask>, StoreError> {
        let want = want.into();
        let grows = !finished.is_empty();
        let r = self
            .call(|r| Command::FinishAndClaim(finished, want, r))
            .await;
        self.note_space(&r, grows);
        r
    }

    /// Claims up to `want` tasks, waiting until at least one can be claimed; the claim is committed in the same
    /// transaction as whatever made it possible (typically the ingest of new tasks), so a new task costs no
    /// commit of its own before it runs. Cancel-safe: tasks claimed for a dropped call go back to the queue
    /// without counting an attempt.
    pub fn wait_and_claim(&self, want: impl Into<Want>) -> WaitingClaim {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .send(Command::WaitAndClaim(want.into(), reply))
            .is_ok();
        WaitingClaim {
            rx,
            sent,
            tx: self.tx.clone(),
        }
    }

    /// Disk-full bookkeeping, fed by the writes that need space (new tasks, results): set and logged at the
    /// first failure for lack of space, cleared and logged by the next such write that commits.
    fn note_space<T>(&self, r: &Result<T, StoreError>, grows: bool) {
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
                    *s = Some(format!("since {}: {e}", crate::wire::rfc3339_utc(crate::wire::now_ms())));
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

    /// Puts running tasks back in the queue without counting their attempt (shutdown, or claimed and not run).
    pub async fn requeue(&self, task_ids: Vec<String>) -> Result<(), StoreError> {
        if task_ids.is_empty() {
            return Ok(());
        }
        self.call(|r| Command::Requeue(task_ids, r)).await
    }

    pub async fn mark_published(&self, ids: Vec<i64>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.call(|r| Command::MarkPublished(ids, r)).await
    }

    /// Deletes results published before `before_ms` and their tasks; returns how many.
    pub async fn prune(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.call(|r| Command::Prune(before_ms, r)).await
    }

    /// Records a fact for `endpoint-agent status` (such as the broker link's state).
    pub async fn set_meta(&self, key: &str, value: String) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.call(|r| Command::SetMeta(key, value, r)).await
    }

    /// Copies every committed page from the WAL into the database file and empties the WAL, on a connection of
    /// its own (a checkpoint cannot run inside the writer's transactions). For a clean stop, once nothing writes.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        let path = self.dir.join(DB_FILE);
        tokio::task::spawn_blocking(move || {
            let conn = Connection::open(&path)?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            Ok(())
        })
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
            let _ = self.tx.send(Command::Requeue(ids, reply));
        }
    }
}

const QUEUED: i64 = 0;
const RUNNING: i64 = 1;
const DONE: i64 = 2;

/// A damaged file (truncated, overwritten) must stop the start with its name, not fail later in the middle of
/// serving, and must not be changed. So the check runs on a read-only connection before any read-write one
/// exists: closing a read-write connection would checkpoint the WAL into the damaged file. Only damage is
/// reported here; any other trouble opening the file is left to the real open, which says what it is.
fn check_integrity(path: &Path) -> Result<(), StoreError> {
    if !path.exists() {
        return Ok(());
    }
    let checked = (|| {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.query_row("PRAGMA quick_check(1)", [], |r| r.get::<_, String>(0))
    })();
    match checked {
        Ok(check) if check == "ok" => Ok(()),
        Ok(check) => Err(StoreError::Damaged(
            path.to_owned(),
            format!("integrity check: {check}"),
        )),
        Err(e) => match StoreError::opening(path, e) {
            damaged @ StoreError::Damaged(..) => Err(damaged),
            _ => Ok(()),
        },
    }
}

fn open_db(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;

    // WAL lets `endpoint-agent status` read while the agent writes; FULL makes every commit durable
    // before it returns, which is what an ack to the broker promises.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS tasks (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            task_id TEXT NOT NULL UNIQUE,
            function TEXT NOT NULL,
            payload BLOB NOT NULL,
            timeout_ms INTEGER,
            state INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            received_at_ms INTEGER NOT NULL,
            done_at_ms INTEGER,
            suspect INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks(state, seq);
        CREATE INDEX IF NOT EXISTS tasks_suspect ON tasks(seq) WHERE suspect = 1;
        CREATE TABLE IF NOT EXISTS results (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            task_id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            exit_code INTEGER,
            attempts INTEGER NOT NULL,
            duration_ms INTEGER NOT NULL,
            body BLOB NOT NULL,
            finished_at_ms INTEGER NOT NULL,
            published_at_ms INTEGER
        );
        CREATE INDEX IF NOT EXISTS results_pending ON results(seq) WHERE published_at_ms IS NULL;
        CREATE INDEX IF NOT EXISTS results_published ON results(published_at_ms) WHERE published_at_ms IS NOT NULL;
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    )?;
    Ok(conn)
}

/// Tasks found `running` were interrupted by a crash or a kill: run them again, unless that already happened
/// `max_attempts` times, in which case they are poison and get a `failed` result.
fn recover(conn: &mut Connection, max_attempts: u32) -> Result<Recovery, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut recovery = Recovery::default();
    let stuck: Vec<(String, u32)> = {
        let mut stmt = tx.prepare("SELECT task_id, attempts FROM tasks WHERE state = ?1")?;
        stmt.query_map([RUNNING], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    for (task_id, attempts) in stuck {
        if attempts >= max_attempts {
            let body = format!(
                "task stopped the agent {attempts} times (crash or kill while running); not retried after max_attempts = {max_attempts}"
            );
            let result = TaskResult {
                task_id,
                status: Status::Failed,
                exit_code: None,
                attempts,
                duration_ms: 0,
                body: body.into_bytes(),
            };
            finish(&tx, &result)?;
            recovery.given_up += 1;
        } else {
            // Suspect: it may be what killed the agent, so it runs alone (see `claim`).
            tx.execute(
                "UPDATE tasks SET state = ?1, suspect = 1 WHERE task_id = ?2",
                params![QUEUED, task_id],
            )?;
            recovery.requeued += 1;
        }
    }
    tx.commit()?;
    Ok(recovery)
}

fn read_counts(conn: &Connection) -> rusqlite::Result<Counts> {
    let mut counts = Counts::default();
    let mut stmt = conn.prepare("SELECT state, COUNT(*) FROM tasks GROUP BY state")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
    })?;
    for row in rows {
        match row? {
            (QUEUED, n) => counts.queued = n,
            (RUNNING, n) => counts.running = n,
            (_, n) => counts.done += n,
        }
    }
    let pending: i64 = conn.query_row(
        "SELECT COUNT(*) FROM results WHERE published_at_ms IS NULL",
        [],
        |r| r.get(0),
    )?;
    counts.results_pending = pending.max(0) as u64;
    Ok(counts)
}

/// A read-only connection for the publisher's reads of pending results, so that they wait neither for the
/// writer thread nor for its commits. Sees only committed rows. Blocking: call it from a blocking thread.
pub struct Reader {
    conn: Connection,
}

impl Reader {
    /// Opens the database in `dir` read-only (it must exist: the store opened it first).
    pub fn open(dir: &Path) -> Result<Reader, StoreError> {
        let path = dir.join(DB_FILE);
        let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| StoreError::Open(path.clone(), e))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Reader { conn })
    }

    /// Up to `limit` unpublished results with a row id above `after`, oldest first, each with its row id for
    /// [`Store::mark_published`]. Row ids only grow, so a caller can page with the last id it saw. Sees only
    /// committed rows and waits for no commit.
    pub fn pending_results(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, TaskResult)>, StoreError> {
        pending(&self.conn, after, limit)
    }
}

/// Counts read by a separate, read-only connection (for `endpoint-agent status` while an agent may run).
pub fn read_status(dir: &Path) -> Result<(Counts, Vec<(String, String)>), StoreError> {
    let path = dir.join(DB_FILE);
    let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| StoreError::Open(path.clone(), e))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let has_schema: bool = conn
        .query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| StoreError::Open(path.clone(), e))?;
    if !has_schema {
        // An agent is creating the database right now.
        return Ok((Counts::default(), Vec::new()));
    }
    let counts = read_counts(&conn).map_err(|e| StoreError::Open(path.clone(), e))?;
    let mut stmt = conn.prepare("SELECT key, value FROM meta ORDER BY key")?;
    let meta = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok((counts, meta))
}

/// Longest a batch of only [`Command::MarkPublished`] waits for company before it commits alone.
const MARK_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// A parked [`Command::WaitAndClaim`]: how many tasks it takes, and where they go.
type Parked = (Want, Reply<Vec<ClaimedTask>>);

fn writer(mut conn: Connection, rx: mpsc::Receiver<Command>, counts: watch::Sender<Counts>) {
    const MAX_BATCH: usize = 4096;
    let mut parked: std::collections::VecDeque<Parked> = std::collections::VecDeque::new();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        // A batch of nothing but "published" marks is not urgent (a mark lost in a crash only means a result
        // is published twice): it waits a little for a command that needs a commit anyway and rides along.
        while batch.len() < MAX_BATCH
            && batch
                .iter()
                .all(|c| matches!(c, Command::MarkPublished(..)))
        {
            match rx.recv_timeout(MARK_DELAY) {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let mut orphans = run_batch(&mut conn, batch, &mut parked, &counts);
        // Tasks claimed for a caller that went away meanwhile: back to the queue, attempt not counted.
        while !orphans.is_empty() {
            let (reply, _rx) = oneshot::channel();
            orphans = run_batch(
                &mut conn,
                vec![Command::Requeue(orphans, reply)],
                &mut parked,
                &counts,
            );
        }
    }
}

/// A reply held back until the batch's commit, then sent with the command's own result or the commit's error.
/// Returns the ids of tasks it claimed for a caller that is gone (they must be requeued).
type Deferred = Box<dyn FnOnce(Option<&StoreError>) -> Vec<String> + Send>;

fn defer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Deferred {
    Box::new(move |commit_error: Option<&StoreError>| {
        let result = match (result, commit_error) {
            (Ok(_), Some(e)) => Err(copy_error(e)),
            (r, _) => r,
        };
        let _ = reply.send(result);
        Vec::new()
    })
}

/// Like [`defer`] for claimed tasks: if the caller dropped its end, the claimed tasks are handed back.
fn defer_claim(
    reply: Reply<Vec<ClaimedTask>>,
    result: Result<Vec<ClaimedTask>, StoreError>,
) -> Deferred {
    Box::new(move |commit_error: Option<&StoreError>| {
        let result = match (result, commit_error) {
            (Ok(_), Some(e)) => Err(copy_error(e)),
            (r, _) => r,
        };
        match reply.send(result) {
            Err(Ok(tasks)) => tasks.into_iter().map(|t| t.task_id).collect(),
            _ => Vec::new(),
        }
    })
}

fn copy_error(e: &StoreError) -> StoreError {
    StoreError::Commit(e.to_string(), e.is_disk_full())
}

fn add(counts: &mut Counts, delta: &Counts) {
    counts.queued = counts.queued.wrapping_add(delta.queued);
    counts.running = counts.running.wrapping_add(delta.running);
    counts.done = counts.done.wrapping_add(delta.done);
    counts.results_pending = counts.results_pending.wrapping_add(delta.results_pending);
}

/// Runs one batch in one transaction and commits it; then replies. Returns tasks to requeue (see [`Deferred`]).
fn run_batch(
    conn: &mut Connection,
    batch: Vec<Command>,
    parked: &mut std::collections::VecDeque<Parked>,
    counts_tx: &watch::Sender<Counts>,
) -> Vec<String> {
    let mut replies: Vec<Deferred> = Vec::with_capacity(batch.len());
    let mut counts = *counts_tx.borrow();
    let outcome = (|| -> Result<(), StoreError> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for cmd in batch {
            if let Command::WaitAndClaim(want, reply) = cmd {
                // Claimed below, in order, once the rest of the batch had its chance to queue tasks.
                parked.push_back((want, reply));
                continue;
            }
            tx.prepare_cached("SAVEPOINT cmd")?.execute([])?;
            let mut delta = Counts::default();
            let reply = execute(&tx, cmd, &mut delta);
            if reply.1 {
                tx.prepare_cached("RELEASE cmd")?.execute([])?;
                add(&mut counts, &delta);
            } else {
                tx.execute_batch("ROLLBACK TO cmd; RELEASE cmd")?;
            }
            replies.push(reply.0);
        }
        // Parked claims, oldest first, as long as tasks can be claimed.
        while let Some((want, reply)) = parked.pop_front() {
            if reply.is_closed() {
                continue;
            }
            tx.prepare_cached("SAVEPOINT cmd")?.execute([])?;
            let mut delta = Counts::default();
            match claim(&tx, &want, &mut delta) {
                Ok(tasks) if tasks.is_empty() => {
                    tx.prepare_cached("RELEASE cmd")?.execute([])?;
                    parked.push_front((want, reply));
                    break;
                }
                Ok(tasks) => {
                    tx.prepare_cached("RELEASE cmd")?.execute([])?;
                    add(&mut counts, &delta);
                    replies.push(defer_claim(reply, Ok(tasks)));
                }
                Err(e) => {
                    tx.execute_batch("ROLLBACK TO cmd; RELEASE cmd")?;
                    replies.push(defer_claim(reply, Err(e)));
                }
            }
        }
        tx.commit()?;
        Ok(())
    })();
    match outcome {
        Ok(()) => {
            counts_tx.send_if_modified(|c| {
                let changed = *c != counts;
                *c = counts;
                changed
            });
            replies.into_iter().flat_map(|r| r(None)).collect()
        }
        Err(e) => {
            tracing::error!(error = %e, "store commit failed; nothing in this batch was kept");
            replies.into_iter().for_each(|r| {
                r(Some(&e));
            });
            // Commands that never got a reply (the batch broke off early) are answered by dropping their
            // senders, which callers see as `Closed`; re-read the counts since the transaction rolled back.
            if let Ok(c) = read_counts(conn) {
                counts_tx.send_replace(c);
            }
            Vec::new()
        }
    }
}

/// Counts moves are applied as wrapping additions; `dec` gives the wrapping negative of n.
fn dec(n: u64) -> u64 {
    n.wrapping_neg()
}

/// Runs one command; returns its deferred reply and whether it succeeded (else its savepoint is rolled back).
fn execute(tx: &rusqlite::Transaction, cmd: Command, d: &mut Counts) -> (Deferred, bool) {
    fn done<T: Send + 'static>(reply: Reply<T>, r: Result<T, StoreError>) -> (Deferred, bool) {
        let ok = r.is_ok();
        (defer(reply, r), ok)
    }
    match cmd {
        Command::Ingest(items, reply) => done(reply, ingest(tx, items, d)),
        Command::FinishAndClaim(results, want, reply) => {
            let r = (|| {
                for result in &results {
                    if finish(tx, result)? {
                        d.running = d.running.wrapping_add(dec(1));
                        d.done = d.done.wrapping_add(1);
                        d.results_pending = d.results_pending.wrapping_add(1);
                    }
                }
                claim(tx, &want, d)
            })();
            let ok = r.is_ok();
            (defer_claim(reply, r), ok)
        }
        // Only reached inside `run_batch`'s loop for parked claims; see there.
        Command::WaitAndClaim(want, reply) => {
            let r = claim(tx, &want, d);
            let ok = r.is_ok();
            (defer_claim(reply, r), ok)
        }
        Command::Requeue(task_ids, reply) => {
            let r = (|| {
                let mut stmt = tx.prepare_cached(
                    "UPDATE tasks SET state = ?1, attempts = MAX(attempts - 1, 0) WHERE task_id = ?2 AND state = ?3",
                )?;
                for task_id in task_ids {
                    if stmt.execute(params![QUEUED, task_id, RUNNING])? > 0 {
                        d.running = d.running.wrapping_add(dec(1));
                        d.queued = d.queued.wrapping_add(1);
                    }
                }
                Ok(())
            })();
            done(reply, r)
        }
        Command::MarkPublished(ids, reply) => {
            let r = (|| {
                let now = crate::wire::now_ms() as i64;
                let mut stmt = tx.prepare_cached(
                    "UPDATE results SET published_at_ms = ?1 WHERE seq = ?2 AND published_at_ms IS NULL",
                )?;
                for id in ids {
                    if stmt.execute(params![now, id])? > 0 {
                        d.results_pending = d.results_pending.wrapping_add(dec(1));
                    }
                }
                Ok(())
            })();
            done(reply, r)
        }
        Command::Prune(before, reply) => {
            let r = (|| {
                tx.execute(
                    "DELETE FROM tasks WHERE task_id IN (SELECT task_id FROM results WHERE published_at_ms < ?1)",
                    [before as i64],
                )
                .map(|n| d.done = d.done.wrapping_add(dec(n as u64)))?;
                let n = tx.execute(
                    "DELETE FROM results WHERE published_at_ms < ?1",
                    [before as i64],
                )?;
                Ok(n as u64)
            })();
            done(reply, r)
        }
        Command::SetMeta(key, value, reply) => {
            let r = tx
                .execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    params![key, value],
                )
                .map(|_| ())
                .map_err(StoreError::from);
            done(reply, r)
        }
    }
}

fn ingest(
    tx: &rusqlite::Transaction,
    items: Vec<Intake>,
    d: &mut Counts,
) -> Result<IngestOutcome, StoreError> {
    let now = crate::wire::now_ms() as i64;
    let mut out = IngestOutcome::default();
    let mut insert = tx.prepare_cached(
        "INSERT INTO tasks (task_id, function, payload, timeout_ms, state, received_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(task_id) DO NOTHING",
    )?;
    for item in items {
        match item {
            Intake::Task(t) => {
                let timeout = t.timeout_ms.map(|v| v.min(i64::MAX as u64) as i64);
                if insert.execute(params![
                    t.task_id, t.function, t.payload, timeout, QUEUED, now
                ])? == 0
                {
                    out.duplicates += 1;
                } else {
                    out.queued += 1;
                    d.queued = d.queued.wrapping_add(1);
                }
            }
            Intake::Rejected {
                task_id,
                function,
                reason,
            } => {
                let result = TaskResult {
                    task_id,
                    status: Status::Rejected,
                    exit_code: None,
                    attempts: 0,
                    duration_ms: 0,
                    body: reason.into_bytes(),
                };
                if insert_done(tx, &mut insert, &function, &result, now, d)? {
                    out.rejected += 1;
                } else {
                    out.duplicates += 1;
                }
            }
            Intake::Ran { function, result } => {
                if insert_done(tx, &mut insert, &function, &result, now, d)? {
                    out.ran += 1;
                } else {
                    out.duplicates += 1;
                }
            }
        }
    }
    Ok(out)
}

/// Records a task that arrives with its result: inserted without its payload, then finished. False if its id is
/// already on disk (a duplicate: the result on disk, if any, stands and this one is dropped).
fn insert_done(
    tx: &rusqlite::Transaction,
    insert: &mut rusqlite::CachedStatement,
    function: &str,
    result: &TaskResult,
    now: i64,
    d: &mut Counts,
) -> Result<bool, StoreError> {
    let empty: &[u8] = &[];
    if insert.execute(params![
        result.task_id,
        function,
        empty,
        None::<i64>,
        RUNNING,
        now
    ])? == 0
    {
        return Ok(false);
    }
    finish(tx, result)?;
    d.done = d.done.wrapping_add(1);
    d.results_pending = d.results_pending.wrapping_add(1);
    Ok(true)
}

/// Marks the task done (dropping its payload) and stores its result. Returns false if the task was not running
/// (already finished: the first result wins).
fn finish(tx: &rusqlite::Transaction, r: &TaskResult) -> Result<bool, StoreError> {
    let now = crate::wire::now_ms() as i64;
    let changed = tx
        .prepare_cached(
            "UPDATE tasks SET state = ?1, payload = x'', done_at_ms = ?2, suspect = 0 WHERE task_id = ?3 AND state = ?4",
        )?
        .execute(params![DONE, now, r.task_id, RUNNING])?;
    if changed == 0 {
        return Ok(false);
    }
    tx.prepare_cached(
        "INSERT INTO results (task_id, status, exit_code, attempts, duration_ms, body, finished_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(task_id) DO NOTHING",
    )?
    .execute(params![
            r.task_id,
            r.status.as_str(),
            r.exit_code,
            r.attempts,
            r.duration_ms.min(i64::MAX as u64) as i64,
            r.body,
            now
        ],
    )?;
    Ok(true)
}

/// How many tasks one claim takes: up to `max`, oldest first. With `only`, a claim of several holds only
/// tasks of those functions (the ones known to be short): a task of another function is claimed alone, and
/// the claim stops in front of one. A number is "up to that many of any function".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub max: usize,
    pub only: Option<Vec<String>>,
}

impl Want {
    fn batchable(&self, function: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|f| f == function))
    }
}

impl From<usize> for Want {
    fn from(max: usize) -> Want {
        Want { max, only: None }
    }
}

/// Payload bytes one claim takes at most (it always takes at least one task): bounds what a slot holds in memory.
const MAX_CLAIM_BYTES: usize = 1 << 20;

/// Claims up to `want` queued tasks, oldest first, counting an attempt for each. Quarantine: tasks that were
/// running when the agent died are suspects and run alone, one at a time and with nothing beside them, so that
/// a poison task crashes the agent by itself and the tasks that happened to share its crash are not charged for
/// it again; a suspect is always claimed by itself.
fn claim(
    tx: &rusqlite::Transaction,
    want: &Want,
    d: &mut Counts,
) -> Result<Vec<ClaimedTask>, StoreError> {
    if want.max == 0 {
        return Ok(Vec::new());
    }
    let suspect: Option<(i64, i64)> = tx
        .prepare_cached(
            // INDEXED BY: left to itself the planner walks tasks_by_state for `state IN (..)` and reads every
            // queued row to test `suspect`, which made each claim cost O(backlog). Suspects are few.
            "SELECT seq, state FROM tasks INDEXED BY tasks_suspect
             WHERE suspect = 1 AND state IN (?1, ?2) ORDER BY state DESC, seq LIMIT 1",
        )?
        .query_row([QUEUED, RUNNING], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let read = |r: &rusqlite::Row| {
        Ok((
            r.get::<_, i64>(0)?,
            ClaimedTask {
                task_id: r.get(1)?,
                function: r.get(2)?,
                payload: r.get(3)?,
                timeout_ms: r.get::<_, Option<i64>>(4)?.map(|v| v.max(0) as u64),
                attempts: r.get::<_, u32>(5)? + 1,
            },
        ))
    };
    let mut rows: Vec<(i64, ClaimedTask)> = Vec::new();
    match suspect {
        Some((_, RUNNING)) => return Ok(Vec::new()),
        Some((seq, _)) => {
            let busy: bool = tx
                .prepare_cached("SELECT EXISTS(SELECT 1 FROM tasks WHERE state = ?1)")?
                .query_row([RUNNING], |r| r.get(0))?;
            if busy {
                return Ok(Vec::new());
            }
            rows.extend(
                tx.prepare_cached("SELECT seq, task_id, function, payload, timeout_ms, attempts FROM tasks WHERE seq = ?1")?
                    .query_row([seq], read)
                    .optional()?,
            );
        }
        None => {
            let mut stmt = tx.prepare_cached(
                "SELECT seq, task_id, function, payload, timeout_ms, attempts FROM tasks
                 WHERE state = ?1 ORDER BY seq LIMIT ?2",
            )?;
            let mut it = stmt.query_map(
                params![QUEUED, want.max.min(i64::MAX as usize) as i64],
                read,
            )?;
            let mut bytes = 0;
            while bytes < MAX_CLAIM_BYTES
                && let Some(row) = it.next()
            {
                let row = row?;
                let batchable = want.batchable(&row.1.function);
                if !rows.is_empty() && !batchable {
                    break;
                }
                bytes += row.1.payload.len().max(1);
                rows.push(row);
                if !batchable {
                    break;
                }
            }
        }
    }
    let mut mark =
        tx.prepare_cached("UPDATE tasks SET state = ?1, attempts = attempts + 1 WHERE seq = ?2")?;
    for (seq, _) in &rows {
        mark.execute(params![RUNNING, seq])?;
    }
    let n = rows.len() as u64;
    d.queued = d.queued.wrapping_add(dec(n));
    d.running = d.running.wrapping_add(n);
    Ok(rows.into_iter().map(|(_, t)| t).collect())
}

fn pending(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> Result<Vec<(i64, TaskResult)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, task_id, status, exit_code, attempts, duration_ms, body FROM results
         WHERE published_at_ms IS NULL AND seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, limit.min(i64::MAX as usize) as i64], |r| {
        let status: String = r.get(2)?;
        Ok((
            r.get(0)?,
            TaskResult {
                task_id: r.get(1)?,
                status: Status::parse(&status).unwrap_or(Status::Failed),
                exit_code: r.get(3)?,
                attempts: r.get(4)?,
                duration_ms: r.get::<_, i64>(5)?.max(0) as u64,
                body: r.get(6)?,
            },
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn task(id: &str) -> Intake {
        Intake::Task(NewTask {
            task_id: id.into(),
            function: "echo".into(),
            payload: id.as_bytes().to_vec(),
            timeout_ms: None,
        })
    }

    fn ok(c: &ClaimedTask) -> TaskResult {
        TaskResult {
            task_id: c.task_id.clone(),
            status: Status::Ok,
            exit_code: Some(0),
            attempts: c.attempts,
            duration_ms: 1,
            body: c.payload.clone(),
        }
    }

    /// The one-task-at-a-time use of `finish_and_claim`.
    async fn fc(store: &Store, r: Option<TaskResult>, claim: bool) -> Option<ClaimedTask> {
        let mut got = store
            .finish_and_claim(r.into_iter().collect(), usize::from(claim))
            .await
            .unwrap();
        assert!(got.len() <= 1);
        got.pop()
    }

    fn counts(store: &Store) -> Counts {
        *store.counts().borrow()
    }

    #[tokio::test]
    async fn task_life_cycle_and_dedup() {
        let dir = tempdir("life");
        let (store, rec) = Store::open(&dir, 3).unwrap();
        assert_eq!(rec, Recovery::default());
        let out = store
            .ingest(vec![task("a"), task("b"), task("a")])
            .await
            .unwrap();
        assert_eq!((out.queued, out.duplicates), (2, 1));
        let bad = Intake::Rejected {
            task_id: "c".into(),
            function: "nope".into(),
            reason: "unknown".into(),
        };
        assert_eq!(store.ingest(vec![bad]).await.unwrap().rejected, 1);
        assert_eq!(
            counts(&store),
            Counts {
                queued: 2,
                running: 0,
                done: 1,
                results_pending: 1
            }
        );

        let a = fc(&store, None, true).await.unwrap();
        assert_eq!((a.task_id.as_str(), a.attempts), ("a", 1));
        let b = fc(&store, Some(ok(&a)), true).await.unwrap();
        assert_eq!(b.task_id, "b");
        assert_eq!(fc(&store, Some(ok(&b)), true).await, None);
        // A finished task's second result is ignored, and a redelivery is not queued again.
        assert_eq!(fc(&store, Some(ok(&b)), false).await, None);
        assert_eq!(store.ingest(vec![task("b")]).await.unwrap().duplicates, 1);
        assert_eq!(
            counts(&store),
            Counts {
                queued: 0,
                running: 0,
                done: 3,
                results_pending: 3
            }
        );

        let pending = Reader::open(&dir).unwrap().pending_results(0, 10).unwrap();
        let ids: Vec<_> = pending.iter().map(|(_, r)| r.task_id.as_str()).collect();
        assert_eq!(ids, ["c", "a", "b"]);
        assert_eq!(pending[0].1.status, Status::Rejected);
        store
            .mark_published(vec![pending[0].0, pending[1].0])
            .await
            .unwrap();
        assert_eq!(counts(&store).results_pending, 1);
        assert_eq!(store.prune(crate::wire::now_ms() + 1).await.unwrap(), 2);
        assert_eq!(counts(&store).done, 1);
        assert_eq!(
            Reader::open(&dir)
                .unwrap()
                .pending_results(0, 10)
                .unwrap()
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn a_task_run_on_arrival_is_stored_done_with_its_result() {
        let dir = tempdir("ran");
        let (store, _) = Store::open(&dir, 3).unwrap();
        let ran = |id: &str, body: &str| Intake::Ran {
            function: "echo".into(),
            result: TaskResult {
                task_id: id.into(),
                status: Status::Ok,
                exit_code: None,
                attempts: 1,
                duration_ms: 0,
                body: body.into(),
            },
        };
        let out = store
            .ingest(vec![
                task("q"),
                ran("r", "first"),
                ran("r", "second"),
                ran("q", "x"),
            ])
            .await
            .unwrap();
        assert_eq!((out.queued, out.ran, out.duplicates), (1, 1, 2));
        // A redelivery of a task stored with its result is a duplicate too.
        let out = store.ingest(vec![task("r")]).await.unwrap();
        assert_eq!((out.queued, out.duplicates), (0, 1));
        assert_eq!(
            counts(&store),
            Counts {
                queued: 1,
                running: 0,
                done: 1,
                results_pending: 1
            }
        );
        let pending = Reader::open(&dir).unwrap().pending_results(0, 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (pending[0].1.task_id.as_str(), pending[0].1.body.as_slice()),
            ("r", b"first".as_slice())
        );
        // The task that was queued before its id came again with a result is still queued, unchanged.
        let q = fc(&store, None, true).await.unwrap();
        assert_eq!(
            (q.task_id.as_str(), q.payload.as_slice()),
            ("q", b"q".as_slice())
        );
    }

    #[tokio::test]
    async fn crash_recovery_requeues_then_gives_up() {
        let dir = tempdir("crash");
        for round in 1..=4u32 {
            let (store, rec) = Store::open(&dir, 3).unwrap();
            if round == 1 {
                store.ingest(vec![task("poison")]).await.unwrap();
            } else if round <= 3 {
                assert_eq!(rec.requeued, 1, "round {round}");
            } else {
                assert_eq!(rec.given_up, 1);
                let pending = Reader::open(&dir).unwrap().pending_results(0, 10).unwrap();
                assert_eq!(pending[0].1.status, Status::Failed);
                assert_eq!(pending[0].1.attempts, 3);
                return;
            }
            // Claim and "crash" (drop the store without finishing).
            let t = fc(&store, None, true).await.unwrap();
            assert_eq!(t.attempts, round);
        }
        unreachable!("round 4 returns");
    }

    #[tokio::test]
    async fn tasks_that_shared_a_crash_run_alone() {
        let dir = tempdir("quarantine");
        {
            let (store, _) = Store::open(&dir, 3).unwrap();
            store.ingest(vec![task("s1"), task("s2")]).await.unwrap();
            fc(&store, None, true).await.unwrap();
            fc(&store, None, true).await.unwrap();
            store.ingest(vec![task("fresh")]).await.unwrap();
        } // crash with s1 and s2 running
        let (store, rec) = Store::open(&dir, 3).unwrap();
        assert_eq!(rec.requeued, 2);
        let s1 = fc(&store, None, true).await.unwrap();
        assert_eq!((s1.task_id.as_str(), s1.attempts), ("s1", 2));
        // Nothing runs beside a suspect, not even the fresh task.
        assert_eq!(fc(&store, None, true).await, None);
        let s2 = fc(&store, Some(ok(&s1)), true).await.unwrap();
        assert_eq!(s2.task_id, "s2");
        assert_eq!(fc(&store, None, true).await, None);
        let fresh = fc(&store, Some(ok(&s2)), true).await.unwrap();
        assert_eq!(fresh.task_id, "fresh");
        // Quarantine is over: ordinary tasks run side by side again.
        store.ingest(vec![task("a"), task("b")]).await.unwrap();
        assert!(fc(&store, None, true).await.is_some());
        assert!(fc(&store, None, true).await.is_some());
    }

    #[tokio::test]
    async fn requeue_does_not_count_an_attempt() {
        let dir = tempdir("requeue");
        let (store, _) = Store::open(&dir, 3).unwrap();
        store.ingest(vec![task("t")]).await.unwrap();
        let t = fc(&store, None, true).await.unwrap();
        store.requeue(vec![t.task_id]).await.unwrap();
        let again = fc(&store, None, true).await.unwrap();
        assert_eq!(again.attempts, 1);
    }

    #[tokio::test]
    async fn claims_and_stores_several_per_commit() {
        let dir = tempdir("batch");
        let (store, _) = Store::open(&dir, 3).unwrap();
        let ids = ["a", "b", "c", "d", "e"];
        store
            .ingest(ids.iter().map(|i| task(i)).collect())
            .await
            .unwrap();
        let first = store.finish_and_claim(vec![], 3).await.unwrap();
        let got: Vec<_> = first
            .iter()
            .map(|t| (t.task_id.as_str(), t.attempts))
            .collect();
        assert_eq!(got, [("a", 1), ("b", 1), ("c", 1)]);
        assert_eq!((counts(&store).queued, counts(&store).running), (2, 3));
        let results = first.iter().map(ok).collect();
        let rest = store.finish_and_claim(results, 10).await.unwrap();
        assert_eq!(rest.len(), 2);
        assert_eq!(
            counts(&store),
            Counts {
                queued: 0,
                running: 2,
                done: 3,
                results_pending: 3
            }
        );
        // Paging past a row id.
        let page = Reader::open(&dir).unwrap().pending_results(0, 2).unwrap();
        assert_eq!(page.len(), 2);
        let next = Reader::open(&dir)
            .unwrap()
            .pending_results(page[1].0, 10)
            .unwrap();
        let ids: Vec<_> = next.iter().map(|(_, r)| r.task_id.as_str()).collect();
        assert_eq!(ids, ["c"]);
    }

    #[tokio::test]
    async fn a_claim_of_several_holds_only_batchable_functions() {
        let dir = tempdir("only");
        let (store, _) = Store::open(&dir, 3).unwrap();
        let of = |id: &str, function: &str| {
            Intake::Task(NewTask {
                task_id: id.into(),
                function: function.into(),
                payload: Vec::new(),
                timeout_ms: None,
            })
        };
        let tasks = [
            ("a", "echo"),
            ("b", "echo"),
            ("c", "sleep"),
            ("d", "sleep"),
            ("e", "echo"),
        ];
        store
            .ingest(tasks.iter().map(|(i, f)| of(i, f)).collect())
            .await
            .unwrap();
        let want = || Want {
            max: 10,
            only: Some(vec!["echo".to_owned()]),
        };
        let ids = |v: Vec<ClaimedTask>| v.into_iter().map(|t| t.task_id).collect::<Vec<_>>();
        assert_eq!(
            ids(store.finish_and_claim(vec![], want()).await.unwrap()),
            ["a", "b"]
        );
        assert_eq!(
            ids(store.finish_and_claim(vec![], want()).await.unwrap()),
            ["c"]
        );
        assert_eq!(ids(store.wait_and_claim(want()).await.unwrap()), ["d"]);
        assert_eq!(
            ids(store.finish_and_claim(vec![], want()).await.unwrap()),
            ["e"]
        );
    }

    #[tokio::test]
    async fn a_claim_holds_a_bounded_number_of_payload_bytes() {
        let dir = tempdir("bytes");
        let (store, _) = Store::open(&dir, 3).unwrap();
        let big = |id: &str| {
            Intake::Task(NewTask {
                task_id: id.into(),
                function: "echo".into(),
                payload: vec![0; MAX_CLAIM_BYTES * 3 / 5],
                timeout_ms: None,
            })
        };
        store
            .ingest(vec![big("x"), big("y"), big("z")])
            .await
            .unwrap();
        assert_eq!(store.finish_and_claim(vec![], 10).await.unwrap().len(), 2);
        assert_eq!(store.finish_and_claim(vec![], 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn suspects_are_claimed_alone_even_in_batches() {
        let dir = tempdir("batch-quarantine");
        {
            let (store, _) = Store::open(&dir, 3).unwrap();
            store
                .ingest(vec![task("s1"), task("s2"), task("s3")])
                .await
                .unwrap();
            assert_eq!(store.finish_and_claim(vec![], 3).await.unwrap().len(), 3);
        } // crash with a claimed batch: every task in it is a suspect
        let (store, rec) = Store::open(&dir, 3).unwrap();
        assert_eq!(rec.requeued, 3);
        store.ingest(vec![task("fresh")]).await.unwrap();
        let mut order = Vec::new();
        let mut last: Vec<TaskResult> = Vec::new();
        loop {
            let got = store.finish_and_claim(last, 10).await.unwrap();
            assert!(got.len() <= 1, "suspects run alone: {got:?}");
            assert_eq!(store.finish_and_claim(vec![], 10).await.unwrap(), vec![]);
            let Some(t) = got.into_iter().next() else {
                break;
            };
            order.push(t.task_id.clone());
            last = vec![ok(&t)];
            if t.task_id == "fresh" {
                break;
            }
        }
        assert_eq!(order, ["s1", "s2", "s3", "fresh"]);
    }

    #[tokio::test]
    async fn a_waiting_claim_is_served_by_the_ingest_commit() {
        let dir = tempdir("park");
        let (store, _) = Store::open(&dir, 3).unwrap();
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.wait_and_claim(2).await }
        });
        // A claim dropped before tasks arrive takes nothing.
        let dropped =
            tokio::time::timeout(Duration::from_millis(50), store.wait_and_claim(5)).await;
        assert!(dropped.is_err());
        store
            .ingest(vec![task("a"), task("b"), task("c")])
            .await
            .unwrap();
        let got = waiter.await.unwrap().unwrap();
        let ids: Vec<_> = got.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!((counts(&store).queued, counts(&store).running), (1, 2));
        // Nothing waits when a task is there already.
        assert_eq!(store.wait_and_claim(5).await.unwrap().len(), 1);
        // A claim answered but never taken goes back to the queue without counting an attempt.
        store.ingest(vec![task("d")]).await.unwrap();
        let unread = store.wait_and_claim(1);
        store.set_meta("sync", "1".into()).await.unwrap(); // the writer has answered `unread` by now
        drop(unread);
        store.set_meta("sync", "2".into()).await.unwrap(); // and has requeued what it held
        assert_eq!((counts(&store).queued, counts(&store).running), (1, 3));
        let d = store.finish_and_claim(vec![], 1).await.unwrap();
        assert_eq!((d[0].task_id.as_str(), d[0].attempts), ("d", 1));
    }

    #[tokio::test]
    async fn requeue_takes_back_a_batch() {
        let dir = tempdir("requeue-batch");
        let (store, _) = Store::open(&dir, 3).unwrap();
        store.ingest(vec![task("a"), task("b")]).await.unwrap();
        let got = store.finish_and_claim(vec![], 2).await.unwrap();
        store
            .requeue(got.into_iter().map(|t| t.task_id).collect())
            .await
            .unwrap();
        assert_eq!((counts(&store).queued, counts(&store).running), (2, 0));
        let again = store.finish_and_claim(vec![], 2).await.unwrap();
        assert!(again.iter().all(|t| t.attempts == 1));
    }

    #[tokio::test]
    async fn status_reads_alongside_the_writer() {
        let dir = tempdir("status");
        let (store, _) = Store::open(&dir, 3).unwrap();
        store.ingest(vec![task("x"), task("y")]).await.unwrap();
        store.set_meta("link", "connected".into()).await.unwrap();
        let (c, meta) = read_status(&dir).unwrap();
        assert_eq!(c.queued, 2);
        assert_eq!(meta, vec![("link".to_owned(), "connected".to_owned())]);
    }

    #[test]
    fn garbage_file_is_a_clear_open_error() {
        let dir = tempdir("garbage");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(DB_FILE), vec![0x42u8; 8192]).unwrap();
        let err = Store::open(&dir, 3).err().expect("garbage must not open");
        assert!(matches!(err, StoreError::Damaged(..)), "{err}");
        assert!(err.to_string().contains(DB_FILE));
    }

    #[tokio::test]
    async fn truncated_database_is_refused_and_left_alone() {
        let dir = tempdir("truncated");
        let path = dir.join(DB_FILE);
        let wal = dir.join(format!("{DB_FILE}-wal"));
        let (store, _) = Store::open(&dir, 3).unwrap();
        let many: Vec<Intake> = (0..3000).map(|i| task(&format!("task-{i:05}"))).collect();
        store.ingest(many).await.unwrap();
        // Most pages in the database file, the latest ones in the WAL.
        Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .unwrap();
        store
            .ingest(vec![task("late-1"), task("late-2")])
            .await
            .unwrap();
        // A crash leaves the database with a WAL of committed pages beside it: copy both as they are now.
        let (bytes, wal_bytes) = (std::fs::read(&path).unwrap(), std::fs::read(&wal).unwrap());
        drop(store);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let check = |with_wal: bool, with_shm: bool| {
            let _ = std::fs::remove_file(&wal);
            let _ = std::fs::remove_file(dir.join(format!("{DB_FILE}-shm")));
            let cut = &bytes[..bytes.len() / 2];
            std::fs::write(&path, cut).unwrap();
            if with_wal {
                std::fs::write(&wal, &wal_bytes).unwrap();
            }
            if with_shm {
                // A reader builds the WAL index (the -shm file) and leaves it behind, as a crash does.
                let c =
                    Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                        .unwrap();
                let _ = c.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
                    r.get::<_, i64>(0)
                });
            }
            let err = Store::open(&dir, 3)
                .err()
                .expect("a truncated database must not open");
            assert!(
                matches!(err, StoreError::Damaged(..)),
                "wal {with_wal} shm {with_shm}: {err}"
            );
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
            assert!(
                std::fs::read(&path).unwrap() == cut,
                "wal {with_wal} shm {with_shm}: the file was changed"
            );
        };
        check(false, false);
        check(true, false);
        check(true, true);
    }

    #[tokio::test]
    async fn checkpoint_leaves_the_database_file_complete() {
        let dir = tempdir("checkpoint");
        let (store, _) = Store::open(&dir, 3).unwrap();
        store.ingest(vec![task("a"), task("b")]).await.unwrap();
        store.checkpoint().await.unwrap();
        // The database file alone, without its WAL, holds both tasks.
        let copy = tempdir("checkpoint-copy");
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::copy(dir.join(DB_FILE), copy.join(DB_FILE)).unwrap();
        let (counts, _) = read_status(&copy).unwrap();
        assert_eq!(counts.queued, 2);
    }

    fn tempdir(name: &str) -> crate::TestDir {
        crate::TestDir::new(&format!("store-{name}"))
    }
}
