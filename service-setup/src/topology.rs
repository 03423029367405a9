//! Provisioning and deprovisioning one endpoint: declaring its queues and bindings (plus the shared exchanges and
//! results queue) and publishing its registration, or deleting its own queues (and its broker user, if it has
//! one). Both are idempotent. This module must never delete anything shared by all endpoints (the `tasks`,
//! `results` and `heartbeats` exchanges, the `results` queue) and must not drop queued tasks unless the caller
//! forces it.

use crate::amqp::{
    amqp_err, bind, close_channel, declare_exchange, declare_queue, declare_results,
    declare_tasks_exchange, latest_only_queue_args, open_channel, tasks_queue_args,
};
use crate::error::{SetupError, soft_error};
use crate::management::Management;
use endpoint_wire::amqp::queue_info;
use endpoint_wire::{
    EndpointId, HANDBACK_EXCHANGE, HEARTBEATS_EXCHANGE, PROTOCOL_VERSION, QueueType, Registration,
    TASKS_EXCHANGE, now_ms,
};
use lapin::ExchangeKind;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::protocol::AMQPSoftError;
use lapin::{BasicProperties, Confirmation, Connection};

/// Shortest and longest heartbeat interval a registration may carry, in seconds.
pub const HEARTBEAT_SECS_RANGE: std::ops::RangeInclusive<u16> = 1..=3600;

/// Declares everything endpoint `ep` needs and publishes a fresh [`Registration`] (confirmed by the broker).
/// Safe to run again: the topology is re-declared as is and the new registration replaces the old one, keeping
/// the endpoint's broker user and queue type if the old one named them (a new endpoint gets classic queues).
pub async fn provision(
    conn: &Connection,
    ep: &EndpointId,
    heartbeat_secs: u16,
) -> Result<Registration, SetupError> {
    let old = registration_of(conn, ep).await?;
    let user = old.as_ref().and_then(|r| r.endpoint_user.clone());
    let queue_type = old.map_or(QueueType::Classic, |r| r.tasks_queue_type);
    provision_typed(conn, ep, heartbeat_secs, user, Some(queue_type)).await
}

/// [`provision`] naming `endpoint_user` as the broker user the endpoint's agent logs in as (results for the
/// endpoint are then accepted only from that user); see [`Management::create_endpoint_user`].
pub async fn provision_as(
    conn: &Connection,
    ep: &EndpointId,
    heartbeat_secs: u16,
    endpoint_user: Option<String>,
) -> Result<Registration, SetupError> {
    provision_typed(conn, ep, heartbeat_secs, endpoint_user, None).await
}

