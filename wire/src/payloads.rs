//! The versioned JSON payloads of the contract (the service's [`Registration`], the agent's [`Heartbeat`]), the
//! agent states a heartbeat reports, and the [`Status`] a result carries. Data only: no I/O.

use crate::names::{EndpointId, HEARTBEATS_EXCHANGE, RESULTS_EXCHANGE, TASKS_EXCHANGE};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Version of the wire contract. Bumped on any incompatible change; the agent refuses a registration whose
/// version it does not speak. 2: heartbeats go through the `heartbeats` topic exchange (not the default
/// exchange), results carry the publisher's `user_id`, the registration names the endpoint's broker user.
/// 3: a task may name a service in `reply_to`; its result is then published with routing key
/// `<EP>.results.<SERVICE>` and reaches only that service's queue.
pub const PROTOCOL_VERSION: u32 = 3;

/// Outcome of a task as carried in the `status` header of its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The function ran and succeeded; the body is its output.
    Ok,
    /// The function ran and failed (non-zero exit, killed, output cap, crashed the agent too often).
    Failed,
    /// The function ran past its timeout and was killed.
    Timeout,
    /// The task was not run: bad input (missing type, unknown function, oversized or empty body, ...).
    Rejected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Timeout => "timeout",
            Status::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ok" => Status::Ok,
            "failed" => Status::Failed,
            "timeout" => Status::Timeout,
            "rejected" => Status::Rejected,
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the service decided for an endpoint, written by `service-setup provision` as a persistent JSON message
/// in the max-length-1 queue `<EP>.registration`, read by the agent on every (re)connect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub protocol_version: u32,
    pub endpoint_id: EndpointId,
    /// Interval of the agent's heartbeat messages, and the AMQP heartbeat the agent negotiates.
    pub heartbeat_secs: u16,
    pub tasks_exchange: String,
    pub tasks_queue: String,
    pub results_exchange: String,
    pub results_routing_key: String,
    pub heartbeat_exchange: String,
    pub heartbeat_queue: String,
    /// The broker user the endpoint's agent logs in as, when it has one of its own
    /// (`service-setup provision --credentials`): results for the endpoint are accepted only with this
    /// `user_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_user: Option<String>,
    /// The type of the tasks queue (`classic` when absent: registrations written before quorum queues). It tells
    /// the agent how one consumer at a time is enforced: the exclusive-consumer flag on a classic queue, the
    /// queue's single active consumer on a quorum queue (which ignores the exclusive flag).
    #[serde(default)]
    pub tasks_queue_type: QueueType,
    /// Milliseconds since the Unix epoch when this registration was written.
    pub provisioned_at_ms: u64,
}

/// The type of an endpoint's queues, chosen at provision (`service-setup provision --queue-type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// One node holds each queue: the fastest, and lost to the endpoint while that node is down (nothing is
    /// lost with it: its messages are on that node's disk). One consumer at a time by the exclusive flag.
    #[default]
    Classic,
    /// Raft-replicated over the cluster's nodes: available while a majority of them runs. One consumer at a
    /// time by `x-single-active-consumer`.
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(format!("queue type {other:?}: use classic or quorum")),
        }
    }
}

impl Registration {
    pub fn new(endpoint_id: EndpointId, heartbeat_secs: u16, now_ms: u64) -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            tasks_exchange: TASKS_EXCHANGE.to_owned(),
            tasks_queue: endpoint_id.tasks_queue(),
            results_exchange: RESULTS_EXCHANGE.to_owned(),
            results_routing_key: endpoint_id.results_routing_key(),
            heartbeat_exchange: HEARTBEATS_EXCHANGE.to_owned(),
            heartbeat_queue: endpoint_id.heartbeat_queue(),
            endpoint_user: None,
            tasks_queue_type: QueueType::Classic,
            endpoint_id,
            heartbeat_secs,
            provisioned_at_ms: now_ms,
        }
    }
}

/// What the agent is doing, as reported in its heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Consuming the tasks queue.
    Running,
    /// Another agent holds the exclusive consumer; this one runs what is on its disk and waits to take over.
    Standby,
    /// Local backlog is full: not taking deliveries until executors catch up.
    Paused,
    /// The database cannot take writes (disk full): new deliveries stay in the broker, finished results wait
    /// in memory, until space returns.
    #[serde(rename = "disk_full")]
    DiskFull,
    /// The broker blocked the publishing connection (a resource alarm): results wait on disk, tasks keep
    /// running. Seen by the service only once the block is over, since the broker blocks heartbeats too.
    Blocked,
    /// Quieted (SIGTSTP or `endpoint-agent quiet`): consumes nothing new, so a standby takes the queue at once;
    /// finishes and publishes what is on its disk and stays up until stopped.
    Quiet,
    /// Shutting down: consumes nothing new, finishing what runs.
    Draining,
    /// Stopped cleanly; the last heartbeat an agent sends.
    Stopped,
}

