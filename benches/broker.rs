//! The service side of every measurement (the bench's vhost comes from `test_support::broker`): provisioning
//! with `service_setup::provision`, submitting with `service_setup::Submitter` (blast or open-loop paced), and a
//! results queue of its own bound to the `results` exchange with `<EP>.results`, whose receipts are timed
//! against each task's submit time into an HdrHistogram. It must not consume the shared `results` queue (it
//! only purges it between runs so the vhost does not fill up) and never talks to an agent directly.

use anyhow::{Context, Result, anyhow, bail};
use endpoint_wire::{self as wire, BrokerUrl, EndpointId};
use futures_lite::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use service_setup::{Submitter, TaskSpec};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};

/// Task id of task `seq` of run `run`: the receiver finds the submit time from it.
pub fn task_id(run: u64, seq: usize) -> String {
    format!("{run}-{seq}")
}

fn parse_task_id(id: &str) -> Option<(u64, usize)> {
    let (run, seq) = id.split_once('-')?;
    Some((run.parse().ok()?, seq.parse().ok()?))
}

/// One measured run as the receiver sees it: when each task was submitted (nanoseconds after `epoch`, plus one;
/// zero = not yet) and what has come back.
pub struct RunState {
    pub run: u64,
    pub epoch: Instant,
    pub total: usize,
    sent: Vec<AtomicU64>,
    got: Mutex<Got>,
    done: Notify,
}

struct Got {
    seen: Vec<bool>,
    count: usize,
    last: Option<Instant>,
    hist: Histogram<u64>,
    duplicates: u64,
}

/// What a finished run measured.
pub struct Receipts {
    pub count: usize,
    pub last: Option<Instant>,
    /// Latency in microseconds, submit to receipt.
    pub hist: Histogram<u64>,
    pub duplicates: u64,
}

impl RunState {
    pub fn new(run: u64, total: usize) -> Result<Arc<RunState>> {
        let hist = Histogram::new_with_bounds(1, 600_000_000, 3)
            .map_err(|e| anyhow!("cannot create a latency histogram: {e}"))?;
        Ok(Arc::new(RunState {
            run,
            epoch: Instant::now(),
            total,
            sent: (0..total).map(|_| AtomicU64::new(0)).collect(),
            got: Mutex::new(Got {
                seen: vec![false; total],
                count: 0,
                last: None,
                hist,
                duplicates: 0,
            }),
            done: Notify::new(),
        }))
    }

    /// Records that task `seq` was (or was scheduled to be) submitted at `at`.
    pub fn mark_sent(&self, seq: usize, at: Instant) {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1;
        if let Some(slot) = self.sent.get(seq) {
            slot.store(nanos, Ordering::Relaxed);
        }
    }

    /// Records the result of task `seq` arriving at `at` (a duplicate counts as one).
    pub fn receive(&self, seq: usize, at: Instant) {
        let Some(sent) = self.sent.get(seq).map(|s| s.load(Ordering::Relaxed)) else {
            return;
        };
        let mut got = self.got.lock().expect("receiver lock is never poisoned");
        let Some(seen) = got.seen.get_mut(seq) else {
            return;
        };
        if *seen {
            got.duplicates += 1;
            return;
        }
        *seen = true;
        got.count += 1;
        got.last = Some(at);
        if sent > 0 {
            let sent_at = self.epoch + Duration::from_nanos(sent - 1);
            let micros = at.saturating_duration_since(sent_at).as_micros();
            let micros = u64::try_from(micros)
                .unwrap_or(u64::MAX)
                .clamp(1, 600_000_000);
            got.hist.saturating_record(micros);
        }
        if got.count == self.total {
            self.done.notify_one();
        }
    }

    pub fn received(&self) -> usize {
        self.got
            .lock()
            .expect("receiver lock is never poisoned")
            .count
    }

    /// Waits until every task has a result, or fails after `limit` saying how many are missing.
    pub async fn wait_all(&self, limit: Duration) -> Result<Receipts> {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.done.notified();
            if self.received() >= self.total {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "only {} of {} results arrived within {limit:?}: is the broker or the agent overloaded? (see the agent log under the bench's data dir)",
                    self.received(),
                    self.total
                );
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(250)), notified).await;
        }
        let got = self.got.lock().expect("receiver lock is never poisoned");
        Ok(Receipts {
            count: got.count,
            last: got.last,
            hist: got.hist.clone(),
            duplicates: got.duplicates,
        })
    }
}

