//! Runs tasks: the built-in functions and configured commands, with timeouts, output caps and process-group
//! kills, and the worker loops that feed executor slots from the store; also which tasks are instant enough to
//! run on arrival, without a slot ([`run_on_arrival`]). Knows nothing of AMQP, so it keeps
//! working while the broker is away and is tested without one.

use crate::config::{CommandSpec, Config, Function};
use crate::store::{ClaimedTask, Intake, NewTask, Store, TaskResult, Want};
use crate::wire::Status;
use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How much of a failed command's stderr is kept in its result.
const STDERR_TAIL_BYTES: usize = 4096;

/// What running a task came to.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Finished {
        status: Status,
        exit_code: Option<i32>,
        body: Vec<u8>,
    },
    /// Killed because the agent is shutting down: the task goes back to the queue.
    Interrupted,
}

fn finished(status: Status, exit_code: Option<i32>, body: impl Into<Vec<u8>>) -> Outcome {
    Outcome::Finished {
        status,
        exit_code,
        body: body.into(),
    }
}

/// Runs `task` with the function the config names; `kill` aborts it (shutdown after the grace period).
pub async fn execute(config: &Config, task: &ClaimedTask, kill: &CancellationToken) -> Outcome {
    let Some(function) = config.function(&task.function) else {
        // Checked on intake; reachable only if the config changed between runs of the agent.
        return finished(
            Status::Rejected,
            None,
            format!(
                "unknown function {:?}: this endpoint does not offer it",
                task.function
            ),
        );
    };
    let task_timeout = task.timeout_ms.map(Duration::from_millis);
    match function {
        Function::Echo => finished(Status::Ok, None, task.payload.clone()),
        Function::Sleep => sleep(&task.payload, task_timeout, kill).await,
        Function::Command(spec) => {
            let timeout = task_timeout.map_or(spec.timeout, |t| t.min(spec.timeout));
            run_command(spec, task, timeout, kill).await
        }
    }
}

/// Runs `task` on arrival if its function runs in-process and always finishes at once (`echo`): such a run costs
/// far less than the commit that would claim it for a slot, so the subscriber stores the task together with its
/// result in the commit that acks it ([`Intake::Ran`]), and no slot is involved. Any other task comes back as
/// [`Intake::Task`], to be queued.
///
/// The caller runs only first deliveries (not `redelivered`): the task is unacked while it runs, so if the agent
/// does not survive the run the broker keeps the task and marks its next delivery redelivered, and that one goes
/// through the disk queue, its attempts counted. The result says `attempts` 1.
pub fn run_on_arrival(config: &Config, task: NewTask) -> Intake {
    match config.function(&task.function) {
        Some(Function::Echo) => Intake::Ran {
            function: task.function,
            result: TaskResult {
                task_id: task.task_id,
                status: Status::Ok,
                exit_code: None,
                attempts: 1,
                duration_ms: 0,
                body: task.payload,
            },
        },
        _ => Intake::Task(task),
    }
}

async fn sleep(payload: &[u8], timeout: Option<Duration>, kill: &CancellationToken) -> Outcome {
    let text = String::from_utf8_lossy(payload);
    let text = text.trim();
    if text.is_empty() {
        return finished(
            Status::Rejected,
            None,
            "sleep needs a payload: the number of milliseconds to sleep",
        );
    }
    let Ok(ms) = text.parse::<u64>() else {
        return finished(
            Status::Rejected,
            None,
            format!("sleep payload {text:?} is not a whole number of milliseconds"),
        );
    };
    let want = Duration::from_millis(ms);
    let limit = timeout.unwrap_or(Duration::MAX).min(want);
    tokio::select! {
        _ = kill.cancelled() => Outcome::Interrupted,
        _ = tokio::time::sleep(limit) => if limit < want {
            finished(Status::Timeout, None, format!("timed out after {} ms", limit.as_millis()))
        } else {
            finished(Status::Ok, None, Vec::new())
        },
    }
}

