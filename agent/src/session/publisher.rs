//! Sends the endpoint's results: published `mandatory` and persistent with publisher confirms, pipelined, and
//! marked published in the store only on the broker's ack (a nack, a return or a lost connection leaves them
//! pending for replay). A result whose task named a service goes to that service's routing key; if no queue
//! takes it there (the service's queue is gone), it goes to the shared `results` queue instead of bouncing
//! forever. The writer hands it each result as it commits it (the store's hand-off), so a result is sent without
//! being read back; it reads the database itself at start, when the hand-off overflowed, for a rescan and on
//! an idle timer. Never writes anything but the "published" mark.

use crate::config::Config;
use crate::limits::{
    PUBLISH_READ, PUBLISH_RETRY_MAX, PUBLISH_RETRY_MIN, PUBLISH_WINDOW, PUBLISHER_IDLE_POLL,
};
use crate::retry::{self, Backoff};
use crate::store::{Committed, Reader, Store, StoreError};
use crate::task::TaskResult;
use endpoint_wire::{self as wire, BrokerError, ServiceName};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A published result waiting for the broker's confirm.
struct InFlight {
    id: i64,
    task_id: String,
    /// The service it was addressed to (`None`: sent to the shared queue).
    service: Option<ServiceName>,
    confirm: PublisherConfirm,
    /// When it was published (for the result-to-confirm metric).
    sent_at: std::time::Instant,
}

pub(crate) struct Publisher {
    pub config: Arc<Config>,
    pub store: Store,
    /// `Some(why)` while the broker blocks the publishing connection (a resource alarm).
    pub blocked: watch::Receiver<Option<String>>,
}

