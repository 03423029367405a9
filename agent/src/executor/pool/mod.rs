//! Pool functions: tasks run on long-lived worker processes that speak the worker protocol over a Unix socket
//! (docs/worker-protocol.md), so a Python function pays its interpreter and imports once, not per task.
//!
//! `supervisor` starts the agent's own workers (isolated like commands, each on a socket of its own in its
//! working directory), restarts them with backoff, recycles them after `max_tasks_per_worker` tasks or
//! `max_worker_memory_bytes`, and reports a worker that fails at start instead of restarting it in a hot
//! loop. `listener` accepts workers the agent did not start on `<data_dir>/workers.sock` (mode 0600) and
//! checks every worker's hello. `protocol` is the bytes. This file holds the idle workers and hands one to a
//! slot for each task ([`Pools::run`]): a task is claimed from the disk queue (its attempt committed) before
//! it is sent, and its result goes back to the slot to be committed, exactly like a command's.

mod listener;
pub mod protocol;
mod supervisor;

use super::sandbox::Sandbox;
use super::{Outcome, finished};
use crate::config::{Config, Function, PoolSpec};
use crate::task::ClaimedTask;
use endpoint_wire::{Status, WorkerCounts};
use protocol::{FromWorker, Read, ToWorker, read_frame};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// Name of the socket external workers connect to, in the data directory.
pub const SOCKET: &str = "workers.sock";

/// Room beyond a payload or an output for a frame's other fields.
const FRAME_OVERHEAD: usize = 64 * 1024;

/// One connected worker.
pub(crate) struct Handle {
    name: String,
    functions: Vec<String>,
    /// The process, when the agent started it (external workers have none).
    process: Option<Arc<supervisor::Process>>,
    tasks: AtomicU64,
    /// Set when the worker must not get another task (its process is gone or being replaced).
    retired: AtomicBool,
}

impl Handle {
    fn serves(&self, function: &str) -> bool {
        self.functions.iter().any(|f| f == function)
    }
}

/// A worker handed to a slot for one task.
struct Lease {
    handle: Arc<Handle>,
    stream: UnixStream,
}

/// Counts the pools track besides the idle list, per function.
#[derive(Default)]
struct Tally {
    busy: HashMap<String, u32>,
    starting: HashMap<String, u32>,
    failing: HashMap<String, u32>,
    /// Why the agent's workers of a function keep failing at start (for the tasks that wait for them).
    failing_why: HashMap<String, String>,
}

/// The pool functions of one agent and their connected workers.
pub(crate) struct Pools {
    specs: BTreeMap<String, PoolSpec>,
    idle: Mutex<Vec<Lease>>,
    tally: Mutex<Tally>,
    available: Notify,
    counts: watch::Sender<BTreeMap<String, WorkerCounts>>,
    /// Largest frame a worker may send: the largest output of any pool function, plus room.
    max_frame: usize,
    socket: PathBuf,
    stop: CancellationToken,
    supervisors: tokio_util::task::TaskTracker,
}

impl Pools {
    /// Starts the pool functions' workers and the listener for external ones; `None` if the config has no
    /// pool function. Needs a tokio runtime.
    pub(crate) fn start(
        config: &Arc<Config>,
        sandbox: &Arc<Sandbox>,
    ) -> std::io::Result<Option<Arc<Pools>>> {
        let specs: BTreeMap<String, PoolSpec> = config
            .functions
            .current()
            .iter()
            .filter_map(|(name, f)| match f {
                Function::Pool(spec) => Some((name.clone(), (**spec).clone())),
                _ => None,
            })
            .collect();
        if specs.is_empty() {
            return Ok(None);
        }
        let max_output = specs
            .values()
            .map(|s| s.command.max_output_bytes)
            .max()
            .unwrap_or(0);
        let socket = config.data_dir.join(SOCKET);
        let listener = listener::bind(&socket)?;
        let counts = specs
            .keys()
            .map(|k| (k.clone(), WorkerCounts::default()))
            .collect();
        let pools = Arc::new(Pools {
            specs,
            idle: Mutex::default(),
            tally: Mutex::default(),
            available: Notify::new(),
            counts: watch::channel(counts).0,
            max_frame: max_output + FRAME_OVERHEAD,
            socket,
            stop: CancellationToken::new(),
            supervisors: tokio_util::task::TaskTracker::new(),
        });
        pools
            .supervisors
            .spawn(listener::accept_external(pools.clone(), listener));
        for (name, spec) in &pools.specs {
            for index in 0..spec.size {
                pools.supervisors.spawn(supervisor::keep_running(
                    pools.clone(),
                    sandbox.clone(),
                    name.clone(),
                    index,
                ));
            }
        }
        tracing::info!(socket = %pools.socket.display(), functions = ?pools.specs.keys().collect::<Vec<_>>(), "pool workers start; external workers may connect to the socket");
        Ok(Some(pools))
    }

