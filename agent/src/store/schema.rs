//! The database file itself: the pragmas that make a commit durable, the tables and indexes, the integrity check
//! that runs before anything writes, and the recovery of tasks a crash left running. Runs only while the store
//! opens, before the writer thread exists.

use super::StoreError;
use super::sql::{self, HANDED_BACK, QUEUED, RUNNING};
use crate::limits::{SQLITE_BUSY_TIMEOUT, WAL_BACKSTOP_PAGES, WAL_KEEP_BYTES};
use crate::task::{Counts, TaskResult};
use endpoint_wire::Status;
use rusqlite::{Connection, TransactionBehavior, params};
use std::path::Path;

/// What opening the store found left over from the previous run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Tasks that were running when the agent died, queued again.
    pub requeued: u64,
    /// Tasks that were running when the agent died `max_attempts` times: failed, not run again.
    pub given_up: u64,
}

/// A damaged file (truncated, overwritten) must stop the start with its name, not fail later in the middle of
/// serving, and must not be changed. So the check runs on a read-only connection before any read-write one
/// exists: closing a read-write connection would checkpoint the WAL into the damaged file. Only damage is
/// reported here; any other trouble opening the file is left to the real open, which says what it is.
pub(super) fn check_integrity(path: &Path) -> Result<(), StoreError> {
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

pub(super) fn open_db(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;

    // WAL lets `endpoint-agent status` read while the agent writes; FULL makes every commit durable
    // before it returns, which is what an ack to the broker promises.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Checkpoints run on the checkpointer thread, off the commit path; the writer's own is only a backstop.
    conn.pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES)?;
    conn.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)?;
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
    // Protocol 3: the service a result goes to. Databases of earlier agents get the column (NULL: the shared
    // queue, which is where their results went).
    // Hand-back: a task's headers as they arrived. Earlier databases get the column (NULL: none kept).
    for (table, column, kind) in [
        ("tasks", "reply_to", "TEXT"),
        ("results", "reply_to", "TEXT"),
        ("tasks", "headers", "BLOB"),
    ] {
        let has: bool = conn.query_row(
            &format!(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('{table}') WHERE name = '{column}'"
            ),
            [],
            |r| r.get(0),
        )?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(conn)
}

/// Tasks found `running` were interrupted by a crash or a kill: run them again, unless that already happened
/// `max_attempts` times, in which case they are poison and get a `failed` result.
pub(super) fn recover(conn: &mut Connection, max_attempts: u32) -> Result<Recovery, StoreError> {
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
            sql::finish(&tx, &result)?;
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

pub(super) fn read_counts(conn: &Connection) -> rusqlite::Result<Counts> {
    let mut counts = Counts::default();
    let mut stmt = conn.prepare("SELECT state, COUNT(*) FROM tasks GROUP BY state")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
    })?;
    for row in rows {
        match row? {
            (QUEUED, n) => counts.queued = n,
            (RUNNING, n) => counts.running = n,
            (HANDED_BACK, n) => counts.handed_back = n,
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

/// Creates the database file readable by its owner only (0600, whatever the umask) if it does not exist yet:
/// SQLite gives the WAL and shared-memory files the database file's permissions.
pub(super) fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// `PRAGMA wal_checkpoint(TRUNCATE)` on a connection of its own: the WAL folded into the database file and
/// emptied. A checkpoint the checkpointer thread is running meanwhile makes it report busy (SQLite does not wait
/// for another checkpoint), so it tries again for up to [`SQLITE_BUSY_TIMEOUT`].
pub(super) fn checkpoint(path: &Path) -> Result<(), StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
    let deadline = std::time::Instant::now() + SQLITE_BUSY_TIMEOUT;
    loop {
        let busy: bool = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if !busy {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(StoreError::Commit(
                "the WAL could not be checkpointed: another connection kept it busy".into(),
                false,
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
