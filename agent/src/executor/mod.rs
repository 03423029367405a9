//! Runs tasks: the built-in functions (`builtins`) and configured commands (`process`, isolated in the places
//! `sandbox` prepares), and the executor slots that feed them from the store (`slot`); also which tasks are instant enough to run on arrival, without a
//! slot ([`run_on_arrival`]). Knows nothing of AMQP: it never imports broker code, so it keeps working while the
//! broker is away and is tested without one.

mod builtins;
pub(crate) mod pool;
mod process;
mod sandbox;
mod slot;

pub(crate) use pool::Pools;
pub(crate) use sandbox::Sandbox;
pub(crate) use slot::worker;

use crate::config::{Config, Function};
use crate::task::{ClaimedTask, Intake, NewTask, TaskResult};
use endpoint_wire::Status;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What running a task came to.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Finished {
        status: Status,
        exit_code: Option<i32>,
        body: Vec<u8>,
    },
    /// Killed because the agent is shutting down (or not started before it stopped): the task goes back to the
    /// queue without counting the attempt.
    Interrupted,
    /// The run was lost with its worker (it died mid-task): the attempt stays counted and the task runs again,
    /// or gets a `failed` result carrying `why` once it has had `max_attempts`.
    Retry { why: String },
}

pub(crate) fn finished(
    status: Status,
    exit_code: Option<i32>,
    body: impl Into<Vec<u8>>,
) -> Outcome {
    Outcome::Finished {
        status,
        exit_code,
        body: body.into(),
    }
}

/// Where tasks run: the working directories and cgroups of commands, and the pool workers.
pub(crate) struct Places {
    pub sandbox: std::sync::Arc<Sandbox>,
    pub pools: Option<std::sync::Arc<Pools>>,
}

/// Runs `task` with the function the config names; `stop` hands back a pool task still waiting for a worker,
/// `kill` aborts a running one (shutdown after the grace period).
pub(crate) async fn execute(
    config: &Config,
    places: &Places,
    task: &ClaimedTask,
    stop: &CancellationToken,
    kill: &CancellationToken,
) -> Outcome {
    // The table as it is now: a reload after this leaves this run's definition alone.
    let table = config.functions.current();
    let Some(function) = table.get(&task.function) else {
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
        Function::Echo => builtins::echo(&task.payload),
        Function::Sleep => {
            let timeout =
                task_timeout.map_or(config.builtin_timeout, |t| t.min(config.builtin_timeout));
            builtins::sleep(&task.payload, timeout, kill).await
        }
        Function::Command(spec) => {
            let timeout = task_timeout.map_or(spec.timeout, |t| t.min(spec.timeout));
            process::run_command(spec, &places.sandbox, task, timeout, kill).await
        }
        Function::Pool(spec) => {
            let timeout =
                task_timeout.map_or(spec.command.timeout, |t| t.min(spec.command.timeout));
            match &places.pools {
                // Boxed: the exchange with a worker is a large future, the slot's loop stays small.
                Some(pools) => Box::pin(pools.run(spec, task, timeout, stop, kill)).await,
                None => finished(Status::Failed, None, "pool workers are not running"),
            }
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
    match config.functions.current().get(&task.function) {
        Some(Function::Echo) => Intake::Ran {
            reply_to: task.reply_to,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestDir, config};

    /// A sandbox in a scratch data directory, both removed when dropped.
    struct Place {
        places: Places,
        _dir: TestDir,
    }

    fn place() -> Place {
        let dir = TestDir::new("exec");
        Place {
            places: Places {
                sandbox: std::sync::Arc::new(Sandbox::prepare(&dir).unwrap()),
                pools: None,
            },
            _dir: dir,
        }
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
        let (stop, kill) = (CancellationToken::new(), CancellationToken::new());
        let out = execute(c, &place().places, &t, &stop, &kill).await;
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
            other => panic!("{}: {other:?}", t.function),
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

    #[tokio::test]
    async fn kill_interrupts() {
        let c = config(FUNCTIONS);
        let kill = CancellationToken::new();
        kill.cancel();
        assert_eq!(
            execute(&c, &place().places, &task("hang", "", None), &kill, &kill).await,
            Outcome::Interrupted
        );
        assert_eq!(
            execute(
                &c,
                &place().places,
                &task("sleep", "5000", None),
                &kill,
                &kill
            )
            .await,
            Outcome::Interrupted
        );
    }
}
