//! The heartbeat ticker: every interval the registration sets, the agent's state and counts go to the
//! `heartbeats` exchange with routing key `<EP>.heartbeat`, bound to the endpoint's max-length-1 queue of that
//! name (unconfirmed: the next beat supersedes a lost one), and a confirmed
//! `stopped` beat ends a clean stop. `service-setup status` judges liveness from them.

use super::publisher::confirm_channel;
use crate::config::Config;
use crate::store::Store;
use endpoint_wire::{self as wire, AgentState, BrokerError, Heartbeat};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
}

impl Heartbeats {
    /// Publishes a heartbeat every `interval` until the connection fails.
    pub async fn ticker(&self, conn: &Connection, interval: Duration) -> Result<(), BrokerError> {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| BrokerError::amqp("while opening the heartbeat channel", e))?;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let state = self.state.borrow().with_conditions(
                self.store.disk_full().borrow().is_some(),
                self.blocked.borrow().is_some(),
            );
            // Not confirmed: the next beat supersedes a lost one.
            let _confirm = self.publish_heartbeat(&channel, state, interval).await?;
        }
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
        };
        let body = serde_json::to_vec(&beat).expect("a heartbeat always serializes");
        let key = self.config.endpoint_id.heartbeat_routing_key();
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
