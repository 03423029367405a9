//! Endpoint status: what the broker knows about one endpoint (its tasks queue, its registration, its latest
//! heartbeat) and the verdict on whether its agent runs, as text for people and JSON for scripts. Reading is
//! strictly non-destructive: queues are checked passively and messages are peeked and requeued, never acked.
//! The verdict is a pure function of [`EndpointStatus`] so it is tested without a broker or a clock.

use crate::error::SetupError;
use crate::time::{rfc3339_utc, secs};
use endpoint_wire::amqp::{peek_all, queue_info};
use endpoint_wire::{AgentState, EndpointId, Heartbeat, Registration, now_ms};
use lapin::Connection;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::fmt::Write as _;
use std::time::Duration;

/// What the broker says about one endpoint at `now_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointStatus {
    /// The endpoint.
    pub endpoint_id: String,
    /// Its tasks queue exists.
    pub provisioned: bool,
    /// Heartbeat interval of its registration, if one could be read.
    pub heartbeat_secs: Option<u16>,
    /// Ready tasks in its tasks queue.
    pub queue_depth: Option<u32>,
    /// Consumers of its tasks queue (an agent holds one while running).
    pub consumers: Option<u32>,
    /// The newest heartbeat in its heartbeat queue.
    pub last_heartbeat: Option<Heartbeat>,
    /// The newest heartbeat of an agent that does not consume the tasks (standing by, or quieted).
    pub standby_heartbeat: Option<Heartbeat>,
    /// When this status was taken (milliseconds since the Unix epoch).
    pub now_ms: u64,
    /// How liveness is judged: `None`, by the last heartbeat's age against this machine's clock;
    /// `Some(watch)`, by whether the heartbeat sequence moved while watching ([`watch_status`]).
    pub watched: Option<Watched>,
}

/// What [`watch_status`] saw: whether a new heartbeat came while it watched, and for how long it watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watched {
    /// The active heartbeat's sequence number (or instance) changed.
    pub moved: bool,
    /// How long it watched, in milliseconds.
    pub for_ms: u64,
}

/// Whether the endpoint's agent runs, judged from its last heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// The last heartbeat is fresh.
    Running {
        /// How old the heartbeat is.
        age_ms: u64,
        /// What it says the agent does.
        state: AgentState,
    },
    /// The last heartbeat says it stopped (`clean_stop`), or is older than 2.5 heartbeat intervals.
    NotRunningSince {
        /// The last heartbeat's time.
        since_ms: u64,
        /// It said `stopped`.
        clean_stop: bool,
    },
    /// No heartbeat at all: the agent never ran against this endpoint (or it was re-provisioned).
    NeverSeen,
}

impl EndpointStatus {
    /// Whether the agent runs, from the last heartbeat's state and age (older than 2.5 intervals: not running).
    pub fn liveness(&self) -> Liveness {
        let Some(hb) = &self.last_heartbeat else {
            return Liveness::NeverSeen;
        };
        if hb.state == AgentState::Stopped {
            return Liveness::NotRunningSince {
                since_ms: hb.time_ms,
                clean_stop: true,
            };
        }
        // Watched: the sequence moving is the proof of life, whatever either clock says.
        if let Some(w) = self.watched {
            return if w.moved {
                Liveness::Running {
                    age_ms: 0,
                    state: hb.state,
                }
            } else {
                Liveness::NotRunningSince {
                    since_ms: hb.time_ms,
                    clean_stop: false,
                }
            };
        }
        // The heartbeat's own interval is what the agent follows; the registration's is only a fallback.
        let interval = match hb.heartbeat_secs {
            0 => self.heartbeat_secs.unwrap_or(0),
            s => s,
        };
        let age_ms = self.now_ms.saturating_sub(hb.time_ms);
        // age > 2.5 * interval, in integers.
        if age_ms.saturating_mul(2) > u64::from(interval) * 5_000 {
            Liveness::NotRunningSince {
                since_ms: hb.time_ms,
                clean_stop: false,
            }
        } else {
            Liveness::Running {
                age_ms,
                state: hb.state,
            }
        }
    }

