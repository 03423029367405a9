//! Every tuning constant of the agent, in one place, each with the reason for its value: the defaults of the
//! settings an operator may change (README "Configuration"), and the internal sizes and delays nobody should
//! need to. Constants of the wire contract (names, header limits) live in `endpoint_wire`; constants of the
//! AMQP protocol itself (frame types, method ids) live with the codec that speaks it (`raw::codec`).

use std::time::Duration;

// --- Defaults of settings (the config file and the command line override them) ---

/// Deliveries in flight before an ack: enough to keep a group commit full at thousands of tasks/s, few enough
/// that a crash hands back a bounded batch.
pub const DEFAULT_PREFETCH: u16 = 256;
/// Queued tasks on disk above which intake pauses: minutes of work for typical functions; the rest waits in
/// the broker, where another agent could take it.
pub const DEFAULT_MAX_BACKLOG: u64 = 10_000;
/// Agent crashes a running task may cause before it gets a `failed` result: one crash can be bad luck, three
/// in a row is a poison task.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Largest task body accepted; larger ones are `rejected`. Payloads belong in messages only up to this size.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Time running tasks get to finish on SIGTERM; systemd's default stop timeout is 90 s.
pub const DEFAULT_GRACE_SECS: u64 = 30;
/// How long published results (and their ids, for de-duplication of redeliveries) stay on disk.
pub const DEFAULT_RETENTION_SECS: u64 = 24 * 3600;
/// A command function's timeout when its config gives none.
pub const DEFAULT_FUNCTION_TIMEOUT_SECS: u64 = 600;
/// A command function's output cap when its config gives none; results travel as one AMQP message.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1024 * 1024;
/// Reconnect backoff: the first retry soon (a forced close, a blip), later ones no more than twice a minute.
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(200);
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Most executor slots one agent runs: far above any useful count on one host, low enough to catch a typo.
pub const MAX_WORKERS: usize = 1024;

// --- Intake ---

/// Most payload bytes one intake batch holds (one commit, one ack). At most two batches are in memory (one
/// committing, the next gathering meanwhile), and the raw consumer reads the socket only as fast as batches take
/// deliveries: this and `max_body_bytes` bound what deliveries take in memory (2 x 8 MiB + one body).
pub const INTAKE_BATCH_BYTES: usize = 8 << 20;

// --- The store ---

/// Most commands one commit takes: bounds a transaction's memory and the time a reply waits behind others.
pub const WRITER_MAX_BATCH: usize = 4096;
/// Longest a commit of nothing but "published" marks waits for company: a lost mark only republishes a result,
/// so it may ride along with a commit that is due anyway instead of costing an fsync of its own.
pub const MARK_DELAY: Duration = Duration::from_millis(20);
/// Least time between two checkpoints of the checkpointer thread (`store::checkpointer`): each costs an fsync
/// of the database file, and pages changed again within the interval (the tasks table's, its indexes') are
/// copied once. The WAL holds about this much of the write traffic between checkpoints.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// WAL size (in 4 KiB pages: 32 MiB) at which the writer checkpoints itself, inside a commit: a backstop for a
/// load that never pauses long enough for the checkpointer's passive checkpoints to let the WAL start over, and
/// for a checkpointer that fails. SQLite's default (1,000 pages) put a checkpoint inside every few hundred
/// commits.
pub const WAL_BACKSTOP_PAGES: u32 = 8192;
/// Bytes a WAL file keeps after it starts over (`journal_size_limit`): one that grew to the backstop under a
/// burst is cut back to this.
pub const WAL_KEEP_BYTES: i64 = 16 << 20;
/// How long a connection waits for a lock held by another connection (a status read, a checkpoint).
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Payload bytes one claim holds at most (it always takes at least one task): bounds a slot's memory.
pub const MAX_CLAIM_BYTES: usize = 1 << 20;

// --- Executor slots ---