/// [`provision_as`] with the type of the endpoint's queues: `Some(quorum)` replicates them over a cluster's
/// nodes (the tasks queue with a single active consumer), `None` keeps the type the registration already names
/// (classic for a new endpoint). An existing tasks queue of another type is [`SetupError::QueueTypeChange`].
pub async fn provision_typed(
    conn: &Connection,
    ep: &EndpointId,
    heartbeat_secs: u16,
    endpoint_user: Option<String>,
    queue_type: Option<QueueType>,
) -> Result<Registration, SetupError> {
    let queue_type = match queue_type {
        Some(t) => t,
        None => registration_of(conn, ep)
            .await?
            .map_or(QueueType::Classic, |r| r.tasks_queue_type),
    };
    if !HEARTBEAT_SECS_RANGE.contains(&heartbeat_secs) {
        return Err(SetupError::InvalidArgument(format!(
            "heartbeat interval {heartbeat_secs}s is out of range: pass 1 to 3600 seconds"
        )));
    }
    declare_results(conn, queue_type).await?;
    let channel = open_channel(conn, "provision").await?;
    declare_tasks_exchange(&channel).await?;

    let tasks = ep.tasks_queue();
    declare_queue(&channel, &tasks, tasks_queue_args(queue_type))
        .await
        .map_err(|e| match e {
            SetupError::QueueMismatch { queue, reason }
                if reason.contains("x-queue-type")
                    || reason.contains("x-single-active-consumer") =>
            {
                SetupError::QueueTypeChange {
                    endpoint: ep.clone(),
                    queue,
                    wanted: queue_type,
                    reason,
                }
            }
            e => e,
        })?;
    bind(&channel, &tasks, TASKS_EXCHANGE, &tasks).await?;
    // Where a hand-back puts tasks back (an endpoint's user may publish there with its own key only).
    declare_exchange(&channel, HANDBACK_EXCHANGE, ExchangeKind::Topic).await?;
    bind(&channel, &tasks, HANDBACK_EXCHANGE, &tasks).await?;
    let registration_queue = ep.registration_queue();
    declare_queue(
        &channel,
        &registration_queue,
        latest_only_queue_args(queue_type),
    )
    .await?;
    declare_exchange(&channel, HEARTBEATS_EXCHANGE, ExchangeKind::Topic).await?;
    let heartbeat_queue = ep.heartbeat_queue();
    declare_queue(
        &channel,
        &heartbeat_queue,
        latest_only_queue_args(queue_type),
    )
    .await?;
    bind(
        &channel,
        &heartbeat_queue,
        HEARTBEATS_EXCHANGE,
        &ep.heartbeat_routing_key(),
    )
    .await?;
    // Beats of agents that do not consume (standing by, quieted): kept apart so they never hide the active one's.
    let standby_queue = ep.standby_heartbeat_queue();
    declare_queue(&channel, &standby_queue, latest_only_queue_args(queue_type)).await?;
    bind(
        &channel,
        &standby_queue,
        HEARTBEATS_EXCHANGE,
        &standby_queue,
    )
    .await?;

    let mut registration = Registration::new(ep.clone(), heartbeat_secs, now_ms());
    registration.endpoint_user = endpoint_user;
    registration.tasks_queue_type = queue_type;
    let body = serde_json::to_vec(&registration).expect("a Registration always serializes to JSON");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp_err("while enabling publisher confirms"))?;
    let what = format!("the registration of endpoint {ep}");
    let confirm = channel
        .basic_publish(
            "".into(),
            registration_queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &body,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into()),
        )
        .await
        .map_err(amqp_err(format!("while publishing {what}")))?
        .await
        .map_err(amqp_err(format!(
            "while waiting for the broker to confirm {what}"
        )))?;
    match confirm {
        Confirmation::Ack(None) => {}
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            return Err(SetupError::Unroutable {
                what,
                reason: format!(
                    "{} (was queue {registration_queue} deleted meanwhile? provision again)",
                    returned.reply_text
                ),
            });
        }
        Confirmation::Nack(None) | Confirmation::NotRequested => {
            return Err(SetupError::Nacked { what });
        }
    }
    close_channel(&channel).await;
    tracing::info!(endpoint = %ep, heartbeat_secs, %queue_type, "provisioned");
    Ok(registration)
}

/// What [`deprovision`] removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deprovisioned {
    /// The endpoint.
    pub endpoint_id: EndpointId,
    /// The queues that existed and were deleted, in the order they were deleted.
    pub deleted_queues: Vec<String>,
    /// Tasks that were still queued and are gone (only non-zero with `force`).
    pub dropped_tasks: u32,
    /// The endpoint's broker user, deleted.
    pub deleted_user: Option<String>,
}

/// The broker user `ep`'s registration names, if it can be read and names one.
pub async fn endpoint_user_of(
    conn: &Connection,
    ep: &EndpointId,
) -> Result<Option<String>, SetupError> {
    Ok(registration_of(conn, ep)
        .await?
        .and_then(|r| r.endpoint_user))
}