    /// One line: `running (state S, last heartbeat Ns ago)`, `not running since <time> (stopped cleanly)`,
    /// `not running since <time> (no heartbeat for Ns)` or `never seen`.
    pub fn verdict(&self) -> String {
        match (self.liveness(), self.watched) {
            (Liveness::Running { state, .. }, Some(w)) => format!(
                "running (state {state}, a new heartbeat within {}s of watching)",
                secs(w.for_ms)
            ),
            (
                Liveness::NotRunningSince {
                    since_ms,
                    clean_stop: false,
                },
                Some(w),
            ) => format!(
                "not running since {} (no new heartbeat in {}s of watching)",
                rfc3339_utc(since_ms),
                secs(w.for_ms)
            ),
            (liveness, _) => self.verdict_by_age(liveness),
        }
    }

    fn verdict_by_age(&self, liveness: Liveness) -> String {
        match liveness {
            Liveness::Running { age_ms, state } => {
                format!(
                    "running (state {state}, last heartbeat {}s ago)",
                    secs(age_ms)
                )
            }
            Liveness::NotRunningSince {
                since_ms,
                clean_stop: true,
            } => format!(
                "not running since {} (stopped cleanly)",
                rfc3339_utc(since_ms)
            ),
            Liveness::NotRunningSince {
                since_ms,
                clean_stop: false,
            } => format!(
                "not running since {} (no heartbeat for {}s)",
                rfc3339_utc(since_ms),
                secs(self.now_ms.saturating_sub(since_ms))
            ),
            Liveness::NeverSeen => "never seen".to_owned(),
        }
    }

    /// The status as JSON (what `service-setup status --json` prints).
    pub fn to_json(&self) -> serde_json::Value {
        let liveness = match self.liveness() {
            Liveness::Running { age_ms, state } => {
                json!({"kind": "running", "state": state, "age_ms": age_ms})
            }
            Liveness::NotRunningSince {
                since_ms,
                clean_stop,
            } => {
                json!({"kind": "not_running", "since_ms": since_ms, "since": rfc3339_utc(since_ms),
                        "clean_stop": clean_stop})
            }
            Liveness::NeverSeen => json!({"kind": "never_seen"}),
        };
        json!({
            "endpoint_id": self.endpoint_id,
            "provisioned": self.provisioned,
            "heartbeat_secs": self.heartbeat_secs,
            "queue_depth": self.queue_depth,
            "consumers": self.consumers,
            "last_heartbeat": self.last_heartbeat,
            "standby_heartbeat": self.standby_heartbeat,
            "now_ms": self.now_ms,
            "liveness": liveness,
            "judged_by": match self.watched {
                None => json!({"kind": "age", "rule": "last heartbeat younger than 2.5 intervals by this machine's clock"}),
                Some(w) => json!({"kind": "sequence", "moved": w.moved, "watched_ms": w.for_ms}),
            },
            "verdict": self.verdict(),
        })
    }

