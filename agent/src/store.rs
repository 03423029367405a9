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
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    pub queued: u64,
    pub rejected: u64,
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
    /// Stores a finished result (if any) and claims the next queued task (if wanted), in one transaction.
    FinishAndClaim(Option<TaskResult>, bool, Reply<Option<ClaimedTask>>),
    /// Puts a task interrupted by shutdown back in the queue, not counting the run as an attempt.
    Requeue(String, Reply<()>),
    PendingResults(usize, Reply<Vec<(i64, TaskResult)>>),
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

    pub async fn finish_and_claim(
        &self,
        finished: Option<TaskResult>,
        claim: bool,
    ) -> Result<Option<ClaimedTask>, StoreError> {
        let grows = finished.is_some();
        let r = self
            .call(|r| Command::FinishAndClaim(finished, claim, r))
            .await;
        self.note_space(&r, grows);
        r
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

    pub async fn requeue(&self, task_id: String) -> Result<(), StoreError> {
        self.call(|r| Command::Requeue(task_id, r)).await
    }

    /// Up to `limit` unpublished results, oldest first, each with its row id for [`Store::mark_published`].
    pub async fn pending_results(
        &self,
        limit: usize,
    ) -> Result<Vec<(i64, TaskResult)>, StoreError> {
        self.call(|r| Command::PendingResults(limit, r)).await
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

    /// Counts as of the last commit; `changed()` on the receiver wakes on every commit that moved them.
    pub fn counts(&self) -> watch::Receiver<Counts> {
        self.counts.clone()
    }
}

const QUEUED: i64 = 0;
const RUNNING: i64 = 1;
const DONE: i64 = 2;

fn open_db(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Before anything writes: a damaged file (truncated, overwritten) must stop the start with its name, not
    // fail later in the middle of serving, and must not be "repaired" by writes that drop what it holds.
    let check: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(format!("integrity check: {check}")),
        ));
    }
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

fn writer(mut conn: Connection, rx: mpsc::Receiver<Command>, counts: watch::Sender<Counts>) {
    const MAX_BATCH: usize = 4096;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        run_batch(&mut conn, batch, &counts);
    }
}

/// A reply held back until the batch's commit, then sent with the command's own result or the commit's error.
type Deferred = Box<dyn FnOnce(Option<&StoreError>) + Send>;

fn defer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Deferred {
    Box::new(move |commit_error: Option<&StoreError>| {
        let result = match (result, commit_error) {
            (Ok(_), Some(e)) => Err(copy_error(e)),
            (r, _) => r,
        };
        let _ = reply.send(result);
    })
}

fn copy_error(e: &StoreError) -> StoreError {
    StoreError::Commit(e.to_string(), e.is_disk_full())
}

