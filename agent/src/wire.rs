//! The wire contract between the service and an endpoint: names of exchanges, queues and headers, and the
//! versioned payloads (registration, heartbeat) carried as JSON. Everything any AMQP client needs to speak to
//! an endpoint is defined here and documented in `docs/protocol.md`; nothing here touches the network or disk,
//! so the service side (`service-setup`) and the agent share one definition.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Version of the wire contract. Bumped on any incompatible change; the agent refuses a registration whose
/// version it does not speak.
pub const PROTOCOL_VERSION: u32 = 1;

/// Durable direct exchange tasks are published to, with routing key `<EP>.tasks`.
pub const TASKS_EXCHANGE: &str = "tasks";
/// Durable topic exchange results are published to, with routing key `<EP>.results`.
pub const RESULTS_EXCHANGE: &str = "results";
/// Durable queue bound to [`RESULTS_EXCHANGE`] with [`RESULTS_BINDING`]: where the service reads results.
pub const RESULTS_QUEUE: &str = "results";
/// Binding of [`RESULTS_QUEUE`]: one word (the endpoint id) followed by `.results`.
pub const RESULTS_BINDING: &str = "*.results";

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
    pub heartbeat_queue: String,
    /// Milliseconds since the Unix epoch when this registration was written.
    pub provisioned_at_ms: u64,
}

impl Registration {
    pub fn new(endpoint_id: EndpointId, heartbeat_secs: u16, now_ms: u64) -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            tasks_exchange: TASKS_EXCHANGE.to_owned(),
            tasks_queue: endpoint_id.tasks_queue(),
            results_exchange: RESULTS_EXCHANGE.to_owned(),
            results_routing_key: endpoint_id.results_routing_key(),
            heartbeat_queue: endpoint_id.heartbeat_queue(),
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
            AgentState::Draining | AgentState::Stopped => self,
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
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2024-03-01T12:34:56.789Z` for `ms` milliseconds since the Unix epoch: how humans see wire times.
pub fn rfc3339_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Year, month (1-12) and day (1-31) of the `days`-th day after 1970-01-01, by Howard Hinnant's
/// `civil_from_days` (proleptic Gregorian calendar, eras of 400 years).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097; // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year starting March 1st, 0..=365
    let mp = (5 * doy + 2) / 153; // month starting March, 0..=11
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        let check = |ms: u64, expected: &str| {
            assert_eq!(rfc3339_utc(ms), expected, "{ms}");
        };

        check(0, "1970-01-01T00:00:00.000Z");
        check(999, "1970-01-01T00:00:00.999Z");
        check(86_399_999, "1970-01-01T23:59:59.999Z");
        check(951_782_400_000, "2000-02-29T00:00:00.000Z");
        check(951_868_800_000, "2000-03-01T00:00:00.000Z");
        check(1_709_210_096_789, "2024-02-29T12:34:56.789Z");
        check(1_735_689_599_000, "2024-12-31T23:59:59.000Z");
        check(1_735_689_600_000, "2025-01-01T00:00:00.000Z");
        check(4_102_444_800_000, "2100-01-01T00:00:00.000Z");
        check(4_107_456_000_000, "2100-02-28T00:00:00.000Z");
        check(4_107_542_400_000, "2100-03-01T00:00:00.000Z");
    }

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
