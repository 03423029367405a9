//! Read-only connections to the database: the publisher's reads of pending results (they wait neither for the
//! writer thread nor for its commits) and `endpoint-agent status` (safe while an agent runs). See only
//! committed rows. Blocking: call them from a blocking thread.

use super::schema::read_counts;
use super::sql::QueuedTask;
use super::{DB_FILE, StoreError, sql};
use crate::limits::SQLITE_BUSY_TIMEOUT;
use crate::task::{Counts, TaskResult};
use endpoint_wire::ServiceName;
use rusqlite::Connection;
use std::path::Path;

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
        conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
        Ok(Reader { conn })
    }

    /// Up to `limit` unpublished results with a row id above `after`, oldest first, each with its row id for
    /// [`super::Store::mark_published`]. Row ids only grow, so a caller can page with the last id it saw. Sees only
    /// committed rows and waits for no commit.
    pub fn pending_results(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, TaskResult, Option<ServiceName>)>, StoreError> {
        sql::pending(&self.conn, after, limit)
    }

    /// Up to `limit` queued tasks with a row id above `after`, oldest first, as they arrived (for a hand-back).
    pub fn queued_tasks(&self, after: i64, limit: usize) -> Result<Vec<QueuedTask>, StoreError> {
        sql::queued(&self.conn, after, limit)
    }

    /// The latest `limit` results that did not succeed (`failed`, `timeout`, `rejected`), newest first, among
    /// the latest `scan` results (results have no index by status: the scan is bounded instead), each with
    /// the start of its body. For the status page.
    pub fn recent_failures(
        &self,
        limit: usize,
        scan: usize,
    ) -> Result<Vec<RecentFailure>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT r.task_id, COALESCE(t.function, ''), r.status, r.finished_at_ms, substr(r.body, 1, ?3)
             FROM results r LEFT JOIN tasks t ON t.task_id = r.task_id
             WHERE r.seq > (SELECT COALESCE(MAX(seq), 0) FROM results) - ?2
               AND r.status IN ('failed', 'timeout', 'rejected')
             ORDER BY r.seq DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(
            rusqlite::params![
                limit.min(i64::MAX as usize) as i64,
                scan.min(i64::MAX as usize) as i64,
                FAILURE_TEXT_BYTES
            ],
            |r| {
                Ok(RecentFailure {
                    task_id: r.get(0)?,
                    function: r.get(1)?,
                    status: r.get(2)?,
                    finished_at_ms: r.get::<_, i64>(3)?.max(0) as u64,
                    text: String::from_utf8_lossy(&r.get::<_, Vec<u8>>(4)?).into_owned(),
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The facts the agent recorded for status (`meta` rows: key, value).
    pub fn meta(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, value FROM meta ORDER BY key")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// How much of a failed result's body [`Reader::recent_failures`] returns.
const FAILURE_TEXT_BYTES: i64 = 200;

/// A result that did not succeed, as [`Reader::recent_failures`] reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct RecentFailure {
    pub task_id: String,
    /// Empty if its task row is gone.
    pub function: String,
    /// `failed`, `timeout` or `rejected`.
    pub status: String,
    pub finished_at_ms: u64,
    /// The start of the result's body (the error), lossily decoded.
    pub text: String,
}

/// Counts read by a separate, read-only connection (for `endpoint-agent status` while an agent may run).
pub fn read_status(dir: &Path) -> Result<(Counts, Vec<(String, String)>), StoreError> {
    let path = dir.join(DB_FILE);
    let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| StoreError::Open(path.clone(), e))?;
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
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