impl AgentState {
    /// The state a heartbeat reports: the conditions that stop work (disk full, then blocked publishing) are
    /// shown over the intake state, but not over shutting down.
    pub fn with_conditions(self, disk_full: bool, blocked: bool) -> AgentState {
        match self {
            AgentState::Draining | AgentState::Stopped | AgentState::Quiet => self,
            _ if disk_full => AgentState::DiskFull,
            _ if blocked => AgentState::Blocked,
            _ => self,
        }
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self).ok();
        f.write_str(s.as_ref().and_then(|v| v.as_str()).unwrap_or("unknown"))
    }
}

/// The ticker message the agent publishes every `heartbeat_secs` into the max-length-1 queue `<EP>.heartbeat`.
/// A moving `seq` means the agent is alive; a stale `time_ms` means it is not running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub protocol_version: u32,
    pub endpoint_id: EndpointId,
    pub state: AgentState,
    pub tasks_queued: u64,
    pub tasks_running: u64,
    pub results_pending: u64,
    pub seq: u64,
    /// Milliseconds since the Unix epoch when the heartbeat was sent.
    pub time_ms: u64,
    /// The interval the agent follows, so a reader can judge staleness without the registration.
    pub heartbeat_secs: u16,
    pub agent_version: String,
    /// Workers of each pool function (absent when the agent has no pool functions).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub workers: std::collections::BTreeMap<String, WorkerCounts>,
    /// The host the agent runs on (its host name).
    #[serde(default)]
    pub host: String,
    /// The agent's process id on that host.
    #[serde(default)]
    pub pid: u32,
    /// Chosen at each start: tells two runs (or two agents) on one host apart.
    #[serde(default)]
    pub instance: String,
    /// Whether the agent holds the endpoint's tasks consumer (its beats go to `<EP>.heartbeat`) or not (standby,
    /// quiet: `<EP>.heartbeat.standby`), so a standby's beat never hides the active agent's.
    #[serde(default)]
    pub role: Role,
    /// The broker node the agent is connected to (`host:port` of the URL it uses; absent from older agents).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
}

/// Whether an agent consumes the endpoint's tasks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Holds the tasks consumer (or held it until it stopped).
    #[default]
    Active,
    /// Does not: waiting to take over, or quieted.
    Standby,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Active => "active",
            Role::Standby => "standby",
        })
    }
}

/// The workers of one pool function, by what they are doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCounts {
    /// Connected and waiting for a task.
    pub idle: u32,
    /// Running a task.
    pub busy: u32,
    /// Started by the agent, not connected yet.
    pub starting: u32,
    /// Started by the agent and exiting before they connect, again and again (restarted with backoff).
    pub failing: u32,
    /// Connected workers the agent did not start (counted in `idle` and `busy` too).
    pub external: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn status_round_trips() {
        for s in [
            Status::Ok,
            Status::Failed,
            Status::Timeout,
            Status::Rejected,
        ] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("OK"), None);
    }

    #[test]
    fn registration_json_round_trips() {
        let reg = Registration::new(EndpointId::new("ep").unwrap(), 5, 42);
        let json = serde_json::to_string(&reg).unwrap();
        let back: Registration = serde_json::from_str(&json).unwrap();
        assert_eq!(back, reg);
        let bad = json.replace("\"ep\"", "\"e.p\"");
        assert!(serde_json::from_str::<Registration>(&bad).is_err());
        assert_eq!(AgentState::Standby.to_string(), "standby");
        assert_eq!(AgentState::DiskFull.to_string(), "disk_full");
    }

    #[test]
    fn conditions_show_over_intake_states() {
        use AgentState::*;
        let check = |s: AgentState, full, blocked, want| {
            assert_eq!(
                s.with_conditions(full, blocked),
                want,
                "{s} {full} {blocked}"
            )
        };
        check(Running, false, false, Running);
        check(Paused, true, false, DiskFull);
        check(Standby, true, true, DiskFull);
        check(Running, false, true, Blocked);
        check(Draining, true, true, Draining);
        check(Stopped, false, true, Stopped);
    }
}
