//! The writer thread: the only read-write connection. It takes every command waiting, runs them all in one
//! transaction (each under its own savepoint, so one failure does not undo the others) and commits once: group
//! commit, so the cost of an fsync is shared by everything that arrived while the previous one ran. A reply is
//! sent only after the commit. Idle slots park their claims here; a parked claim is served in the first commit
//! that makes a task claimable (typically the one that queues new tasks). Checkpoints are not its work: the
//! checkpointer thread (`checkpointer`) runs them beside it, so that a commit is only its own statements and
//! its fsync.

use super::handoff::{Committed, Handoff};
use super::sql::{self, Delta, Stored};
use super::{GiveBack, NotStored, Reply, StoreError};
use crate::claim::Want;
use crate::limits::{MARK_DELAY, WRITER_MAX_BATCH};
use crate::meta::MetaKey;
use crate::task::{ClaimedTask, Counts, IngestOutcome, Intake, TaskResult};
use rusqlite::{Connection, TransactionBehavior};
use std::collections::VecDeque;
use std::sync::mpsc;
use tokio::sync::{oneshot, watch};

/// What the store handle sends the writer.
pub(super) enum Command {
    /// Run in the next transaction.
    Run(Op),
    /// Claim up to `want` tasks as soon as one can be claimed: parked in the writer until a later batch (an
    /// ingest, a requeue, the end of a quarantine) makes one claimable, then claimed in that batch.
    Park(Want, Reply<Vec<ClaimedTask>>),
}

/// A command that runs in the next transaction.
pub(super) enum Op {
    /// Queues new tasks, records those that come with a result; the items come back if they are not committed.
    Ingest(Vec<Intake>, GiveBack<IngestOutcome, Vec<Intake>>),
    /// Stores finished results and claims up to `want` queued tasks, in one transaction; the results come back
    /// if they are not committed.
    FinishAndClaim(
        Vec<TaskResult>,
        Want,
        GiveBack<Vec<ClaimedTask>, Vec<TaskResult>>,
    ),
    /// Puts tasks interrupted by shutdown (or claimed but not started) back in the queue, not counting the run
    /// as an attempt.
    Requeue(Vec<String>, Reply<()>),
    /// Puts tasks whose run was lost (a pool worker died under them) back in the queue, the attempt counted.
    Retry(Vec<String>, Reply<()>),
    MarkPublished(Vec<i64>, Reply<()>),
    /// Marks queued tasks handed back to the broker.
    MarkHandedBack(Vec<String>, Reply<()>),
    Prune(u64, Reply<u64>),
    SetMeta(MetaKey, String, Reply<()>),
}

/// A parked claim: how many tasks it takes, and where they go.
type Parked = (Want, Reply<Vec<ClaimedTask>>);

/// Serves commands until every [`super::Store`] handle is gone. After each commit it hands the committed
/// results to the publisher (`handoff`) and tells the checkpointer (`commits`, never waiting: a signal already
/// pending covers this commit too).
pub(super) fn run(
    mut conn: Connection,
    rx: mpsc::Receiver<Command>,
    counts: watch::Sender<Counts>,
    handoff: &Handoff,
    commits: mpsc::SyncSender<()>,
) {
    let mut parked: VecDeque<Parked> = VecDeque::new();
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::new();
        take(first, &mut batch, &mut parked);
        while batch.len() < WRITER_MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => take(cmd, &mut batch, &mut parked),
                Err(_) => break,
            }
        }
        // A batch of nothing but "published" marks is not urgent (a mark lost in a crash only means a result
        // is published twice): it waits a little for a command that needs a commit anyway and rides along.
        while !batch.is_empty()
            && batch.len() < WRITER_MAX_BATCH
            && batch.iter().all(|op| matches!(op, Op::MarkPublished(..)))
        {
            match rx.recv_timeout(MARK_DELAY) {
                Ok(cmd) => take(cmd, &mut batch, &mut parked),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let mut orphans = run_batch(&mut conn, batch, &mut parked, &counts, handoff);
        crate::stages::since(crate::stages::Stage::WriterBatch, started);
        let _ = commits.try_send(());
        // Tasks claimed for a caller that went away meanwhile: back to the queue, attempt not counted.
        while !orphans.is_empty() {
            let (reply, _rx) = oneshot::channel();
            orphans = run_batch(
                &mut conn,
                vec![Op::Requeue(orphans, reply)],
                &mut parked,
                &counts,
                handoff,
            );
        }
    }
}

/// Sorts a command into this batch or the parked claims (served, in order, after the batch's own commands).
fn take(cmd: Command, batch: &mut Vec<Op>, parked: &mut VecDeque<Parked>) {
    match cmd {
        Command::Run(op) => batch.push(op),
        Command::Park(want, reply) => parked.push_back((want, reply)),
    }
}