    /// A few aligned `key  value` lines for people.
    pub fn to_text(&self) -> String {
        let ep = &self.endpoint_id;
        let mut out = String::new();
        let mut line = |key: &str, value: String| {
            let _ = writeln!(out, "{key:<15} {value}");
        };
        line("endpoint", ep.clone());
        line(
            "provisioned",
            if self.provisioned {
                "yes".to_owned()
            } else {
                format!("no (run `service-setup provision --endpoint-id {ep}`)")
            },
        );
        line(
            "tasks queued",
            self.queue_depth.map_or("-".to_owned(), |n| n.to_string()),
        );
        line(
            "consumer",
            match self.consumers {
                Some(0) => "no".to_owned(),
                Some(1) => "yes".to_owned(),
                Some(n) => format!("yes ({n})"),
                None => "-".to_owned(),
            },
        );
        line(
            "heartbeat",
            match self.heartbeat_secs {
                Some(s) => format!("every {s}s (registration)"),
                None if self.provisioned => format!(
                    "unknown: no registration, run `service-setup provision --endpoint-id {ep}` again"
                ),
                None => "-".to_owned(),
            },
        );
        let beat = |hb: &Heartbeat| {
            format!(
                "{} ({}s ago): state {}, seq {}, {} queued, {} running, {} results pending, agent {} on {} pid {} (instance {}){}",
                rfc3339_utc(hb.time_ms),
                secs(self.now_ms.saturating_sub(hb.time_ms)),
                hb.state,
                hb.seq,
                hb.tasks_queued,
                hb.tasks_running,
                hb.results_pending,
                hb.agent_version,
                if hb.host.is_empty() { "?" } else { &hb.host },
                hb.pid,
                if hb.instance.is_empty() {
                    "?"
                } else {
                    &hb.instance
                },
                if hb.node.is_empty() {
                    String::new()
                } else {
                    format!(", via broker node {}", hb.node)
                },
            )
        };
        line(
            "last heartbeat",
            self.last_heartbeat.as_ref().map_or("none".to_owned(), beat),
        );
        if let Some(hb) = &self.standby_heartbeat {
            line("standby", beat(hb));
        }
        if let Some(hb) = &self.last_heartbeat {
            for (function, w) in &hb.workers {
                line(
                    "workers",
                    format!(
                        "{function}: {} idle, {} busy, {} starting, {} failing ({} external)",
                        w.idle, w.busy, w.starting, w.failing, w.external
                    ),
                );
            }
        }
        line("verdict", self.verdict());
        line(
            "judged by",
            match self.watched {
                None => "the last heartbeat's age by this machine's clock (--watch judges by the sequence moving)".to_owned(),
                Some(w) => format!("the heartbeat sequence, watched for {}s", secs(w.for_ms)),
            },
        );
        out
    }
}

/// Reads the status of `ep` without changing anything on the broker. A missing tasks queue means
/// `provisioned: false`, not an error.
pub async fn endpoint_status(
    conn: &Connection,
    ep: &EndpointId,
) -> Result<EndpointStatus, SetupError> {
    let tasks = queue_info(conn, &ep.tasks_queue()).await?;
    let registration: Option<Registration> =
        latest(conn, ep, &ep.registration_queue(), |r: &Registration| {
            r.provisioned_at_ms
        })
        .await?;
    let heartbeat: Option<Heartbeat> = latest(conn, ep, &ep.heartbeat_queue(), |h: &Heartbeat| {
        (h.time_ms, h.seq)
    })
    .await?;
    // Absent on endpoints provisioned before standby beats had a queue of their own: none to show.
    let standby: Option<Heartbeat> =
        latest(conn, ep, &ep.standby_heartbeat_queue(), |h: &Heartbeat| {
            (h.time_ms, h.seq)
        })
        .await?;
    Ok(EndpointStatus {
        endpoint_id: ep.to_string(),
        provisioned: tasks.is_some(),
        heartbeat_secs: registration.map(|r| r.heartbeat_secs),
        queue_depth: tasks.as_ref().map(|q| q.message_count()),
        consumers: tasks.as_ref().map(|q| q.consumer_count()),
        last_heartbeat: heartbeat,
        standby_heartbeat: standby,
        now_ms: now_ms(),
        watched: None,
    })
}

