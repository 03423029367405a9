//! The heartbeat ticker: every interval the registration sets, the agent's state and counts, its host, pid,
//! instance and role go to the `heartbeats` exchange (unconfirmed: the next beat supersedes a lost one), and a
//! confirmed `stopped` beat ends a clean stop. An agent that holds the tasks consumer (or held it until it
//! stopped) beats with routing key `<EP>.heartbeat`; one that does not (standing by, quiet) with
//! `<EP>.heartbeat.standby`, so its beats land in a queue of their own and never hide the active agent's.
//! `service-setup status` judges liveness from them.

use super::publisher::confirm_channel;
use crate::config::Config;
use crate::store::Store;
use endpoint_wire::{self as wire, AgentState, BrokerError, Heartbeat};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

pub(crate) struct Heartbeats {
    pub config: Arc<Config>,
    pub store: Store,
    /// The intake state (running, standby, paused, draining) the subscriber and `run` set.
    pub state: watch::Receiver<AgentState>,
    /// Heartbeat sequence, kept across reconnects.
    pub seq: AtomicU64,
    /// `Some(why)` while the broker blocks the publishing connection (a resource alarm).
    pub blocked: watch::Receiver<Option<String>>,
    /// Pool workers per function.
    pub workers: watch::Receiver<std::collections::BTreeMap<String, wire::WorkerCounts>>,
    /// Whether this agent holds the tasks consumer (set by the subscriber, cleared by quiet).
    pub consuming: Arc<AtomicBool>,
    /// Who is beating.
    pub identity: Identity,
    /// The broker node (`host:port`) of the current session; the link sets it at each connect.
    pub node: std::sync::Mutex<String>,
    /// Set while the subscriber waits as a consumer of a single-active-consumer queue: each tick then also
    /// sends a probe into the tasks queue, which reaches this agent once the broker made it the active one.
    pub waiting: Arc<AtomicBool>,
    /// Notified by the subscriber when it starts waiting: the first probe goes at once, not a beat later.
    pub probe_now: Arc<tokio::sync::Notify>,
}

/// What tells this agent apart from any other beating for the endpoint.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub host: String,
    pub pid: u32,
    /// Random at every start.
    pub instance: String,
}

impl Identity {
    pub(crate) fn of_this_process() -> Identity {
        use std::hash::{BuildHasher, Hasher};
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "unknown".to_owned());
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        Identity {
            host,
            pid: std::process::id(),
            instance: format!("{:016x}", h.finish()),
        }
    }
}

impl Heartbeats {
    /// Publishes a heartbeat every `interval` until the connection fails.
    pub async fn ticker(&self, conn: &Connection, interval: Duration) -> Result<(), BrokerError> {
        let open = || async {
            conn.create_channel()
                .await
                .map_err(|e| BrokerError::amqp("while opening the heartbeat channel", e))
        };
        let mut channel = open().await?;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // An endpoint provisioned before standby beats had their own key: with an endpoint user, the broker
        // refuses that key and closes the channel. Then standby beats stop (said once) instead of the session.
        let (mut sent_standby, mut standby_refused) = (false, false);
        let mut probes: Option<Channel> = None;
        let mut probes_refused = false;
        loop {
            let probe_only = tokio::select! {
                _ = tick.tick() => false,
                _ = self.probe_now.notified() => true,
            };
            if self.waiting.load(Ordering::Relaxed) && !probes_refused {
                probes_refused = !self.probe(conn, &mut probes).await?;
            }
            if probe_only {
                continue;
            }
            if !channel.status().connected() {
                if !(sent_standby && conn.status().connected()) || standby_refused {
                    return Err(BrokerError::Lost("the heartbeat channel closed".into()));
                }
                standby_refused = true;
                tracing::warn!(
                    key = %self.config.endpoint_id.standby_heartbeat_queue(),
                    "the broker refuses standby heartbeats on this key (the endpoint was provisioned by an older service-setup): this agent sends none while it stands by; run `service-setup provision` for the endpoint again"
                );
                channel = open().await?;
            }
            sent_standby = !self.consuming.load(Ordering::Relaxed);
            if sent_standby && standby_refused {
                continue;
            }
            let state = self.state.borrow().with_conditions(
                self.store.disk_full().borrow().is_some(),
                self.blocked.borrow().is_some(),
            );
            // Not confirmed: the next beat supersedes a lost one.
            let _confirm = self.publish_heartbeat(&channel, state, interval).await?;
        }
    }

