//! Errors talking to the broker, classified for retry loops by predicates ([`BrokerError::is_transient`],
//! [`BrokerError::is_exclusive_conflict`], ...): callers decide on a retry by kind, never by message text.

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};

/// Errors talking to the broker, classified for retry loops.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid broker url {0}: {1}")]
    BadUrl(String, String),
    // The lapin error is shown in the message and deliberately not chained as a `source`: its own Display
    // already repeats its causes, and `{:#}` would print them again.
    #[error("{context}: {cause}{}", connect_hint(cause))]
    Connect {
        context: String,
        cause: lapin::Error,
    },
    /// The TLS handshake failed for a reason a retry cannot fix (a certificate the agent does not trust, an
    /// expired or mismatched one, a server that does not speak TLS): an operator must act.
    #[error("{context}: {reason}")]
    Tls { context: String, reason: String },
    /// The connection or a consumer ended without an error from the client library.
    #[error("{0}")]
    Lost(String),
    #[error("{context}: {cause}")]
    Amqp {
        context: String,
        cause: lapin::Error,
    },
}

impl BrokerError {
    pub fn amqp(context: impl Into<String>, source: lapin::Error) -> Self {
        BrokerError::Amqp {
            context: context.into(),
            cause: source,
        }
    }

    fn soft_error(&self) -> Option<AMQPSoftError> {
        match self {
            BrokerError::Amqp { cause, .. } | BrokerError::Connect { cause, .. } => {
                soft_error(cause)
            }
            BrokerError::BadUrl(..) | BrokerError::Tls { .. } | BrokerError::Lost(_) => None,
        }
    }

    /// The broker said the queue or exchange does not exist (404).
    pub fn is_not_found(&self) -> bool {
        self.soft_error() == Some(AMQPSoftError::NOTFOUND)
    }

    /// Another consumer holds the queue exclusively (403 on `basic.consume`, or 405 resource locked).
    pub fn is_exclusive_conflict(&self) -> bool {
        matches!(self, BrokerError::Amqp { .. })
            && matches!(
                self.soft_error(),
                Some(AMQPSoftError::ACCESSREFUSED | AMQPSoftError::RESOURCELOCKED)
            )
    }

    /// Worth retrying with backoff: a network problem, a closed connection or channel, a broker restart.
    /// Not transient: a bad URL, or the broker refusing the login or the vhost while connecting (an operator
    /// must fix the credentials or permissions).
    pub fn is_transient(&self) -> bool {
        match self {
            BrokerError::BadUrl(..) | BrokerError::Tls { .. } => false,
            BrokerError::Connect { cause, .. } => !matches!(
                cause.kind(),
                lapin::ErrorKind::ProtocolError(_) | lapin::ErrorKind::AuthProviderError(_)
            ),
            BrokerError::Amqp { .. } | BrokerError::Lost(_) => true,
        }
    }
}

/// What an operator should check after a failed connect.
fn connect_hint(e: &lapin::Error) -> &'static str {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(_) | lapin::ErrorKind::AuthProviderError(_) => {
            " (check the user, password and vhost permissions in --broker-url or AMQP_URL)"
        }
        _ => {
            " (is RabbitMQ running and reachable? `rabbitmq-server -detached` or `docker compose up -d` starts one)"
        }
    }
}

/// The soft (channel-level) AMQP error behind a lapin error, if that is what it is.
pub fn soft_error(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}
