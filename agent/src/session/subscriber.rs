//! Takes tasks from the broker: an exclusive consumer on `<EP>.tasks` with a prefetch, group-committing every
//! delivery to the store before one `multiple` ack. What each delivery becomes is `intake`'s decision (bad
//! input becomes a `rejected` result or, with no task id, a logged drop; a first delivery of an instant
//! function comes with its result); this module reads lapin's deliveries into intake's terms. Above the local
//! backlog it stops taking deliveries so the work stays in the broker. When another agent holds the queue it
//! stands by and retries. After a delivery lapin could not parse, it reads the in-flight ones with `raw`.

use crate::config::Config;
use crate::intake::{classify, classify_raw, on_arrival, parse_ms, positive_ms};
use crate::limits::{STANDBY_RETRY_MAX, STANDBY_RETRY_MIN, STORE_RETRY_MAX, STORE_RETRY_MIN};
use crate::meta::MetaKey;
use crate::raw::{RawConnection, RawError};
use crate::retry::{self, Backoff};
use crate::store::Store;
use crate::task::Intake;
use endpoint_wire::{AgentState, BrokerError, HEADER_TIMEOUT_MS, now_rfc3339};
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub(crate) struct Subscriber {
    pub config: Arc<Config>,
    pub store: Store,
    pub state: watch::Sender<AgentState>,
    /// Set when the last subscriber connection died because lapin could not parse a delivery: the next
    /// session first reads the deliveries that were in flight with [`crate::raw`].
    pub unparsable: AtomicBool,
}

