//! Submitting tasks: one confirm-mode channel that publishes persistent, mandatory task messages to the `tasks`
//! exchange and reports a task as submitted only after the broker confirmed it, plus task id generation. It must
//! not declare an endpoint's queues (an unprovisioned endpoint is an error for the operator to fix, not something
//! to paper over) and must not retry on its own: a caller that retries would publish duplicates.

use crate::amqp::{amqp_err, declare_tasks_exchange, open_channel};
use crate::error::SetupError;
use endpoint_wire::{EndpointId, HEADER_TIMEOUT_MS, MAX_TASK_ID_LEN, ServiceName, TASKS_EXCHANGE};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest function name: it travels in the AMQP `type` property, a short string.
pub const MAX_FUNCTION_LEN: usize = 255;

/// One task to submit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskSpec {
    /// The task id (AMQP `message_id`); a fresh [`new_task_id`] when `None`.
    pub task_id: Option<String>,
    /// The function the agent runs (AMQP `type`).
    pub function: String,
    /// The message body handed to the function.
    pub payload: Vec<u8>,
    /// Optional per-task timeout (`x-timeout-ms` header); it can only shorten the function's own.
    pub timeout_ms: Option<u64>,
    /// The service whose queue gets the result (AMQP `reply_to`); `None`: the shared `results` queue.
    pub reply_to: Option<ServiceName>,
}

impl TaskSpec {
    /// A task for `function` with `payload`, a fresh id, no timeout of its own, its result for the shared queue.
    pub fn new(function: impl Into<String>, payload: impl Into<Vec<u8>>) -> TaskSpec {
        TaskSpec {
            task_id: None,
            function: function.into(),
            payload: payload.into(),
            timeout_ms: None,
            reply_to: None,
        }
    }
}

/// Publishes tasks on a channel of its own with publisher confirms enabled.
#[derive(Debug)]
pub struct Submitter {
    channel: Channel,
}

impl Submitter {
    /// Opens the confirm-mode channel on `conn` and declares the `tasks` exchange.
    pub async fn new(conn: &Connection) -> Result<Self, SetupError> {
        let channel = open_channel(conn, "submit tasks").await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp_err("while enabling publisher confirms"))?;
        // Publishing to an exchange that does not exist closes the channel (404); declaring the shared exchange
        // makes a task for an unprovisioned endpoint come back as unroutable, which names the fix.
        declare_tasks_exchange(&channel).await?;
        Ok(Self { channel })
    }

    /// Publishes all tasks, pipelined (publish all, then await every confirm), mandatory and persistent, and
    /// returns their ids in order. A negative confirm or a returned (unroutable) message is an error; unroutable
    /// means the endpoint is not provisioned. On error, tasks other than the failing ones may have been queued.
    pub async fn submit(
        &self,
        ep: &EndpointId,
        tasks: Vec<TaskSpec>,
    ) -> Result<Vec<String>, SetupError> {
        let prepared = tasks
            .into_iter()
            .map(prepare)
            .collect::<Result<Vec<_>, _>>()?;
        let routing_key = ep.tasks_queue();
        let mut confirms = Vec::with_capacity(prepared.len());
        for (id, payload, properties) in &prepared {
            let confirm = self
                .channel
                .basic_publish(
                    TASKS_EXCHANGE.into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    payload,
                    properties.clone(),
                )
                .await
                .map_err(amqp_err(format!("while publishing task {id}")))?;
            confirms.push(confirm);
        }
        // Await every confirm even after a failure so none is left dangling on the channel; report the first.
        let mut first_error = None;
        for ((id, _, _), confirm) in prepared.iter().zip(confirms) {
            let outcome = match confirm.await {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_))) => {
                    Err(SetupError::NotProvisioned(ep.clone()))
                }
                Ok(Confirmation::Nack(None) | Confirmation::NotRequested) => {
                    Err(SetupError::Nacked {
                        what: format!("task {id}"),
                    })
                }
                Err(e) => Err(amqp_err(format!(
                    "while waiting for the broker to confirm task {id}"
                ))(e)),
            };
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(prepared.into_iter().map(|(id, _, _)| id).collect()),
        }
    }

    /// [`Submitter::submit`], with a task that came back unroutable explained: when `ep`'s tasks queue exists
    /// but its node is down (a classic queue on a cluster), that is the error (a lost link, worth retrying once
    /// the node is back), not "not provisioned".
    pub async fn submit_on(
        &self,
        conn: &Connection,
        ep: &EndpointId,
        tasks: Vec<TaskSpec>,
    ) -> Result<Vec<String>, SetupError> {
        match self.submit(ep, tasks).await {
            Err(e) if e.is_not_provisioned() => {
                match endpoint_wire::amqp::queue_info(conn, &ep.tasks_queue()).await {
                    Err(down) => Err(SetupError::Broker(down)),
                    Ok(_) => Err(e),
                }
            }
            other => other,
        }
    }

    /// Closes the channel after the last confirm; dropping a `Submitter` is fine too.
    pub async fn close(self) {
        crate::amqp::close_channel(&self.channel).await;
    }
}