/// A reply held back until the batch's commit, then sent with the command's own result or, if the commit failed,
/// the commit's error. After a commit it first hands the results the command stored to the publisher
/// (`handoff`), so they are there before its caller hears of the commit. Returns the ids of tasks it claimed for
/// a caller that is gone (they must be requeued).
type Deferred = Box<dyn FnOnce(Option<&StoreError>, &Handoff) -> Vec<String> + Send>;

/// A command's result as its caller gets it: the commit's error, if the commit failed, wins.
fn settled<T>(
    result: Result<T, StoreError>,
    commit_error: Option<&StoreError>,
) -> Result<T, StoreError> {
    match commit_error {
        Some(e) => Err(copy_error(e)),
        None => result,
    }
}

fn defer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Deferred {
    Box::new(move |commit_error: Option<&StoreError>, _: &Handoff| {
        let _ = reply.send(settled(result, commit_error));
        Vec::new()
    })
}

/// Sends claimed tasks; if the caller dropped its end, returns their ids to hand them back.
fn send_claim<E>(
    reply: oneshot::Sender<Result<Vec<ClaimedTask>, E>>,
    result: Result<Vec<ClaimedTask>, E>,
) -> Vec<String> {
    match reply.send(result) {
        Err(Ok(tasks)) => tasks.into_iter().map(|t| t.task_id).collect(),
        _ => Vec::new(),
    }
}

/// Like [`defer`] for a parked claim.
fn defer_claim(
    reply: Reply<Vec<ClaimedTask>>,
    result: Result<Vec<ClaimedTask>, StoreError>,
) -> Deferred {
    Box::new(move |commit_error: Option<&StoreError>, _: &Handoff| {
        send_claim(reply, settled(result, commit_error))
    })
}

/// The deferred reply of a command that stored results (`items`, each turned into its result by `result_of`):
/// after the commit the stored ones move to the publisher and `value` goes to the caller; else `items` go back.
fn defer_stored<T: Send + 'static, I: Send + 'static>(
    reply: GiveBack<T, Vec<I>>,
    items: Vec<I>,
    result: Result<(T, Vec<Stored>), StoreError>,
    result_of: fn(I) -> Option<TaskResult>,
    send: Answer<T, Vec<I>>,
) -> Deferred {
    Box::new(
        move |commit_error: Option<&StoreError>, handoff: &Handoff| {
            let error = match settled(result, commit_error) {
                Ok((value, stored)) => {
                    let mut items: Vec<Option<I>> = items.into_iter().map(Some).collect();
                    let mut committed = Vec::with_capacity(stored.len());
                    for Stored { index, id, service } in stored {
                        if let Some(result) = items
                            .get_mut(index)
                            .and_then(Option::take)
                            .and_then(result_of)
                        {
                            committed.push(Committed {
                                id,
                                result,
                                service,
                            });
                        }
                    }
                    handoff.push(committed);
                    return send(reply, Ok(value));
                }
                Err(e) => e,
            };
            send(
                reply,
                Err(NotStored {
                    error,
                    items: Some(items),
                }),
            )
        },
    )
}

/// How a command that carries items is answered (returns the ids of claimed tasks whose caller is gone).
type Answer<T, I> = fn(GiveBack<T, I>, Result<T, NotStored<I>>) -> Vec<String>;

/// The result an intake item came with (rejected, or run on arrival).
fn intake_result(item: Intake) -> Option<TaskResult> {
    match item {
        Intake::Task(_) => None,
        Intake::Rejected {
            task_id, reason, ..
        } => Some(sql::rejected(&task_id, &reason)),
        Intake::Ran { result, .. } => Some(result),
    }
}

fn send_plain<T, I>(reply: GiveBack<T, I>, result: Result<T, NotStored<I>>) -> Vec<String> {
    let _ = reply.send(result);
    Vec::new()
}

fn copy_error(e: &StoreError) -> StoreError {
    StoreError::Commit(e.to_string(), e.is_disk_full())
}