/// Like [`endpoint_status`], but judges liveness by the heartbeat sequence moving instead of the heartbeat's
/// age: it watches the active heartbeat for up to 2.5 intervals and says running as soon as a new one comes
/// (another `seq`, or another agent instance). A clock skewed between the agent's host and this one cannot make
/// a live agent look dead, or a dead one alive. Returns at once when there is no heartbeat or it says stopped.
pub async fn watch_status(
    conn: &Connection,
    ep: &EndpointId,
) -> Result<EndpointStatus, SetupError> {
    let first = endpoint_status(conn, ep).await?;
    let Some(beat) = first.last_heartbeat.clone() else {
        return Ok(first);
    };
    if beat.state == AgentState::Stopped {
        return Ok(first);
    }
    let interval_ms = u64::from(match beat.heartbeat_secs {
        0 => first.heartbeat_secs.unwrap_or(10),
        s => s,
    }) * 1000;
    let limit = Duration::from_millis(interval_ms * 5 / 2);
    let poll = Duration::from_millis((interval_ms / 5).clamp(100, 1000));
    let started = tokio::time::Instant::now();
    let mut status = first;
    loop {
        let moved = status
            .last_heartbeat
            .as_ref()
            .is_some_and(|hb| hb.seq != beat.seq || hb.instance != beat.instance);
        let for_ms = started.elapsed().as_millis() as u64;
        if moved || started.elapsed() >= limit {
            status.watched = Some(Watched { moved, for_ms });
            return Ok(status);
        }
        tokio::time::sleep(poll.min(limit.saturating_sub(started.elapsed()))).await;
        status = endpoint_status(conn, ep).await?;
    }
}

/// Extra reads of an empty max-length-1 queue: another reader may hold its one message unacked for a moment.
const EMPTY_RETRIES: u32 = 3;
const EMPTY_RETRY_DELAY: Duration = Duration::from_millis(50);

/// The newest (by `key`) valid JSON message of `queue` naming endpoint `ep`, read without consuming it.
pub(crate) async fn latest<T, K>(
    conn: &Connection,
    ep: &EndpointId,
    queue: &str,
    key: impl Fn(&T) -> K,
) -> Result<Option<T>, SetupError>
where
    T: DeserializeOwned + Named,
    K: Ord,
{
    for attempt in 0..=EMPTY_RETRIES {
        let Some(bodies) = peek_all(conn, queue).await? else {
            return Ok(None);
        };
        if bodies.is_empty() && attempt < EMPTY_RETRIES {
            tokio::time::sleep(EMPTY_RETRY_DELAY).await;
            continue;
        }
        let parsed = bodies.iter().filter_map(|body| match serde_json::from_slice::<T>(body) {
            Ok(v) if v.endpoint() == ep => Some(v),
            Ok(v) => {
                tracing::warn!(queue, named = %v.endpoint(), "ignoring a message naming another endpoint");
                None
            }
            Err(e) => {
                tracing::warn!(queue, error = %e, "ignoring a message that is not valid JSON of the contract");
                None
            }
        });
        return Ok(parsed.max_by_key(|v| key(v)));
    }
    Ok(None)
}

/// Wire payloads that name their endpoint.
pub(crate) trait Named {
    fn endpoint(&self) -> &EndpointId;
}

impl Named for Registration {
    fn endpoint(&self) -> &EndpointId {
        &self.endpoint_id
    }
}