/// Most tasks one slot claims in one commit (when tasks are short): at most ~64 ms of work that another slot
/// cannot take, and at most that many suspects after a crash.
pub const MAX_CLAIM: usize = 64;
/// Functions whose runs average below this are claimed several per commit: a commit (an fsync) costs about
/// as much as such a task.
pub const SHORT_TASK: Duration = Duration::from_millis(1);
/// Results of a claimed batch are stored once the oldest waited this long, even while the batch goes on, so a
/// batch does not hold finished results back from the publisher.
pub const FLUSH_AFTER: Duration = Duration::from_millis(2);
/// Results of a claimed batch are stored once they hold this many bytes, so what a slot keeps in memory while
/// the disk is full (its commit retried, nothing more run) is at most this plus one result (up to the
/// function's `max_output_bytes`).
pub const FLUSH_BYTES: usize = 1 << 20;
/// How much of a failed command's stderr its result keeps: enough for a traceback's end.
pub const STDERR_TAIL_BYTES: usize = 4096;
/// How long a command's stderr may still be read after it exited (a grandchild may hold the pipe open).
pub const STDERR_DRAIN: Duration = Duration::from_secs(1);

// --- Pool workers ---

/// How long a started pool worker may take to connect and say hello (an interpreter importing a big module).
pub const POOL_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Backoff between starts of a worker that fails at start: soon after the first failure, then no more than
/// once a minute while it keeps failing.
pub const POOL_RESTART_MIN: Duration = Duration::from_millis(500);
pub const POOL_RESTART_MAX: Duration = Duration::from_secs(60);
/// Failures at start in a row after which a worker is reported failing (and its function's tasks fail
/// instead of waiting for it).
pub const POOL_FAILING_AFTER: u32 = 3;
/// How long a stopping worker gets after SIGTERM before SIGKILL.
pub const POOL_STOP_WAIT: Duration = Duration::from_secs(5);

// --- Retry loops ---

/// Backoff of a commit or claim that failed (a full disk, a locked file): quick to resume, gentle while it lasts.
pub const STORE_RETRY_MIN: Duration = Duration::from_millis(100);
pub const STORE_RETRY_MAX: Duration = Duration::from_secs(5);
/// Backoff of a standby agent asking for the exclusive consumer: takes over within seconds of the active agent
/// going away, without hammering the broker while it stays.
pub const STANDBY_RETRY_MIN: Duration = Duration::from_millis(500);
pub const STANDBY_RETRY_MAX: Duration = Duration::from_secs(10);
/// Backoff of results the broker refused (nack, return) and of failed reads or marks: a refusal is usually a
/// missing binding or an alarm an operator has to fix.
pub const PUBLISH_RETRY_MIN: Duration = Duration::from_millis(200);
pub const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(30);

// --- The broker session ---

/// A session up at least this long resets the reconnect backoff: the path works again, so the next outage
/// starts from the shortest delay instead of the longest one reached by earlier outages.
pub const STABLE_SESSION: Duration = Duration::from_secs(10);
/// Results published and not yet confirmed, at most: keeps the broker busy without unbounded memory.
pub const PUBLISH_WINDOW: usize = 1024;
/// Result bytes the writer hands the publisher directly after a commit, at most, beyond which the publisher reads
/// them back from the database instead (`store::handoff`): 4 MiB is a few hundred ms of results at thousands of
/// tasks/s, 64 results of 64 KiB; a publisher further behind than that is not kept waiting on memory.
pub const HANDOFF_BYTES: usize = 4 << 20;
/// Results read from the store at a time.
pub const PUBLISH_READ: usize = 256;
/// How often an idle publisher looks for results nobody announced (a safety net; announcements are the rule).
pub const PUBLISHER_IDLE_POLL: Duration = Duration::from_secs(1);
/// How long closing a connection may take before it is dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Least time a stopping agent gives the publisher to send what is pending, however short the grace period.
pub const MIN_DRAIN: Duration = Duration::from_secs(5);

// --- Upkeep ---

/// How often results past their retention are pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

// --- The raw reader ---

/// How long any one exchange of the raw reader with the broker may take.
pub const RAW_IO_TIMEOUT: Duration = Duration::from_secs(15);
