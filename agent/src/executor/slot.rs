//! One executor slot: claims tasks from the store, runs them one by one, stores their results and claims the
//! next tasks in the same commit, until the agent stops it. How many tasks one claim takes is the claim
//! policy's decision (`crate::claim`), fed with the run times the slots observe.

use super::{Outcome, Places, execute};
use crate::claim::{RunTimes, Want};
use crate::config::Config;
use crate::limits::{FLUSH_AFTER, FLUSH_BYTES, STORE_RETRY_MAX, STORE_RETRY_MIN};
use crate::retry::{self, Backoff};
use crate::store::Store;
use crate::task::{ClaimedTask, TaskResult};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// One executor slot: claim tasks, run them one by one, store their results (and claim the next tasks in the
/// same commit), until `stop` (no new tasks; the running one finishes, claimed ones not started go back) or
/// `kill` (the running one is killed and requeued).
///
/// Short tasks are claimed several at a time (see `crate::claim`), so that one commit stores many results
/// and claims many tasks; every claimed task's attempt is committed before the first of them runs, and every
/// result is committed before the publisher can see it. An idle slot parks its claim in the store, which
/// claims for it in the commit that queues new tasks.
pub(crate) async fn worker(
    config: Arc<Config>,
    store: Store,
    run_times: Arc<RunTimes>,
    places: Arc<Places>,
    stop: CancellationToken,
    kill: CancellationToken,
) {
    let mut claimed: VecDeque<ClaimedTask> = VecDeque::new();
    // Finished, not yet stored; `unsaved_since` is when the oldest of them finished.
    let mut unsaved: Vec<TaskResult> = Vec::new();
    let mut unsaved_since: Option<Instant> = None;
    let mut retry = Backoff::new(STORE_RETRY_MIN, STORE_RETRY_MAX);
    loop {
        let stopping = stop.is_cancelled();
        let unsaved_bytes: usize = unsaved.iter().map(|r| r.body.len()).sum();
        let flush_due = unsaved_since.is_some_and(|t| t.elapsed() >= FLUSH_AFTER)
            || unsaved_bytes >= FLUSH_BYTES;
        if claimed.is_empty() || flush_due || stopping {
            let want: Want = if claimed.is_empty() && !stopping {
                run_times.want()
            } else {
                0.into()
            };
            if !unsaved.is_empty() || want.max > 0 {
                // A full disk or similar: the results stay in memory and the commit is tried again; they are
                // never dropped. Given up only on `kill`: those tasks stay `running` on disk and run again at
                // the next start.
                // A failed commit gives the results back, so a retry copies nothing.
                let stored = retry::until_stopped_with(
                    "cannot store results or claim tasks (results kept in memory)",
                    &mut retry,
                    &kill,
                    std::mem::take(&mut unsaved),
                    |results| async {
                        store
                            .try_finish_and_claim(results, want.clone())
                            .await
                            .map_err(|n| (n.error, n.items))
                    },
                )
                .await;
                let Some(tasks) = stored else { return };
                unsaved_since = None;
                claimed.extend(tasks);
            }
            if stopping {
                requeue(&store, claimed.drain(..).map(|t| t.task_id).collect()).await;
                return;
            }
            if claimed.is_empty() {
                // Nothing queued: park a claim in the store until tasks arrive (nothing unsaved here).
                tokio::select! {
                    _ = stop.cancelled() => {}
                    got = retry::until_stopped(
                        "cannot claim tasks",
                        &mut retry,
                        &kill,
                        || store.wait_and_claim(want.clone()),
                    ) => match got {
                        Some(tasks) => claimed.extend(tasks),
                        None => return,
                    },
                }
                continue;
            }
        }
        let Some(task) = claimed.pop_front() else {
            continue;
        };
        let started = Instant::now();
        let _busy = crate::http::metrics::task_started(&config, &task.function);
        tracing::debug!(task_id = %task.task_id, function = %task.function, attempt = task.attempts, "running");
        match execute(&config, &places, &task, &stop, &kill).await {
            Outcome::Interrupted => {
                // Store what finished before, then hand back the interrupted task and those never started.
                if !unsaved.is_empty()
                    && let Err(e) = store
                        .finish_and_claim(std::mem::take(&mut unsaved), 0)
                        .await
                {
                    // Those tasks stay `running` on disk and run again at the next start.
                    tracing::warn!(error = %e, "cannot store finished results");
                }
                let ids = std::iter::once(task.task_id)
                    .chain(claimed.drain(..).map(|t| t.task_id))
                    .collect();
                requeue(&store, ids).await;
                return;
            }
            Outcome::Retry { why } if task.attempts < config.max_attempts => {
                tracing::warn!(task_id = %task.task_id, attempt = task.attempts, reason = %why, "the task's run was lost; it runs again");
                if let Err(e) = store.retry(vec![task.task_id]).await {
                    // It stays `running` on disk and runs again at the next start.
                    tracing::warn!(error = %e, "cannot put the task back in the queue");
                }
            }
            Outcome::Retry { why } => {
                crate::http::metrics::task_finished(
                    &config,
                    &task.function,
                    endpoint_wire::Status::Failed,
                    started.elapsed(),
                );
                unsaved_since.get_or_insert_with(Instant::now);
                unsaved.push(TaskResult {
                    task_id: task.task_id,
                    status: endpoint_wire::Status::Failed,
                    exit_code: None,
                    attempts: task.attempts,
                    duration_ms: started.elapsed().as_millis() as u64,
                    body: format!(
                        "{why}\nnot run again: it has had max_attempts = {} attempts",
                        config.max_attempts
                    )
                    .into_bytes(),
                });
            }
            Outcome::Finished {
                status,
                exit_code,
                body,
            } => {
                let took = started.elapsed();
                crate::http::metrics::task_finished(&config, &task.function, status, took);
                tracing::debug!(task_id = %task.task_id, %status, "finished");
                run_times.ran(&task.function, took);
                unsaved_since.get_or_insert_with(Instant::now);
                unsaved.push(TaskResult {
                    task_id: task.task_id,
                    status,
                    exit_code,
                    attempts: task.attempts,
                    duration_ms: took.as_millis() as u64,
                    body,
                });
            }
        }
    }
}