    /// Puts a probe into the endpoint's tasks queue (through the hand-back exchange, which an endpoint's own
    /// broker user may publish to with its own key) on a channel of its own. False if the broker refuses it
    /// (an endpoint provisioned before hand-backs): then said once, and the agent learns it is active from its
    /// first task instead.
    async fn probe(
        &self,
        conn: &Connection,
        channel: &mut Option<Channel>,
    ) -> Result<bool, BrokerError> {
        let ep = &self.config.endpoint_id;
        if let Some(c) = channel.as_ref()
            && !c.status().connected()
        {
            if !conn.status().connected() {
                return Err(BrokerError::Lost("the connection closed".into()));
            }
            tracing::warn!(
                exchange = wire::HANDBACK_EXCHANGE,
                "the broker refuses this agent's probes (the endpoint was provisioned by an older service-setup): a standby learns it became the active consumer from its first task; run `service-setup provision` for the endpoint again"
            );
            *channel = None;
            return Ok(false);
        }
        let c = match channel {
            Some(c) => c,
            None => channel.insert(
                conn.create_channel()
                    .await
                    .map_err(|e| BrokerError::amqp("while opening the probe channel", e))?,
            ),
        };
        c.basic_publish(
            wire::HANDBACK_EXCHANGE.into(),
            ep.tasks_queue().as_str().into(),
            BasicPublishOptions::default(),
            b"",
            BasicProperties::default().with_type(wire::PROBE_TYPE.into()),
        )
        .await
        .map_err(|e| BrokerError::amqp("while publishing a probe", e))?;
        Ok(true)
    }

    /// Publishes the last heartbeat (`stopped`) and waits for the broker's confirm.
    pub async fn final_heartbeat(
        &self,
        conn: &Connection,
        interval: Duration,
    ) -> Result<(), BrokerError> {
        let channel = confirm_channel(conn, "heartbeat").await?;
        let confirm = self
            .publish_heartbeat(&channel, AgentState::Stopped, interval)
            .await?;
        confirm
            .await
            .map_err(|e| BrokerError::amqp("while confirming the final heartbeat", e))?;
        let _ = channel.close(200, "stopped".into()).await;
        Ok(())
    }

    async fn publish_heartbeat(
        &self,
        channel: &Channel,
        state: AgentState,
        interval: Duration,
    ) -> Result<lapin::PublisherConfirm, BrokerError> {
        let counts = *self.store.counts().borrow();
        let role = if self.consuming.load(Ordering::Relaxed) {
            wire::Role::Active
        } else {
            wire::Role::Standby
        };
        let beat = Heartbeat {
            protocol_version: wire::PROTOCOL_VERSION,
            endpoint_id: self.config.endpoint_id.clone(),
            state,
            tasks_queued: counts.queued,
            tasks_running: counts.running,
            results_pending: counts.results_pending,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            time_ms: wire::now_ms(),
            heartbeat_secs: u16::try_from(interval.as_secs()).unwrap_or(u16::MAX),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            workers: self.workers.borrow().clone(),
            host: self.identity.host.clone(),
            pid: self.identity.pid,
            instance: self.identity.instance.clone(),
            role,
            node: self.node.lock().expect("node lock").clone(),
        };
        let body = serde_json::to_vec(&beat).expect("a heartbeat always serializes");
        let ep = &self.config.endpoint_id;
        let key = match role {
            wire::Role::Active => ep.heartbeat_routing_key(),
            wire::Role::Standby => ep.standby_heartbeat_queue(),
        };
        channel
            .basic_publish(
                wire::HEARTBEATS_EXCHANGE.into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_timestamp(beat.time_ms / 1000),
            )
            .await
            .map_err(|e| BrokerError::amqp("while publishing a heartbeat", e))
    }
}