fn run_batch(conn: &mut Connection, batch: Vec<Command>, counts_tx: &watch::Sender<Counts>) {
    let mut replies: Vec<Deferred> = Vec::with_capacity(batch.len());
    let mut counts = *counts_tx.borrow();
    let outcome = (|| -> Result<(), StoreError> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for cmd in batch {
            tx.execute_batch("SAVEPOINT cmd")?;
            let mut delta = Counts::default();
            let reply = execute(&tx, cmd, &mut delta);
            if reply.1 {
                tx.execute_batch("RELEASE cmd")?;
                counts.queued = counts.queued.wrapping_add(delta.queued);
                counts.running = counts.running.wrapping_add(delta.running);
                counts.done = counts.done.wrapping_add(delta.done);
                counts.results_pending = counts.results_pending.wrapping_add(delta.results_pending);
            } else {
                tx.execute_batch("ROLLBACK TO cmd; RELEASE cmd")?;
            }
            replies.push(reply.0);
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
            replies.into_iter().for_each(|r| r(None));
        }
        Err(e) => {
            tracing::error!(error = %e, "store commit failed; nothing in this batch was kept");
            replies.into_iter().for_each(|r| r(Some(&e)));
            // Commands that never got a reply (the batch broke off early) are answered by dropping their
            // senders, which callers see as `Closed`; re-read the counts since the transaction rolled back.
            if let Ok(c) = read_counts(conn) {
                counts_tx.send_replace(c);
            }
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
        Command::FinishAndClaim(result, want, reply) => {
            let r = (|| {
                if let Some(result) = &result
                    && finish(tx, result)?
                {
                    d.running = d.running.wrapping_add(dec(1));
                    d.done = d.done.wrapping_add(1);
                    d.results_pending = d.results_pending.wrapping_add(1);
                }
                if want { claim(tx, d) } else { Ok(None) }
            })();
            done(reply, r)
        }
        Command::Requeue(task_id, reply) => {
            let r = tx
                .execute(
                    "UPDATE tasks SET state = ?1, attempts = MAX(attempts - 1, 0) WHERE task_id = ?2 AND state = ?3",
                    params![QUEUED, task_id, RUNNING],
                )
                .map(|n| {
                    if n > 0 {
                        d.running = d.running.wrapping_add(dec(1));
                        d.queued = d.queued.wrapping_add(1);
                    }
                })
                .map_err(StoreError::from);
            done(reply, r)
        }
        Command::PendingResults(limit, reply) => done(reply, pending(tx, limit)),
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
                let empty: &[u8] = &[];
                if insert.execute(params![task_id, function, empty, None::<i64>, RUNNING, now])?
                    == 0
                {
                    out.duplicates += 1;
                    continue;
                }
                let result = TaskResult {
                    task_id,
                    status: Status::Rejected,
                    exit_code: None,
                    attempts: 0,
                    duration_ms: 0,
                    body: reason.into_bytes(),
                };
                finish(tx, &result)?;
                out.rejected += 1;
                d.done = d.done.wrapping_add(1);
                d.results_pending = d.results_pending.wrapping_add(1);
            }
        }
    }
    Ok(out)
}

