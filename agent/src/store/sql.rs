//! The statements behind each store command, run inside the writer's transaction: queue what intake accepted,
//! store results, claim tasks (the claim policy decides which, see `crate::claim`), requeue, mark published,
//! prune, record meta facts; and the read of pending results. Each reports how it moved the [`Counts`] as a
//! signed [`Delta`], applied only if its savepoint is released.

use super::StoreError;
use crate::claim::{self, Quarantine, Selection, Suspect, Take, Want};
use crate::meta::MetaKey;
use crate::task::{ClaimedTask, Counts, IngestOutcome, Intake, TaskResult};
use endpoint_wire::{ServiceName, Status, now_ms};
use rusqlite::{Connection, OptionalExtension, params};

/// Task states as stored in `tasks.state`.
pub(super) const QUEUED: i64 = 0;
pub(super) const RUNNING: i64 = 1;
pub(super) const DONE: i64 = 2;
/// Republished to the broker by a hand-back (its payload dropped); never run here. Kept for the counts and
/// removed at the retention; the same id arriving again is queued afresh.
pub(super) const HANDED_BACK: i64 = 3;

/// How one command moved the counts; signed, applied to [`Counts`] once the command's savepoint is released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Delta {
    pub queued: i64,
    pub running: i64,
    pub done: i64,
    pub results_pending: i64,
    pub handed_back: i64,
}

impl Delta {
    /// A task that moved from `running` to `done` with a pending result.
    fn finished(&mut self) {
        self.running -= 1;
        self.done += 1;
        self.results_pending += 1;
    }

    pub(super) fn apply(&self, counts: &mut Counts) {
        counts.queued = counts.queued.saturating_add_signed(self.queued);
        counts.running = counts.running.saturating_add_signed(self.running);
        counts.done = counts.done.saturating_add_signed(self.done);
        counts.results_pending = counts
            .results_pending
            .saturating_add_signed(self.results_pending);
        counts.handed_back = counts.handed_back.saturating_add_signed(self.handed_back);
    }
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Queues new tasks and records those that come with their result (rejected, or run on arrival), leaving ids
/// already on disk alone (counted as duplicates). With `revive` (some tasks were handed back), a task id that
/// was handed back is taken afresh: its hand-back row makes way for the new arrival.
pub(super) fn ingest(
    tx: &rusqlite::Transaction,
    items: &[Intake],
    d: &mut Delta,
    revive: bool,
) -> Result<(IngestOutcome, Vec<Stored>), StoreError> {
    let now = now_ms() as i64;
    let mut out = IngestOutcome::default();
    let mut stored = Vec::new();
    let mut insert = tx.prepare_cached(
        "INSERT INTO tasks (task_id, function, payload, timeout_ms, state, received_at_ms, reply_to, headers)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(task_id) DO NOTHING",
    )?;
    for (index, item) in items.iter().enumerate() {
        if revive {
            let id = match item {
                Intake::Task(t) => &t.task_id,
                Intake::Rejected { task_id, .. } => task_id,
                Intake::Ran { result, .. } => &result.task_id,
            };
            let gone = tx
                .prepare_cached("DELETE FROM tasks WHERE task_id = ?1 AND state = ?2")?
                .execute(params![id, HANDED_BACK])?;
            d.handed_back -= count(gone);
        }
        match item {
            Intake::Task(t) => {
                let timeout = t.timeout_ms.map(|v| v.min(i64::MAX as u64) as i64);
                let reply_to = t.reply_to.as_ref().map(ServiceName::as_str);
                if insert.execute(params![
                    t.task_id, t.function, t.payload, timeout, QUEUED, now, reply_to, t.headers
                ])? == 0
                {
                    out.duplicates += 1;
                } else {
                    out.queued += 1;
                    d.queued += 1;
                }
            }
            Intake::Rejected {
                task_id,
                function,
                reason,
                reply_to,
            } => {
                let result = rejected(task_id, reason);
                match insert_done(tx, &mut insert, function, &result, reply_to, now, d)? {
                    Some(id) => {
                        out.rejected += 1;
                        stored.extend(id.map(|id| stored_at(index, id, reply_to)));
                    }
                    None => out.duplicates += 1,
                }
            }
            Intake::Ran {
                function,
                result,
                reply_to,
            } => match insert_done(tx, &mut insert, function, result, reply_to, now, d)? {
                Some(id) => {
                    out.ran += 1;
                    stored.extend(id.map(|id| stored_at(index, id, reply_to)));
                }
                None => out.duplicates += 1,
            },
        }
    }
    Ok((out, stored))
}

/// A result row a command stored: which of the command's items it came from, its row id, and its service.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Stored {
    pub index: usize,
    pub id: i64,
    pub service: Option<ServiceName>,
}

