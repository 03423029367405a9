//! What `/api/status` returns and the status page shows, gathered from the agent's own sources of truth (the
//! store's counts and disk-full condition, the intake state, the subscriber's consuming flag, the pool
//! workers, the link flags of the metrics, and the store's `meta` facts and recent failures read on a
//! read-only connection), plus the readiness verdict of `/readyz` and the throughput ring the page draws.
//! Reads only; never waits for the writer.

use super::metrics::Metrics;
use crate::config::Config;
use crate::store::{Reader, RecentFailure, Store, StoreError};
use endpoint_wire::{AgentState, WorkerCounts, rfc3339_utc};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often the throughput ring takes a sample of the counters: fine enough for a chart of minutes.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: ten minutes at [`SAMPLE_EVERY`].
const SAMPLES: usize = 120;
/// Failures the page lists.
const RECENT_FAILURES: usize = 20;
/// Latest results searched for failures: bounds the read at a few milliseconds however many results the
/// retention keeps (there is no index by status).
const FAILURE_SCAN: usize = 50_000;

/// Everything the status endpoints read, shared by the handlers.
pub(super) struct App {
    pub config: Arc<Config>,
    pub store: Store,
    pub state: watch::Receiver<AgentState>,
    pub workers: watch::Receiver<BTreeMap<String, WorkerCounts>>,
    pub metrics: &'static Metrics,
    /// Whether this agent holds the tasks consumer (the subscriber sets it; standing by and quiet clear it; a
    /// lost link leaves it as it was, so it counts only while `broker_connected`).
    pub consuming: Arc<AtomicBool>,
    /// The status reads' own read-only connection, opened at first use by the blocking thread that reads.
    pub reader: Arc<Mutex<Option<Reader>>>,
    pub throughput: Mutex<Ring>,
}

/// The JSON of `/api/status`; the page renders the same.
#[derive(Debug, Serialize)]
pub(super) struct Snapshot {
    pub endpoint_id: String,
    pub agent_version: &'static str,
    /// As heartbeats report it: `running`, `standby`, `paused`, `disk_full`, `blocked`, `draining`, ...
    pub state: String,
    /// What `/readyz` answers now, and why.
    pub ready: bool,
    pub ready_reason: String,
    pub broker_connected: bool,
    /// The broker link as last recorded (`connected since T`, `disconnected since T: why`, ...).
    pub link: Option<String>,
    /// The broker node (URL, password redacted) in use, or last used.
    pub node: Option<String>,
    pub reconnects: u64,
    pub publishing_blocked: Option<String>,
    pub disk_full: Option<String>,
    pub tasks_queued: u64,
    pub tasks_running: u64,
    pub tasks_done: u64,
    pub results_pending: u64,
    pub slots: usize,
    pub slots_busy: i64,
    pub throughput: Throughput,
    pub recent_failures: Vec<Failure>,
    pub workers: BTreeMap<String, WorkerCounts>,
    /// Set when the database could not be read (the link text and failures are then missing).
    pub store_error: Option<String>,
    pub time: String,
}

#[derive(Debug, Serialize)]
pub(super) struct Failure {
    pub task_id: String,
    pub function: String,
    pub status: String,
    pub time: String,
    /// The start of the result's body.
    pub error: String,
}

#[derive(Debug, Default, Serialize)]
pub(super) struct Throughput {
    pub every_secs: u64,
    /// Oldest first.
    pub points: Vec<Rate>,
}

/// Tasks per second over one sampling interval, ending at `time`.
#[derive(Debug, Serialize)]
pub(super) struct Rate {
    pub time: String,
    pub received_per_sec: f64,
    pub finished_per_sec: f64,
}

/// Samples of the received and finished counters, oldest first.
#[derive(Default)]
pub(super) struct Ring(VecDeque<Sample>);

struct Sample {
    at: Instant,
    time_ms: u64,
    received: u64,
    finished: u64,
}

impl Ring {
    pub fn sample(&mut self, metrics: &Metrics) {
        if self.0.len() > SAMPLES {
            self.0.pop_front();
        }
        self.0.push_back(Sample {
            at: Instant::now(),
            time_ms: endpoint_wire::now_ms(),
            received: metrics.received_total(),
            finished: metrics.finished_total(),
        });
    }