async fn requeue(store: &Store, task_ids: Vec<String>) {
    if let Err(e) = store.requeue(task_ids).await {
        // They stay `running` on disk and are rerun at the next start (counted as an attempt).
        tracing::warn!(error = %e, "cannot requeue interrupted tasks");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{Intake, NewTask};
    use crate::testing::config;
    use std::time::Duration;

    #[tokio::test]
    async fn slots_run_batches_take_new_work_and_give_back_on_stop() {
        let dir = crate::testing::TestDir::new("exec-slots");
        let (store, _) = Store::open(&dir, 3).unwrap();
        let tasks = |from: usize, n: usize, function: &str, payload: &str| -> Vec<Intake> {
            (from..from + n)
                .map(|i| {
                    Intake::Task(NewTask {
                        headers: None,
                        task_id: format!("t{i}"),
                        function: function.into(),
                        payload: payload.as_bytes().to_vec(),
                        timeout_ms: None,
                        reply_to: None,
                    })
                })
                .collect()
        };
        store.ingest(tasks(0, 300, "echo", "x")).await.unwrap();
        let config = Arc::new(config(""));
        let run_times = Arc::new(RunTimes::default());
        let places = Arc::new(Places {
            sandbox: Arc::new(crate::executor::Sandbox::prepare(&dir).unwrap()),
            pools: None,
        });
        let (stop, kill) = (CancellationToken::new(), CancellationToken::new());
        let slots: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(worker(
                    config.clone(),
                    store.clone(),
                    run_times.clone(),
                    places.clone(),
                    stop.clone(),
                    kill.clone(),
                ))
            })
            .collect();
        let mut counts = store.counts();
        let mut wait_done = async |n: u64| {
            while counts.borrow_and_update().done < n {
                counts.changed().await.unwrap();
            }
        };
        wait_done(300).await;
        // Idle slots are parked in the store: the commit that queues new tasks hands them over.
        store.ingest(tasks(300, 5, "echo", "y")).await.unwrap();
        wait_done(305).await;
        // Slow tasks claimed as a batch when the stop comes: the one running finishes, those not started go
        // back to the queue without counting an attempt, nothing is left running.
        store.ingest(tasks(305, 3, "sleep", "200")).await.unwrap();
        while store.counts().borrow().running == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // most likely one has started by now
        stop.cancel();
        for slot in slots {
            slot.await.unwrap();
        }
        // A claim answered for a slot that stopped first is handed back by a command of its own: let it land.
        store
            .set_meta(crate::meta::MetaKey::Reconnects, String::new())
            .await
            .unwrap();
        let c = *store.counts().borrow();
        assert_eq!((c.running, c.queued + c.done), (0, 308), "{c:?}");
        assert_eq!(c.results_pending, c.done);
        let back = store.finish_and_claim(vec![], 10).await.unwrap();
        assert_eq!(back.len() as u64, c.queued);
        assert!(back.iter().all(|t| t.attempts == 1), "{back:?}");
    }
}