async fn run_command(
    spec: &CommandSpec,
    task: &ClaimedTask,
    timeout: Duration,
    kill: &CancellationToken,
) -> Outcome {
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(&spec.env)
        .env("ENDPOINT_AGENT_TASK_ID", &task.task_id)
        .env("ENDPOINT_AGENT_ATTEMPT", task.attempts.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group, so a timeout kills everything it started.
        .process_group(0);
    if let Some(dir) = &spec.working_dir {
        cmd.current_dir(dir);
    }
    die_with_parent(&mut cmd);
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return finished(
                Status::Failed,
                None,
                format!("cannot start {:?}: {e}", spec.program),
            );
        }
    };
    let pgid = child.id();
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        kill_group(pgid);
        return finished(Status::Failed, None, "cannot open the command's pipes");
    };
    let payload = task.payload.clone();
    // Feed stdin concurrently with reading, so a command that writes before it reads cannot deadlock us;
    // a command that never reads its stdin closes the pipe (EPIPE), which is fine.
    let feeder = tokio::spawn(async move {
        let _ = stdin.write_all(&payload).await;
        let _ = stdin.shutdown().await;
    });
    let cap = spec.max_output_bytes;
    // stderr is drained on its own task so a chatty command never blocks on it; stdout is read here, up to
    // one byte past the cap so that an overflow is seen at once (the command may still be writing).
    let stderr_tail = tokio::spawn(async move {
        let mut tail = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > 2 * STDERR_TAIL_BYTES {
                tail.drain(..tail.len() - STDERR_TAIL_BYTES);
            }
        }
        if tail.len() > STDERR_TAIL_BYTES {
            tail.drain(..tail.len() - STDERR_TAIL_BYTES);
        }
        tail
    });
    let read_out = async {
        let mut out = Vec::new();
        let mut limited = (&mut stdout).take(cap as u64 + 1);
        let r = limited.read_to_end(&mut out).await;
        (out, r)
    };
    let abort_all = |pgid| {
        kill_group(pgid);
        stderr_tail.abort();
        feeder.abort();
    };
    let outcome = tokio::select! {
        _ = kill.cancelled() => Err(None),
        _ = tokio::time::sleep(timeout) => Err(Some(timeout)),
        r = read_out => Ok(r),
    };
    let (out, read) = match outcome {
        Ok(r) => r,
        Err(reason) => {
            abort_all(pgid);
            let _ = child.wait().await;
            return match reason {
                None => Outcome::Interrupted,
                Some(t) => finished(
                    Status::Timeout,
                    None,
                    format!(
                        "timed out after {} ms; its process group was killed",
                        t.as_millis()
                    ),
                ),
            };
        }
    };
    if out.len() > cap {
        abort_all(pgid);
        let _ = child.wait().await;
        return finished(
            Status::Failed,
            None,
            format!(
                "output exceeded the cap of {cap} bytes (max_output_bytes); the command was killed"
            ),
        );
    }
    // stdout is closed; wait for the exit (and stderr) within what is left of the timeout.
    let rest = async {
        let status = child.wait().await;
        // The task is over when its process exits: whatever it left running in its group goes too.
        kill_group(pgid);
        let tail = tokio::time::timeout(Duration::from_secs(1), stderr_tail).await;
        (status, tail.ok().and_then(Result::ok).unwrap_or_default())
    };
    let (status, err) = tokio::select! {
        r = rest => r,
        _ = kill.cancelled() => { kill_group(pgid); return Outcome::Interrupted }
        _ = tokio::time::sleep(timeout.saturating_sub(started.elapsed())) => {
            kill_group(pgid);
            return finished(
                Status::Timeout,
                None,
                format!("timed out after {} ms; its process group was killed", timeout.as_millis()),
            );
        }
    };
    feeder.abort();
    let stderr_tail = String::from_utf8_lossy(&err);
    match (status, read) {
        (Err(e), _) => finished(
            Status::Failed,
            None,
            format!("cannot wait for the command: {e}"),
        ),
        (_, Err(e)) => finished(
            Status::Failed,
            None,
            format!("cannot read the command's output: {e}"),
        ),
        (Ok(st), Ok(_)) if st.success() => finished(Status::Ok, Some(0), out),
        (Ok(st), Ok(_)) => {
            use std::os::unix::process::ExitStatusExt;
            match (st.code(), st.signal()) {
                (Some(code), _) => finished(
                    Status::Failed,
                    Some(code),
                    format!("command exited with code {code}; stderr tail:\n{stderr_tail}"),
                ),
                (None, sig) => finished(
                    Status::Failed,
                    None,
                    format!(
                        "command was killed by signal {}; stderr tail:\n{stderr_tail}",
                        sig.unwrap_or(0)
                    ),
                ),
            }
        }
    }
}