/// Validates a task and builds its id, body and properties.
fn prepare(task: TaskSpec) -> Result<(String, Vec<u8>, BasicProperties), SetupError> {
    let id = task.task_id.unwrap_or_else(new_task_id);
    if id.is_empty() || id.len() > MAX_TASK_ID_LEN {
        return Err(SetupError::InvalidArgument(format!(
            "task id {id:?} is {} bytes long: pass 1 to {MAX_TASK_ID_LEN} bytes, or none to get a generated one",
            id.len()
        )));
    }
    if task.function.is_empty() || task.function.len() > MAX_FUNCTION_LEN {
        return Err(SetupError::InvalidArgument(format!(
            "function name {:?} is {} bytes long: pass 1 to {MAX_FUNCTION_LEN} bytes",
            task.function,
            task.function.len()
        )));
    }
    let mut properties = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_type(task.function.as_str().into())
        .with_delivery_mode(2);
    if let Some(service) = &task.reply_to {
        properties = properties.with_reply_to(service.as_str().into());
    }
    if let Some(ms) = task.timeout_ms {
        let ms = i64::try_from(ms).map_err(|_| {
            SetupError::InvalidArgument(format!(
                "timeout of task {id} is {ms} ms: pass at most {} ms",
                i64::MAX
            ))
        })?;
        let mut headers = FieldTable::default();
        headers.insert(HEADER_TIMEOUT_MS.into(), AMQPValue::LongLongInt(ms));
        properties = properties.with_headers(headers);
    }
    Ok((id, task.payload, properties))
}

/// A fresh task id, shaped like a version 4 UUID (`8-4-4-4-12` lowercase hex). Unique across processes and
/// hosts without extra crates: the clock, the pid and a counter are mixed through two `RandomState` hashers,
/// whose keys the standard library seeds from the operating system.
pub fn new_task_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let pid = std::process::id();
    let mix = |salt: u8| {
        let mut h = RandomState::new().build_hasher();
        h.write_u8(salt);
        h.write_u128(nanos);
        h.write_u32(pid);
        h.write_u64(n);
        h.finish()
    };
    let bits = (u128::from(mix(1)) << 64) | u128::from(mix(2));
    // Version 4, RFC 4122 variant, so tools that parse UUIDs accept it.
    let bits = (bits & !(0xf_u128 << 76) & !(0x3_u128 << 62)) | (0x4_u128 << 76) | (0x2_u128 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn task_ids_are_uuid_shaped_and_unique() {
        let ids: HashSet<String> = (0..10_000).map(|_| new_task_id()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(100) {
            let groups: Vec<usize> = id.split('-').map(str::len).collect();
            assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
            assert!(
                id.chars()
                    .all(|c| c == '-' || matches!(c, '0'..='9' | 'a'..='f')),
                "{id}"
            );
            assert_eq!(&id[14..15], "4", "version nibble of {id}");
            assert!(
                matches!(&id[19..20], "8" | "9" | "a" | "b"),
                "variant of {id}"
            );
        }
    }

    fn task(id: Option<&str>, function: &str, timeout_ms: Option<u64>) -> TaskSpec {
        TaskSpec {
            task_id: id.map(str::to_owned),
            function: function.to_owned(),
            payload: b"x".to_vec(),
            timeout_ms,
            reply_to: None,
        }
    }

    #[test]
    fn tasks_are_validated_before_publishing() {
        let check = |t: TaskSpec, ok: bool| assert_eq!(prepare(t.clone()).is_ok(), ok, "{t:?}");
        check(task(None, "echo", None), true);
        check(task(Some("t1"), "echo", Some(5)), true);
        check(task(Some(""), "echo", None), false);
        check(task(Some(&"i".repeat(256)), "echo", None), false);
        check(task(None, "", None), false);
        check(task(None, &"f".repeat(256), None), false);
        check(task(None, "echo", Some(u64::MAX)), false);
    }

    #[test]
    fn properties_follow_the_contract() {
        let (id, body, props) = prepare(task(Some("t1"), "echo", Some(1500))).expect("valid task");
        assert_eq!(id, "t1");
        assert_eq!(body, b"x");
        assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some("t1"));
        assert_eq!(props.kind().as_ref().map(|s| s.as_str()), Some("echo"));
        assert_eq!(*props.delivery_mode(), Some(2));
        let headers = props.headers().as_ref().expect("timeout header");
        assert_eq!(
            headers.inner().get(HEADER_TIMEOUT_MS),
            Some(&AMQPValue::LongLongInt(1500))
        );
        let (_, _, props) = prepare(task(None, "echo", None)).expect("valid task");
        assert!(props.headers().is_none());
    }
}