fn stored_at(index: usize, id: i64, service: &Option<ServiceName>) -> Stored {
    Stored {
        index,
        id,
        service: service.clone(),
    }
}

/// The result a task rejected on intake gets.
pub(super) fn rejected(task_id: &str, reason: &str) -> TaskResult {
    TaskResult {
        task_id: task_id.to_owned(),
        status: Status::Rejected,
        exit_code: None,
        attempts: 0,
        duration_ms: 0,
        body: reason.as_bytes().to_vec(),
    }
}

/// Records a task that arrives with its result: inserted without its payload, then finished. `None` if its id is
/// already on disk (a duplicate: the result on disk, if any, stands and this one is dropped); else the new
/// result's row id (`None` inside if a result row for that id was already there).
fn insert_done(
    tx: &rusqlite::Transaction,
    insert: &mut rusqlite::CachedStatement,
    function: &str,
    result: &TaskResult,
    reply_to: &Option<ServiceName>,
    now: i64,
    d: &mut Delta,
) -> Result<Option<Option<i64>>, StoreError> {
    let empty: &[u8] = &[];
    if insert.execute(params![
        result.task_id,
        function,
        empty,
        None::<i64>,
        RUNNING,
        now,
        reply_to.as_ref().map(ServiceName::as_str),
        None::<Vec<u8>>
    ])? == 0
    {
        return Ok(None);
    }
    let id = finish(tx, result)?.and_then(|f| f.id);
    d.done += 1;
    d.results_pending += 1;
    Ok(Some(id))
}

/// A task [`finish`] marked done: its result's row id (`None` if a result for the id was already stored) and
/// the service the result goes to.
pub(super) struct Finished {
    pub id: Option<i64>,
    pub service: Option<ServiceName>,
}

/// Marks the task done (dropping its payload) and stores its result. `None` if the task was not running
/// (already finished: the first result wins).
pub(super) fn finish(
    tx: &rusqlite::Transaction,
    r: &TaskResult,
) -> Result<Option<Finished>, StoreError> {
    let now = now_ms() as i64;
    let reply_to: Option<Option<String>> = tx
        .prepare_cached(
            "UPDATE tasks SET state = ?1, payload = x'', done_at_ms = ?2, suspect = 0 WHERE task_id = ?3 AND state = ?4
             RETURNING reply_to",
        )?
        .query_row(params![DONE, now, r.task_id, RUNNING], |row| row.get(0))
        .optional()?;
    let Some(reply_to) = reply_to else {
        return Ok(None);
    };
    let inserted = tx
        .prepare_cached(
            "INSERT INTO results (task_id, status, exit_code, attempts, duration_ms, body, finished_at_ms, reply_to)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(task_id) DO NOTHING",
        )?
        .execute(params![
            r.task_id,
            r.status.as_str(),
            r.exit_code,
            r.attempts,
            r.duration_ms.min(i64::MAX as u64) as i64,
            r.body,
            now,
            reply_to
        ])?;
    let id = (inserted > 0).then(|| tx.last_insert_rowid());
    // Checked on intake; a name that no longer parses goes to the shared queue (as `pending` reads it).
    Ok(Some(Finished {
        id,
        service: reply_to.and_then(|s| ServiceName::new(s).ok()),
    }))
}