    /// Workers per function as they change (for heartbeats and `endpoint-agent status`).
    pub(crate) fn counts(&self) -> watch::Receiver<BTreeMap<String, WorkerCounts>> {
        self.counts.subscribe()
    }

    /// Stops every worker: the agent's get SIGTERM (then SIGKILL), external ones see their connection close
    /// and reconnect to the next agent. Call once the slots are done.
    pub(crate) async fn shutdown(&self) {
        self.stop.cancel();
        self.idle.lock().expect("idle lock").clear();
        self.supervisors.close();
        if tokio::time::timeout(Duration::from_secs(10), self.supervisors.wait())
            .await
            .is_err()
        {
            tracing::warn!("pool workers did not stop within 10 s");
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Recomputes the counts from the idle list and the tally, and publishes them if they changed.
    fn publish(&self) {
        let idle = self.idle.lock().expect("idle lock");
        let tally = self.tally.lock().expect("tally lock");
        let mut counts: BTreeMap<String, WorkerCounts> = self
            .specs
            .keys()
            .map(|k| (k.clone(), WorkerCounts::default()))
            .collect();
        for lease in idle.iter() {
            for f in &lease.handle.functions {
                if let Some(c) = counts.get_mut(f) {
                    c.idle += 1;
                    if lease.handle.process.is_none() {
                        c.external += 1;
                    }
                }
            }
        }
        for (f, c) in counts.iter_mut() {
            c.busy = tally.busy.get(f).copied().unwrap_or(0);
            c.starting = tally.starting.get(f).copied().unwrap_or(0);
            c.failing = tally.failing.get(f).copied().unwrap_or(0);
        }
        drop((idle, tally));
        self.counts.send_if_modified(|old| {
            let changed = *old != counts;
            *old = counts;
            changed
        });
    }

    fn adjust(&self, function: &str, field: fn(&mut Tally) -> &mut HashMap<String, u32>, by: i32) {
        {
            let mut tally = self.tally.lock().expect("tally lock");
            let n = field(&mut tally).entry(function.to_owned()).or_default();
            *n = n.saturating_add_signed(by);
        }
        self.publish();
    }

    /// Puts a worker in the idle list (or retires it) and wakes the slots waiting for one.
    fn release(&self, lease: Lease) {
        if lease.handle.retired.load(Ordering::Relaxed) || self.stop.is_cancelled() {
            return;
        }
        self.idle.lock().expect("idle lock").push(lease);
        self.publish();
        self.available.notify_waiters();
    }

    /// Takes an idle worker serving `function`, skipping those whose connection is gone.
    fn take_idle(&self, function: &str) -> Option<Lease> {
        let mut idle = self.idle.lock().expect("idle lock");
        while let Some(at) = idle.iter().position(|l| l.handle.serves(function)) {
            let lease = idle.swap_remove(at);
            if lease.handle.retired.load(Ordering::Relaxed) || closed(&lease.stream) {
                continue;
            }
            return Some(lease);
        }
        None
    }

    /// Why tasks of `function` cannot get a worker now, if its agent-started workers keep failing at start and
    /// none is connected.
    fn failing(&self, function: &str) -> Option<String> {
        let tally = self.tally.lock().expect("tally lock");
        let spec = self.specs.get(function)?;
        let failing = tally.failing.get(function).copied().unwrap_or(0);
        if spec.size > 0 && failing as usize >= spec.size {
            tally.failing_why.get(function).cloned()
        } else {
            None
        }
    }

    /// Runs `task` on a worker of its function: waits for an idle one (until the function's timeout; at once
    /// a `failed` result if its workers keep failing at start), sends the task, and waits for the result
    /// within what is left of the timeout. A worker that dies or closes its socket mid-task costs the task
    /// the attempt it was charged ([`Outcome::Retry`]); a task past its timeout kills its worker (a fresh
    /// one replaces it). `stop` before a worker was found hands the task back unstarted; `kill` interrupts it.
    pub(crate) async fn run(
        &self,
        spec: &PoolSpec,
        task: &ClaimedTask,
        timeout: Duration,
        stop: &CancellationToken,
        kill: &CancellationToken,
    ) -> Outcome {
        let started = Instant::now();
        let function = task.function.as_str();
        let mut lease = loop {
            let notified = self.available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(lease) = self.take_idle(function) {
                break lease;
            }
            if let Some(why) = self.failing(function) {
                return finished(
                    Status::Failed,
                    None,
                    format!("no worker of {function:?} could start: {why}"),
                );
            }
            let left = timeout.saturating_sub(started.elapsed());
            tokio::select! {
                _ = stop.cancelled() => return Outcome::Interrupted,
                _ = kill.cancelled() => return Outcome::Interrupted,
                _ = tokio::time::sleep(left) => return finished(
                    Status::Timeout,
                    None,
                    format!(
                        "timed out after {} ms waiting for a worker of {function:?} (none was free{})",
                        timeout.as_millis(),
                        if self.specs.get(function).is_some_and(|s| s.size == 0) { "; only external workers serve it" } else { "" }
                    ),
                ),
                _ = notified => {}
            }
        };
        self.publish();
        self.adjust(function, |t| &mut t.busy, 1);
        let frame = ToWorker::Task {
            task_id: task.task_id.clone(),
            attempt: task.attempts,
            function: task.function.clone(),
            timeout_ms: timeout.as_millis() as u64,
            payload: task.payload.clone(),
        }
        .encode();
        let exchange = async {
            lease.stream.write_all(&frame).await?;
            read_frame(&mut lease.stream, self.max_frame).await
        };
        let left = timeout.saturating_sub(started.elapsed());
        let answer = tokio::select! {
            r = exchange => Some(r),
            _ = tokio::time::sleep(left) => None,
            _ = kill.cancelled() => {
                self.adjust(function, |t| &mut t.busy, -1);
                self.retire(&lease.handle);
                return Outcome::Interrupted;
            }
        };
        self.adjust(function, |t| &mut t.busy, -1);
        let cap = spec.command.max_output_bytes;
        let outcome = match answer {
            None => {
                self.retire(&lease.handle);
                return finished(
                    Status::Timeout,
                    None,
                    format!(
                        "timed out after {} ms; its worker {} was killed (a new one replaces it)",
                        timeout.as_millis(),
                        lease.handle.name
                    ),
                );
            }
            Some(Ok(Read::Frame(content))) => match FromWorker::decode(&content) {
                Ok(FromWorker::Ok { task_id, output }) if task_id == task.task_id => {
                    if output.len() > cap {
                        finished(
                            Status::Failed,
                            None,
                            format!("output exceeded the cap of {cap} bytes (max_output_bytes)"),
                        )
                    } else {
                        finished(Status::Ok, None, output)
                    }
                }
                Ok(FromWorker::Error { task_id, message }) if task_id == task.task_id => {
                    finished(Status::Failed, None, message)
                }
                Ok(other) => {
                    self.retire(&lease.handle);
                    return self
                        .died(
                            &lease.handle,
                            format!("it answered out of turn ({other:?})"),
                        )
                        .await;
                }
                Err(e) => {
                    self.retire(&lease.handle);
                    return self
                        .died(&lease.handle, format!("it sent a malformed frame ({e})"))
                        .await;
                }
            },
            Some(Ok(Read::TooLarge(n))) => finished(
                Status::Failed,
                None,
                format!("output of {n} bytes exceeded the cap of {cap} bytes (max_output_bytes)"),
            ),
            Some(Ok(Read::Closed)) => {
                self.retire(&lease.handle);
                return self
                    .died(&lease.handle, "it closed its connection".into())
                    .await;
            }
            Some(Err(e)) => {
                self.retire(&lease.handle);
                return self
                    .died(&lease.handle, format!("its connection failed ({e})"))
                    .await;
            }
        };
        let done = lease.handle.tasks.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(process) = &lease.handle.process {
            let too_many = spec.max_tasks_per_worker.is_some_and(|max| done >= max);
            let too_big = spec
                .max_worker_memory_bytes
                .is_some_and(|max| process.rss_bytes().is_some_and(|rss| rss > max));
            if too_many || too_big {
                tracing::debug!(worker = %lease.handle.name, tasks = done, too_big, "recycling a pool worker");
                lease.handle.retired.store(true, Ordering::Relaxed);
                process.terminate();
                return outcome;
            }
        }
        self.release(lease);
        outcome
    }

    /// A worker will get no more tasks; the agent's own is killed (its supervisor starts a fresh one).
    fn retire(&self, handle: &Handle) {
        handle.retired.store(true, Ordering::Relaxed);
        if let Some(process) = &handle.process {
            process.kill();
        }
    }

    /// The task of a worker that died under it runs again on another worker (its attempt stays charged).
    async fn died(&self, handle: &Handle, how: String) -> Outcome {
        let why = match &handle.process {
            Some(process) => process.describe_exit().await,
            None => String::new(),
        };
        Outcome::Retry {
            why: format!(
                "worker {} died while running the task: {how}{why}",
                handle.name
            ),
        }
    }
}

/// Whether an idle worker's `stream` is unusable: the peer closed it, or sent something unasked (out of step).
fn closed(stream: &UnixStream) -> bool {
    let mut probe = [0u8; 1];
    stream.try_read(&mut probe).is_ok()
}
