//! Sends what the endpoint has to say: results, published `mandatory` and persistent with publisher confirms
//! and marked published in the store only on the broker's ack (a nack, a return or a lost connection leaves
//! them pending for replay), and the heartbeat ticker. Imports lapin; reads results from the store, never
//! writes anything but the "published" mark.

use crate::config::Config;
use crate::connection::{Backoff, BrokerError};
use crate::executor::Signals;
use crate::store::{Store, TaskResult};
use crate::wire::{self, AgentState, Heartbeat};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Results published per round of confirms.
const BATCH: usize = 512;

pub(crate) struct Publisher {
    pub config: Arc<Config>,
    pub store: Store,
    pub signals: Arc<Signals>,
    pub state: watch::Receiver<AgentState>,
    /// Heartbeat sequence, kept across reconnects.
    pub seq: Arc<AtomicU64>,
    /// `Some(why)` while the broker blocks the publishing connection (a resource alarm).
    pub blocked: watch::Receiver<Option<String>>,
}

async fn confirm_channel(conn: &Connection, what: &str) -> Result<Channel, BrokerError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| BrokerError::amqp(format!("while opening the {what} channel"), e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| BrokerError::amqp("while enabling publisher confirms", e))?;
    Ok(channel)
}

impl Publisher {
    /// Publishes pending results as they appear. Returns Ok once `drain` is cancelled and nothing is pending,
    /// or the error that broke the connection.
    pub async fn run(
        &self,
        conn: &Connection,
        drain: &CancellationToken,
    ) -> Result<(), BrokerError> {
        let channel = confirm_channel(conn, "publisher").await?;
        let mut failures = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut blocked = self.blocked.clone();
        loop {
            // While the broker blocks us, publish nothing: results stay on disk and nothing piles up in the
            // client's buffers. A shutdown meanwhile leaves them pending for the next start.
            while blocked.borrow_and_update().is_some() {
                if blocked.changed().await.is_err() {
                    return Ok(());
                }
            }
            let notified = self.signals.new_results.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let pending = match self.store.pending_results(BATCH).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read pending results; retrying");
                    tokio::time::sleep(failures.next_delay()).await;
                    continue;
                }
            };
            if pending.is_empty() {
                if drain.is_cancelled() {
                    return Ok(());
                }
                tokio::select! {
                    _ = &mut notified => {}
                    _ = drain.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let (acked, refused) = self.publish_batch(&channel, &pending).await?;
            if let Err(e) = self.store.mark_published(acked).await {
                // They stay pending and go out again: a duplicate result is harmless, a lost one is not.
                tracing::error!(error = %e, "cannot mark results published; they will be published again");
            }
            if refused > 0 {
                let delay = failures.next_delay();
                tracing::warn!(
                    refused,
                    ?delay,
                    "the broker did not take some results; they stay pending"
                );
                // Not cut short by `drain`: while draining, a refusal would otherwise be retried in a hot loop.
                tokio::time::sleep(delay).await;
            } else {
                failures.reset();
            }
        }
    }

