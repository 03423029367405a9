//! Hand-back: puts the tasks a data directory holds but has not run back into the endpoint's tasks queue, for
//! another agent, when this host will not return (an autoscaled VM, a container). Pending results are
//! published first (the publisher, drained). Then every queued task is republished as it came (same
//! `message_id`, `type`, headers, `reply_to` and payload, persistent) to the `handback` exchange (where an
//! endpoint's own broker user may publish its own tasks queue's key only) with `mandatory` and a confirm, through our
//! own AMQP client so that the header bytes go out exactly as they arrived; only after the confirm is a task
//! marked handed back on disk. A crash in between loses nothing: the task is still queued here and is handed
//! back again, so another agent may get it twice (its disk keeps the first; see docs/operations.md).
//!
//! Runs only while no slot claims tasks: `endpoint-agent handback` on a directory no agent holds, or at the end
//! of a clean stop (`handback_on_stop`).

use super::publisher::Publisher;
use crate::config::Config;
use crate::raw::{FIELD_SIGNED_64, RawConnection, RawError, RawProperties, table_entry};
use crate::store::{Reader, Store, StoreError};
use endpoint_wire::amqp::connect_any;
use endpoint_wire::registration::{RegistrationError, fetch_registration};
use endpoint_wire::{BrokerError, HANDBACK_EXCHANGE, HEADER_TIMEOUT_MS};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Tasks read, republished and marked per round.
const BATCH: usize = 200;

/// What a hand-back did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handback {
    /// Results that were pending and are now published.
    pub results_published: u64,
    /// Tasks republished to the endpoint's tasks queue (and marked so on disk).
    pub tasks_handed_back: u64,
}

/// Why a hand-back stopped; what was handed back so far stays marked, the rest stays queued on disk.
#[derive(Debug, thiserror::Error)]
pub enum HandbackError {
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("while republishing tasks: {0}")]
    Raw(#[from] RawError),
    /// The `handback` exchange is missing (404) or this user may not publish to it (403): the endpoint was
    /// provisioned by an older `service-setup`.
    #[error(
        "the broker refused the republished task ({0}): the endpoint was provisioned before hand-back existed; run `service-setup provision --endpoint-id <EP>` again (it adds the `handback` exchange and, with --credentials, the endpoint user's permission), then run the hand-back again"
    )]
    TasksRefused(RawError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read the broker URL: {0}")]
    Url(String),
}

/// Publishes what is pending, then hands every queued task back (see the module doc). `store` must be open on
/// `config`'s data directory with no slot running.
pub(crate) async fn hand_back(
    config: &Arc<Config>,
    store: &Store,
) -> Result<Handback, HandbackError> {
    let ep = &config.endpoint_id;
    let urls = config
        .ordered_broker_urls()
        .map_err(|e| HandbackError::Url(e.to_string()))?;
    let (conn, url) = connect_any(&urls, &format!("endpoint-agent {ep} handback")).await?;
    tracing::info!(broker = %url, "connected to hand back");
    let reg = fetch_registration(&conn, ep).await;
    let reg = match reg {
        Ok(reg) => reg,
        Err(e) => {
            let _ = endpoint_wire::amqp::close(&conn, "handback").await;
            return Err(e.into());
        }
    };

    // Results first: they are owed to the service, and publishing them leaves nothing on this disk but tasks.
    let pending_before = store.counts().borrow().results_pending;
    let login = url.parts();
    let user_id = (!login.external).then_some(login.user);
    let publisher = Publisher {
        config: config.clone(),
        store: store.clone(),
        blocked: tokio::sync::watch::channel(None).1,
    };
    let drained = CancellationToken::new();
    drained.cancel();
    let published = publisher.run(&conn, user_id.as_deref(), &drained).await;
    let _ = endpoint_wire::amqp::close(&conn, "handback").await;
    published?;
    let results_published = pending_before.saturating_sub(store.counts().borrow().results_pending);

    let mut raw = RawConnection::open(
        &url,
        &format!("endpoint-agent {ep} handback"),
        reg.heartbeat_secs,
    )
    .await?;
    let queue = ep.tasks_queue();
    let mut handed = Handback {
        results_published,
        tasks_handed_back: 0,
    };
    let mut after = 0i64;
    let outcome = loop {
        let dir = config.data_dir.clone();
        let tasks = tokio::task::spawn_blocking(move || {
            Reader::open(&dir).and_then(|r| r.queued_tasks(after, BATCH))
        })
        .await
        .expect("a read of queued tasks does not panic");
        let tasks = match tasks {
            Ok(t) => t,
            Err(e) => break Err(e.into()),
        };
        let Some(last) = tasks.last() else {
            break Ok(());
        };
        after = last.seq;
        let mut confirmed = Vec::with_capacity(tasks.len());
        let mut failed = None;
        for t in tasks {
            let headers = t.headers.or_else(|| {
                t.timeout_ms.map(|ms| {
                    table_entry(
                        HEADER_TIMEOUT_MS.as_bytes(),
                        FIELD_SIGNED_64,
                        &ms.to_be_bytes(),
                    )
                })
            });
            let props = RawProperties {
                message_id: Some(t.task_id.clone().into_bytes()),
                kind: Some(t.function.into_bytes()),
                headers,
                delivery_mode: Some(2),
                reply_to: t.reply_to.map(String::into_bytes),
            };
            match raw
                .publish_mandatory(HANDBACK_EXCHANGE, &queue, &props, &t.payload)
                .await
            {
                Ok(()) => confirmed.push(t.task_id),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let n = confirmed.len() as u64;
        // Marked even when a later one failed: these are in the broker now.
        if let Err(e) = store.mark_handed_back(confirmed).await {
            break Err(e.into());
        }
        handed.tasks_handed_back += n;
        if let Some(e) = failed {
            break Err(match e {
                e @ RawError::Closed("channel", 403 | 404, _) => HandbackError::TasksRefused(e),
                e => e.into(),
            });
        }
    };
    raw.close().await;
    outcome.map(|()| handed)
}