/// Marks the task done (dropping its payload) and stores its result. Returns false if the task was not running
/// (already finished: the first result wins).
fn finish(tx: &rusqlite::Transaction, r: &TaskResult) -> Result<bool, StoreError> {
    let now = crate::wire::now_ms() as i64;
    let changed = tx.execute(
        "UPDATE tasks SET state = ?1, payload = x'', done_at_ms = ?2, suspect = 0 WHERE task_id = ?3 AND state = ?4",
        params![DONE, now, r.task_id, RUNNING],
    )?;
    if changed == 0 {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO results (task_id, status, exit_code, attempts, duration_ms, body, finished_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(task_id) DO NOTHING",
        params![
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

/// Claims the next task. Quarantine: tasks that were running when the agent died are suspects and run alone,
/// one at a time and with nothing beside them, so that a poison task crashes the agent by itself and the tasks
/// that happened to share its crash are not charged for it again.
fn claim(tx: &rusqlite::Transaction, d: &mut Counts) -> Result<Option<ClaimedTask>, StoreError> {
    let suspect: Option<(i64, i64)> = tx
        .prepare_cached(
            "SELECT seq, state FROM tasks WHERE suspect = 1 AND state IN (?1, ?2) ORDER BY state DESC, seq LIMIT 1",
        )?
        .query_row([QUEUED, RUNNING], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let seq = match suspect {
        Some((_, RUNNING)) => return Ok(None),
        Some((seq, _)) => {
            let busy: bool = tx
                .prepare_cached("SELECT EXISTS(SELECT 1 FROM tasks WHERE state = ?1)")?
                .query_row([RUNNING], |r| r.get(0))?;
            if busy {
                return Ok(None);
            }
            Some(seq)
        }
        None => None,
    };
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
    let row = match seq {
        Some(seq) => tx
            .prepare_cached("SELECT seq, task_id, function, payload, timeout_ms, attempts FROM tasks WHERE seq = ?1")?
            .query_row([seq], read)
            .optional()?,
        None => tx
            .prepare_cached(
                "SELECT seq, task_id, function, payload, timeout_ms, attempts FROM tasks
                 WHERE state = ?1 ORDER BY seq LIMIT 1",
            )?
            .query_row([QUEUED], read)
            .optional()?,
    };
    let Some((seq, task)) = row else {
        return Ok(None);
    };
    tx.prepare_cached("UPDATE tasks SET state = ?1, attempts = attempts + 1 WHERE seq = ?2")?
        .execute(params![RUNNING, seq])?;
    d.queued = d.queued.wrapping_add(dec(1));
    d.running = d.running.wrapping_add(1);
    Ok(Some(task))
}

fn pending(tx: &rusqlite::Transaction, limit: usize) -> Result<Vec<(i64, TaskResult)>, StoreError> {
    let mut stmt = tx.prepare_cached(
        "SELECT seq, task_id, status, exit_code, attempts, duration_ms, body FROM results
         WHERE published_at_ms IS NULL ORDER BY seq LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit as i64], |r| {
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

        let a = store.finish_and_claim(None, true).await.unwrap().unwrap();
        assert_eq!((a.task_id.as_str(), a.attempts), ("a", 1));
        let b = store
            .finish_and_claim(Some(ok(&a)), true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.task_id, "b");
        assert_eq!(
            store.finish_and_claim(Some(ok(&b)), true).await.unwrap(),
            None
        );
        // A finished task's second result is ignored, and a redelivery is not queued again.
        assert_eq!(
            store.finish_and_claim(Some(ok(&b)), false).await.unwrap(),
            None
        );
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

        let pending = store.pending_results(10).await.unwrap();
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
        assert_eq!(store.pending_results(10).await.unwrap().len(), 1);
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
                let pending = store.pending_results(10).await.unwrap();
                assert_eq!(pending[0].1.status, Status::Failed);
                assert_eq!(pending[0].1.attempts, 3);
                return;
            }
            // Claim and "crash" (drop the store without finishing).
            let t = store.finish_and_claim(None, true).await.unwrap().unwrap();
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
            store.finish_and_claim(None, true).await.unwrap().unwrap();
            store.finish_and_claim(None, true).await.unwrap().unwrap();
            store.ingest(vec![task("fresh")]).await.unwrap();
        } // crash with s1 and s2 running
        let (store, rec) = Store::open(&dir, 3).unwrap();
        assert_eq!(rec.requeued, 2);
        let s1 = store.finish_and_claim(None, true).await.unwrap().unwrap();
        assert_eq!((s1.task_id.as_str(), s1.attempts), ("s1", 2));
        // Nothing runs beside a suspect, not even the fresh task.
        assert_eq!(store.finish_and_claim(None, true).await.unwrap(), None);
        let s2 = store
            .finish_and_claim(Some(ok(&s1)), true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s2.task_id, "s2");
        assert_eq!(store.finish_and_claim(None, true).await.unwrap(), None);
        let fresh = store
            .finish_and_claim(Some(ok(&s2)), true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fresh.task_id, "fresh");
        // Quarantine is over: ordinary tasks run side by side again.
        store.ingest(vec![task("a"), task("b")]).await.unwrap();
        assert!(store.finish_and_claim(None, true).await.unwrap().is_some());
        assert!(store.finish_and_claim(None, true).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn requeue_does_not_count_an_attempt() {
        let dir = tempdir("requeue");
        let (store, _) = Store::open(&dir, 3).unwrap();
        store.ingest(vec![task("t")]).await.unwrap();
        let t = store.finish_and_claim(None, true).await.unwrap().unwrap();
        store.requeue(t.task_id).await.unwrap();
        let again = store.finish_and_claim(None, true).await.unwrap().unwrap();
        assert_eq!(again.attempts, 1);
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
        {
            let (store, _) = Store::open(&dir, 3).unwrap();
            let many: Vec<Intake> = (0..3000).map(|i| task(&format!("task-{i:05}"))).collect();
            store.ingest(many).await.unwrap();
        }
        // The writer thread checkpoints and closes once the last handle is gone.
        for _ in 0..100 {
            if !dir.join(format!("{DB_FILE}-wal")).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let path = dir.join(DB_FILE);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 4 * 4096, "the database grew past a few pages");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let _ = std::fs::remove_file(dir.join(format!("{DB_FILE}-wal")));
        let _ = std::fs::remove_file(dir.join(format!("{DB_FILE}-shm")));
        let err = Store::open(&dir, 3)
            .err()
            .expect("a truncated database must not open");
        assert!(matches!(err, StoreError::Damaged(..)), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes[..bytes.len() / 2],
            "the file was not touched"
        );
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ea-store-{name}-{}-{}",
            std::process::id(),
            crate::wire::now_ms()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}
