//! Read-only connections to the database: the publisher's reads of pending results (they wait neither for the
//! writer thread nor for its commits) and `endpoint-agent status` (safe while an agent runs). See only
//! committed rows. Blocking: call them from a blocking thread.

use super::schema::read_counts;
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