impl Named for Heartbeat {
    fn endpoint(&self) -> &EndpointId {
        &self.endpoint_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_wire::PROTOCOL_VERSION;

    const NOW: u64 = 1_709_210_096_789; // 2024-02-29T12:34:56.789Z

    fn heartbeat(state: AgentState, age_ms: u64, heartbeat_secs: u16) -> Heartbeat {
        Heartbeat {
            protocol_version: PROTOCOL_VERSION,
            endpoint_id: EndpointId::new("ep").expect("valid id"),
            state,
            tasks_queued: 1,
            tasks_running: 2,
            results_pending: 3,
            seq: 7,
            time_ms: NOW - age_ms,
            heartbeat_secs,
            agent_version: "0.1.0".into(),
            workers: Default::default(),
            host: "h1".into(),
            pid: 42,
            instance: "i1".into(),
            role: endpoint_wire::Role::Active,
            node: String::new(),
        }
    }

    fn status(hb: Option<Heartbeat>) -> EndpointStatus {
        EndpointStatus {
            endpoint_id: "ep".into(),
            provisioned: true,
            heartbeat_secs: Some(10),
            queue_depth: Some(4),
            consumers: Some(1),
            last_heartbeat: hb,
            standby_heartbeat: None,
            now_ms: NOW,
            watched: None,
        }
    }

    fn check(hb: Option<Heartbeat>, expected: Liveness, verdict: &str) {
        let s = status(hb);
        assert_eq!(s.liveness(), expected);
        assert_eq!(s.verdict(), verdict);
    }

    #[test]
    fn verdicts() {
        use AgentState::*;
        check(None, Liveness::NeverSeen, "never seen");
        check(
            Some(heartbeat(Running, 3_000, 10)),
            Liveness::Running {
                age_ms: 3_000,
                state: Running,
            },
            "running (state running, last heartbeat 3s ago)",
        );
        // Exactly 2.5 intervals is still running; one millisecond more is not.
        check(
            Some(heartbeat(Standby, 25_000, 10)),
            Liveness::Running {
                age_ms: 25_000,
                state: Standby,
            },
            "running (state standby, last heartbeat 25s ago)",
        );
        check(
            Some(heartbeat(Running, 25_001, 10)),
            Liveness::NotRunningSince {
                since_ms: NOW - 25_001,
                clean_stop: false,
            },
            "not running since 2024-02-29T12:34:31.788Z (no heartbeat for 25s)",
        );
        // The heartbeat's own interval wins over the registration's.
        check(
            Some(heartbeat(Paused, 25_001, 60)),
            Liveness::Running {
                age_ms: 25_001,
                state: Paused,
            },
            "running (state paused, last heartbeat 25s ago)",
        );
        check(
            Some(heartbeat(Stopped, 1_000, 10)),
            Liveness::NotRunningSince {
                since_ms: NOW - 1_000,
                clean_stop: true,
            },
            "not running since 2024-02-29T12:34:55.789Z (stopped cleanly)",
        );
        // Watched: the sequence decides, whatever the age says.
        let mut watched = status(Some(heartbeat(Running, 600_000, 10)));
        watched.watched = Some(Watched {
            moved: true,
            for_ms: 3_000,
        });
        assert!(matches!(watched.liveness(), Liveness::Running { .. }));
        assert!(
            watched.verdict().contains("a new heartbeat within 3s"),
            "{}",
            watched.verdict()
        );
        watched.last_heartbeat = Some(heartbeat(Running, 0, 10));
        watched.watched = Some(Watched {
            moved: false,
            for_ms: 25_000,
        });
        assert!(matches!(
            watched.liveness(),
            Liveness::NotRunningSince {
                clean_stop: false,
                ..
            }
        ));
        assert!(
            watched.verdict().contains("no new heartbeat in 25s"),
            "{}",
            watched.verdict()
        );
        assert_eq!(watched.to_json()["judged_by"]["kind"], "sequence");
        assert_eq!(status(None).to_json()["judged_by"]["kind"], "age");
        // A heartbeat from the future (clock skew) counts as fresh.
        let mut future = heartbeat(Running, 0, 10);
        future.time_ms = NOW + 5_000;
        assert!(matches!(
            status(Some(future)).liveness(),
            Liveness::Running { age_ms: 0, .. }
        ));
    }

    #[test]
    fn text_and_json() {
        let s = status(Some(heartbeat(AgentState::Running, 2_000, 10)));
        let text = s.to_text();
        assert!(text.contains("tasks queued    4"), "{text}");
        assert!(text.contains("consumer        yes"), "{text}");
        assert!(text.contains("every 10s"), "{text}");
        assert!(
            text.contains("verdict         running (state running, last heartbeat 2s ago)"),
            "{text}"
        );
        let j = s.to_json();
        assert_eq!(j["liveness"]["kind"], "running");
        assert_eq!(j["liveness"]["state"], "running");
        assert_eq!(j["queue_depth"], 4);
        assert_eq!(j["last_heartbeat"]["seq"], 7);

        let gone = EndpointStatus {
            provisioned: false,
            heartbeat_secs: None,
            queue_depth: None,
            consumers: None,
            ..status(None)
        };
        assert!(
            gone.to_text()
                .contains("no (run `service-setup provision --endpoint-id ep`)")
        );
        assert_eq!(gone.to_json()["liveness"]["kind"], "never_seen");
        assert!(gone.to_json()["queue_depth"].is_null());
    }
}
