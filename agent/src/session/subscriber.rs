//! Takes tasks from the broker: an exclusive consumer on `<EP>.tasks` with a prefetch, on a connection of our
//! own AMQP client (`raw`), group-committing every delivery to the store before one `multiple` ack, the next
//! batch gathering while one commits. What
//! each delivery becomes is `intake`'s decision (bad input becomes a `rejected` result or, with no task id, a
//! logged drop; a first delivery of an instant function comes with its result). `raw` reads the socket only as
//! fast as this takes deliveries and never holds a body over `max_body_bytes`, and a batch is bounded in
//! bytes, so hostile input cannot fill memory; and it reads any bytes, so a message no library can parse is
//! answered like any other. Above the local backlog it stops taking deliveries so the work stays in the
//! broker. On a classic tasks queue (exclusive consumer), when another agent holds the queue it stands by and
//! retries. On a quorum tasks queue (single active consumer) it registers as a consumer at once and the
//! broker decides: it waits (standby) until the broker delivers to it, which proves it is the active one (an
//! idle queue gets a probe from the heartbeat ticker, `PROBE_TYPE`, at once and then every beat).

use crate::config::Config;
use crate::intake::{classify_raw, on_arrival};
use crate::limits::{
    INTAKE_BATCH_BYTES, STANDBY_RETRY_MAX, STANDBY_RETRY_MIN, STORE_RETRY_MAX, STORE_RETRY_MIN,
};
use crate::meta::MetaKey;
use crate::raw::{RawConnection, RawError, RawMessage};
use crate::retry::{self, Backoff};
use crate::stages::Stage;
use crate::store::Store;
use crate::task::Intake;
use endpoint_wire::{AgentState, PROBE_TYPE, QueueType, now_rfc3339};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub(crate) struct Subscriber {
    pub config: Arc<Config>,
    pub store: Store,
    pub state: watch::Sender<AgentState>,
    /// Set while this agent holds the tasks consumer (heartbeats say `active`), cleared while it stands by.
    pub consuming: Arc<AtomicBool>,
    /// Set while this agent is registered as a waiting consumer of a single-active-consumer queue (not yet
    /// delivered to); the heartbeat ticker then sends probes.
    pub waiting: Arc<AtomicBool>,
    /// Wakes the heartbeat ticker to send its first probe as soon as this agent waits.
    pub probe_now: Arc<tokio::sync::Notify>,
}

/// What ended a subscriber's work on its connection.
pub(crate) type Ended = Result<(), RawError>;

/// A batch being committed: the commit (true once committed, false if given up; it hands the backoff back), the
/// last delivery tag to ack after it, how many deliveries it holds, and when its first one arrived.
struct Committing<'a> {
    commit: std::pin::Pin<Box<dyn std::future::Future<Output = (bool, Backoff)> + Send + 'a>>,
    last_tag: u64,
    received: usize,
    arrived: std::time::Instant,
}

impl Subscriber {
    /// Consumes until `stop` (returns Ok; what was not acked goes back to the broker when the connection
    /// closes) or until the connection fails (returns the error; the caller reconnects).
    pub async fn run(
        &self,
        conn: &mut RawConnection,
        stop: &CancellationToken,
        queue_type: QueueType,
    ) -> Ended {
        let ended = self.run_on(conn, stop, queue_type).await;
        self.waiting.store(false, Ordering::Relaxed);
        ended
    }