/// Runs one batch in one transaction and commits it, serving parked claims last; then hands the committed
/// results to the publisher and replies. Returns tasks to requeue (see [`Deferred`]). Every command gets its
/// reply, the commit's error if it failed, so that what a command carried always goes back to its caller.
fn run_batch(
    conn: &mut Connection,
    batch: Vec<Op>,
    parked: &mut VecDeque<Parked>,
    counts_tx: &watch::Sender<Counts>,
    handoff: &Handoff,
) -> Vec<String> {
    let mut replies: Vec<Deferred> = Vec::with_capacity(batch.len());
    let mut counts = *counts_tx.borrow();
    let mut ops = batch.into_iter();
    let outcome = (|| -> Result<(), StoreError> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for op in ops.by_ref() {
            let mut delta = Delta::default();
            let savepoint = tx
                .prepare_cached("SAVEPOINT cmd")
                .and_then(|mut s| s.execute([]));
            if let Err(e) = savepoint {
                replies.push(fail(op));
                return Err(e.into());
            }
            let (reply, ok) = execute(&tx, op, &mut delta, counts.handed_back > 0);
            replies.push(reply);
            if ok {
                tx.prepare_cached("RELEASE cmd")?.execute([])?;
                delta.apply(&mut counts);
            } else {
                tx.execute_batch("ROLLBACK TO cmd; RELEASE cmd")?;
            }
        }
        // Parked claims, oldest first, as long as tasks can be claimed.
        while let Some((want, reply)) = parked.pop_front() {
            if reply.is_closed() {
                continue;
            }
            tx.prepare_cached("SAVEPOINT cmd")?.execute([])?;
            let mut delta = Delta::default();
            match sql::claim(&tx, &want, &mut delta) {
                Ok(tasks) if tasks.is_empty() => {
                    tx.prepare_cached("RELEASE cmd")?.execute([])?;
                    parked.push_front((want, reply));
                    break;
                }
                Ok(tasks) => {
                    replies.push(defer_claim(reply, Ok(tasks)));
                    tx.prepare_cached("RELEASE cmd")?.execute([])?;
                    delta.apply(&mut counts);
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
    // Commands the batch never reached (it broke off) fail with it.
    replies.extend(ops.map(fail));
    match outcome {
        Ok(()) => {
            counts_tx.send_if_modified(|c| {
                let changed = *c != counts;
                *c = counts;
                changed
            });
            replies.into_iter().flat_map(|r| r(None, handoff)).collect()
        }
        Err(e) => {
            tracing::error!(error = %e, "store commit failed; nothing in this batch was kept");
            replies.into_iter().for_each(|r| {
                r(Some(&e), handoff);
            });
            // Re-read the counts since the transaction rolled back.
            if let Ok(c) = super::schema::read_counts(conn) {
                counts_tx.send_replace(c);
            }
            Vec::new()
        }
    }
}

/// The reply of a command the batch never ran: it gets the commit's error (which always wins, see [`Deferred`];
/// `Closed` only stands in for it until then).
fn fail(op: Op) -> Deferred {
    fn never<T>() -> Result<T, StoreError> {
        Err(StoreError::Closed)
    }
    match op {
        Op::Ingest(items, reply) => defer_stored(reply, items, never(), intake_result, send_plain),
        Op::FinishAndClaim(results, _, reply) => {
            defer_stored(reply, results, never(), Some, send_claim)
        }
        Op::Requeue(_, reply)
        | Op::Retry(_, reply)
        | Op::MarkPublished(_, reply)
        | Op::MarkHandedBack(_, reply)
        | Op::SetMeta(_, _, reply) => defer(reply, never()),
        Op::Prune(_, reply) => defer(reply, never()),
    }
}

/// Runs one command; returns its deferred reply and whether it succeeded (else its savepoint is rolled back).
fn execute(tx: &rusqlite::Transaction, op: Op, d: &mut Delta, revive: bool) -> (Deferred, bool) {
    fn done<T: Send + 'static>(reply: Reply<T>, r: Result<T, StoreError>) -> (Deferred, bool) {
        let ok = r.is_ok();
        (defer(reply, r), ok)
    }
    match op {
        Op::Ingest(items, reply) => {
            let r = sql::ingest(tx, &items, d, revive);
            let ok = r.is_ok();
            (defer_stored(reply, items, r, intake_result, send_plain), ok)
        }
        Op::MarkHandedBack(ids, reply) => done(reply, sql::mark_handed_back(tx, ids, d)),
        Op::FinishAndClaim(results, want, reply) => {
            let r = sql::finish_all(tx, &results, d)
                .and_then(|stored| Ok((sql::claim(tx, &want, d)?, stored)));
            let ok = r.is_ok();
            (defer_stored(reply, results, r, Some, send_claim), ok)
        }
        Op::Requeue(task_ids, reply) => done(reply, sql::requeue(tx, task_ids, d)),
        Op::Retry(task_ids, reply) => done(reply, sql::retry(tx, task_ids, d)),
        Op::MarkPublished(ids, reply) => done(reply, sql::mark_published(tx, ids, d)),
        Op::Prune(before, reply) => done(reply, sql::prune(tx, before, d)),
        Op::SetMeta(key, value, reply) => done(reply, sql::set_meta(tx, key, &value)),
    }
}