pub(super) async fn confirm_channel(conn: &Connection, what: &str) -> Result<Channel, BrokerError> {
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
    ///
    /// Pipelined: results are published while earlier confirms are outstanding (up to [`PUBLISH_WINDOW`]), taken
    /// from the hand-off as they are committed or read from the store by row id past the last one read (`cursor`;
    /// a read skips those the hand-off brought past it, `ahead`), and marked published as their confirms
    /// arrive, every confirm that has arrived in one `mark_published` commit, which runs while publishing goes
    /// on. A result refused by the broker (or whose mark failed) stays pending below the cursor: once nothing
    /// is in flight the cursor goes back to the start and it is published again, after a backoff.
    pub async fn run(
        &self,
        conn: &Connection,
        user_id: Option<&str>,
        drain: &CancellationToken,
    ) -> Result<(), BrokerError> {
        let channel = confirm_channel(conn, "publisher").await?;
        let mut failures = Backoff::new(PUBLISH_RETRY_MIN, PUBLISH_RETRY_MAX);
        let mut read_retry = Backoff::new(PUBLISH_RETRY_MIN, PUBLISH_RETRY_MAX);
        // Reads are not given up: a publisher that cannot read its database waits for it (a stop that waits
        // too long is ended by the link's drain limit).
        let forever = CancellationToken::new();
        let handoff = self.store.handoff();
        // The first read below finds every pending result, those waiting in the hand-off too.
        handoff.clear();
        // Results sent from the hand-off past the cursor and not yet marked published: a read skips them.
        let mut ahead: BTreeSet<i64> = BTreeSet::new();
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut cursor: i64 = 0;
        // Some result at or below the cursor is still pending (refused, or its mark failed).
        let mut rescan = false;
        let mut acked: Vec<i64> = Vec::new();
        // Results a service's queue did not take: they go to the shared queue when published again.
        let mut unaddressed: HashSet<i64> = HashSet::new();
        let mut marking: Option<Marking> = None;
        // The ids `marking` marks (they leave `ahead` once marked).
        let mut marking_ids: Vec<i64> = Vec::new();
        let reader = ReaderSlot::default();
        // New results may be waiting (a notification came, or the last read was full): read before waiting.
        let mut fresh = true;
        // Draining, and a read since found nothing: done once nothing is in flight.
        let mut drained = false;
        let mut blocked = self.blocked.clone();
        loop {
            // While the broker blocks us, publish nothing: results stay on disk and nothing piles up in the
            // client's buffers. A shutdown meanwhile leaves them pending for the next start. Confirms and marks
            // already under way are seen through first.
            let is_blocked = blocked.borrow_and_update().is_some();
            if is_blocked && in_flight.is_empty() && acked.is_empty() && marking.is_none() {
                while blocked.borrow_and_update().is_some() {
                    if blocked.changed().await.is_err() {
                        return Ok(());
                    }
                }
                continue;
            }
            let notified = handoff.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if rescan && in_flight.is_empty() && acked.is_empty() && marking.is_none() {
                cursor = 0;
                rescan = false;
                fresh = true;
                ahead.clear();
            }
            // With a rescan due, nothing new goes out until everything in flight is settled and the cursor is
            // back at the start, so that a refused result cannot be overtaken forever under a steady load.
            if !is_blocked && !rescan && fresh && in_flight.len() < PUBLISH_WINDOW {
                let limit = PUBLISH_READ.min(PUBLISH_WINDOW - in_flight.len());
                let read = retry::until_stopped(
                    "cannot read pending results",
                    &mut read_retry,
                    &forever,
                    || read_pending(reader.clone(), &self.config, cursor, limit),
                )
                .await;
                let Some(pending) = read else { continue };
                fresh = pending.len() == limit;
                if let Some((last, _, _)) = pending.last() {
                    cursor = *last;
                    drained = false;
                }
                crate::stages::publishing();
                for (id, r, service) in pending {
                    if ahead.contains(&id) {
                        continue;
                    }
                    let sent = self
                        .send(&channel, id, r, service, &unaddressed, user_id)
                        .await?;
                    in_flight.push_back(sent);
                }
                // No later read returns a row at or below the cursor.
                ahead = ahead.split_off(&(cursor + 1));
            }
            // Results the writer handed over as it committed them: sent as they are, not read back.
            if !is_blocked && !rescan && in_flight.len() < PUBLISH_WINDOW {
                let (committed, overflowed) = handoff.take(PUBLISH_WINDOW - in_flight.len());
                // Some were left out of the hand-off: the database has them.
                fresh |= overflowed;
                if !committed.is_empty() {
                    crate::stages::publishing();
                    drained = false;
                }
                for Committed {
                    id,
                    result: r,
                    service,
                } in committed
                {
                    // At or below the cursor a read has already sent it (results are committed in row id order).
                    if id <= cursor || !ahead.insert(id) {
                        continue;
                    }
                    let sent = self
                        .send(&channel, id, r, service, &unaddressed, user_id)
                        .await?;
                    in_flight.push_back(sent);
                }
            }
            if marking.is_none() && !acked.is_empty() {
                marking_ids = std::mem::take(&mut acked);
                marking = Some(start_marking(&self.store, marking_ids.clone()));
            }
            if in_flight.is_empty() && marking.is_none() {
                if !fresh && !rescan && !is_blocked {
                    if drain.is_cancelled() {
                        if drained {
                            return Ok(());
                        }
                        // One more read once draining: results stored just before the drain are not left behind.
                        drained = true;
                    } else {
                        // The writer hands over every result it commits; the timer is a safety net that reads the
                        // database anyway.
                        tokio::select! {
                            _ = &mut notified => continue,
                            _ = drain.cancelled() => {}
                            _ = tokio::time::sleep(PUBLISHER_IDLE_POLL) => {}
                        }
                    }
                    fresh = true;
                }
                continue;
            }
            // Room for more, and allowed to read it (else only confirms and marks are waited for).
            let room = in_flight.len() < PUBLISH_WINDOW && !rescan && !is_blocked;
            tokio::select! {
                biased;
                c = async { (&mut in_flight.front_mut().expect("checked non-empty").confirm).await }, if !in_flight.is_empty() => {
                    let head = in_flight.pop_front().expect("checked non-empty");
                    let mut refused = self.settle(head, c, &mut acked, &mut unaddressed)?;
                    // Everything else already confirmed joins this group.
                    while let Some(next) = in_flight.front_mut() {
                        let Some(c) = futures_lite::future::poll_once(&mut next.confirm).await else {
                            break;
                        };
                        let next = in_flight.pop_front().expect("checked non-empty");
                        refused += self.settle(next, c, &mut acked, &mut unaddressed)?;
                    }
                    if refused > 0 {
                        rescan = true;
                        let delay = failures.next_delay();
                        tracing::warn!(
                            refused,
                            ?delay,
                            "the broker did not take some results; they stay pending"
                        );
                        // Not cut short by `drain`: while draining, a refusal would otherwise be retried in a
                        // hot loop.
                        tokio::time::sleep(delay).await;
                    } else {
                        failures.reset();
                    }
                }
                r = async { marking.as_mut().expect("checked some").await }, if marking.is_some() => {
                    marking = None;
                    let marked = std::mem::take(&mut marking_ids);
                    if r.is_ok() {
                        // Marked: no read returns them any more.
                        for id in marked {
                            ahead.remove(&id);
                        }
                    }
                    if let Err(e) = r {
                        // They stay pending and go out again: a duplicate result is harmless, a lost one is not.
                        tracing::error!(error = %e, "cannot mark results published; they will be published again");
                        rescan = true;
                        tokio::time::sleep(failures.next_delay()).await;
                    }
                }
                _ = &mut notified, if room => {}
                _ = std::future::ready(()), if room && fresh => {}
            }
        }
    }

    /// Publishes result `id` (row id) to its service, or to the shared queue if it is in `unaddressed` (a
    /// service's queue did not take it) or names none; returns it as in flight.
    async fn send(
        &self,
        channel: &Channel,
        id: i64,
        r: TaskResult,
        service: Option<ServiceName>,
        unaddressed: &HashSet<i64>,
        user_id: Option<&str>,
    ) -> Result<InFlight, BrokerError> {
        let service = service.filter(|_| !unaddressed.contains(&id));
        let confirm = self
            .publish_result(channel, &r, service.as_ref(), user_id)
            .await?;
        Ok(InFlight {
            id,
            task_id: r.task_id,
            service,
            confirm,
            sent_at: std::time::Instant::now(),
        })
    }

    /// Publishes one result (`mandatory`, persistent) for `service` (or the shared queue); returns its pending
    /// confirm.
    async fn publish_result(
        &self,
        channel: &Channel,
        r: &TaskResult,
        service: Option<&ServiceName>,
        user_id: Option<&str>,
    ) -> Result<PublisherConfirm, BrokerError> {
        let ep = &self.config.endpoint_id;
        channel
            .basic_publish(
                wire::RESULTS_EXCHANGE.into(),
                ep.results_routing_key_for(service).into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &r.body,
                result_properties(ep.as_str(), r, user_id),
            )
            .await
            .map_err(|e| BrokerError::amqp("while publishing results", e))
    }

    /// Sorts one confirm: a plain ack goes to `acked`; a nack or a return counts as refused (returns 1). A
    /// result returned from a service's routing key joins `unaddressed`, to go to the shared queue next time.
    fn settle(
        &self,
        sent: InFlight,
        confirm: lapin::Result<Confirmation>,
        acked: &mut Vec<i64>,
        unaddressed: &mut HashSet<i64>,
    ) -> Result<usize, BrokerError> {
        let task_id = &sent.task_id;
        if confirm.is_ok() {
            crate::http::metrics::result_confirmed(sent.sent_at);
            crate::stages::since(crate::stages::Stage::PublishToConfirm, sent.sent_at);
        }
        match confirm.map_err(|e| BrokerError::amqp("while publishing results", e))? {
            Confirmation::Ack(None) => {
                acked.push(sent.id);
                unaddressed.remove(&sent.id);
                Ok(0)
            }
            Confirmation::Ack(Some(returned)) if sent.service.is_some() => {
                let service = sent.service.as_ref().map(ServiceName::as_str);
                tracing::warn!(task_id = %task_id, service, reply = %returned.reply_text,
                    "no queue of the service the task named takes its result (was the service's queue deleted?): it goes to the shared `results` queue");
                unaddressed.insert(sent.id);
                Ok(1)
            }
            Confirmation::Ack(Some(returned)) => {
                tracing::warn!(task_id = %task_id, reply = %returned.reply_text,
                    "result returned unroutable: is the `results` queue bound? (run `service-setup provision`)");
                Ok(1)
            }
            Confirmation::Nack(_) | Confirmation::NotRequested => {
                tracing::warn!(task_id = %task_id, "result nacked by the broker");
                Ok(1)
            }
        }
    }
}