    async fn run_on(
        &self,
        conn: &mut RawConnection,
        stop: &CancellationToken,
        queue_type: QueueType,
    ) -> Ended {
        let queue = self.config.endpoint_id.tasks_queue();
        // A quorum queue ignores the exclusive flag: there its single active consumer keeps one agent at a time.
        let single_active = queue_type == QueueType::Quorum;
        let tag = format!("endpoint-agent-{}", std::process::id());
        let mut standby = Backoff::new(STANDBY_RETRY_MIN, STANDBY_RETRY_MAX);
        let mut standing_by = false;
        while !stop.is_cancelled() {
            match conn
                .consume(&queue, &tag, self.config.prefetch, !single_active)
                .await
            {
                Ok(()) if single_active => {
                    tracing::info!(queue = %queue, prefetch = self.config.prefetch, "registered as a consumer of the tasks queue (single active consumer): standing by until the broker delivers to this agent");
                    self.store
                        .record(
                            MetaKey::Link,
                            format!(
                                "standby since {}: registered as a consumer of {queue}, waiting for the broker to make it the active one",
                                now_rfc3339()
                            ),
                        )
                        .await;
                    self.consuming.store(false, Ordering::Relaxed);
                    self.waiting.store(true, Ordering::Relaxed);
                    self.probe_now.notify_one();
                    self.state.send_replace(AgentState::Standby);
                    return self.consume(conn, stop).await;
                }
                Ok(()) => {
                    if standing_by {
                        tracing::info!(queue = %queue, "the other agent went away: taking over the tasks queue");
                        self.store
                            .record(
                                MetaKey::Link,
                                format!(
                                    "connected since {} (took over from another agent)",
                                    now_rfc3339()
                                ),
                            )
                            .await;
                    } else {
                        tracing::info!(queue = %queue, prefetch = self.config.prefetch, "consuming tasks");
                    }
                    self.consuming.store(true, Ordering::Relaxed);
                    self.state.send_replace(AgentState::Running);
                    return self.consume(conn, stop).await;
                }
                Err(e) if e.is_exclusive_conflict() => {
                    if !standing_by {
                        tracing::warn!(
                            queue = %queue,
                            "another agent is consuming this endpoint's tasks: standing by (running what is on disk, publishing its results) and retrying until it goes away"
                        );
                        standing_by = true;
                        self.store
                            .record(
                                MetaKey::Link,
                                format!(
                                    "standby since {}: another agent consumes {queue}",
                                    now_rfc3339()
                                ),
                            )
                            .await;
                    }
                    self.consuming.store(false, Ordering::Relaxed);
                    self.state.send_replace(AgentState::Standby);
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(standby.next_delay()) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Group commit, pipelined: while one batch commits, the deliveries that arrive meanwhile gather into the
    /// next one (up to the prefetch and [`INTAKE_BATCH_BYTES`]), which starts committing as soon as the first is
    /// acked. So the broker's deliveries and the disk's writes overlap instead of taking turns, and at most two
    /// batches are in memory. Each batch is acked (one `multiple` ack of its last tag) only after its commit.
    async fn consume(&self, conn: &mut RawConnection, stop: &CancellationToken) -> Ended {
        let max_batch = usize::from(self.config.prefetch);
        let max_body = self.config.max_body_bytes;
        let mut retry = Some(Backoff::new(STORE_RETRY_MIN, STORE_RETRY_MAX));
        // The batch gathering, its payload bytes, and when its first delivery arrived.
        let mut next: Vec<RawMessage> = Vec::new();
        let mut next_bytes = 0;
        let mut next_arrived = std::time::Instant::now();
        let mut committing: Option<Committing<'_>> = None;
        loop {
            if committing.is_none() && !next.is_empty() {
                if !self.wait_for_room(stop).await {
                    return Ok(());
                }
                let batch = std::mem::take(&mut next);
                next_bytes = 0;
                let last_tag = batch
                    .last()
                    .map(|d| d.delivery_tag)
                    .expect("checked non-empty");
                if self.waiting.swap(false, Ordering::Relaxed) {
                    self.became_active().await;
                }
                let received = batch.len();
                let intake: Vec<Intake> = batch
                    .into_iter()
                    .filter(|d| d.properties.kind.as_deref() != Some(PROBE_TYPE.as_bytes()))
                    .filter_map(|d| {
                        let redelivered = d.redelivered;
                        classify_raw(&self.config, d)
                            .map(|i| on_arrival(&self.config, i, redelivered))
                    })
                    .collect();
                let retry = retry.take().expect("one commit at a time");
                committing = Some(Committing {
                    commit: Box::pin(self.commit(intake, retry, stop)),
                    last_tag,
                    received,
                    arrived: next_arrived,
                });
            }
            let room = next.len() < max_batch && next_bytes < INTAKE_BATCH_BYTES;
            tokio::select! {
                biased;
                // A commit under way is seen through (and acked) first: `commit` itself gives up on `stop`.
                _ = stop.cancelled(), if committing.is_none() => return Ok(()),
                (committed, backoff) = async { committing.as_mut().expect("checked some").commit.as_mut().await }, if committing.is_some() => {
                    let batch = committing.take().expect("checked some");
                    retry = Some(backoff);
                    if !committed {
                        return Ok(());
                    }
                    let at = std::time::Instant::now();
                    crate::stages::since(Stage::IntakeCommit, batch.arrived);
                    conn.ack_up_to(batch.last_tag).await?;
                    crate::stages::since(Stage::Ack, at);
                    crate::http::metrics::deliveries_acked(batch.arrived, batch.received);
                }
                d = conn.next_delivery(max_body), if room => {
                    let d = d?;
                    if next.is_empty() {
                        next_arrived = std::time::Instant::now();
                    }
                    next_bytes += d.body.len();
                    next.push(d);
                }
            }
        }
    }

    /// The broker delivered to this waiting consumer of a single-active-consumer queue: it is the active one.
    async fn became_active(&self) {
        tracing::info!(
            "the broker made this agent the tasks queue's active consumer: taking tasks"
        );
        self.store
            .record(
                MetaKey::Link,
                format!("connected since {} (the active consumer)", now_rfc3339()),
            )
            .await;
        self.consuming.store(true, Ordering::Relaxed);
        self.state.send_replace(AgentState::Running);
    }

    /// Commits received tasks, retrying with backoff until it works (a full disk); nothing may be acked before.
    /// A failed commit gives the batch back, so a retry copies nothing. False if `stop` came first (the
    /// deliveries stay unacked and go back to the broker), or if the store is gone. Owns the backoff while it
    /// runs (it runs beside the gathering of the next batch) and returns it.
    async fn commit(
        &self,
        intake: Vec<Intake>,
        mut retry: Backoff,
        stop: &CancellationToken,
    ) -> (bool, Backoff) {
        if intake.is_empty() {
            // Nothing but probes or dropped deliveries: only the ack is due.
            return (true, retry);
        }
        // What the metrics need of the batch, taken before it moves into the store.
        let finished = crate::http::metrics::arrived_finished(&self.config, &intake);
        let committed = retry::until_stopped_with(
            "cannot commit received tasks (not acked)",
            &mut retry,
            stop,
            intake,
            |intake| async {
                self.store
                    .try_ingest(intake)
                    .await
                    .map_err(|n| (n.error, n.items))
            },
        )
        .await;
        let Some(out) = committed else {
            return (false, retry);
        };
        crate::http::metrics::intake_committed(finished);
        if out.duplicates > 0 {
            tracing::info!(
                duplicates = out.duplicates,
                "task ids already on disk were not queued again"
            );
        }
        (true, retry)
    }

    /// Local backpressure: waits while the backlog on disk is at its maximum. False if stopped meanwhile.
    async fn wait_for_room(&self, stop: &CancellationToken) -> bool {
        let mut counts = self.store.counts();
        let mut paused = false;
        loop {
            if counts.borrow_and_update().queued < self.config.max_backlog {
                if paused {
                    tracing::info!("backlog below max_backlog again: taking tasks");
                    self.state.send_replace(AgentState::Running);
                }
                return true;
            }
            if !paused {
                tracing::warn!(
                    max_backlog = self.config.max_backlog,
                    "local backlog full: leaving further tasks in the broker"
                );
                self.state.send_replace(AgentState::Paused);
                paused = true;
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                r = counts.changed() => if r.is_err() { return false },
            }
        }
    }
}