/// Stores finished results (each task marked done with its result); returns the result rows stored.
pub(super) fn finish_all(
    tx: &rusqlite::Transaction,
    results: &[TaskResult],
    d: &mut Delta,
) -> Result<Vec<Stored>, StoreError> {
    let mut stored = Vec::new();
    for (index, result) in results.iter().enumerate() {
        if let Some(Finished { id, service }) = finish(tx, result)? {
            d.finished();
            stored.extend(id.map(|id| Stored { index, id, service }));
        }
    }
    Ok(stored)
}

/// Puts running tasks back in the queue without counting their attempt (shutdown, or claimed and not run).
pub(super) fn requeue(
    tx: &rusqlite::Transaction,
    task_ids: Vec<String>,
    d: &mut Delta,
) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(
        "UPDATE tasks SET state = ?1, attempts = MAX(attempts - 1, 0) WHERE task_id = ?2 AND state = ?3",
    )?;
    for task_id in task_ids {
        if stmt.execute(params![QUEUED, task_id, RUNNING])? > 0 {
            d.running -= 1;
            d.queued += 1;
        }
    }
    Ok(())
}

/// Puts running tasks back in the queue keeping their attempt counted (their run was lost with its worker).
pub(super) fn retry(
    tx: &rusqlite::Transaction,
    task_ids: Vec<String>,
    d: &mut Delta,
) -> Result<(), StoreError> {
    let mut stmt =
        tx.prepare_cached("UPDATE tasks SET state = ?1 WHERE task_id = ?2 AND state = ?3")?;
    for task_id in task_ids {
        if stmt.execute(params![QUEUED, task_id, RUNNING])? > 0 {
            d.running -= 1;
            d.queued += 1;
        }
    }
    Ok(())
}

/// Marks results (by row id) published.
pub(super) fn mark_published(
    tx: &rusqlite::Transaction,
    ids: Vec<i64>,
    d: &mut Delta,
) -> Result<(), StoreError> {
    let now = now_ms() as i64;
    let mut stmt = tx.prepare_cached(
        "UPDATE results SET published_at_ms = ?1 WHERE seq = ?2 AND published_at_ms IS NULL",
    )?;
    for id in ids {
        if stmt.execute(params![now, id])? > 0 {
            d.results_pending -= 1;
        }
    }
    Ok(())
}

/// Deletes results published before `before_ms` and their tasks; returns how many results.
pub(super) fn prune(
    tx: &rusqlite::Transaction,
    before_ms: u64,
    d: &mut Delta,
) -> Result<u64, StoreError> {
    let before = i64::try_from(before_ms).unwrap_or(i64::MAX);
    let tasks = tx.execute(
        "DELETE FROM tasks WHERE task_id IN (SELECT task_id FROM results WHERE published_at_ms < ?1)",
        [before],
    )?;
    d.done -= count(tasks);
    let n = tx.execute("DELETE FROM results WHERE published_at_ms < ?1", [before])?;
    let handed = tx.execute(
        "DELETE FROM tasks WHERE state = ?1 AND done_at_ms < ?2",
        params![HANDED_BACK, before],
    )?;
    d.handed_back -= count(handed);
    Ok(n as u64)
}

/// Marks queued tasks handed back (after the broker confirmed their republication): never run here, payload
/// dropped. Tasks no longer queued are left alone.
pub(super) fn mark_handed_back(
    tx: &rusqlite::Transaction,
    task_ids: Vec<String>,
    d: &mut Delta,
) -> Result<(), StoreError> {
    let now = now_ms() as i64;
    let mut stmt = tx.prepare_cached(
        "UPDATE tasks SET state = ?1, payload = x'', done_at_ms = ?2 WHERE task_id = ?3 AND state = ?4",
    )?;
    for id in task_ids {
        // Queued, or left running by a stop that killed it after the grace period (no slot runs during a
        // hand-back).
        let n = stmt.execute(params![HANDED_BACK, now, id, QUEUED])?;
        d.queued -= count(n);
        let m = if n == 0 {
            stmt.execute(params![HANDED_BACK, now, id, RUNNING])?
        } else {
            0
        };
        d.running -= count(m);
        d.handed_back += count(n + m);
    }
    Ok(())
}

