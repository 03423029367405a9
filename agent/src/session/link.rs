//! The link supervisor: (re)registers, connects the subscriber (our own AMQP client, `raw`) and the publisher
//! (lapin) on connections of their own (with the AMQP heartbeat the registration sets), notices a dead link (lapin's error events, AMQP heartbeats,
//! a failed operation) and starts over with backoff; its watchdog also turns `connection.blocked` /
//! `unblocked` into the condition the publisher waits on. Executors never wait on it: a lost link only pauses
//! intake and publishing.

use super::heartbeat::{Heartbeats, Identity};
use super::publisher::Publisher;
use super::subscriber::Subscriber;
use crate::config::{BrokerOrder, Config};
use crate::limits::{CLOSE_TIMEOUT, STABLE_SESSION};
use crate::meta::MetaKey;
use crate::raw::{RawConnection, RawError};
use crate::retry::Backoff;
use crate::store::Store;
use endpoint_wire::amqp::connect;
use endpoint_wire::registration::{RegistrationError, fetch_registration};
use endpoint_wire::{AgentState, BrokerError, BrokerUrl, Registration, WorkerCounts, now_rfc3339};
use futures_lite::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The link supervisor; built once by `crate::run`.
pub(crate) struct Link {
    config: Arc<Config>,
    store: Store,
    state: watch::Sender<AgentState>,
    workers: watch::Receiver<BTreeMap<String, WorkerCounts>>,
    /// Whether this agent holds the tasks consumer (the subscriber sets it; quiet clears it).
    consuming: Arc<AtomicBool>,
    /// Sessions opened so far; every one after the first is a reconnect.
    sessions: AtomicU64,
}

/// What every session uses, kept across reconnects.
struct Parts {
    subscriber: Subscriber,
    publisher: Publisher,
    heartbeats: Heartbeats,
    /// `Some(why)` while the broker blocks the publishing connection; the publisher and heartbeats watch it.
    blocked: watch::Sender<Option<String>>,
}

/// How a session with the broker ended.
enum SessionEnd {
    /// `drain` was cancelled and every result is published.
    Drained,
    Failed(BrokerError),
}

impl Link {
    /// `state` is the agent's intake state as heartbeats report it (the subscriber sets it, `run` too).
    pub(crate) fn new(
        config: Arc<Config>,
        store: Store,
        state: watch::Sender<AgentState>,
        workers: watch::Receiver<BTreeMap<String, WorkerCounts>>,
        consuming: Arc<AtomicBool>,
    ) -> Link {
        Link {
            config,
            store,
            state,
            workers,
            consuming,
            sessions: AtomicU64::new(0),
        }
    }

