//! Takes tasks from the broker: an exclusive consumer on `<EP>.tasks` with a prefetch, group-committing every
//! delivery to the store before one `multiple` ack. Bad input becomes a `rejected` result (or, with no task
//! id, a logged drop). Above the local backlog it stops taking deliveries so the work stays in the broker.
//! When another agent holds the queue it stands by and retries. Imports lapin. Runs no task itself: a first
//! delivery of an instant function (`echo`) is handed to [`executor::run_on_arrival`] and committed with its
//! result, everything else is queued for the executor slots.

use crate::config::Config;
use crate::connection::{Backoff, BrokerError};
use crate::executor::{self, Signals};
use crate::raw::{FieldValue, RawConnection, RawError, RawMessage};
use crate::store::{Intake, NewTask, Store};
use crate::wire::{AgentState, HEADER_TIMEOUT_MS, MAX_HEADER_BYTES};
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub(crate) struct Subscriber {
    pub config: Arc<Config>,
    pub store: Store,
    pub signals: Arc<Signals>,
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
        let mut standby = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
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
        loop {
            match self.store.ingest(intake.clone()).await {
                Ok(out) => {
                    retry.reset();
                    if out.rejected + out.ran > 0 {
                        self.signals.new_results.notify_one();
                    }
                    if out.duplicates > 0 {
                        tracing::info!(
                            duplicates = out.duplicates,
                            "task ids already on disk were not queued again"
                        );
                    }
                    return true;
                }
                Err(e) => {
                    // Disk full was logged once by the store; other errors are worth a line each time.
                    if e.is_disk_full() {
                        tracing::debug!(error = %e, "disk still full; not acking received tasks, retrying");
                    } else {
                        tracing::error!(error = %e, "cannot commit received tasks; not acking them, retrying");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(retry.next_delay()) => {}
                    }
                }
            }
        }
    }

    /// Reads the deliveries that were in flight when lapin failed to parse one (the broker gave them back,
    /// `redelivered`) with our own AMQP reader, one at a time: each is committed, then acked, exactly as in
    /// `consume`. Stops after the unparsable one, at the first message that was never delivered, or after
    /// `prefetch` messages; each pass moves at least one message, so a bad message cannot loop.
    async fn read_unparsable(&self, queue: &str, stop: &CancellationToken) -> Result<(), RawError> {
        let name = format!("endpoint-agent {} raw reader", self.config.endpoint_id);
        let mut raw = RawConnection::open(&self.config.broker_url, &name).await?;
        let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
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

fn parse_ms(text: &[u8]) -> Option<i128> {
    std::str::from_utf8(text).ok()?.trim().parse().ok()
}

/// The `x-timeout-ms` value `n` read from the header value `shown`, if it is a positive integer.
fn positive_ms(n: Option<i128>, shown: &dyn std::fmt::Debug) -> Result<u64, String> {
    match n {
        Some(n) if n > 0 => Ok(u64::try_from(n).unwrap_or(u64::MAX)),
        _ => Err(format!(
            "header {HEADER_TIMEOUT_MS} must be a positive integer number of milliseconds, got {shown:?}"
        )),
    }
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

fn utf8(b: &Option<Vec<u8>>) -> Result<Option<&str>, std::str::Utf8Error> {
    b.as_deref().map(std::str::from_utf8).transpose()
}

/// What a message fetched by [`crate::raw`] becomes, and whether lapin could not have read it (the reason it
/// was fetched that way). A task id that is not UTF-8 cannot be answered (results carry it as a UTF-8 short
/// string), so such a message is dropped and logged like one without an id.
fn classify_raw(config: &Config, m: &RawMessage) -> (Option<Intake>, bool) {
    let p = &m.properties;
    let Ok(message_id) = utf8(&p.message_id) else {
        tracing::warn!(
            message_id = ?String::from_utf8_lossy(p.message_id.as_deref().unwrap_or_default()),
            function = ?p.kind.as_deref().map(String::from_utf8_lossy),
            bytes = m.body.len(),
            "dropped a task whose message_id is not valid UTF-8 (no task id to answer to): send task ids as UTF-8"
        );
        return (None, true);
    };
    let Some(task_id) = message_id.filter(|id| !id.is_empty()) else {
        tracing::warn!(
            bytes = m.body.len(),
            "dropped a task without message_id (no task id to answer to): set message_id on every task"
        );
        return (None, false);
    };
    let reject = |reason: String| {
        Some(Intake::Rejected {
            task_id: task_id.to_owned(),
            function: String::from_utf8_lossy(p.kind.as_deref().unwrap_or_default()).into_owned(),
            reason,
        })
    };
    let Ok(function) = utf8(&p.kind) else {
        let shown = String::from_utf8_lossy(p.kind.as_deref().unwrap_or_default()).into_owned();
        return (
            reject(format!(
                "the `type` property (the function name) is not valid UTF-8: {shown:?}"
            )),
            true,
        );
    };
    let headers = match p
        .headers
        .as_deref()
        .map(crate::raw::parse_table)
        .transpose()
    {
        Ok(h) => h.unwrap_or_default(),
        Err(e) => return (reject(format!("task headers cannot be read: {e}")), true),
    };
    if let Some((key, _)) = headers
        .iter()
        .find(|(k, _)| std::str::from_utf8(k).is_err())
    {
        let shown = String::from_utf8_lossy(key).into_owned();
        return (
            reject(format!("header name {shown:?} is not valid UTF-8")),
            true,
        );
    }
    let timeout = headers
        .iter()
        .find(|(k, _)| k.as_slice() == HEADER_TIMEOUT_MS.as_bytes())
        .map(|(_, v)| {
            let n = match v {
                FieldValue::Int(n) => Some(*n),
                FieldValue::Bytes(b) => parse_ms(b),
                FieldValue::Other(_) => None,
            };
            positive_ms(n, v)
        });
    let header_bytes = p.headers.as_ref().map_or(0, Vec::len);
    let intake = classify(
        config,
        Some(task_id),
        function,
        timeout,
        header_bytes,
        &m.body,
    );
    (intake, false)
}

/// A first delivery of a task whose function runs on arrival comes with its result (see
/// [`executor::run_on_arrival`]); a redelivered one may be what stopped the agent last time, so it is queued
/// and runs from the disk queue with its attempt counted.
fn on_arrival(config: &Config, intake: Intake, redelivered: bool) -> Intake {
    match intake {
        Intake::Task(t) if !redelivered => executor::run_on_arrival(config, t),
        other => other,
    }
}

/// Decides what a delivery becomes. `None`: no task id, so nothing can be answered (logged and acked).
fn classify(
    config: &Config,
    message_id: Option<&str>,
    function: Option<&str>,
    timeout: Option<Result<u64, String>>,
    header_bytes: usize,
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
    if header_bytes > MAX_HEADER_BYTES {
        return reject(
            function,
            format!(
                "task headers are {header_bytes} bytes, over the limit of {MAX_HEADER_BYTES}: put data in the body, not in headers"
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
    use crate::raw::RawProperties;
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

    #[test]
    fn only_first_deliveries_of_instant_functions_run_on_arrival() {
        let c = config();
        let task = |f: &str| {
            Intake::Task(NewTask {
                task_id: "t".into(),
                function: f.into(),
                payload: b"hi".to_vec(),
                timeout_ms: None,
            })
        };
        match on_arrival(&c, task("echo"), false) {
            Intake::Ran { function, result } => {
                assert_eq!(function, "echo");
                assert_eq!(
                    (result.task_id.as_str(), result.status, result.attempts),
                    ("t", crate::wire::Status::Ok, 1)
                );
                assert_eq!(result.body, b"hi");
            }
            other => panic!("echo on first delivery should run on arrival: {other:?}"),
        }
        // Redelivered: maybe it stopped the agent last time; it goes to the disk queue.
        assert_eq!(on_arrival(&c, task("echo"), true), task("echo"));
        // Not instant: queued for a slot.
        assert_eq!(on_arrival(&c, task("sleep"), false), task("sleep"));
        let rejected = Intake::Rejected {
            task_id: "t".into(),
            function: "echo".into(),
            reason: "bad".into(),
        };
        assert_eq!(on_arrival(&c, rejected.clone(), false), rejected);
    }

    fn check(
        id: Option<&str>,
        f: Option<&str>,
        t: Option<Result<u64, String>>,
        body: &str,
        want: Option<&str>,
    ) {
        let got = classify(&config(), id, f, t, 0, body.as_bytes());
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

    fn check_raw(props: RawProperties, want: Option<&str>, unparsable: bool) {
        let m = RawMessage {
            delivery_tag: 1,
            redelivered: true,
            properties: props,
            body: b"hi".to_vec(),
        };
        let (got, bad) = classify_raw(&config(), &m);
        assert_eq!(bad, unparsable, "{got:?}");
        match (got, want) {
            (None, None) => {}
            (Some(Intake::Task(t)), Some(w)) if w.starts_with("task") => {
                assert_eq!(format!("task {:?}", t.timeout_ms), w)
            }
            (Some(Intake::Rejected { reason, .. }), Some(w)) => {
                assert!(reason.contains(w), "{reason:?} lacks {w:?}")
            }
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn raw_classification() {
        use crate::raw::table_entry;
        let good = || RawProperties {
            message_id: Some(b"t1".to_vec()),
            kind: Some(b"echo".to_vec()),
            headers: None,
            delivery_mode: Some(2),
        };
        check_raw(good(), Some("task None"), false);
        let timeout = table_entry(HEADER_TIMEOUT_MS.as_bytes(), b'I', &250i32.to_be_bytes());
        check_raw(
            RawProperties {
                headers: Some(timeout),
                ..good()
            },
            Some("task Some(250)"),
            false,
        );
        check_raw(
            RawProperties {
                message_id: Some(b"id\xff".to_vec()),
                ..good()
            },
            None,
            true,
        );
        check_raw(
            RawProperties {
                message_id: None,
                ..good()
            },
            None,
            false,
        );
        check_raw(
            RawProperties {
                kind: Some(b"ec\xffho".to_vec()),
                ..good()
            },
            Some("`type` property (the function name) is not valid UTF-8"),
            true,
        );
        check_raw(
            RawProperties {
                headers: Some(table_entry(b"k\xfe", b'V', &[])),
                ..good()
            },
            Some("header name \"k\u{fffd}\" is not valid UTF-8"),
            true,
        );
        check_raw(
            RawProperties {
                headers: Some(table_entry(b"k", b'U', &[0, 1])),
                ..good()
            },
            Some("unknown header field type 'U'"),
            true,
        );
        let mut big = Vec::new();
        for i in 0..200 {
            big.extend(table_entry(
                format!("h{i}").as_bytes(),
                b'x',
                &[&100u32.to_be_bytes()[..], &[7; 100]].concat(),
            ));
        }
        check_raw(
            RawProperties {
                headers: Some(big),
                ..good()
            },
            Some("over the limit of 16384"),
            false,
        );
    }

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