    /// Publishes every result, then awaits every confirm (pipelined). Returns the row ids the broker acked
    /// and routed, and how many it nacked or returned.
    async fn publish_batch(
        &self,
        channel: &Channel,
        pending: &[(i64, TaskResult)],
    ) -> Result<(Vec<i64>, usize), BrokerError> {
        let ep = &self.config.endpoint_id;
        let routing_key: ShortString = ep.results_routing_key().into();
        let lost = |e| BrokerError::amqp("while publishing results", e);
        let mut confirms = Vec::with_capacity(pending.len());
        for (id, r) in pending {
            let confirm = channel
                .basic_publish(
                    wire::RESULTS_EXCHANGE.into(),
                    routing_key.clone(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &r.body,
                    result_properties(ep.as_str(), r),
                )
                .await
                .map_err(lost)?;
            confirms.push((*id, &r.task_id, confirm));
        }
        let mut acked = Vec::with_capacity(confirms.len());
        let mut refused = 0;
        for (id, task_id, confirm) in confirms {
            match confirm.await.map_err(lost)? {
                Confirmation::Ack(None) => acked.push(id),
                Confirmation::Ack(Some(returned)) => {
                    refused += 1;
                    tracing::warn!(task_id = %task_id, reply = %returned.reply_text,
                        "result returned unroutable: is the `results` queue bound? (run `service-setup provision`)");
                }
                Confirmation::Nack(_) | Confirmation::NotRequested => {
                    refused += 1;
                    tracing::warn!(task_id = %task_id, "result nacked by the broker");
                }
            }
        }
        Ok((acked, refused))
    }

    /// Publishes a heartbeat every `interval` until the connection fails.
    pub async fn ticker(&self, conn: &Connection, interval: Duration) -> Result<(), BrokerError> {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| BrokerError::amqp("while opening the heartbeat channel", e))?;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let state = self.state.borrow().with_conditions(
                self.store.disk_full().borrow().is_some(),
                self.blocked.borrow().is_some(),
            );
            // Not confirmed: the next beat supersedes a lost one.
            let _confirm = self.publish_heartbeat(&channel, state, interval).await?;
        }
    }

    /// Publishes the last heartbeat (`stopped`) and waits for the broker's confirm.
    pub async fn final_heartbeat(
        &self,
        conn: &Connection,
        interval: Duration,
    ) -> Result<(), BrokerError> {
        let channel = confirm_channel(conn, "heartbeat").await?;
        let confirm = self
            .publish_heartbeat(&channel, AgentState::Stopped, interval)
            .await?;
        confirm
            .await
            .map_err(|e| BrokerError::amqp("while confirming the final heartbeat", e))?;
        let _ = channel.close(200, "stopped".into()).await;
        Ok(())
    }

    async fn publish_heartbeat(
        &self,
        channel: &Channel,
        state: AgentState,
        interval: Duration,
    ) -> Result<lapin::PublisherConfirm, BrokerError> {
        let counts = *self.store.counts().borrow();
        let beat = Heartbeat {
            protocol_version: wire::PROTOCOL_VERSION,
            endpoint_id: self.config.endpoint_id.clone(),
            state,
            tasks_queued: counts.queued,
            tasks_running: counts.running,
            results_pending: counts.results_pending,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            time_ms: wire::now_ms(),
            heartbeat_secs: u16::try_from(interval.as_secs()).unwrap_or(u16::MAX),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let body = serde_json::to_vec(&beat).expect("a heartbeat always serializes");
        let queue = self.config.endpoint_id.heartbeat_queue();
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_timestamp(beat.time_ms / 1000),
            )
            .await
            .map_err(|e| BrokerError::amqp("while publishing a heartbeat", e))
    }
}

fn result_properties(endpoint_id: &str, r: &TaskResult) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        wire::HEADER_ENDPOINT_ID.into(),
        AMQPValue::LongString(endpoint_id.into()),
    );
    headers.insert(
        wire::HEADER_STATUS.into(),
        AMQPValue::LongString(r.status.as_str().into()),
    );
    if let Some(code) = r.exit_code {
        headers.insert(wire::HEADER_EXIT_CODE.into(), AMQPValue::LongInt(code));
    }
    headers.insert(
        wire::HEADER_ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(r.attempts)),
    );
    headers.insert(
        wire::HEADER_DURATION_MS.into(),
        AMQPValue::LongLongInt(i64::try_from(r.duration_ms).unwrap_or(i64::MAX)),
    );
    BasicProperties::default()
        .with_message_id(r.task_id.as_str().into())
        .with_correlation_id(r.task_id.as_str().into())
        .with_delivery_mode(2)
        .with_timestamp(wire::now_ms() / 1000)
        .with_headers(headers)
}