/// A queued task as it came, for a hand-back.
#[derive(Clone, Debug)]
pub struct QueuedTask {
    pub seq: i64,
    pub task_id: String,
    pub function: String,
    pub payload: Vec<u8>,
    pub reply_to: Option<String>,
    /// The encoded header entries as they arrived (absent for tasks stored before headers were kept, and for
    /// those with none); `timeout_ms` stands in for the timeout header then.
    pub headers: Option<Vec<u8>>,
    pub timeout_ms: Option<i64>,
}

/// Up to `limit` tasks without a result past row `after`, oldest first: queued ones, and running ones (left
/// so by a stop that killed them; read only while no slot runs).
pub(super) fn queued(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> Result<Vec<QueuedTask>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, task_id, function, payload, reply_to, headers, timeout_ms FROM tasks
         WHERE state IN (?1, ?4) AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = stmt.query_map(
        params![QUEUED, after, limit.min(i64::MAX as usize) as i64, RUNNING],
        |r| {
            Ok(QueuedTask {
                seq: r.get(0)?,
                task_id: r.get(1)?,
                function: r.get(2)?,
                payload: r.get(3)?,
                reply_to: r.get(4)?,
                headers: r.get(5)?,
                timeout_ms: r.get(6)?,
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Records a fact for `endpoint-agent status`.
pub(super) fn set_meta(
    tx: &rusqlite::Transaction,
    key: MetaKey,
    value: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key.as_str(), value],
    )?;
    Ok(())
}

/// Claims queued tasks as the claim policy decides (see `crate::claim`), oldest first, counting an attempt
/// for each.
pub(super) fn claim(
    tx: &rusqlite::Transaction,
    want: &Want,
    d: &mut Delta,
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
    let suspect = suspect.map(|(seq, state)| {
        if state == RUNNING {
            Suspect::Running
        } else {
            Suspect::Queued(seq)
        }
    });
    let mut busy_error = None;
    let rule = claim::quarantine(suspect, || {
        tx.prepare_cached("SELECT EXISTS(SELECT 1 FROM tasks WHERE state = ?1)")
            .and_then(|mut s| s.query_row([RUNNING], |r| r.get(0)))
            .unwrap_or_else(|e| {
                busy_error = Some(e);
                true
            })
    });
    if let Some(e) = busy_error {
        return Err(e.into());
    }
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
    match rule {
        Quarantine::Wait => return Ok(Vec::new()),
        Quarantine::Alone(seq) => rows.extend(
            tx.prepare_cached(
                "SELECT seq, task_id, function, payload, timeout_ms, attempts FROM tasks WHERE seq = ?1",
            )?
            .query_row([seq], read)
            .optional()?,
        ),
        Quarantine::Off => {
            let mut stmt = tx.prepare_cached(
                "SELECT seq, task_id, function, payload, timeout_ms, attempts FROM tasks
                 WHERE state = ?1 ORDER BY seq LIMIT ?2",
            )?;
            let mut selection = Selection::new(want);
            for row in stmt.query_map(params![QUEUED, count(want.max)], read)? {
                let row = row?;
                match selection.offer(&row.1.function, row.1.payload.len()) {
                    Take::AndMore => rows.push(row),
                    Take::AndStop => {
                        rows.push(row);
                        break;
                    }
                    Take::Stop => break,
                }
            }
        }
    }
    let mut mark =
        tx.prepare_cached("UPDATE tasks SET state = ?1, attempts = attempts + 1 WHERE seq = ?2")?;
    for (seq, _) in &rows {
        mark.execute(params![RUNNING, seq])?;
    }
    d.queued -= count(rows.len());
    d.running += count(rows.len());
    Ok(rows.into_iter().map(|(_, t)| t).collect())
}

/// Results not yet published past row `after`, oldest first: row id, result, and the service it goes to.
pub(super) fn pending(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> Result<Vec<(i64, TaskResult, Option<ServiceName>)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, task_id, status, exit_code, attempts, duration_ms, body, reply_to FROM results
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
            // Checked on intake; a name that no longer parses goes to the shared queue.
            r.get::<_, Option<String>>(7)?
                .and_then(|s| ServiceName::new(s).ok()),
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
