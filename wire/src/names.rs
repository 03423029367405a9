//! Names every AMQP client needs to speak to an endpoint: the shared exchanges and queues, the headers of tasks
//! and results, the per-endpoint queue names derived from an [`EndpointId`], and the size limits of ids and
//! headers. Documented in `docs/protocol.md`; nothing outside this crate spells one of these names.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Durable direct exchange tasks are published to, with routing key `<EP>.tasks`.
pub const TASKS_EXCHANGE: &str = "tasks";
/// Durable topic exchange results are published to, with routing key `<EP>.results` (a task that named no
/// service) or `<EP>.results.<SERVICE>` (a task whose `reply_to` named a service).
pub const RESULTS_EXCHANGE: &str = "results";
/// Durable queue bound to [`RESULTS_EXCHANGE`] with [`RESULTS_BINDING`]: the shared queue, where results of
/// tasks that named no service go.
pub const RESULTS_QUEUE: &str = "results";
/// Binding of [`RESULTS_QUEUE`]: one word (the endpoint id) followed by `.results`. It does not match
/// `<EP>.results.<SERVICE>`: a service's results reach only that service's queue.
pub const RESULTS_BINDING: &str = "*.results";
/// Durable topic exchange heartbeats are published to, with routing key `<EP>.heartbeat` (a topic exchange,
/// so a broker user of one endpoint can be confined to its own routing key).
pub const HEARTBEATS_EXCHANGE: &str = "heartbeats";
/// Durable topic exchange a hand-back republishes tasks to, with routing key `<EP>.tasks`; each tasks queue is
/// bound to it with its own name. A topic exchange, so an endpoint's own broker user can be allowed to put
/// tasks back into its own queue only (topic permissions), never into another endpoint's.
pub const HANDBACK_EXCHANGE: &str = "handback";

/// AMQP `type` of a probe: a message without `message_id` an agent waiting as a single active consumer (a
/// quorum tasks queue) puts into its own tasks queue through [`HANDBACK_EXCHANGE`] to learn whether the broker
/// now delivers to it (the broker does not tell a consumer that it became the active one). Whoever receives a
/// probe acks and drops it; it never becomes a task or a result.
pub const PROBE_TYPE: &str = "x-endpoint-agent-probe";

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
/// Longest service name; keeps its queue name and routing keys well under AMQP's 255-byte short string.
pub const MAX_SERVICE_NAME_LEN: usize = 64;

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

    /// Max-length-1 queue holding the latest heartbeat of an agent that does not consume the endpoint's tasks
    /// (standing by, or quieted), bound with the routing key of the same name: its beats never replace the
    /// active agent's in [`EndpointId::heartbeat_queue`].
    pub fn standby_heartbeat_queue(&self) -> String {
        format!("{}.heartbeat.standby", self.0)
    }

    /// Routing key of this endpoint's results for `service` (`<EP>.results.<SERVICE>`), or of its results for
    /// the shared queue (`<EP>.results`) when the task named no service.
    pub fn results_routing_key_for(&self, service: Option<&ServiceName>) -> String {
        match service {
            Some(s) => format!("{}.results.{}", self.0, s.0),
            None => self.results_routing_key(),
        }
    }

    /// The endpoint id a results routing key (`<EP>.results` or `<EP>.results.<SERVICE>`) names, if it is one.
    pub fn from_results_routing_key(key: &str) -> Option<EndpointId> {
        Self::parse_results_routing_key(key).map(|(ep, _)| ep)
    }

    /// The endpoint and (for `<EP>.results.<SERVICE>`) the service a results routing key names.
    pub fn parse_results_routing_key(key: &str) -> Option<(EndpointId, Option<ServiceName>)> {
        let mut words = key.split('.');
        let ep = EndpointId::new(words.next()?).ok()?;
        if words.next()? != "results" {
            return None;
        }
        let service = match words.next() {
            None => None,
            Some(s) => Some(ServiceName::new(s).ok()?),
        };
        if words.next().is_some() {
            return None;
        }
        Some((ep, service))
    }
}

/// The name of a service instance: 1 to 64 of `A-Z a-z 0-9 _ -`. A task names its service in `reply_to`;
/// the agent then publishes its result with routing key `<EP>.results.<SERVICE>`, which only the service's own
/// queue ([`ServiceName::results_queue`]) is bound to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServiceNameError {
    #[error("service name is empty: pass 1 to {MAX_SERVICE_NAME_LEN} characters")]
    Empty,
    #[error("service name is {0} characters long: at most {MAX_SERVICE_NAME_LEN} are allowed")]
    TooLong(usize),
    #[error(
        "service name {0:?} contains {1:?}: use only letters, digits, '_' and '-' (it becomes a word of a routing key)"
    )]
    BadChar(String, char),
}

impl ServiceName {
    pub fn new(name: impl Into<String>) -> Result<Self, ServiceNameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(ServiceNameError::Empty);
        }
        if name.len() > MAX_SERVICE_NAME_LEN {
            return Err(ServiceNameError::TooLong(name.len()));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(ServiceNameError::BadChar(name, c));
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The service's durable results queue: `service.<SERVICE>.results` (three words, so it never collides
    /// with an endpoint's `<EP>.<kind>` queues).
    pub fn results_queue(&self) -> String {
        format!("service.{}.results", self.0)
    }

    /// The binding of [`ServiceName::results_queue`] on [`RESULTS_EXCHANGE`]: `*.results.<SERVICE>`, every
    /// endpoint's results for this service.
    pub fn results_binding(&self) -> String {
        format!("*.results.{}", self.0)
    }
}

impl TryFrom<String> for ServiceName {
    type Error = ServiceNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<ServiceName> for String {
    fn from(s: ServiceName) -> Self {
        s.0
    }
}

impl std::str::FromStr for ServiceName {
    type Err = ServiceNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
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
        let svc = ServiceName::new("billing-1").unwrap();
        assert_eq!(ep.results_routing_key_for(None), "ep1.results");
        assert_eq!(
            ep.results_routing_key_for(Some(&svc)),
            "ep1.results.billing-1"
        );
        assert_eq!(svc.results_queue(), "service.billing-1.results");
        assert_eq!(svc.results_binding(), "*.results.billing-1");
    }

    #[test]
    fn results_routing_keys() {
        let parse = |k: &str| {
            EndpointId::parse_results_routing_key(k)
                .map(|(e, s)| (e.to_string(), s.map(|s| s.to_string())))
        };
        assert_eq!(parse("a.results"), Some(("a".into(), None)));
        assert_eq!(parse("a.results.s1"), Some(("a".into(), Some("s1".into()))));
        assert_eq!(parse("a.results.s1.x"), None);
        assert_eq!(parse("a.result"), None);
        assert_eq!(parse("a.results."), None);
        assert_eq!(parse("a"), None);
        assert_eq!(parse("a.b.results"), None);
        assert_eq!(
            EndpointId::from_results_routing_key("a.results.s")
                .unwrap()
                .as_str(),
            "a"
        );
    }

    #[test]
    fn service_names() {
        assert!(ServiceName::new("svc_1-a").is_ok());
        assert_eq!(ServiceName::new(""), Err(ServiceNameError::Empty));
        assert!(ServiceName::new("a.b").is_err());
        assert!(ServiceName::new("a*").is_err());
        assert!(ServiceName::new("x".repeat(MAX_SERVICE_NAME_LEN)).is_ok());
        assert!(ServiceName::new("x".repeat(MAX_SERVICE_NAME_LEN + 1)).is_err());
    }
}