    fn rates(&self) -> Throughput {
        let points = self
            .0
            .iter()
            .zip(self.0.iter().skip(1))
            .map(|(a, b)| {
                let secs = b.at.duration_since(a.at).as_secs_f64().max(0.001);
                let per_sec =
                    |x: u64, y: u64| (y.saturating_sub(x) as f64 / secs * 10.0).round() / 10.0;
                Rate {
                    time: rfc3339_utc(b.time_ms),
                    received_per_sec: per_sec(a.received, b.received),
                    finished_per_sec: per_sec(a.finished, b.finished),
                }
            })
            .collect();
        Throughput {
            every_secs: SAMPLE_EVERY.as_secs(),
            points,
        }
    }
}

/// What readiness depends on.
#[derive(Clone, Copy, Debug)]
pub(super) struct Conditions<'a> {
    /// The intake state as `run` and the subscriber set it (before conditions).
    pub state: AgentState,
    pub disk_full: Option<&'a str>,
    pub connected: bool,
    pub consuming: bool,
    pub blocked: bool,
    pub queued: u64,
    pub max_backlog: u64,
}

/// `/readyz`: ready (`Ok(why)`) only while connected and consuming, or standing by on purpose (another agent
/// holds the queue); otherwise `Err(why)`, one line. A state this code does not know is not ready.
pub(super) fn readiness(c: &Conditions<'_>) -> Result<String, String> {
    // Matched by name, so that a state added to the contract later falls to "not ready" instead of failing
    // to build.
    let state = c.state.to_string();
    match state.as_str() {
        "draining" => return Err("draining: shutting down, taking no new tasks".into()),
        "stopped" => return Err("stopped".into()),
        "quiet" => {
            return Err("quiet: taking no new tasks (a standby agent can take the queue)".into());
        }
        _ => {}
    }
    if let Some(since) = c.disk_full {
        return Err(format!(
            "disk full {since}: new tasks stay in the broker until space returns"
        ));
    }
    if !c.connected {
        return Err("disconnected from the broker: reconnecting".into());
    }
    if c.blocked {
        return Err(
            "publishing blocked by the broker (resource alarm): results wait on disk".into(),
        );
    }
    match state.as_str() {
        "standby" => Ok("standby: another agent consumes the tasks queue".into()),
        "running" if c.consuming => Ok("consuming".into()),
        "running" => Err("connected, not consuming yet".into()),
        "paused" => Err(format!(
            "paused for backlog: {} tasks queued on disk (max_backlog {}); further tasks stay in the broker",
            c.queued, c.max_backlog
        )),
        other => Err(format!("{other}: not taking tasks")),
    }
}

