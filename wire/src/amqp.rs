//! The AMQP helpers both sides share: opening a named connection with a timeout, checking a queue without
//! declaring it ([`queue_info`]) and reading a queue without consuming it ([`peek_all`]). They change nothing
//! on the broker.

use crate::error::{BrokerError, soft_error};
use crate::url::BrokerUrl;
use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::time::Duration;

/// How long opening a connection may take: a blackholed path would otherwise hang the reconnect loop.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens a connection named `name` (shown in the management UI and `rabbitmqctl list_connections`).
pub async fn connect(url: &BrokerUrl, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url.expose(), props)).await {
        Ok(conn) => conn.map_err(|cause| BrokerError::Connect {
            context: format!("while connecting to {url}"),
            cause,
        }),
        Err(_) => Err(BrokerError::Lost(format!(
            "no answer from {url} within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// Depth and consumer count of `queue`, or `None` if it does not exist. Uses a channel of its own, because the
/// broker closes the channel of a passive declare that fails.
pub async fn queue_info(
    conn: &Connection,
    queue: &str,
) -> Result<Option<lapin::Queue>, BrokerError> {
    let channel = conn.create_channel().await.map_err(|e| {
        BrokerError::amqp(format!("while opening a channel to check queue {queue}"), e)
    })?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(q) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(Some(q))
        }
        Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => Ok(None),
        Err(e) => Err(BrokerError::amqp(
            format!("while checking queue {queue}"),
            e,
        )),
    }
}

/// At most this many messages are looked at by [`peek_all`]; a max-length-1 queue holds one, or two for a
/// moment when a reader requeues the old message while the writer adds a new one.
const PEEK_LIMIT: usize = 16;

/// Reads the messages of `queue` without consuming them: `basic.get` until empty, then one `basic.nack` with
/// `multiple` and `requeue` puts them all back in order. `None` if the queue does not exist.
pub async fn peek_all(conn: &Connection, queue: &str) -> Result<Option<Vec<Vec<u8>>>, BrokerError> {
    let channel = conn.create_channel().await.map_err(|e| {
        BrokerError::amqp(format!("while opening a channel to read queue {queue}"), e)
    })?;
    let mut bodies = Vec::new();
    let mut last_tag = None;
    while bodies.len() < PEEK_LIMIT {
        match channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
        {
            Ok(Some(msg)) => {
                last_tag = Some(msg.delivery.delivery_tag);
                bodies.push(msg.delivery.data);
            }
            Ok(None) => break,
            Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => return Ok(None),
            Err(e) => return Err(BrokerError::amqp(format!("while reading queue {queue}"), e)),
        }
    }
    if let Some(tag) = last_tag {
        let requeue = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        channel.basic_nack(tag, requeue).await.map_err(|e| {
            BrokerError::amqp(
                format!("while returning the messages read to queue {queue}"),
                e,
            )
        })?;
    }
    let _ = channel.close(200, "read".into()).await;
    Ok(Some(bodies))
}
