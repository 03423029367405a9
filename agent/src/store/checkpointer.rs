//! The checkpointer thread: copies committed pages from the WAL into the database file on a connection of its
//! own, so that no commit waits for a checkpoint. SQLite's own automatic checkpoint runs inside the commit that
//! crosses its threshold (on the writer's thread, between the commit and its replies): the commit before an
//! ack then takes as long as copying everything since the last one, which was the agent's latency tail.
//!
//! Paced: at most one `PASSIVE` checkpoint per [`CHECKPOINT_EVERY`], and only after commits. A passive
//! checkpoint never blocks the writer, which may append while it runs; under a load that never pauses, the WAL
//! therefore cannot start over from its beginning (SQLite restarts it only once every frame has been copied),
//! so the writer keeps an automatic checkpoint as a backstop at
//! [`WAL_BACKSTOP_PAGES`](crate::limits::WAL_BACKSTOP_PAGES): by then this thread
//! has copied all but the last interval's frames, so the backstop's stall is short. Durability is unchanged:
//! a commit is durable in the WAL (`synchronous=FULL`) before anything is acked; a checkpoint only moves pages.

use crate::limits::{CHECKPOINT_EVERY, SQLITE_BUSY_TIMEOUT};
use rusqlite::Connection;
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

/// Opens the checkpointer's connection (read-write: a checkpoint writes the database file).
pub(super) fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
    // A checkpoint syncs the WAL before it copies and the database file after: the copy is on disk before the
    // WAL may start over.
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

/// Runs until the writer hangs up: one checkpoint per [`CHECKPOINT_EVERY`] at most, after `commits` said some
/// commit happened (the writer sends without waiting; signals that arrive while one is pending merge).
pub(super) fn run(conn: Connection, commits: mpsc::Receiver<()>) {
    let mut last: Option<Instant> = None;
    let mut failing = false;
    while commits.recv().is_ok() {
        if let Some(wait) = last.and_then(|l| CHECKPOINT_EVERY.checked_sub(l.elapsed())) {
            std::thread::sleep(wait);
        }
        // Commits signalled while it slept are covered by this checkpoint.
        while commits.try_recv().is_ok() {}
        match checkpoint(&conn) {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("database checkpoints work again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(
                    error = %e,
                    "cannot checkpoint the database (tried again after the next commit); meanwhile its WAL file grows until the writer checkpoints it itself"
                );
            }
            Err(e) => tracing::debug!(error = %e, "checkpoint failed again"),
        }
        last = Some(Instant::now());
    }
}

/// One passive checkpoint: copies what it can without waiting for the writer or for readers.
fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    let started = Instant::now();
    let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
    crate::stages::since(crate::stages::Stage::Checkpoint, started);
    done
}
