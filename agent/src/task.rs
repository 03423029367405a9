//! The vocabulary the agent's parts hand each other: a task as received ([`NewTask`]) and what intake made of a
//! delivery ([`Intake`]), a task claimed for a run ([`ClaimedTask`]), its [`TaskResult`], and the [`Counts`]
//! of tasks and results in each state. Data only: no I/O, no broker, no SQLite.

use endpoint_wire::{ServiceName, Status};

/// A task accepted from the broker, ready to be queued.
#[derive(Clone, Debug, PartialEq)]
pub struct NewTask {
    pub task_id: String,
    pub function: String,
    pub payload: Vec<u8>,
    pub timeout_ms: Option<u64>,
    /// The service whose queue gets the result (the task's `reply_to`); `None`: the shared `results` queue.
    pub reply_to: Option<ServiceName>,
    /// The task's headers as they arrived (the encoded field-table entries), kept so that a hand-back
    /// republishes the task as it came.
    pub headers: Option<Vec<u8>>,
}

/// What one delivery becomes, handed to the store by the subscriber.
#[derive(Clone, Debug, PartialEq)]
pub enum Intake {
    Task(NewTask),
    /// Bad input with a task id: recorded as done with a `rejected` result, never run.
    Rejected {
        task_id: String,
        function: String,
        reason: String,
        reply_to: Option<ServiceName>,
    },
    /// A task already run on arrival (see `executor::run_on_arrival`): recorded as done with its result.
    Ran {
        function: String,
        result: TaskResult,
        reply_to: Option<ServiceName>,
    },
}

/// What the store did with one batch of [`Intake`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    pub queued: u64,
    pub rejected: u64,
    /// Tasks that came with their result ([`Intake::Ran`]).
    pub ran: u64,
    /// Task ids already on disk (a redelivery, or the same id submitted twice): not run again.
    pub duplicates: u64,
}

/// A task claimed for execution; `attempts` counts this run.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedTask {
    pub task_id: String,
    pub function: String,
    pub payload: Vec<u8>,
    pub timeout_ms: Option<u64>,
    pub attempts: u32,
}

/// A finished task's result, as stored and later published.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskResult {
    pub task_id: String,
    pub status: Status,
    pub exit_code: Option<i32>,
    pub attempts: u32,
    pub duration_ms: u64,
    pub body: Vec<u8>,
}

/// How many tasks and results are in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub queued: u64,
    pub running: u64,
    pub done: u64,
    pub results_pending: u64,
    /// Tasks handed back to the broker (`endpoint-agent handback`), never run here.
    pub handed_back: u64,
}
