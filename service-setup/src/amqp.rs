//! Small AMQP building blocks shared by the service-side operations: opening a channel and declaring the shared
//! exchanges and queues exactly as the wire contract says (checking or reading a queue without consuming it are
//! `endpoint_wire::amqp::{peek_all, queue_info}`, shared with the agent). Every declaration of topology lives
//! here so provision, submit and the results reader cannot drift apart. It must not decide policy (what is an error for which command); callers do.

use crate::error::{SetupError, reply_text, soft_error};
use endpoint_wire::amqp::queue_info;
use endpoint_wire::{BrokerError, QueueType};
use endpoint_wire::{RESULTS_BINDING, RESULTS_EXCHANGE, RESULTS_QUEUE, TASKS_EXCHANGE};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};

/// Wraps a lapin error with what we were doing, for [`SetupError::Broker`].
pub(crate) fn amqp_err(context: impl Into<String>) -> impl FnOnce(lapin::Error) -> SetupError {
    let context = context.into();
    move |e| SetupError::Broker(BrokerError::amqp(context, e))
}

pub(crate) async fn open_channel(conn: &Connection, purpose: &str) -> Result<Channel, SetupError> {
    conn.create_channel()
        .await
        .map_err(amqp_err(format!("while opening a channel to {purpose}")))
}

/// Best-effort close: the channel is done with, and a failure here changes nothing for the caller.
pub(crate) async fn close_channel(channel: &Channel) {
    if let Err(e) = channel.close(200, "OK".into()).await {
        tracing::debug!(error = %e, "closing a channel failed");
    }
}

/// The type argument of a queue of `queue_type`: none for a classic queue (as queues were always declared, so an
/// existing one matches), `x-queue-type=quorum` for a quorum one.
pub(crate) fn type_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(queue_type.as_str())),
        );
    }
    args
}

/// Arguments of the `<EP>.tasks` queue: a quorum queue has a single active consumer (it ignores the exclusive
/// flag a classic queue's consumer is held to). No `x-delivery-limit`: the agent counts attempts itself.
pub(crate) fn tasks_queue_args(queue_type: QueueType) -> FieldTable {
    // The tasks queue always named its type (`x-queue-type=classic` since the first version).
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(queue_type.as_str())),
    );
    if queue_type == QueueType::Quorum {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args
}

/// Arguments of the max-length-1 `<EP>.registration` and `<EP>.heartbeat` queues: a new message replaces the
/// old. A classic one keeps the arguments it always had (no `x-queue-type`), so endpoints provisioned before
/// queue types re-provision as they are.
pub(crate) fn latest_only_queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = type_args(queue_type);
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("drop-head")),
    );
    args
}

pub(crate) async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), SetupError> {
    channel
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(amqp_err(format!("while declaring exchange {name}")))
}

/// Declares a durable queue; a queue that exists with other arguments is reported as [`SetupError::QueueMismatch`].
pub(crate) async fn declare_queue(
    channel: &Channel,
    name: &str,
    args: FieldTable,
) -> Result<lapin::Queue, SetupError> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map_err(|e| {
            if soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) {
                SetupError::QueueMismatch {
                    queue: name.to_owned(),
                    reason: reply_text(&e),
                }
            } else {
                amqp_err(format!("while declaring queue {name}"))(e)
            }
        })
}

pub(crate) async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
) -> Result<(), SetupError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp_err(format!(
            "while binding queue {queue} to exchange {exchange} with {key}"
        )))
}

/// The shared `tasks` exchange: idempotent, and what lets a mandatory publish to an unprovisioned endpoint come
/// back as unroutable instead of closing the channel with 404.
pub(crate) async fn declare_tasks_exchange(channel: &Channel) -> Result<(), SetupError> {
    declare_exchange(channel, TASKS_EXCHANGE, ExchangeKind::Direct).await
}

/// The shared results exchange, queue and binding, shared by every endpoint of the vhost. The queue is made
/// with `queue_type` when it does not exist yet; one that exists is used as it is, whatever its type (it serves
/// every endpoint, and a queue cannot change type): a classic one where quorum was asked for is logged as a
/// warning.
pub(crate) async fn declare_results(
    conn: &Connection,
    queue_type: QueueType,
) -> Result<(), SetupError> {
    let channel = open_channel(conn, "declare the results queue").await?;
    declare_exchange(&channel, RESULTS_EXCHANGE, ExchangeKind::Topic).await?;
    let exists = queue_info(conn, RESULTS_QUEUE).await?.is_some();
    let args = type_args(queue_type);
    if !exists {
        declare_queue(&channel, RESULTS_QUEUE, args).await?;
    } else if queue_type == QueueType::Quorum {
        // Replication was asked for: say so if the queue has another type. A declare with other arguments is
        // refused and closes the channel, so it is tried on one of its own.
        let probe = open_channel(conn, "check the results queue's type").await?;
        match declare_queue(&probe, RESULTS_QUEUE, args).await {
            Ok(_) => close_channel(&probe).await,
            Err(SetupError::QueueMismatch { reason, .. }) => tracing::warn!(
                queue = RESULTS_QUEUE,
                broker = %reason,
                "the shared results queue exists as a classic queue and is used as it is (it serves every endpoint of this vhost; a queue cannot change type): results that no service queue takes wait on that one node; to replicate it, stop every agent, drain it with `service-setup results`, delete it and provision again"
            ),
            Err(e) => return Err(e),
        }
    }
    bind(&channel, RESULTS_QUEUE, RESULTS_EXCHANGE, RESULTS_BINDING).await?;
    close_channel(&channel).await;
    Ok(())
}
