//! The raw-broker ceiling: a client that does what the agent does on the wire for each task and nothing else.
//! Per endpoint it opens two connections (as the agent does: one to consume, one to publish), takes
//! `<EP>.tasks` with an exclusive consumer, manual acks and the agent's prefetch, and answers every delivery
//! with a persistent, `mandatory`, confirmed result to the `results` exchange carrying the agent's result
//! properties (message_id, correlation_id, delivery_mode 2, timestamp, the `endpoint_id`/`status`/`attempts`/
//! `duration_ms` headers) and the payload as body (what `echo` returns). A delivery is acked (with `multiple`)
//! only after its result's confirm. It pipelines like a good client: results are published as deliveries
//! arrive while earlier confirms are outstanding, bounded only by the prefetch. No disk queue, no executor.

use anyhow::{Context, Result, bail};
use endpoint_agent::task::TaskResult;
use endpoint_wire::BrokerUrl;
use endpoint_wire::{self as wire, EndpointId, Status};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The agent's default prefetch (`prefetch` in README "Configuration"); the raw client uses the same.
pub const AGENT_DEFAULT_PREFETCH: u16 = 256;

/// A running raw client for one endpoint.
pub struct RawClient {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<u64>>,
    conns: [Connection; 2],
}

impl RawClient {
    /// Connects and starts consuming; returns once the consumer is registered with the broker.
    pub async fn start(url: &BrokerUrl, ep: EndpointId, prefetch: u16) -> Result<RawClient> {
        let sub = endpoint_wire::amqp::connect(url, &format!("bench raw {ep} consumer"))
            .await
            .context("while connecting the raw consumer")?;
        let publ = endpoint_wire::amqp::connect(url, &format!("bench raw {ep} publisher"))
            .await
            .context("while connecting the raw publisher")?;
        let consume = sub
            .create_channel()
            .await
            .context("while opening the raw consume channel")?;
        consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .context("while setting the raw prefetch")?;
        let publish = publ
            .create_channel()
            .await
            .context("while opening the raw publish channel")?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("while enabling confirms on the raw publish channel")?;
        let consumer = consume
            .basic_consume(
                ep.tasks_queue().as_str().into(),
                "bench-raw".into(),
                BasicConsumeOptions {
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("while consuming {}", ep.tasks_queue()))?;
        let stop = CancellationToken::new();
        let user = url.parts().user;
        let task = tokio::spawn(serve(ep, user, consume, publish, consumer, stop.clone()));
        Ok(RawClient {
            stop,
            task,
            conns: [sub, publ],
        })
    }

    /// Stops consuming, lets outstanding confirms and acks finish, closes both connections; returns how many
    /// tasks it answered.
    pub async fn stop(self) -> Result<u64> {
        self.stop.cancel();
        let answered = self.task.await.context("the raw client panicked")??;
        for c in &self.conns {
            let _ = c.close(200, "bench done".into()).await;
        }
        Ok(answered)
    }
}

async fn serve(
    ep: EndpointId,
    user: String,
    consume: Channel,
    publish: Channel,
    mut consumer: lapin::Consumer,
    stop: CancellationToken,
) -> Result<u64> {
    let routing_key: ShortString = ep.results_routing_key().into();
    let (to_acker, from_consumer) = mpsc::unbounded_channel();
    let acker = tokio::spawn(ack_after_confirm(consume.clone(), from_consumer));
    let mut answered = 0u64;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            d = consumer.next() => d,
        };
        let Some(delivery) = next else {
            bail!("the raw consumer of {} ended", ep.tasks_queue());
        };
        let delivery = delivery.context("while receiving a task")?;
        let Some(task_id) = delivery.properties.message_id().clone() else {
            // Like the agent: no task id, nothing to answer; ack it.
            let _ = to_acker.send((delivery.delivery_tag, None));
            continue;
        };
        let confirm = publish
            .basic_publish(
                wire::RESULTS_EXCHANGE.into(),
                routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                result_properties(ep.as_str(), task_id.as_str(), &user),
            )
            .await
            .context("while publishing a raw result")?;
        answered += 1;
        if to_acker
            .send((delivery.delivery_tag, Some(confirm)))
            .is_err()
        {
            break;
        }
    }
    drop(to_acker);
    acker.await.context("the raw acker panicked")??;
    let _ = consume
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    let _ = consume.close(200, "bench done".into()).await;
    let _ = publish.close(200, "bench done".into()).await;
    Ok(answered)
}

/// Awaits confirms in delivery order and acks, with `multiple`, the last delivery whose result (and every
/// earlier one's) is confirmed, whenever no further confirm is ready to be awaited at once.
async fn ack_after_confirm(
    channel: Channel,
    mut rx: mpsc::UnboundedReceiver<(u64, Option<PublisherConfirm>)>,
) -> Result<()> {
    while let Some((mut last, confirm)) = rx.recv().await {
        check(confirm).await?;
        while let Ok((tag, confirm)) = rx.try_recv() {
            check(confirm).await?;
            last = tag;
        }
        channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await
            .context("while acking tasks")?;
    }
    Ok(())
}

async fn check(confirm: Option<PublisherConfirm>) -> Result<()> {
    let Some(confirm) = confirm else {
        return Ok(());
    };
    match confirm
        .await
        .context("while waiting for a result confirm")?
    {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(r)) => bail!("a raw result was returned: {}", r.reply_text),
        Confirmation::Nack(_) | Confirmation::NotRequested => bail!("a raw result was nacked"),
    }
}

/// The properties the agent's publisher puts on an `echo` result: `echo` has no exit code, runs once and takes
/// well under a millisecond.
fn result_properties(endpoint_id: &str, task_id: &str, user: &str) -> BasicProperties {
    let echo = TaskResult {
        task_id: task_id.to_owned(),
        status: Status::Ok,
        exit_code: None,
        attempts: 1,
        duration_ms: 0,
        body: Vec::new(),
    };
    endpoint_agent::result_properties(endpoint_id, &echo, Some(user))
}