/// The service side: one connection that provisions, submits and receives results.
pub struct Service {
    pub conn: Connection,
    /// A connection for nothing but the tasks queues' checks (a channel per check): no channel on it ever fails,
    /// whereas `conn` has had channel errors (provisioning checks the shared queue passively), and after a few
    /// thousand channels lapin handed out such a failed channel's id again with its old error (a `--full --busy`
    /// run stopped on it).
    checks: Connection,
    submitter: Arc<Submitter>,
    channel: Channel,
    queue: String,
    current: Arc<Mutex<Option<Arc<RunState>>>>,
    receiver: tokio::task::JoinHandle<()>,
}

/// Interval the bench provisions endpoints with: heartbeats are background noise, not what is measured.
const HEARTBEAT_SECS: u16 = 30;

impl Service {
    pub async fn connect(url: &BrokerUrl) -> Result<Service> {
        let conn = endpoint_wire::amqp::connect(url, "bench service")
            .await
            .context("while connecting the bench's service side: is RabbitMQ running? (docker compose up -d)")?;
        let checks = endpoint_wire::amqp::connect(url, "bench checks")
            .await
            .context("while connecting the bench's checks")?;
        // Provision once so the `results` exchange exists before the bench queue binds to it.
        let channel = conn
            .create_channel()
            .await
            .context("while opening the results channel")?;
        let queue = format!("bench-results-{}", std::process::id());
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("while declaring the bench's results queue")?;
        let submitter = Arc::new(
            Submitter::new(&conn)
                .await
                .context("while opening the submitter")?,
        );
        let current: Arc<Mutex<Option<Arc<RunState>>>> = Arc::default();
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "bench-results".into(),
                BasicConsumeOptions {
                    // Auto-ack: the receiver must never be what limits either mode.
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("while consuming the bench's results queue")?;
        let receiver = tokio::spawn(receive(consumer, current.clone()));
        Ok(Service {
            conn,
            checks,
            submitter,
            channel,
            queue,
            current,
            receiver,
        })
    }

    /// Provisions `eps` with queues of `queue_type` and binds the bench's results queue to each one's
    /// `<EP>.results`, before anything is submitted to them.
    pub async fn provision(&self, eps: &[EndpointId], queue_type: wire::QueueType) -> Result<()> {
        for ep in eps {
            service_setup::provision_typed(&self.conn, ep, HEARTBEAT_SECS, None, Some(queue_type))
                .await
                .with_context(|| format!("while provisioning {ep}"))?;
            self.channel
                .queue_bind(
                    self.queue.as_str().into(),
                    wire::RESULTS_EXCHANGE.into(),
                    ep.results_routing_key().as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("while binding the bench's results queue to {ep}"))?;
        }
        Ok(())
    }

    /// Makes `state` the run whose results are timed; results of other runs are ignored.
    pub fn begin(&self, state: &Arc<RunState>) {
        *self
            .current
            .lock()
            .expect("current-run lock is never poisoned") = Some(state.clone());
    }

    /// Empties the shared durable `results` queue (every result is routed there too, as in production), so
    /// runs do not pile results up in the broker.
    pub async fn purge_shared_results(&self) -> Result<()> {
        // A channel of its own: a failure here must not take the results consumer's channel with it.
        let channel = self
            .conn
            .create_channel()
            .await
            .context("while opening a channel to purge the shared results queue")?;
        channel
            .queue_purge(wire::RESULTS_QUEUE.into(), QueuePurgeOptions::default())
            .await
            .context("while purging the shared results queue")?;
        let _ = channel.close(200, "purged".into()).await;
        Ok(())
    }

    /// Number of tasks waiting in `ep`'s tasks queue and its consumers.
    pub async fn tasks_queue(&self, ep: &EndpointId) -> Result<(u32, u32)> {
        let q = endpoint_wire::amqp::queue_info(&self.checks, &ep.tasks_queue())
            .await
            .context("while checking a tasks queue")?
            .ok_or_else(|| anyhow!("queue {} is gone: was the vhost deleted?", ep.tasks_queue()))?;
        Ok((q.message_count(), q.consumer_count()))
    }

    /// Waits until every endpoint's tasks queue has a consumer (the agent or raw client is taking tasks).
    pub async fn wait_consumers(&self, eps: &[EndpointId], limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        for ep in eps {
            loop {
                if self.tasks_queue(ep).await?.1 > 0 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("nobody consumes {} after {limit:?}", ep.tasks_queue());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Submits every task of `state` as fast as confirms allow: chunks of `CHUNK` tasks per endpoint (one
    /// pipelined `Submitter::submit` each), `WINDOW` chunks in flight. Latency counts from the moment a
    /// task's chunk is handed to the submitter.
    pub async fn blast(
        &self,
        state: &Arc<RunState>,
        eps: &[EndpointId],
        function: &str,
        payload: &[u8],
    ) -> Result<()> {
        const CHUNK: usize = 256;
        const WINDOW: usize = 4;
        let window = Arc::new(Semaphore::new(WINDOW));
        let mut tasks = tokio::task::JoinSet::new();
        let n_eps = eps.len().max(1);
        // Round robin over endpoints in chunks: seq % n_eps picks the endpoint.
        let mut per_ep: Vec<Vec<usize>> = vec![Vec::new(); n_eps];
        for seq in 0..state.total {
            let e = seq % n_eps;
            per_ep[e].push(seq);
            if per_ep[e].len() == CHUNK || seq + n_eps >= state.total {
                let seqs = std::mem::take(&mut per_ep[e]);
                if seqs.is_empty() {
                    continue;
                }
                let permit = window
                    .clone()
                    .acquire_owned()
                    .await
                    .context("submit window closed")?;
                let specs = specs(state.run, &seqs, function, payload);
                let now = Instant::now();
                for s in &seqs {
                    state.mark_sent(*s, now);
                }
                let submitter = self.submitter.clone();
                let ep = eps[e].clone();
                tasks.spawn(async move {
                    let r = submitter.submit(&ep, specs).await;
                    drop(permit);
                    r
                });
            }
            while let Some(done) = tasks.try_join_next() {
                submitted(done)?;
            }
        }
        while let Some(done) = tasks.join_next().await {
            submitted(done)?;
        }
        Ok(())
    }

    /// Open-loop submission at `rate` tasks/s in total (round robin over endpoints): every millisecond, the
    /// tasks whose scheduled time has come are submitted on a task of their own, never waiting for earlier
    /// confirms. Latency counts from each task's scheduled time, so a slow broker cannot hide its delay
    /// (no coordinated omission).
    pub async fn paced(
        &self,
        state: &Arc<RunState>,
        eps: &[EndpointId],
        function: &str,
        payload: &[u8],
        rate: f64,
    ) -> Result<()> {
        let n_eps = eps.len().max(1);
        let start = Instant::now();
        let mut next = 0usize;
        let mut tasks = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while next < state.total {
            tick.tick().await;
            let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(state.total);
            let mut groups: Vec<Vec<usize>> = vec![Vec::new(); n_eps];
            for seq in next..due {
                let at = start + Duration::from_secs_f64(seq as f64 / rate);
                state.mark_sent(seq, at);
                groups[seq % n_eps].push(seq);
            }
            next = next.max(due);
            for (e, seqs) in groups.into_iter().enumerate() {
                if seqs.is_empty() {
                    continue;
                }
                let submitter = self.submitter.clone();
                let ep = eps[e].clone();
                let specs = specs(state.run, &seqs, function, payload);
                tasks.spawn(async move { submitter.submit(&ep, specs).await });
            }
            while let Some(done) = tasks.try_join_next() {
                submitted(done)?;
            }
        }
        while let Some(done) = tasks.join_next().await {
            submitted(done)?;
        }
        Ok(())
    }

    pub fn stop(self) {
        self.receiver.abort();
    }
}

fn specs(run: u64, seqs: &[usize], function: &str, payload: &[u8]) -> Vec<TaskSpec> {
    seqs.iter()
        .map(|s| TaskSpec {
            task_id: Some(task_id(run, *s)),
            function: function.to_owned(),
            payload: payload.to_vec(),
            timeout_ms: None,
            reply_to: None,
        })
        .collect()
}

async fn receive(mut consumer: lapin::Consumer, current: Arc<Mutex<Option<Arc<RunState>>>>) {
    while let Some(Ok(d)) = consumer.next().await {
        let at = Instant::now();
        let Some((run, seq)) = d
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| parse_task_id(id.as_str()))
        else {
            continue;
        };
        let state = current
            .lock()
            .expect("current-run lock is never poisoned")
            .clone();
        if let Some(state) = state.filter(|s| s.run == run) {
            state.receive(seq, at);
        }
    }
}

/// The outcome of one spawned submit task.
fn submitted<T, E: std::error::Error + Send + Sync + 'static>(
    done: std::result::Result<std::result::Result<T, E>, tokio::task::JoinError>,
) -> Result<()> {
    done.context("a submit task panicked")?
        .context("while submitting tasks")?;
    Ok(())
}
