//! Names every AMQP client needs to speak to an endpoint: the shared exchanges and queues, the headers of tasks
//! and results, the per-endpoint queue names derived from an [`EndpointId`], and the size limits of ids and
//! headers. Documented in `docs/protocol.md`; nothing outside this crate spells one of these names.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Durable direct exchange tasks are published to, with routing key `<EP>.tasks`.
pub const TASKS_EXCHANGE: &str = "tasks";
/// Durable topic exchange results are published to, with routing key `<EP>.results`.
pub const RESULTS_EXCHANGE: &str = "results";
/// Durable queue bound to [`RESULTS_EXCHANGE`] with [`RESULTS_BINDING`]: where the service reads results.
pub const RESULTS_QUEUE: &str = "results";
/// Binding of [`RESULTS_QUEUE`]: one word (the endpoint id) followed by `.results`.
pub const RESULTS_BINDING: &str = "*.results";
/// Durable topic exchange heartbeats are published to, with routing key `<EP>.heartbeat` (a topic exchange,
/// so a broker user of one endpoint can be confined to its own routing key).
pub const HEARTBEATS_EXCHANGE: &str = "heartbeats";

/// Task header: a per-task timeout in milliseconds (an integer); it can only shorten the function's own.
pub const HEADER_TIMEOUT_MS: &str = "x-timeout-ms";
/// Result headers.
pub const HEADER_ENDPOINT_ID: &str = "endpoint_id";
pub const HEADER_STATUS: &str = "status";
pub const HEADER_EXIT_CODE: &str = "exit_code";
pub const HEADER_ATTEMPTS: &str = "attempts";
pub const HEADER_DURATION_MS: &str = "duration_ms";

/// Largest header table a task may carry (estimated encoded size); larger ones get a `rejected` result. Task
/// data belongs in the body.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Longest endpoint id accepted; keeps every derived queue name well under AMQP's 255-byte short string.
pub const MAX_ENDPOINT_ID_LEN: usize = 128;
/// Longest task id (AMQP `message_id` is a short string).
pub const MAX_TASK_ID_LEN: usize = 255;

/// An endpoint id: 1 to 128 of `A-Z a-z 0-9 _ -`. No dots, because the results binding `*.results` matches
/// exactly one word before `.results`, and no topic wildcards.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EndpointId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointIdError {
    #[error("endpoint id is empty: pass --endpoint-id with 1 to {MAX_ENDPOINT_ID_LEN} characters")]
    Empty,
    #[error("endpoint id is {0} characters long: at most {MAX_ENDPOINT_ID_LEN} are allowed")]
    TooLong(usize),
    #[error(
        "endpoint id {0:?} contains {1:?}: use only letters, digits, '_' and '-' (a '.' would break the `*.results` binding)"
    )]
    BadChar(String, char),
}

impl EndpointId {
    pub fn new(id: impl Into<String>) -> Result<Self, EndpointIdError> {
        let id = id.into();
        if id.is_empty() {
            return Err(EndpointIdError::Empty);
        }
        if id.len() > MAX_ENDPOINT_ID_LEN {
            return Err(EndpointIdError::TooLong(id.len()));
        }
        if let Some(c) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(EndpointIdError::BadChar(id, c));
        }
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Queue (and routing key on [`TASKS_EXCHANGE`]) holding this endpoint's tasks.
    pub fn tasks_queue(&self) -> String {
        format!("{}.tasks", self.0)
    }

    /// Routing key of this endpoint's results on [`RESULTS_EXCHANGE`].
    pub fn results_routing_key(&self) -> String {
        format!("{}.results", self.0)
    }

    /// Max-length-1 queue holding the service's [`Registration`] for this endpoint.
    pub fn registration_queue(&self) -> String {
        format!("{}.registration", self.0)
    }

    /// Max-length-1 queue holding the latest [`Heartbeat`] of this endpoint.
    pub fn heartbeat_queue(&self) -> String {
        format!("{}.heartbeat", self.0)
    }

    /// Routing key of this endpoint's heartbeats on [`HEARTBEATS_EXCHANGE`] (the heartbeat queue's binding).
    pub fn heartbeat_routing_key(&self) -> String {
        self.heartbeat_queue()
    }

    /// The endpoint id a results routing key `<EP>.results` names, if it is one.
    pub fn from_results_routing_key(key: &str) -> Option<EndpointId> {
        EndpointId::new(key.strip_suffix(".results")?).ok()
    }
}

impl TryFrom<String> for EndpointId {
    type Error = EndpointIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<EndpointId> for String {
    fn from(id: EndpointId) -> Self {
        id.0
    }
}

impl std::str::FromStr for EndpointId {
    type Err = EndpointIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn check(id: &str, ok: bool) {
        assert_eq!(EndpointId::new(id).is_ok(), ok, "{id:?}");
    }

    #[test]
    fn endpoint_ids() {
        check("demo", true);
        check("A_b-9", true);
        check("", false);
        check("a.b", false);
        check("a*", false);
        check("a#", false);
        check("é", false);
        check(&"x".repeat(MAX_ENDPOINT_ID_LEN), true);
        check(&"x".repeat(MAX_ENDPOINT_ID_LEN + 1), false);
    }

    #[test]
    fn derived_names() {
        let ep = EndpointId::new("ep1").unwrap();
        assert_eq!(ep.tasks_queue(), "ep1.tasks");
        assert_eq!(ep.results_routing_key(), "ep1.results");
        assert_eq!(ep.registration_queue(), "ep1.registration");
        assert_eq!(ep.heartbeat_queue(), "ep1.heartbeat");
    }
}