impl Subscriber {
    /// Consumes until `stop` (returns Ok, unacked deliveries go back to the broker with the channel) or until
    /// the connection fails (returns the error; the caller reconnects).
    pub async fn run(
        &self,
        conn: &Connection,
        stop: &CancellationToken,
    ) -> Result<(), BrokerError> {
        let queue = self.config.endpoint_id.tasks_queue();
        let tag = format!("endpoint-agent-{}", std::process::id());
        let mut standby = Backoff::new(STANDBY_RETRY_MIN, STANDBY_RETRY_MAX);
        let mut standing_by = false;
        if self.unparsable.load(Ordering::Relaxed) {
            match self.read_unparsable(&queue, stop).await {
                Ok(()) => self.unparsable.store(false, Ordering::Relaxed),
                Err(e) => {
                    return Err(BrokerError::Lost(format!(
                        "cannot read the task lapin could not parse: {e}"
                    )));
                }
            }
        }
        while !stop.is_cancelled() {
            let channel = conn
                .create_channel()
                .await
                .map_err(|e| BrokerError::amqp("while opening the subscriber channel", e))?;
            channel
                .basic_qos(self.config.prefetch, BasicQosOptions::default())
                .await
                .map_err(|e| BrokerError::amqp("while setting the prefetch", e))?;
            let options = BasicConsumeOptions {
                exclusive: true,
                ..BasicConsumeOptions::default()
            };
            let consumed = channel
                .basic_consume(
                    queue.as_str().into(),
                    tag.as_str().into(),
                    options,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| BrokerError::amqp(format!("while consuming {queue}"), e));
            match consumed {
                Ok(consumer) => {
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
                    self.state.send_replace(AgentState::Running);
                    return self.consume(&channel, consumer, stop).await;
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

    async fn consume(
        &self,
        channel: &Channel,
        mut consumer: Consumer,
        stop: &CancellationToken,
    ) -> Result<(), BrokerError> {
        let lost = |e| BrokerError::amqp("while receiving tasks", e);
        let mut retry = Backoff::new(STORE_RETRY_MIN, STORE_RETRY_MAX);
        let max_batch = usize::from(self.config.prefetch);
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => break,
                d = consumer.next() => d,
            };
            let Some(first) = first else {
                return Err(BrokerError::Lost(
                    "the tasks consumer ended (channel closed or consumer cancelled by the broker)"
                        .into(),
                ));
            };
            let mut batch = vec![first.map_err(lost)?];
            // Group commit: take everything that has already arrived, up to the prefetch.
            while batch.len() < max_batch {
                match futures_lite::future::poll_once(consumer.next()).await {
                    Some(Some(d)) => batch.push(d.map_err(lost)?),
                    _ => break,
                }
            }
            if !self.wait_for_room(stop).await {
                break;
            }
            let intake: Vec<Intake> = batch
                .iter()
                .filter_map(|d| {
                    classify_delivery(&self.config, d)
                        .map(|i| on_arrival(&self.config, i, d.redelivered))
                })
                .collect();
            let last_tag = batch
                .last()
                .map(|d| d.delivery_tag)
                .expect("batch holds at least the first delivery");
            // The payloads now live in `intake`: let the deliveries' copies go before the commit.
            drop(batch);
            if !self.commit(intake, &mut retry, stop).await {
                return close(channel, &consumer).await;
            }
            channel
                .basic_ack(last_tag, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| BrokerError::amqp("while acking tasks", e))?;
        }
        close(channel, &consumer).await
    }

    /// Commits received tasks, retrying with backoff until it works (a full disk); nothing may be acked before.
    /// False if `stop` came first: the deliveries stay unacked and go back to the broker.
    async fn commit(
        &self,
        intake: Vec<Intake>,
        retry: &mut Backoff,
        stop: &CancellationToken,
    ) -> bool {
        let committed = retry::until_stopped(
            "cannot commit received tasks (not acked)",
            retry,
            stop,
            || self.store.ingest(intake.clone()),
        )
        .await;
        match committed {
            Some(out) => {
                if out.duplicates > 0 {
                    tracing::info!(
                        duplicates = out.duplicates,
                        "task ids already on disk were not queued again"
                    );
                }
                true
            }
            None => false,
        }
    }

    /// Reads the deliveries that were in flight when lapin failed to parse one (the broker gave them back,
    /// `redelivered`) with our own AMQP reader, one at a time: each is committed, then acked, exactly as in
    /// `consume`. Stops after the unparsable one, at the first message that was never delivered, or after
    /// `prefetch` messages; each pass moves at least one message, so a bad message cannot loop.
    async fn read_unparsable(&self, queue: &str, stop: &CancellationToken) -> Result<(), RawError> {
        let name = format!("endpoint-agent {} raw reader", self.config.endpoint_id);
        let mut raw = RawConnection::open(&self.config.broker_url, &name).await?;
        let mut retry = Backoff::new(STORE_RETRY_MIN, STORE_RETRY_MAX);
        for _ in 0..self.config.prefetch.max(1) {
            let Some(message) = raw.get(queue).await? else {
                break;
            };
            if !message.redelivered {
                raw.requeue(message.delivery_tag).await?;
                break;
            }
            let (intake, unparsable) = classify_raw(&self.config, &message);
            if unparsable {
                tracing::warn!(
                    delivery_tag = message.delivery_tag,
                    "read a task the AMQP client library could not parse (it broke the connection)"
                );
            }
            if !self
                .commit(intake.into_iter().collect(), &mut retry, stop)
                .await
            {
                raw.close().await;
                return Ok(());
            }
            raw.ack(message.delivery_tag).await?;
            if unparsable {
                break;
            }
        }
        raw.close().await;
        Ok(())
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

async fn close(channel: &Channel, consumer: &Consumer) -> Result<(), BrokerError> {
    let _ = channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    // Closing the channel hands any delivery we did not ack back to the broker.
    let _ = channel.close(200, "endpoint-agent stopping".into()).await;
    Ok(())
}

fn classify_delivery(config: &Config, d: &Delivery) -> Option<Intake> {
    let p = &d.properties;
    let timeout = p
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(HEADER_TIMEOUT_MS))
        .map(timeout_ms);
    let intake = classify(
        config,
        p.message_id().as_ref().map(|s| s.as_str()),
        p.kind().as_ref().map(|s| s.as_str()),
        timeout,
        p.headers().as_ref().map_or(0, table_bytes),
        &d.data,
    );
    if intake.is_none() {
        tracing::warn!(
            delivery_tag = d.delivery_tag,
            function = ?p.kind().as_ref().map(|s| s.as_str()),
            bytes = d.data.len(),
            "dropped a task without message_id (no task id to answer to): set message_id on every task"
        );
    }
    intake
}

fn timeout_ms(v: &AMQPValue) -> Result<u64, String> {
    let n: Option<i128> = match v {
        AMQPValue::ShortShortInt(n) => Some((*n).into()),
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => Some((*n).into()),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::LongLongInt(n) => Some((*n).into()),
        AMQPValue::Timestamp(n) => Some((*n).into()),
        AMQPValue::LongString(s) => parse_ms(s.as_bytes()),
        AMQPValue::ShortString(s) => parse_ms(s.as_str().as_bytes()),
        _ => None,
    };
    positive_ms(n, v)
}

/// The encoded size of a header table, to hold tasks to [`MAX_HEADER_BYTES`].
fn table_bytes(t: &FieldTable) -> usize {
    t.inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_bytes(v))
        .sum::<usize>()
}

fn value_bytes(v: &AMQPValue) -> usize {
    1 + match v {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_bytes).sum::<usize>(),
        AMQPValue::FieldTable(t) => 4 + table_bytes(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::tests::config;
    use endpoint_wire::MAX_HEADER_BYTES;

    #[test]
    fn big_header_tables_are_rejected() {
        let mut t = FieldTable::default();
        t.insert("small".into(), AMQPValue::LongLongInt(1));
        assert_eq!(table_bytes(&t), 1 + 5 + 1 + 8);
        t.insert(
            "big".into(),
            AMQPValue::LongString(vec![b'x'; MAX_HEADER_BYTES].into()),
        );
        let got = classify(
            &config(),
            Some("t"),
            Some("echo"),
            None,
            table_bytes(&t),
            b"x",
        );
        assert!(
            matches!(&got, Some(Intake::Rejected { reason, .. }) if reason.contains("over the limit")),
            "{got:?}"
        );
    }

    #[test]
    fn timeout_header_types() {
        assert_eq!(timeout_ms(&AMQPValue::LongLongInt(250)), Ok(250));
        assert_eq!(timeout_ms(&AMQPValue::ShortUInt(7)), Ok(7));
        assert_eq!(timeout_ms(&AMQPValue::LongString("42".into())), Ok(42));
        assert!(timeout_ms(&AMQPValue::LongInt(-1)).is_err());
        assert!(timeout_ms(&AMQPValue::LongInt(0)).is_err());
        assert!(timeout_ms(&AMQPValue::Boolean(true)).is_err());
        assert!(timeout_ms(&AMQPValue::LongString("soon".into())).is_err());
    }
}