/// Asks the kernel to SIGKILL the child if the agent dies, so a SIGKILLed agent leaves no orphan behind
/// (its grandchildren are reached through the process group on timeout, not on agent death).
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it runs in the forked child
    // before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[allow(unsafe_code)]
fn kill_group(pgid: Option<u32>) {
    if let Some(pgid) = pgid.and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: killpg takes plain integers; the group is the one the child leads (process_group(0)).
        // ESRCH (already gone) is expected and ignored.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
}

/// Wakes the publisher when results are stored (workers learn of new tasks from their parked claims), and keeps
/// what the slots learned about how long each function's tasks take (to size their claims).
#[derive(Debug, Default)]
pub struct Signals {
    pub new_results: Notify,
    run_times: std::sync::Mutex<HashMap<String, Duration>>,
}

impl Signals {
    /// Folds one run of `function` into its moving average.
    fn ran(&self, function: &str, took: Duration) {
        let mut times = self.run_times.lock().expect("run times are never poisoned");
        match times.get_mut(function) {
            Some(mean) => *mean = (*mean * 3 + took) / 4,
            None => {
                times.insert(function.to_owned(), took);
            }
        }
    }

    /// What the next claim takes, see [`want`].
    fn want(&self) -> Want {
        want(&self.run_times.lock().expect("run times are never poisoned"))
    }
}

/// Most tasks one slot claims in one commit (when tasks are short).
const MAX_CLAIM: usize = 64;
/// Tasks shorter than this on average are claimed several per commit: a commit (an fsync) costs about as much.
const SHORT_TASK: Duration = Duration::from_millis(1);
/// Results of a claimed batch are stored as soon as the oldest waited this long, even if the batch goes on.
const FLUSH_AFTER: Duration = Duration::from_millis(2);

/// What one claim takes: tasks of the functions known to be short (a commit, an fsync, costs about as much as
/// such a task) are claimed up to [`MAX_CLAIM`] at a time; a task of any other function (slow, or not seen yet)
/// is claimed alone, so it never holds queued tasks back from an idle slot. A batch is at most ~64 ms of work
/// another slot cannot take, and at most that many suspects after a crash (each then reruns alone). Not
/// scaled by the depth of the queue on disk: it is shallow at steady state (the backlog waits in the broker).
fn want(run_times: &HashMap<String, Duration>) -> Want {
    let mut short: Vec<String> = run_times
        .iter()
        .filter(|(_, mean)| **mean < SHORT_TASK)
        .map(|(f, _)| f.clone())
        .collect();
    if short.is_empty() {
        return 1.into();
    }
    short.sort();
    Want {
        max: MAX_CLAIM,
        only: Some(short),
    }
}