/// The publisher's read-only connection to the store, opened at first use by the blocking thread that reads
/// through it (only that thread ever locks it).
type ReaderSlot = Arc<std::sync::Mutex<Option<Reader>>>;

/// Up to `limit` pending results past `after`, read on a blocking thread through the publisher's own read-only
/// connection, so a read never waits behind the store's commits.
async fn read_pending(
    reader: ReaderSlot,
    config: &Config,
    after: i64,
    limit: usize,
) -> Result<Vec<(i64, TaskResult, Option<ServiceName>)>, StoreError> {
    let dir = config.data_dir.clone();
    tokio::task::spawn_blocking(move || {
        let mut slot = reader.lock().expect("the reader's lock is never poisoned");
        let reader = match &mut *slot {
            Some(r) => r,
            None => slot.insert(Reader::open(&dir)?),
        };
        reader.pending_results(after, limit)
    })
    .await
    .expect("a read of pending results does not panic")
}

/// A `mark_published` commit running while the publisher goes on publishing.
type Marking = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;

fn start_marking(store: &Store, ids: Vec<i64>) -> Marking {
    let store = store.clone();
    Box::pin(async move { store.mark_published(ids).await })
}

/// The AMQP properties of a result as the agent publishes it (docs/protocol.md); public so that the benchmark's
/// raw client publishes exactly the same. `user_id` is the broker user the publisher logged in as (the broker
/// refuses any other), so the service can tell which endpoint user sent it.
pub fn result_properties(
    endpoint_id: &str,
    r: &TaskResult,
    user_id: Option<&str>,
) -> BasicProperties {
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
    let props = BasicProperties::default();
    let props = match user_id {
        Some(user) => props.with_user_id(user.into()),
        None => props,
    };
    props
        .with_message_id(r.task_id.as_str().into())
        .with_correlation_id(r.task_id.as_str().into())
        .with_delivery_mode(2)
        .with_timestamp(wire::now_ms() / 1000)
        .with_headers(headers)
}