    /// Keeps the endpoint connected until `drain` is cancelled and every result is published. `stop_intake`
    /// stops consuming. Fails only when the first registration fails for a reason no retry can fix (the
    /// endpoint is not provisioned, the credentials are refused): later failures are logged and retried.
    pub async fn run(
        self,
        stop_intake: CancellationToken,
        drain: CancellationToken,
    ) -> Result<(), RegistrationError> {
        let config = self.config.clone();
        let ep = &config.endpoint_id;
        let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
        let mut ever_registered = false;
        let blocked = watch::channel(None).0;
        let waiting = Arc::new(AtomicBool::new(false));
        let probe_now = Arc::new(tokio::sync::Notify::new());
        let parts = Parts {
            publisher: Publisher {
                config: config.clone(),
                store: self.store.clone(),
                blocked: blocked.subscribe(),
            },
            heartbeats: Heartbeats {
                config: config.clone(),
                store: self.store.clone(),
                state: self.state.subscribe(),
                seq: AtomicU64::new(0),
                blocked: blocked.subscribe(),
                workers: self.workers.clone(),
                consuming: self.consuming.clone(),
                identity: Identity::of_this_process(),
                node: std::sync::Mutex::default(),
                waiting: waiting.clone(),
                probe_now: probe_now.clone(),
            },
            subscriber: Subscriber {
                config: config.clone(),
                store: self.store.clone(),
                state: self.state.clone(),
                consuming: self.consuming.clone(),
                waiting,
                probe_now,
            },
            blocked,
        };
        let mut nodes = Nodes::default();
        // Refusals for good (not provisioned, bad credentials) before the first registration: with several
        // nodes, each gets its say (one may have lost its copy of a classic queue) before the agent gives up.
        let mut refused = 0;
        loop {
            // Read at every attempt: a URL file may have been rewritten (a rotated password, a new node).
            let url = match config.broker_urls() {
                Ok(urls) => nodes.current(urls, config.broker_order),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::error!(error = %e, ?delay, "cannot read the broker URL; tasks on disk keep running; retrying");
                    self.note(format!("disconnected since {}: {e}", now_rfc3339()))
                        .await;
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let registered = async {
                let conn = connect(&url, &format!("endpoint-agent {ep} registration")).await?;
                let reg = fetch_registration(&conn, ep).await;
                let _ = endpoint_wire::amqp::close(&conn, "registered").await;
                reg
            };
            let reg = match registered.await {
                Ok(reg) => reg,
                Err(e) if !ever_registered && !e.is_transient() && refused + 1 >= nodes.len() => {
                    return Err(e);
                }
                Err(e) => {
                    if !e.is_transient() {
                        refused += 1;
                    }
                    let delay = backoff.next_delay();
                    if e.is_transient() {
                        tracing::warn!(error = %e, broker = %url, ?delay, "broker unreachable; tasks on disk keep running; retrying");
                    } else {
                        tracing::error!(error = %e, broker = %url, ?delay, "cannot register; tasks on disk keep running; retrying");
                    }
                    self.note(format!("disconnected since {}: {e}", now_rfc3339()))
                        .await;
                    nodes.advance();
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            if !ever_registered {
                tracing::info!(endpoint = %ep, heartbeat_secs = reg.heartbeat_secs, broker = %url, "registered");
            }
            ever_registered = true;
            let started = std::time::Instant::now();
            let end = self.session(&url, &reg, &parts, &stop_intake, &drain).await;
            // A session that stayed up a while proves the path works: the next outage starts over from the
            // shortest delay instead of the longest one reached by earlier outages.
            if started.elapsed() >= STABLE_SESSION {
                backoff.reset();
            }
            match end {
                SessionEnd::Drained => return Ok(()),
                SessionEnd::Failed(e) => {
                    let delay = backoff.next_delay();
                    // The next node (with several): this one may be the one that went away.
                    nodes.advance();
                    tracing::warn!(error = %e, broker = %url, ?delay, "lost the broker; tasks keep running, results wait on disk; reconnecting");
                    self.note(format!("disconnected since {}: {e}", now_rfc3339()))
                        .await;
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn set_blocked(&self, blocked: &watch::Sender<Option<String>>, why: Option<String>) {
        crate::http::metrics::publishing_blocked(why.is_some());
        self.store
            .record(MetaKey::PublishingBlocked, why.clone().unwrap_or_default())
            .await;
        blocked.send_replace(why);
    }

    async fn note(&self, link: String) {
        self.store.record(MetaKey::Link, link).await;
    }

    async fn session(
        &self,
        broker: &BrokerUrl,
        reg: &Registration,
        parts: &Parts,
        stop_intake: &CancellationToken,
        drain: &CancellationToken,
    ) -> SessionEnd {
        let Parts {
            subscriber,
            publisher,
            heartbeats,
            blocked,
        } = parts;
        let ep = &self.config.endpoint_id;
        let url = broker.with_heartbeat(reg.heartbeat_secs);
        // Results say who sent them; with EXTERNAL the user is the certificate's, which the URL does not name.
        let login = broker.parts();
        let user_id = (!login.external).then_some(login.user);
        let connected = async {
            let name = format!("endpoint-agent {ep} subscriber");
            let sub = RawConnection::open(broker, &name, reg.heartbeat_secs)
                .await
                .map_err(|e| subscriber_failed("while connecting the subscriber", e))?;
            let publ = connect(&url, &format!("endpoint-agent {ep} publisher")).await?;
            Ok::<_, BrokerError>((sub, publ))
        };
        let (mut sub_conn, pub_conn) = match connected.await {
            Ok(c) => c,
            Err(e) => return SessionEnd::Failed(e),
        };
        tracing::info!(broker = %broker, tls = broker.is_tls(), "connected");
        self.store.record(MetaKey::Node, broker.to_string()).await;
        *heartbeats.node.lock().expect("node lock") = broker.node();
        self.note(format!(
            "connected since {} to {}",
            now_rfc3339(),
            broker.node()
        ))
        .await;
        let sessions = self.sessions.fetch_add(1, Ordering::Relaxed);
        crate::http::metrics::session_opened(sessions);
        self.store
            .record(MetaKey::Reconnects, sessions.to_string())
            .await;
        let interval = Duration::from_secs(u64::from(reg.heartbeat_secs));
        // The intake owns the subscriber's connection: once intake stops it closes it at once, so what it held
        // unacked goes back to the broker (for a standby agent) while the publisher drains.
        let intake = async move {
            match subscriber
                .run(&mut sub_conn, stop_intake, reg.tasks_queue_type)
                .await
            {
                Ok(()) => {
                    sub_conn.close().await;
                    std::future::pending().await
                }
                Err(e) => subscriber_failed("the subscriber connection failed", e),
            }
        };
        let watchdog = async {
            let mut events = pub_conn.events_listener();
            while let Some(event) = events.next().await {
                match event {
                    // A channel-level (soft) error, such as the exclusive consume being refused, also arrives
                    // here; it is handled where it happened and leaves the connection alive.
                    lapin::Event::Error(e) if !e.is_amqp_soft_error() => {
                        return BrokerError::amqp("the broker connection failed", e);
                    }
                    // Only the publisher connection publishes, so only it is ever blocked.
                    lapin::Event::ConnectionBlocked(reason) => {
                        tracing::warn!(reason = %reason, "the broker blocked publishing (resource alarm): results wait on disk, tasks keep running; it resumes when the broker unblocks");
                        self.set_blocked(
                            blocked,
                            Some(format!("since {}: {reason}", now_rfc3339())),
                        )
                        .await;
                    }
                    lapin::Event::ConnectionUnblocked => {
                        tracing::info!(
                            "the broker unblocked publishing: sending the results that waited"
                        );
                        self.set_blocked(blocked, None).await;
                    }
                    _ => {}
                }
            }
            BrokerError::Lost("the broker connection closed".into())
        };
        let end = tokio::select! {
            e = intake => SessionEnd::Failed(e),
            e = watchdog => SessionEnd::Failed(e),
            r = heartbeats.ticker(&pub_conn, interval) => SessionEnd::Failed(r.err().unwrap_or_else(|| BrokerError::Lost("the heartbeat ticker stopped".into()))),
            r = publisher.run(&pub_conn, user_id.as_deref(), drain) => match r {
                Ok(()) => SessionEnd::Drained,
                Err(e) => SessionEnd::Failed(e),
            },
        };
        crate::http::metrics::session_ended();
        if matches!(end, SessionEnd::Drained) {
            if let Err(e) = heartbeats.final_heartbeat(&pub_conn, interval).await {
                tracing::warn!(error = %e, "cannot publish the final heartbeat");
            }
            self.note(format!("stopped at {}", now_rfc3339())).await;
        }
        // A new connection starts unblocked (the broker blocks it again at its first publish if it must).
        if blocked.borrow().is_some() {
            self.set_blocked(blocked, None).await;
        }
        let _ =
            tokio::time::timeout(CLOSE_TIMEOUT, pub_conn.close(200, "endpoint-agent".into())).await;
        end
    }
}

/// Which of the broker's nodes to connect to: the URLs in the configured order, taken in turn; a new list (a
/// rewritten URL file) starts a new order.
#[derive(Default)]
struct Nodes {
    listed: Vec<BrokerUrl>,
    order: Vec<BrokerUrl>,
    next: usize,
}

impl Nodes {
    /// The node to try now, given the URLs as configured now (at least one).
    fn current(&mut self, urls: Vec<BrokerUrl>, order: BrokerOrder) -> BrokerUrl {
        if urls != self.listed {
            self.order = order.arrange(urls.clone());
            self.listed = urls;
            self.next = 0;
        }
        self.order[self.next % self.order.len()].clone()
    }

    /// Moves on to the next node.
    fn advance(&mut self) {
        self.next = self.next.wrapping_add(1);
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

/// The subscriber's connection failed: a TLS refusal stays one (an operator must act), anything else is a lost
/// link to reconnect.
fn subscriber_failed(context: &str, e: RawError) -> BrokerError {
    match e {
        RawError::Tls(reason) => BrokerError::Tls {
            context: context.to_owned(),
            reason,
        },
        e => BrokerError::Lost(format!("{context}: {e}")),
    }
}
