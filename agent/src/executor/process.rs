//! Configured commands as child processes: no shell, payload on stdin, stdout is the result (up to a cap),
//! the tail of stderr kept for errors, each in its own process group that a timeout or a stop kills whole, and
//! `PR_SET_PDEATHSIG` so a SIGKILLed agent leaves no orphan. The only module with `unsafe` (the pre-exec hook
//! and `killpg`).

use super::{Outcome, finished};
use crate::config::CommandSpec;
use crate::limits::{STDERR_DRAIN, STDERR_TAIL_BYTES};
use crate::task::ClaimedTask;
use endpoint_wire::Status;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub(super) async fn run_command(
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
        let tail = tokio::time::timeout(STDERR_DRAIN, stderr_tail).await;
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