/// One executor slot: claim tasks, run them one by one, store their results (and claim the next tasks in the
/// same commit), until `stop` (no new tasks; the running one finishes, claimed ones not started go back) or
/// `kill` (the running one is killed and requeued).
///
/// Short tasks are claimed several at a time (see [`want`]), so that one commit stores many results
/// and claims many tasks; every claimed task's attempt is committed before the first of them runs, and every
/// result is committed before the publisher can see it. An idle slot parks its claim in the store, which
/// claims for it in the commit that queues new tasks.
pub async fn worker(
    config: Arc<Config>,
    store: Store,
    signals: Arc<Signals>,
    stop: CancellationToken,
    kill: CancellationToken,
) {
    let mut claimed: VecDeque<ClaimedTask> = VecDeque::new();
    // Finished, not yet stored; `unsaved_since` is when the oldest of them finished.
    let mut unsaved: Vec<TaskResult> = Vec::new();
    let mut unsaved_since: Option<Instant> = None;
    let mut retry =
        crate::connection::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let stopping = stop.is_cancelled();
        let flush_due = unsaved_since.is_some_and(|t| t.elapsed() >= FLUSH_AFTER);
        if claimed.is_empty() || flush_due || stopping {
            let want: Want = if claimed.is_empty() && !stopping {
                signals.want()
            } else {
                0.into()
            };
            if !unsaved.is_empty() || want.max > 0 {
                match store.finish_and_claim(unsaved.clone(), want.clone()).await {
                    Ok(tasks) => {
                        if !unsaved.is_empty() {
                            signals.new_results.notify_one();
                        }
                        unsaved.clear();
                        unsaved_since = None;
                        claimed.extend(tasks);
                        retry.reset();
                    }
                    Err(e) => {
                        // Disk full or similar: keep the results in memory and try again; never drop them.
                        // A full disk was logged once by the store; other errors are worth a line each time.
                        if e.is_disk_full() {
                            tracing::debug!(error = %e, "disk still full; keeping results in memory, retrying");
                        } else {
                            tracing::error!(error = %e, "cannot store results or claim tasks; retrying");
                        }
                        tokio::select! {
                            _ = kill.cancelled() => return,
                            _ = tokio::time::sleep(retry.next_delay()) => continue,
                        }
                    }
                }
            }
            if stopping {
                requeue(&store, claimed.drain(..).map(|t| t.task_id).collect()).await;
                return;
            }
            if claimed.is_empty() {
                // Nothing queued: park a claim in the store until tasks arrive (nothing unsaved here).
                tokio::select! {
                    _ = stop.cancelled() => {}
                    r = store.wait_and_claim(want) => match r {
                        Ok(tasks) => {
                            claimed.extend(tasks);
                            retry.reset();
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot claim tasks; retrying");
                            tokio::select! {
                                _ = kill.cancelled() => return,
                                _ = tokio::time::sleep(retry.next_delay()) => {}
                            }
                        }
                    },
                }
                continue;
            }
        }
        let Some(task) = claimed.pop_front() else {
            continue;
        };
        let started = Instant::now();
        tracing::debug!(task_id = %task.task_id, function = %task.function, attempt = task.attempts, "running");
        match execute(&config, &task, &kill).await {
            Outcome::Interrupted => {
                // Store what finished before, then hand back the interrupted task and those never started.
                if !unsaved.is_empty() {
                    match store
                        .finish_and_claim(std::mem::take(&mut unsaved), 0)
                        .await
                    {
                        Ok(_) => signals.new_results.notify_one(),
                        // Those tasks stay `running` on disk and run again at the next start.
                        Err(e) => tracing::warn!(error = %e, "cannot store finished results"),
                    }
                }
                let ids = std::iter::once(task.task_id)
                    .chain(claimed.drain(..).map(|t| t.task_id))
                    .collect();
                requeue(&store, ids).await;
                return;
            }
            Outcome::Finished {
                status,
                exit_code,
                body,
            } => {
                let took = started.elapsed();
                tracing::debug!(task_id = %task.task_id, %status, "finished");
                signals.ran(&task.function, took);
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
    use crate::config::Overrides;
    use crate::connection::BrokerUrl;
    use crate::wire::EndpointId;

    fn config(functions: &str) -> Config {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // One file per call: tests run in parallel and must not read each other's half-written file.
        let path = std::env::temp_dir().join(format!("ea-exec-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, functions).unwrap();
        let o = Overrides {
            endpoint_id: EndpointId::new("ep").unwrap(),
            broker_url: BrokerUrl::new("amqp://h/%2f").unwrap(),
            data_dir: Some(std::env::temp_dir()),
            workers: None,
            prefetch: None,
        };
        let config = Config::load(o, Some(&path)).unwrap();
        let _ = std::fs::remove_file(&path);
        config
    }

    fn task(function: &str, payload: &str, timeout_ms: Option<u64>) -> ClaimedTask {
        ClaimedTask {
            task_id: "t1".into(),
            function: function.into(),
            payload: payload.as_bytes().to_vec(),
            timeout_ms,
            attempts: 1,
        }
    }

    async fn check(c: &Config, t: ClaimedTask, status: Status, body_has: &str) -> Outcome {
        let out = execute(c, &t, &CancellationToken::new()).await;
        match &out {
            Outcome::Finished {
                status: s, body, ..
            } => {
                let text = String::from_utf8_lossy(body);
                assert_eq!(*s, status, "{}: {text}", t.function);
                assert!(
                    text.contains(body_has),
                    "{}: {text:?} lacks {body_has:?}",
                    t.function
                );
            }
            Outcome::Interrupted => panic!("{} interrupted", t.function),
        }
        out
    }

    const FUNCTIONS: &str = r#"
[functions.wc]
command = ["wc", "-c"]
[functions.fail]
command = ["sh", "-c", "echo oops >&2; exit 3"]
[functions.hang]
command = ["sh", "-c", "sleep 30 & sleep 30"]
timeout_secs = 1
[functions.big]
command = ["sh", "-c", "head -c 5000 /dev/zero"]
max_output_bytes = 100
[functions.selfkill]
command = ["sh", "-c", "kill -9 $$"]
[functions.missing]
command = ["/nonexistent/program"]
[functions.noread]
command = ["true"]
"#;

    #[tokio::test]
    async fn builtins_and_commands() {
        let c = config(FUNCTIONS);
        check(&c, task("echo", "hi", None), Status::Ok, "hi").await;
        check(&c, task("sleep", "10", None), Status::Ok, "").await;
        check(
            &c,
            task("sleep", "5000", Some(20)),
            Status::Timeout,
            "timed out",
        )
        .await;
        check(
            &c,
            task("sleep", "", None),
            Status::Rejected,
            "needs a payload",
        )
        .await;
        check(
            &c,
            task("sleep", "soon", None),
            Status::Rejected,
            "not a whole number",
        )
        .await;
        check(&c, task("wc", "hello", None), Status::Ok, "5").await;
        let out = check(&c, task("fail", "", None), Status::Failed, "oops").await;
        assert!(matches!(
            out,
            Outcome::Finished {
                exit_code: Some(3),
                ..
            }
        ));
        check(
            &c,
            task("hang", "", None),
            Status::Timeout,
            "process group was killed",
        )
        .await;
        check(
            &c,
            task("hang", "", Some(50)),
            Status::Timeout,
            "after 50 ms",
        )
        .await;
        check(
            &c,
            task("big", "", None),
            Status::Failed,
            "cap of 100 bytes",
        )
        .await;
        check(&c, task("selfkill", "", None), Status::Failed, "signal 9").await;
        check(
            &c,
            task("missing", "", None),
            Status::Failed,
            "cannot start",
        )
        .await;
        let big_payload = "x".repeat(1 << 20);
        check(&c, task("noread", &big_payload, None), Status::Ok, "").await;
        check(
            &c,
            task("gone", "", None),
            Status::Rejected,
            "unknown function",
        )
        .await;
    }

    #[test]
    fn claims_batch_only_short_functions() {
        let check = |times: &[(&str, u64)], expected: Want| {
            let times = times
                .iter()
                .map(|(f, us)| (f.to_string(), Duration::from_micros(*us)))
                .collect();
            assert_eq!(want(&times), expected, "{times:?}");
        };
        check(&[], 1.into());
        check(&[("sleep", 5_000)], 1.into());
        let short = |fs: &[&str]| Want {
            max: MAX_CLAIM,
            only: Some(fs.iter().map(|f| f.to_string()).collect()),
        };
        check(&[("echo", 20), ("sleep", 5_000)], short(&["echo"]));
        check(&[("wc", 300), ("echo", 20)], short(&["echo", "wc"]));
    }

    #[tokio::test]
    async fn slots_run_batches_take_new_work_and_give_back_on_stop() {
        let dir = crate::TestDir::new("exec-slots");
        let (store, _) = Store::open(&dir, 3).unwrap();
        let tasks = |from: usize, n: usize, function: &str, payload: &str| -> Vec<Intake> {
            (from..from + n)
                .map(|i| {
                    Intake::Task(NewTask {
                        task_id: format!("t{i}"),
                        function: function.into(),
                        payload: payload.as_bytes().to_vec(),
                        timeout_ms: None,
                    })
                })
                .collect()
        };
        store.ingest(tasks(0, 300, "echo", "x")).await.unwrap();
        let config = Arc::new(config(""));
        let signals = Arc::new(Signals::default());
        let (stop, kill) = (CancellationToken::new(), CancellationToken::new());
        let slots: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(worker(
                    config.clone(),
                    store.clone(),
                    signals.clone(),
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
        store.set_meta("sync", String::new()).await.unwrap();
        let c = *store.counts().borrow();
        assert_eq!((c.running, c.queued + c.done), (0, 308), "{c:?}");
        assert_eq!(c.results_pending, c.done);
        let back = store.finish_and_claim(vec![], 10).await.unwrap();
        assert_eq!(back.len() as u64, c.queued);
        assert!(back.iter().all(|t| t.attempts == 1), "{back:?}");
    }

    #[tokio::test]
    async fn kill_interrupts() {
        let c = config(FUNCTIONS);
        let kill = CancellationToken::new();
        kill.cancel();
        assert_eq!(
            execute(&c, &task("hang", "", None), &kill).await,
            Outcome::Interrupted
        );
        assert_eq!(
            execute(&c, &task("sleep", "5000", None), &kill).await,
            Outcome::Interrupted
        );
    }
}