/// `ep`'s newest registration of this protocol version, read without consuming it (retried a few times while
/// another reader holds its one message); `None` if there is none to read.
pub async fn registration_of(
    conn: &Connection,
    ep: &EndpointId,
) -> Result<Option<Registration>, SetupError> {
    let newest: Option<Registration> =
        crate::status::latest(conn, ep, &ep.registration_queue(), |r: &Registration| {
            r.provisioned_at_ms
        })
        .await?;
    Ok(newest.filter(|r| r.protocol_version == PROTOCOL_VERSION))
}

/// Deletes the queues of endpoint `ep`: the tasks queue first, and only if it is empty unless `force`, so a refusal
/// leaves the endpoint fully provisioned. Queues that do not exist are skipped, so running it twice is fine. When
/// the registration names a broker user of the endpoint, `management` deletes it first (before any queue, so a
/// failure leaves the endpoint as it was).
pub async fn deprovision(
    conn: &Connection,
    ep: &EndpointId,
    force: bool,
    management: Option<&Management>,
) -> Result<Deprovisioned, SetupError> {
    let mut done = Deprovisioned {
        endpoint_id: ep.clone(),
        deleted_queues: Vec::new(),
        dropped_tasks: 0,
        deleted_user: None,
    };
    let tasks = ep.tasks_queue();
    if !force
        && let Some(q) = queue_info(conn, &tasks).await?
        && q.message_count() > 0
    {
        return Err(SetupError::TasksQueued {
            endpoint: ep.clone(),
            queue: tasks,
            count: q.message_count(),
        });
    }
    if let Some(user) = endpoint_user_of(conn, ep).await? {
        let Some(management) = management else {
            return Err(SetupError::InvalidArgument(format!(
                "endpoint {ep} has a broker user of its own ({user}): deprovision needs the management API to delete it"
            )));
        };
        management.delete_user(&user).await?;
        done.deleted_user = Some(user);
    }
    if queue_info(conn, &tasks).await?.is_some() {
        match delete_queue(conn, &tasks, !force).await {
            Ok(n) => {
                done.dropped_tasks = n;
                done.deleted_queues.push(tasks);
            }
            Err(e) if soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) => {
                let count = queue_info(conn, &tasks)
                    .await?
                    .map_or(0, |q| q.message_count());
                return Err(SetupError::TasksQueued {
                    endpoint: ep.clone(),
                    queue: tasks,
                    count,
                });
            }
            // Deleted by someone else between the check and the delete.
            Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {}
            Err(e) => return Err(amqp_err(format!("while deleting queue {tasks}"))(e)),
        }
    }
    for queue in [
        ep.registration_queue(),
        ep.heartbeat_queue(),
        ep.standby_heartbeat_queue(),
    ] {
        if queue_info(conn, &queue).await?.is_none() {
            continue;
        }
        match delete_queue(conn, &queue, false).await {
            Ok(_) => done.deleted_queues.push(queue),
            Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {}
            Err(e) => return Err(amqp_err(format!("while deleting queue {queue}"))(e)),
        }
    }
    tracing::info!(endpoint = %ep, deleted = ?done.deleted_queues, "deprovisioned");
    Ok(done)
}

/// Deletes `queue` on a channel of its own (a refused delete closes it) and returns how many messages it held.
async fn delete_queue(conn: &Connection, queue: &str, if_empty: bool) -> Result<u32, lapin::Error> {
    let channel = conn.create_channel().await?;
    let deleted = channel
        .queue_delete(
            queue.into(),
            QueueDeleteOptions {
                if_empty,
                ..QueueDeleteOptions::default()
            },
        )
        .await?;
    close_channel(&channel).await;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_range_matches_the_cli() {
        assert!(!HEARTBEAT_SECS_RANGE.contains(&0));
        assert!(HEARTBEAT_SECS_RANGE.contains(&1));
        assert!(HEARTBEAT_SECS_RANGE.contains(&3600));
        assert!(!HEARTBEAT_SECS_RANGE.contains(&3601));
    }
}
