//! Takes tasks from the broker: an exclusive consumer on `<EP>.tasks` with a prefetch, group-committing every
//! delivery to the store before one `multiple` ack. Bad input becomes a `rejected` result (or, with no task
//! id, a logged drop). Above the local backlog it stops taking deliveries so the work stays in the broker.
//! When another agent holds the queue it stands by and retries. Imports lapin; never runs tasks.

use crate::config::Config;
use crate::connection::{Backoff, BrokerError};
use crate::executor::Signals;
use crate::store::{Intake, NewTask, Store};
use crate::wire::{AgentState, HEADER_TIMEOUT_MS};
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub(crate) struct Subscriber {
    pub config: Arc<Config>,
    pub store: Store,
    pub signals: Arc<Signals>,
    pub state: watch::Sender<AgentState>,
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
        let mut standby = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let mut standing_by = false;
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
                        crate::connection::record_link(
                            &self.store,
                            "link",
                            format!(
                                "connected since {} (took over from another agent)",
                                crate::connection::wire_time()
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
                        crate::connection::record_link(
                            &self.store,
                            "link",
                            format!(
                                "standby since {}: another agent consumes {queue}",
                                crate::connection::wire_time()
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
        let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
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
                .filter_map(|d| classify_delivery(&self.config, d))
                .collect();
            let last_tag = batch
                .last()
                .map(|d| d.delivery_tag)
                .expect("batch holds at least the first delivery");
            loop {
                match self.store.ingest(intake.clone()).await {
                    Ok(out) => {
                        retry.reset();
                        if out.duplicates > 0 {
                            tracing::info!(
                                duplicates = out.duplicates,
                                "task ids already on disk were not queued again"
                            );
                        }
                        break;
                    }
                    Err(e) => {
                        // Not acked: the deliveries stay ours (or the broker's, if we stop) until a commit works.
                        tracing::error!(error = %e, "cannot commit received tasks; not acking them, retrying");
                        tokio::select! {
                            _ = stop.cancelled() => return close(channel, &consumer).await,
                            _ = tokio::time::sleep(retry.next_delay()) => {}
                        }
                    }
                }
            }
            channel
                .basic_ack(last_tag, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| BrokerError::amqp("while acking tasks", e))?;
            self.signals.new_tasks.notify_waiters();
        }
        close(channel, &consumer).await
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
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse().ok()),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    };
    match n {
        Some(n) if n > 0 => Ok(u64::try_from(n).unwrap_or(u64::MAX)),
        _ => Err(format!(
            "header {HEADER_TIMEOUT_MS} must be a positive integer number of milliseconds, got {v:?}"
        )),
    }
}

/// Decides what a delivery becomes. `None`: no task id, so nothing can be answered (logged and acked).
fn classify(
    config: &Config,
    message_id: Option<&str>,
    function: Option<&str>,
    timeout: Option<Result<u64, String>>,
    body: &[u8],
) -> Option<Intake> {
    let task_id = message_id.filter(|id| !id.is_empty())?.to_owned();
    let reject = |function: &str, reason: String| {
        Some(Intake::Rejected {
            task_id: task_id.clone(),
            function: function.to_owned(),
            reason,
        })
    };
    let Some(function) = function.filter(|f| !f.is_empty()) else {
        return reject(
            "",
            "task has no `type` property: set it to the name of the function to run".into(),
        );
    };
    if config.function(function).is_none() {
        let offered: Vec<&str> = config.functions.keys().map(String::as_str).collect();
        return reject(
            function,
            format!(
                "unknown function {function:?}: this endpoint offers {}",
                offered.join(", ")
            ),
        );
    }
    if body.len() > config.max_body_bytes {
        return reject(
            function,
            format!(
                "task body is {} bytes, over this endpoint's max_body_bytes of {}",
                body.len(),
                config.max_body_bytes
            ),
        );
    }
    let timeout_ms = match timeout.transpose() {
        Ok(t) => t,
        Err(reason) => return reject(function, reason),
    };
    Some(Intake::Task(NewTask {
        task_id,
        function: function.to_owned(),
        payload: body.to_vec(),
        timeout_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;
    use crate::connection::BrokerUrl;
    use crate::wire::EndpointId;

    fn config() -> Config {
        let o = Overrides {
            endpoint_id: EndpointId::new("ep").unwrap(),
            broker_url: BrokerUrl::new("amqp://h/%2f").unwrap(),
            data_dir: Some(std::env::temp_dir()),
            workers: None,
            prefetch: None,
        };
        let mut c = Config::load(o, None).unwrap();
        c.max_body_bytes = 10;
        c
    }

    fn check(
        id: Option<&str>,
        f: Option<&str>,
        t: Option<Result<u64, String>>,
        body: &str,
        want: Option<&str>,
    ) {
        let got = classify(&config(), id, f, t, body.as_bytes());
        match (got, want) {
            (None, None) => {}
            (Some(Intake::Task(t)), Some("task")) => assert_eq!(t.payload, body.as_bytes()),
            (Some(Intake::Rejected { reason, .. }), Some(w)) => {
                assert!(reason.contains(w), "{reason:?} lacks {w:?}")
            }
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn classification() {
        check(Some("t"), Some("echo"), None, "hi", Some("task"));
        check(None, Some("echo"), None, "hi", None);
        check(Some(""), Some("echo"), None, "hi", None);
        check(Some("t"), None, None, "hi", Some("no `type`"));
        check(
            Some("t"),
            Some("nope"),
            None,
            "hi",
            Some("offers echo, sleep"),
        );
        check(
            Some("t"),
            Some("echo"),
            None,
            "01234567890",
            Some("max_body_bytes of 10"),
        );
        check(
            Some("t"),
            Some("echo"),
            Some(Err("bad header".into())),
            "x",
            Some("bad header"),
        );
        check(Some("t"), Some("echo"), Some(Ok(5)), "x", Some("task"));
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
