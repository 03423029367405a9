//! The AMQP helpers both sides share: opening a named connection with a timeout, closing one with a timeout, checking a queue without
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
/// How long closing a connection may wait for the broker's close-ok: lapin's close future has been seen never
/// to resolve after the connection was gone from the broker, which hung its caller.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes `conn` (code 200, `reason`), waiting at most [`CLOSE_TIMEOUT`]. The connection is being given up
/// either way, so a failure is only returned for the caller to log.
pub async fn close(conn: &Connection, reason: &str) -> Result<(), String> {
    match tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, reason.into())).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no close-ok within {CLOSE_TIMEOUT:?}")),
    }
}

/// Opens a connection named `name` (shown in the management UI and `rabbitmqctl list_connections`). An
/// `amqps://` URL connects with TLS, verifying the server's certificate and host name against the system's CAs
/// and the URL's private CA; a TLS failure no retry can fix is [`BrokerError::Tls`].
pub async fn connect(url: &BrokerUrl, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let runtime = lapin::runtime::default_runtime().map_err(|cause| BrokerError::Connect {
        context: "while starting the AMQP client".into(),
        cause,
    })?;
    let connecting =
        Connection::connect_with_config(url.expose(), props, url.tls().lapin(), runtime);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(conn) => conn.map_err(|cause| {
            let context = format!("while connecting to {url}");
            match tls_failure(&cause) {
                Some(reason) if url.is_tls() => BrokerError::Tls { context, reason },
                _ => BrokerError::Connect { context, cause },
            }
        }),
        Err(_) => Err(BrokerError::Lost(format!(
            "no answer from {url} within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// Opens a connection named `name` to the first of `urls` that accepts, trying them in the order given; returns
/// it with the URL it went to, else the last URL's error (each failure is logged with its node).
pub async fn connect_any(
    urls: &[BrokerUrl],
    name: &str,
) -> Result<(Connection, BrokerUrl), BrokerError> {
    let mut last = None;
    for url in urls {
        match connect(url, name).await {
            Ok(conn) => return Ok((conn, url.clone())),
            Err(e) => {
                if urls.len() > 1 {
                    tracing::warn!(node = %url.node(), error = %e, "cannot connect to this broker node; trying the next");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| BrokerError::Lost("no broker URL to connect to".into())))
}

/// Why a connection failed in its TLS handshake, if that is what happened.
fn tls_failure(e: &lapin::Error) -> Option<String> {
    match e.kind() {
        lapin::ErrorKind::IOError(io) => crate::tls::explain(io.as_ref()),
        _ => None,
    }
}

/// Whether `e` is the broker's 404 for a durable queue whose node is down (a classic queue in a cluster): the
/// queue exists and comes back with its node, so this is a lost link to retry, never "not provisioned".
fn queue_node_down(e: &lapin::Error) -> bool {
    soft_error(e) == Some(AMQPSoftError::NOTFOUND) && e.to_string().contains("down or inaccessible")
}

/// The error for a queue whose node is down (see [`queue_node_down`]).
fn node_down(queue: &str, e: &lapin::Error) -> BrokerError {
    BrokerError::Lost(format!(
        "queue {queue} is unavailable: the broker node that holds it is down ({e}); it returns with that node"
    ))
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
        Err(e) if queue_node_down(&e) => Err(node_down(queue, &e)),
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
            Err(e) if queue_node_down(&e) => return Err(node_down(queue, &e)),
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
