//! The one error type of the service-setup library, with the predicates the CLI maps to exit codes and a caller
//! may use to decide on a retry. Classification of lapin errors stays in the contract crate
//! (`endpoint_wire::BrokerError`); this module only adds the service-side outcomes and must not match on message
//! strings.

use endpoint_wire::BrokerError;
use endpoint_wire::EndpointId;

#[derive(Debug, thiserror::Error)]
/// Everything the service side can fail with; each message says what to do about it.
pub enum SetupError {
    #[error("endpoint {0} is not provisioned: run `service-setup provision --endpoint-id {0}`")]
    /// The endpoint has no tasks queue.
    NotProvisioned(EndpointId),

    #[error(
        "endpoint {endpoint} still has {count} task(s) queued in {queue}: wait for the agent to run them, or pass --force to delete them"
    )]
    /// Deprovisioning would drop queued tasks (pass `force`).
    TasksQueued {
        /// The endpoint being deprovisioned.
        endpoint: EndpointId,
        /// Its tasks queue.
        queue: String,
        /// Tasks still in it.
        count: u32,
    },

    #[error(
        "queue {queue} already exists with different arguments ({reason}): delete it with `rabbitmqctl delete_queue {queue}` (its messages are lost) and provision again"
    )]
    /// A queue exists with other arguments than the contract's: `queue`, and the broker's `reason`.
    QueueMismatch {
        /// The queue.
        queue: String,
        /// The broker's reply text.
        reason: String,
    },

    #[error(
        "queue {queue} exists as another type than {wanted} ({reason}): a queue cannot change its type; let the agent finish what is queued, run `service-setup deprovision --endpoint-id {endpoint}`, then provision again with --queue-type {wanted}"
    )]
    /// Provision asked for another queue type than the endpoint's queues have.
    QueueTypeChange {
        /// The endpoint.
        endpoint: EndpointId,
        /// The queue.
        queue: String,
        /// The type asked for.
        wanted: endpoint_wire::QueueType,
        /// The broker's reply text.
        reason: String,
    },

    #[error(
        "the broker refused {what} (negative confirm): it may be short of disk or memory, check `rabbitmqctl status` and retry"
    )]
    /// The broker refused `what` with a negative confirm.
    Nacked {
        /// What was refused.
        what: String,
    },

    #[error("the broker returned {what} as unroutable: {reason}")]
    /// The broker returned `what`: no queue took it (`reason` says what to check).
    Unroutable {
        /// What was returned.
        what: String,
        /// The broker's reply text and what to check.
        reason: String,
    },

    /// A caller-supplied value is out of range; the message says which and what to pass instead.
    #[error("{0}")]
    InvalidArgument(String),

    #[error(
        "could not connect to {url} within {secs}s: check that RabbitMQ is running and reachable (e.g. `rabbitmq-server -detached`)"
    )]
    /// No connection to `url` (password redacted) within `secs` seconds.
    ConnectTimeout {
        /// The URL, password redacted.
        url: String,
        /// The time limit.
        secs: u64,
    },

    #[error("could not write results")]
    /// Writing results to the caller's sink failed.
    Output(#[source] std::io::Error),

    #[error("the broker's management API failed {what}: {reason}")]
    /// The management API failed `what` (a request), for `reason`.
    Management {
        /// The request.
        what: String,
        /// What went wrong.
        reason: String,
    },

    #[error("cannot write the credentials file {path}: {err}")]
    /// Writing an endpoint's credentials file failed.
    Credentials {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        err: std::io::Error,
    },

    #[error("the client was closed")]
    /// The [`crate::Client`] was closed while waiting.
    ClientClosed,

    /// The broker cancelled a consumer (its queue was deleted, or the broker is shutting down).
    #[error(
        "the broker cancelled the consumer of queue {queue}: was it deleted? (the client declares it again when it reconnects)"
    )]
    ConsumerCancelled {
        /// The queue consumed.
        queue: String,
    },

    #[error(transparent)]
    /// A broker or network failure (see [`BrokerError::is_transient`]).
    Broker(#[from] BrokerError),
}

impl SetupError {
    /// The endpoint's queues do not exist: an operator must run `service-setup provision`.
    pub fn is_not_provisioned(&self) -> bool {
        matches!(self, SetupError::NotProvisioned(_))
    }

    /// No connection could be opened at all (refused, unreachable, timed out, login or vhost refused).
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            SetupError::ConnectTimeout { .. } | SetupError::Broker(BrokerError::Connect { .. })
        )
    }

    /// Worth retrying as is: a network problem, a closed channel, a broker restart, a negative confirm.
    pub fn is_transient(&self) -> bool {
        match self {
            SetupError::Broker(e) => e.is_transient(),
            SetupError::ConnectTimeout { .. } | SetupError::Nacked { .. } => true,
            _ => false,
        }
    }
}

pub(crate) use endpoint_wire::soft_error;

/// The broker's explanation behind a lapin error (`PRECONDITION_FAILED - inequivalent arg ...`).
pub(crate) fn reply_text(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        let ep = EndpointId::new("demo").expect("valid id");
        assert_eq!(
            SetupError::NotProvisioned(ep.clone()).to_string(),
            "endpoint demo is not provisioned: run `service-setup provision --endpoint-id demo`"
        );
        let queued = SetupError::TasksQueued {
            endpoint: ep,
            queue: "demo.tasks".into(),
            count: 3,
        };
        assert!(queued.to_string().contains("3 task(s)"));
        assert!(queued.to_string().contains("--force"));
        assert!(!queued.is_transient());
    }

    #[test]
    fn predicates() {
        let timeout = SetupError::ConnectTimeout {
            url: "amqp://h".into(),
            secs: 1,
        };
        assert!(timeout.is_connect_failure());
        assert!(timeout.is_transient());
        let ep = EndpointId::new("x").expect("valid id");
        assert!(SetupError::NotProvisioned(ep).is_not_provisioned());
    }
}
