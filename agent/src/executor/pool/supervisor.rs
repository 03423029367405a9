//! The agent's own pool workers: one supervisor per worker keeps a process running from the function's
//! `command`, isolated like a command (cleared environment, a fresh working directory, the function's user,
//! limits and cgroup), connected through a socket of its own in its working directory (so a worker running as
//! another user reaches it without reaching the data directory). It restarts a worker that exits, replaces
//! one that is recycled or killed after a timeout, and backs off from a worker that exits before it connects:
//! after a few such failures in a row it is reported (log, status, heartbeat) as failing and tried again every
//! backoff interval, never in a hot loop.

use super::super::process::isolated;
use super::super::sandbox::{Sandbox, TaskCgroup, TaskDir};
use super::listener::{bind, handshake};
use super::{Lease, Pools};
use crate::limits::{
    POOL_FAILING_AFTER, POOL_RESTART_MAX, POOL_RESTART_MIN, POOL_START_TIMEOUT, POOL_STOP_WAIT,
    STDERR_TAIL_BYTES,
};
use crate::retry::Backoff;
use crate::sys;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

/// Name of a worker's own socket in its working directory.
const WORKER_SOCKET: &str = "agent.sock";

/// A worker process the agent started.
pub(crate) struct Process {
    pid: u32,
    cgroup: Option<TaskCgroup>,
    /// The last bytes it wrote to stdout and stderr.
    tail: Arc<Mutex<Vec<u8>>>,
    /// How it exited, once it has.
    exit: watch::Receiver<Option<String>>,
    /// The agent ended it on purpose (recycled, timed out, stopping): not a failure to report.
    ended_on_purpose: AtomicBool,
    _dir: TaskDir,
}

impl Process {
    /// SIGKILLs its process group and cgroup.
    pub(crate) fn kill(&self) {
        self.ended_on_purpose.store(true, Ordering::Relaxed);
        sys::kill_group(Some(self.pid));
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
    }

    /// SIGTERMs it (to be replaced): it may finish what it is doing.
    pub(crate) fn terminate(&self) {
        self.ended_on_purpose.store(true, Ordering::Relaxed);
        sys::terminate_group(Some(self.pid));
    }

    /// Its resident memory, from `/proc`.
    pub(crate) fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// How it ended (waiting up to a second for it to exit) and the tail of its output, for a result.
    pub(crate) async fn describe_exit(&self) -> String {
        let mut exit = self.exit.clone();
        let _ = tokio::time::timeout(Duration::from_secs(1), exit.wait_for(Option::is_some)).await;
        let status = exit
            .borrow()
            .clone()
            .unwrap_or_else(|| "still running".into());
        let tail = String::from_utf8_lossy(&self.tail.lock().expect("tail lock")).into_owned();
        format!("; {status}; output tail:\n{tail}")
    }

    async fn exited(&self) {
        let mut exit = self.exit.clone();
        let _ = exit.wait_for(Option::is_some).await;
    }

    fn exit_text(&self) -> String {
        self.exit.borrow().clone().unwrap_or_default()
    }

    fn tail_text(&self) -> String {
        String::from_utf8_lossy(&self.tail.lock().expect("tail lock")).into_owned()
    }
}