impl App {
    /// The link flags, the conditions and the counts as of now (no database read).
    pub fn conditions<T>(&self, f: impl FnOnce(&Conditions<'_>) -> T) -> T {
        let counts = *self.store.counts().borrow();
        let disk_full = self.store.disk_full().borrow().clone();
        let c = Conditions {
            state: *self.state.borrow(),
            disk_full: disk_full.as_deref(),
            connected: self.metrics.broker_connected(),
            consuming: self.consuming(),
            blocked: self.metrics.publishing_blocked(),
            queued: counts.queued,
            max_backlog: self.config.max_backlog,
        };
        f(&c)
    }

    /// Connected and holding the tasks consumer.
    pub fn consuming(&self) -> bool {
        self.metrics.broker_connected() && self.consuming.load(Ordering::Relaxed)
    }

    /// The intake state with the conditions over it, as heartbeats report it.
    pub fn reported_state(&self) -> AgentState {
        self.conditions(|c| c.state.with_conditions(c.disk_full.is_some(), c.blocked))
    }

    pub async fn snapshot(&self) -> Snapshot {
        let counts = *self.store.counts().borrow();
        let disk_full = self.store.disk_full().borrow().clone();
        let (ready, ready_reason) = match self.conditions(readiness) {
            Ok(why) => (true, why),
            Err(why) => (false, why),
        };
        let (meta, failures, store_error) = match self.read_store().await {
            Ok((meta, failures)) => (meta, failures, None),
            Err(e) => (Vec::new(), Vec::new(), Some(e.to_string())),
        };
        let get = |key: crate::meta::MetaKey| {
            meta.iter()
                .find(|(k, _)| k == key.as_str())
                .map(|(_, v)| v.clone())
        };
        let throughput = self.throughput.lock().expect("never poisoned").rates();
        Snapshot {
            endpoint_id: self.config.endpoint_id.to_string(),
            agent_version: env!("CARGO_PKG_VERSION"),
            state: self.reported_state().to_string(),
            ready,
            ready_reason,
            broker_connected: self.metrics.broker_connected(),
            link: get(crate::meta::MetaKey::Link),
            node: get(crate::meta::MetaKey::Node),
            reconnects: get(crate::meta::MetaKey::Reconnects)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            publishing_blocked: get(crate::meta::MetaKey::PublishingBlocked)
                .filter(|v| !v.is_empty()),
            disk_full,
            tasks_queued: counts.queued,
            tasks_running: counts.running,
            tasks_done: counts.done,
            results_pending: counts.results_pending,
            slots: self.config.workers,
            slots_busy: self.metrics.slots_busy(),
            throughput,
            recent_failures: failures
                .into_iter()
                .map(|f| Failure {
                    task_id: f.task_id,
                    function: f.function,
                    status: f.status,
                    time: rfc3339_utc(f.finished_at_ms),
                    error: f.text,
                })
                .collect(),
            workers: self.workers.borrow().clone(),
            store_error,
            time: endpoint_wire::now_rfc3339(),
        }
    }

    /// The `meta` facts and the recent failures, read on a blocking thread through the status reads' own
    /// read-only connection (it waits neither for the writer nor for its commits).
    async fn read_store(&self) -> Result<(Vec<(String, String)>, Vec<RecentFailure>), StoreError> {
        let slot = self.reader.clone();
        let dir = self.config.data_dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut slot = slot.lock().expect("never poisoned");
            let reader = match &mut *slot {
                Some(r) => r,
                None => slot.insert(Reader::open(&dir)?),
            };
            let meta = reader.meta()?;
            let failures = reader.recent_failures(RECENT_FAILURES, FAILURE_SCAN)?;
            Ok((meta, failures))
        })
        .await
        .unwrap_or(Err(StoreError::Closed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(c: Conditions<'_>, expected: Result<&str, &str>) {
        let got = readiness(&c);
        match (&got, expected) {
            (Ok(why), Ok(want)) | (Err(why), Err(want)) => {
                assert!(
                    why.starts_with(want),
                    "{c:?}: {why:?} should start with {want:?}"
                )
            }
            _ => panic!("{c:?}: got {got:?}, want {expected:?}"),
        }
    }

    #[test]
    fn ready_only_while_consuming_or_standing_by() {
        let ok = Conditions {
            state: AgentState::Running,
            disk_full: None,
            connected: true,
            consuming: true,
            blocked: false,
            queued: 3,
            max_backlog: 10,
        };
        check(ok, Ok("consuming"));
        check(
            Conditions {
                consuming: false,
                ..ok
            },
            Err("connected, not consuming"),
        );
        check(
            Conditions {
                connected: false,
                ..ok
            },
            Err("disconnected"),
        );
        check(
            Conditions {
                state: AgentState::Standby,
                consuming: false,
                ..ok
            },
            Ok("standby"),
        );
        check(
            Conditions {
                state: AgentState::Standby,
                connected: false,
                ..ok
            },
            Err("disconnected"),
        );
        check(
            Conditions {
                state: AgentState::Paused,
                ..ok
            },
            Err("paused for backlog: 3 tasks"),
        );
        check(
            Conditions {
                state: AgentState::Draining,
                ..ok
            },
            Err("draining"),
        );
        check(
            Conditions {
                disk_full: Some("since T: full"),
                ..ok
            },
            Err("disk full since T"),
        );
        check(
            Conditions {
                blocked: true,
                ..ok
            },
            Err("publishing blocked"),
        );
        check(
            Conditions {
                state: AgentState::Stopped,
                ..ok
            },
            Err("stopped"),
        );
    }
}
