//! Configured commands as child processes: no shell, payload on stdin, stdout is the result (up to a cap),
//! the tail of stderr kept for errors. Each runs isolated: a cleared environment (nothing of the agent's but
//! what the function names), a fresh working directory, optionally another user and resource limits, no new
//! privileges, its own process group and (where cgroup v2 is writable) its own cgroup, which a timeout or a
//! stop kills whole; `PR_SET_PDEATHSIG` so a SIGKILLed agent leaves no orphan. The fork-to-exec steps are
//! `crate::sys`'s.

use super::sandbox::{Sandbox, TaskCgroup, TaskDir};
use super::{Outcome, finished};
use crate::config::CommandSpec;
use crate::limits::{STDERR_DRAIN, STDERR_TAIL_BYTES};
use crate::sys::{self, ChildSetup};
use crate::task::ClaimedTask;
use endpoint_wire::Status;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The `PATH` of every command: the system's programs, nothing of the agent's.
pub const TASK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Everything a command's run may leave behind, killed and removed together.
struct Running {
    pgid: Option<u32>,
    cgroup: Option<TaskCgroup>,
    _dir: Option<TaskDir>,
}

impl Running {
    /// SIGKILLs the process group and, where there is one, the cgroup (children that left the group too).
    fn kill(&self) {
        sys::kill_group(self.pgid);
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
    }

    /// Kills what is left and removes the cgroup and the working directory (in the background).
    fn finish(self) {
        sys::kill_group(self.pgid);
        if let Some(cg) = self.cgroup {
            cg.finish();
        }
    }
}

/// The command `spec` for `task`, with its environment, working directory and child setup.
fn command(
    spec: &CommandSpec,
    task: &ClaimedTask,
    dir: &std::path::Path,
    cgroup: Option<&TaskCgroup>,
) -> std::io::Result<tokio::process::Command> {
    let vars = [
        ("ENDPOINT_AGENT_TASK_ID", task.task_id.clone()),
        ("ENDPOINT_AGENT_ATTEMPT", task.attempts.to_string()),
        ("ENDPOINT_AGENT_FUNCTION", task.function.clone()),
    ];
    let mut cmd = isolated(spec, &vars, dir, cgroup)?;
    cmd.stdin(Stdio::piped());
    Ok(cmd)
}

/// `spec`'s program isolated as every command and pool worker is: a cleared environment (`PATH`, `HOME`,
/// `LANG`, `agent_vars`, then the function's `env`), working directory `dir`, its own process group, the child
/// setup of `crate::sys` (cgroup, limits, user, no new privileges, death with the agent); stdout and stderr
/// piped, stdin left to the caller.
pub(super) fn isolated(
    spec: &CommandSpec,
    agent_vars: &[(&str, String)],
    dir: &std::path::Path,
    cgroup: Option<&TaskCgroup>,
) -> std::io::Result<tokio::process::Command> {
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args).env_clear().env("PATH", TASK_PATH);
    for (k, v) in agent_vars {
        cmd.env(k, v);
    }
    let home = match &spec.run_as {
        Some(user) => Some(user.home.clone().into_os_string()),
        None => std::env::var_os("HOME"),
    };
    if let Some(home) = home {
        cmd.env("HOME", home);
    }
    if let Some(lang) = std::env::var_os("LANG") {
        cmd.env("LANG", lang);
    }
    cmd.envs(&spec.env)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group, so a timeout kills everything it started.
        .process_group(0);
    ChildSetup {
        cgroup_procs: cgroup.map(TaskCgroup::procs),
        limits: spec.limits.clone(),
        run_as: spec.run_as.as_ref().map(|u| (u.uid, u.gid)),
        no_new_privileges: spec.no_new_privileges,
    }
    .install(&mut cmd)?;
    Ok(cmd)
}

pub(super) async fn run_command(
    spec: &CommandSpec,
    sandbox: &Sandbox,
    task: &ClaimedTask,
    timeout: Duration,
    kill: &CancellationToken,
) -> Outcome {
    let cannot_start = |e: std::io::Error| {
        finished(
            Status::Failed,
            None,
            format!("cannot start {:?}: {e}", spec.program),
        )
    };
    let fresh = match &spec.working_dir {
        Some(_) => None,
        None => match sandbox.task_dir(spec.run_as.as_ref()) {
            Ok(d) => Some(d),
            Err(e) => return cannot_start(e),
        },
    };
    let dir = match (&spec.working_dir, &fresh) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => d.path().to_owned(),
        (None, None) => unreachable!("a fresh directory was made when none is configured"),
    };
    let cgroup = match sandbox.task_cgroup() {
        Ok(c) => c,
        Err(e) => return cannot_start(e),
    };
    let mut cmd = match command(spec, task, &dir, cgroup.as_ref()) {
        Ok(c) => c,
        Err(e) => return cannot_start(e),
    };
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            if let Some(cg) = cgroup {
                cg.finish();
            }
            return cannot_start(e);
        }
    };
    let running = Running {
        pgid: child.id(),
        cgroup,
        _dir: fresh,
    };
    let outcome = supervise(&mut child, &running, spec, task, timeout, kill, started).await;
    running.finish();
    outcome
}

/// Feeds the payload, collects the output and waits for the exit, within the timeout.
async fn supervise(
    child: &mut tokio::process::Child,
    running: &Running,
    spec: &CommandSpec,
    task: &ClaimedTask,
    timeout: Duration,
    kill: &CancellationToken,
    started: Instant,
) -> Outcome {
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        running.kill();
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
    let abort_all = || {
        running.kill();
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
            abort_all();
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
        abort_all();
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
        // The task is over when its process exits: whatever it left running goes too.
        running.kill();
        let tail = tokio::time::timeout(STDERR_DRAIN, stderr_tail).await;
        (status, tail.ok().and_then(Result::ok).unwrap_or_default())
    };
    let (status, err) = tokio::select! {
        r = rest => r,
        _ = kill.cancelled() => { running.kill(); return Outcome::Interrupted }
        _ = tokio::time::sleep(timeout.saturating_sub(started.elapsed())) => {
            running.kill();
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