/// Keeps worker `index` of `function` running until the pools stop.
pub(super) async fn keep_running(
    pools: Arc<Pools>,
    sandbox: Arc<Sandbox>,
    function: String,
    index: usize,
) {
    let mut backoff = Backoff::new(POOL_RESTART_MIN, POOL_RESTART_MAX);
    let mut failures = 0u32;
    let mut reported = false;
    while !pools.stop.is_cancelled() {
        pools.adjust(&function, |t| &mut t.starting, 1);
        let started = start(&pools, &sandbox, &function, index).await;
        pools.adjust(&function, |t| &mut t.starting, -1);
        match started {
            Ok((process, lease)) => {
                failures = 0;
                backoff.reset();
                if reported {
                    reported = false;
                    pools.adjust(&function, |t| &mut t.failing, -1);
                    tracing::info!(function = %function, "a pool worker started again");
                }
                let handle = lease.handle.clone();
                pools.release(lease);
                tokio::select! {
                    _ = process.exited() => {}
                    _ = pools.stop.cancelled() => {
                        handle.retired.store(true, Ordering::Relaxed);
                        process.terminate();
                        if tokio::time::timeout(POOL_STOP_WAIT, process.exited()).await.is_err() {
                            process.kill();
                        }
                        return;
                    }
                }
                handle.retired.store(true, Ordering::Relaxed);
                if !process.ended_on_purpose.load(Ordering::Relaxed) {
                    tracing::warn!(
                        function = %function,
                        worker = %handle.name,
                        exit = %process.exit_text(),
                        output = %process.tail_text(),
                        "a pool worker exited; starting another"
                    );
                }
                if let Some(cg) = &process.cgroup {
                    cg.kill();
                }
            }
            Err(why) => {
                failures += 1;
                if failures >= POOL_FAILING_AFTER && !reported {
                    reported = true;
                    {
                        let mut tally = pools.tally.lock().expect("tally lock");
                        tally.failing_why.insert(function.clone(), why.clone());
                    }
                    pools.adjust(&function, |t| &mut t.failing, 1);
                    tracing::error!(
                        function = %function,
                        failures,
                        reason = %why,
                        "pool workers fail at start: tasks of this function get `failed` until one starts; retrying with backoff"
                    );
                } else if !reported {
                    tracing::warn!(function = %function, reason = %why, "a pool worker failed to start; retrying");
                }
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = pools.stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Starts one worker and waits for its hello on its own socket. Err: why it did not connect (it exited, with
/// its status and output, or it took too long).
async fn start(
    pools: &Pools,
    sandbox: &Sandbox,
    function: &str,
    index: usize,
) -> Result<(Arc<Process>, Lease), String> {
    let spec = &pools.specs[function];
    let command = &spec.command;
    let dir = sandbox
        .task_dir(command.run_as.as_ref())
        .map_err(|e| format!("cannot make its working directory: {e}"))?;
    let socket = dir.path().join(WORKER_SOCKET);
    let listener = bind(&socket).map_err(|e| format!("cannot make its socket: {e}"))?;
    if let Some(user) = &command.run_as {
        std::os::unix::fs::chown(&socket, Some(user.uid), Some(user.gid))
            .map_err(|e| format!("cannot give its socket to {}: {e}", user.name))?;
    }
    // A worker running as another user cannot reach the data directory: it finds its socket in the working
    // directory it starts in.
    let socket_env = if command.run_as.is_some() {
        WORKER_SOCKET.to_owned()
    } else {
        socket.display().to_string()
    };
    let vars = [
        ("ENDPOINT_AGENT_SOCKET", socket_env),
        ("ENDPOINT_AGENT_POOL_WORKER", "1".to_owned()),
        ("ENDPOINT_AGENT_FUNCTION", function.to_owned()),
        ("ENDPOINT_AGENT_WORKER_INDEX", index.to_string()),
    ];
    let cgroup = sandbox
        .task_cgroup()
        .map_err(|e| format!("cannot make its cgroup: {e}"))?;
    let mut cmd = isolated(command, &vars, dir.path(), cgroup.as_ref())
        .map_err(|e| format!("cannot prepare {:?}: {e}", command.program))?;
    cmd.stdin(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", command.program))?;
    let pid = child.id().unwrap_or(0);
    let tail: Arc<Mutex<Vec<u8>>> = Arc::default();
    for out in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    {
        tokio::spawn(collect_tail(out, tail.clone()));
    }
    let (exit_tx, exit) = watch::channel(None);
    tokio::spawn(async move {
        let status = match child.wait().await {
            Ok(st) => match (st.code(), st.signal()) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => "exited".to_owned(),
            },
            Err(e) => format!("cannot wait for it: {e}"),
        };
        exit_tx.send_replace(Some(status));
    });
    let process = Arc::new(Process {
        pid,
        cgroup,
        tail,
        exit,
        ended_on_purpose: AtomicBool::new(false),
        _dir: dir,
    });
    let connected = tokio::select! {
        a = listener.accept() => a.map_err(|e| format!("cannot accept its connection: {e}")),
        _ = process.exited() => {
            // Let the output collectors take what it wrote last.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Err(format!("it exited before it connected ({}); output tail:\n{}", process.exit_text(), process.tail_text()));
        }
        _ = tokio::time::sleep(POOL_START_TIMEOUT) => {
            process.kill();
            return Err(format!("it did not connect to ENDPOINT_AGENT_SOCKET within {POOL_START_TIMEOUT:?}; output tail:\n{}", process.tail_text()));
        }
        _ = pools.stop.cancelled() => {
            process.kill();
            return Err("the agent is stopping".into());
        }
    };
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    let (stream, _) = connected.inspect_err(|_| process.kill())?;
    match handshake(pools, stream, Some(function), Some(process.clone())).await {
        Ok(lease) => Ok((process, lease)),
        Err(why) => {
            process.kill();
            Err(format!("its hello was refused: {why}"))
        }
    }
}

/// Keeps the last [`STDERR_TAIL_BYTES`] of what a worker writes.
async fn collect_tail(mut out: Box<dyn AsyncRead + Send + Unpin>, tail: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 8192];
    while let Ok(n) = out.read(&mut buf).await {
        if n == 0 {
            return;
        }
        let mut tail = tail.lock().expect("tail lock");
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > STDERR_TAIL_BYTES {
            let cut = tail.len() - STDERR_TAIL_BYTES;
            tail.drain(..cut);
        }
    }
}
