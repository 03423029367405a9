//! Reading results from the shared `results` queue or a service's own queue: parsing a delivery into a
//! [`ResultRecord`] (tolerant of how other AMQP clients encode integers), checking who sent it, rendering it as
//! one JSON object, and a reader that acks a result only after the caller's sink has taken it. The endpoint a
//! result is for is its routing key's (`<EP>.results` or `<EP>.results.<SERVICE>`, which the broker confines an
//! endpoint's user to), never the header it claims; a result whose header or publishing user does not match is
//! logged and dropped. It must never ack a genuine result it did not hand to the sink, and must never sit on
//! another endpoint's results: with an endpoint filter they are handed back within a second, by closing the
//! channel (see [`read_results`]). Memory is bounded by the prefetch, [`RESULTS_WINDOW`].

use crate::amqp::{amqp_err, close_channel, declare_results, open_channel};
use crate::error::SetupError;
use crate::topology::endpoint_user_of;
use endpoint_wire::amqp::queue_info;
use endpoint_wire::{
    Backoff, EndpointId, HEADER_ATTEMPTS, HEADER_DURATION_MS, HEADER_ENDPOINT_ID, HEADER_EXIT_CODE,
    HEADER_STATUS, RESULTS_QUEUE, ServiceName,
};
use futures_lite::StreamExt;
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use std::future::Future;
use std::time::Duration;

/// One result as the service sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultRecord {
    /// From `message_id`, falling back to `correlation_id`, else empty.
    pub task_id: String,
    /// The endpoint of the routing key `<EP>.results` the result was published with (the broker lets an
    /// endpoint's own user publish only its own); empty if the routing key is not one.
    pub endpoint_id: String,
    /// The `endpoint_id` header: what the publisher claims.
    pub claimed_endpoint_id: Option<String>,
    /// The `user_id` property: the broker user that published it (the broker refuses any other).
    pub user_id: Option<String>,
    /// `ok`, `failed`, `timeout` or `rejected` (kept as sent, so a newer agent's status is not lost).
    pub status: String,
    /// The command's exit code, when it exited (absent for built-ins, signals, rejections).
    pub exit_code: Option<i64>,
    /// Which run produced the result (0 for a rejected task).
    pub attempts: Option<u32>,
    /// How long the run took.
    pub duration_ms: Option<u64>,
    /// The function's output for `ok`, else a human-readable error.
    pub body: Vec<u8>,
    /// The broker delivered it before (to a reader that did not ack): it may have been printed already.
    pub redelivered: bool,
}

impl ResultRecord {
    /// Reads a result as delivered; never fails (missing fields stay empty or `None`).
    pub fn from_delivery(d: &Delivery) -> ResultRecord {
        let props = &d.properties;
        let headers = props.headers().as_ref();
        let header = |name: &str| headers.and_then(|h| h.inner().get(name));
        let task_id = props
            .message_id()
            .as_ref()
            .or(props.correlation_id().as_ref())
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        let endpoint_id = EndpointId::from_results_routing_key(d.routing_key.as_str())
            .map(String::from)
            .unwrap_or_default();
        ResultRecord {
            task_id,
            endpoint_id,
            // Present but not a string: kept as shown, so it cannot equal the routing key's endpoint.
            claimed_endpoint_id: header(HEADER_ENDPOINT_ID)
                .map(|v| string_value(v).unwrap_or_else(|| format!("(not a string: {v:?})"))),
            user_id: props.user_id().as_ref().map(|u| u.as_str().to_owned()),
            status: header(HEADER_STATUS)
                .and_then(string_value)
                .unwrap_or_default(),
            exit_code: header(HEADER_EXIT_CODE).and_then(int_value),
            attempts: header(HEADER_ATTEMPTS)
                .and_then(int_value)
                .and_then(|n| u32::try_from(n).ok()),
            duration_ms: header(HEADER_DURATION_MS)
                .and_then(int_value)
                .and_then(|n| u64::try_from(n).ok()),
            body: d.data.clone(),
            redelivered: d.redelivered,
        }
    }

    /// Why this result must not be trusted, if so: it was not published with an endpoint's results routing key,
    /// its header claims another endpoint, or (`endpoint_user`: the endpoint has a broker user of its own) it
    /// was published by another user.
    pub fn distrust(&self, endpoint_user: Option<&str>) -> Option<String> {
        if self.endpoint_id.is_empty() {
            return Some("it was not published with an `<endpoint>.results` routing key".into());
        }
        if let Some(claimed) = &self.claimed_endpoint_id
            && claimed != &self.endpoint_id
        {
            return Some(format!(
                "its header claims endpoint {claimed:?} but it was published for {:?}",
                self.endpoint_id
            ));
        }
        if let Some(user) = endpoint_user
            && self.user_id.as_deref() != Some(user)
        {
            return Some(format!(
                "it was published by user {:?}, not by the endpoint's user {user:?}",
                self.user_id.as_deref().unwrap_or("(none)")
            ));
        }
        None
    }

    /// `{"task_id", "endpoint_id", "status", "exit_code", "attempts", "duration_ms", "output"}`, with
    /// `"output_base64"` instead of `"output"` when the body is not UTF-8. Absent numbers are `null`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = json!({
            "task_id": self.task_id,
            "endpoint_id": self.endpoint_id,
            "status": self.status,
            "exit_code": self.exit_code,
            "attempts": self.attempts,
            "duration_ms": self.duration_ms,
        });
        let (key, output) = match std::str::from_utf8(&self.body) {
            Ok(text) => ("output", text.to_owned()),
            Err(_) => ("output_base64", crate::base64::encode(&self.body)),
        };
        if let Some(map) = value.as_object_mut() {
            map.insert(key.to_owned(), serde_json::Value::String(output));
        }
        value
    }
}

fn string_value(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::ByteArray(b) => Some(String::from_utf8_lossy(b.as_slice()).into_owned()),
        _ => None,
    }
}

/// Any integer encoding a client may pick (and digits in a string, as some clients send numbers that way).
fn int_value(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => {
            string_value(v).and_then(|s| s.trim().parse().ok())
        }
        _ => None,
    }
}

/// What [`read_results`] reads and when it stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultsQuery {
    /// Read this service's queue (`service.<SERVICE>.results`) instead of the shared `results` queue.
    pub service: Option<ServiceName>,
    /// Only results of this endpoint are handed out and acked; the others are left in the queue.
    pub endpoint: Option<EndpointId>,
    /// Keep reading until `shutdown` resolves, instead of stopping after `idle` without a delivery.
    pub follow: bool,
    /// Without `follow`, stop when nothing has arrived for this long.
    pub idle: Duration,
    /// Stop after handing out this many results.
    pub max: Option<u64>,
}

/// Results held unacked at most (the prefetch): what bounds the reader's memory.
pub const RESULTS_WINDOW: u16 = 256;

/// With an endpoint filter, other endpoints' results are handed back to the queue once they have been held this
/// long (or fill the window): the reader never sits on them.
const HOLD_OTHERS: Duration = Duration::from_secs(1);

/// While following with an endpoint filter and only other endpoints' results in sight, the reader steps away from
/// the queue (so their own reader gets them) for a growing pause between these.
const PAUSE_MIN: Duration = Duration::from_secs(1);
const PAUSE_MAX: Duration = Duration::from_secs(30);

/// Other endpoints' results the reader holds unacked: how many, and since when.
#[derive(Default)]
struct Held {
    count: u32,
    since: Option<tokio::time::Instant>,
}

/// Consumes the shared `results` queue (or a service's) with manual acks and a prefetch of at most
/// [`RESULTS_WINDOW`], hands each matching result to `sink`, and acks it once `sink` returned `Ok`. Returns how
/// many results were handed out.
///
/// With an endpoint filter, other endpoints' results are held only briefly: once they fill the window or have
/// been held for a second, the reader closes its channel, which hands every unacked delivery back to the queue.
/// Without `follow` it then stops (it has seen every result it can reach); with `follow` it stays away for a
/// pause (1 s growing to 30 s, back to 1 s when one of its endpoint's results arrives), so that their own
/// reader gets them, and comes back on a new channel. A window full of other endpoints' results hides the ones
/// behind it: that is logged, with the way out (a service queue of one's own). Results beyond `max`, or whose
/// `sink` call failed, are left unacked and return to the queue when the channel closes.
pub async fn read_results<F>(
    conn: &Connection,
    query: &ResultsQuery,
    shutdown: impl Future<Output = ()>,
    mut sink: F,
) -> Result<u64, SetupError>
where
    F: FnMut(&ResultRecord) -> std::io::Result<()>,
{
    if query.max == Some(0) {
        return Ok(0);
    }
    let queue = match &query.service {
        None => {
            // Idempotent (an existing queue is used as it is), and lets a reader start before any endpoint
            // was provisioned in this vhost.
            declare_results(conn, endpoint_wire::QueueType::Classic).await?;
            RESULTS_QUEUE.to_owned()
        }
        Some(service) => {
            let queue = service.results_queue();
            if queue_info(conn, &queue).await?.is_none() {
                return Err(SetupError::InvalidArgument(format!(
                    "service {service} has no results queue ({queue}): it is made when the service first connects (or by `service-setup call --service {service}`)"
                )));
            }
            queue
        }
    };
    // Without a filter every result is acked as it comes, so a smaller `max` needs no larger window.
    let prefetch = match (&query.endpoint, query.max) {
        (None, Some(m)) => u16::try_from(m)
            .unwrap_or(RESULTS_WINDOW)
            .min(RESULTS_WINDOW),
        _ => RESULTS_WINDOW,
    };
    let (mut channel, mut consumer) = open_reader(conn, &queue, prefetch).await?;
    let mut count = 0u64;
    // The broker user each endpoint's registration names (None: the endpoint has no user of its own).
    let mut users: std::collections::HashMap<String, Option<String>> = Default::default();
    let mut held = Held::default();
    let mut pause = Backoff::new(PAUSE_MIN, PAUSE_MAX);
    let mut warned_hidden = false;
    let mut shutdown = std::pin::pin!(shutdown);
    let outcome = loop {
        // Waiting for the next delivery: no longer than the idle limit, nor past the time to hand back what is
        // held.
        let release_at = held.since.map(|t| t + HOLD_OTHERS);
        let idle_at = (!query.follow).then(|| tokio::time::Instant::now() + query.idle);
        let wake_at = match (release_at, idle_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let got = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            got = consumer.next() => Some(got),
            () = async { tokio::time::sleep_until(wake_at.expect("checked")).await }, if wake_at.is_some() => None,
        };
        let mut step_away = false;
        let delivery = match got {
            None if release_at.is_some_and(|r| r <= tokio::time::Instant::now()) => {
                // Held other endpoints' results long enough: hand them back.
                step_away = true;
                None
            }
            None => break Ok(()), // idle for query.idle
            Some(None) => {
                tracing::warn!(
                    "the broker cancelled the results consumer (was queue {queue} deleted?)"
                );
                break Ok(());
            }
            Some(Some(Err(e))) => break Err(amqp_err("while reading results")(e)),
            Some(Some(Ok(delivery))) => Some(delivery),
        };
        if let Some(delivery) = delivery {
            let record = ResultRecord::from_delivery(&delivery);
            if let Some(ep) = &query.endpoint
                && record.endpoint_id != ep.as_str()
            {
                // Not ours: held unacked for a moment, then handed back.
                held.count += 1;
                held.since.get_or_insert_with(tokio::time::Instant::now);
                if held.count >= u32::from(prefetch) {
                    step_away = true;
                    if !warned_hidden {
                        warned_hidden = true;
                        tracing::warn!(
                            "the first {prefetch} results in queue {queue} are other endpoints': {ep}'s results behind them are reached only once those are read (`service-setup results` without --endpoint-id, or the service that reads {queue}); submit with a service name for a queue of your own"
                        );
                    }
                }
            } else {
                pause.reset();
                match hand_over(conn, &mut users, &delivery, record, &mut sink).await {
                    Ok(true) => {
                        count += 1;
                        if query.max == Some(count) {
                            break Ok(());
                        }
                    }
                    Ok(false) => {}
                    Err(e) => break Err(e),
                }
            }
        }
        if step_away {
            if !query.follow {
                break Ok(());
            }
            // Closing the channel hands back every unacked delivery (ours were acked before).
            close_channel(&channel).await;
            held = Held::default();
            tokio::select! {
                () = &mut shutdown => return Ok(count),
                () = tokio::time::sleep(pause.next_delay()) => {}
            }
            match open_reader(conn, &queue, prefetch).await {
                Ok((ch, c)) => (channel, consumer) = (ch, c),
                Err(e) => return Err(e),
            }
        }
    };
    // Closing the channel (after the acks above were sent) hands every unacked delivery back to the queue.
    close_channel(&channel).await;
    outcome.map(|()| count)
}

/// A channel with `prefetch` consuming `queue` with manual acks.
async fn open_reader(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
) -> Result<(lapin::Channel, lapin::Consumer), SetupError> {
    let channel = open_channel(conn, "read results").await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(amqp_err("while setting the prefetch of the results reader"))?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp_err(format!("while consuming queue {queue}")))?;
    Ok((channel, consumer))
}

/// Checks who sent a result and hands it to `sink`, then acks it (true), or acks and drops an untrusted one
/// (false).
async fn hand_over<F>(
    conn: &Connection,
    users: &mut std::collections::HashMap<String, Option<String>>,
    delivery: &Delivery,
    record: ResultRecord,
    sink: &mut F,
) -> Result<bool, SetupError>
where
    F: FnMut(&ResultRecord) -> std::io::Result<()>,
{
    let user = match EndpointId::new(record.endpoint_id.as_str()) {
        Ok(ep) => match users.get(ep.as_str()) {
            Some(u) => u.clone(),
            None => {
                let u = endpoint_user_of(conn, &ep).await?;
                users.insert(ep.to_string(), u.clone());
                u
            }
        },
        Err(_) => None,
    };
    if let Some(why) = record.distrust(user.as_deref()) {
        tracing::warn!(
            task_id = %record.task_id,
            routing_key = %delivery.routing_key,
            user_id = ?record.user_id,
            "dropped a result that cannot be trusted: {why}"
        );
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(amqp_err("while dropping an untrusted result"))?;
        return Ok(false);
    }
    sink(&record).map_err(SetupError::Output)?;
    delivery
        .ack(BasicAckOptions::default())
        .await
        .map_err(amqp_err(format!(
            "while acking the result of task {}",
            record.task_id
        )))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::BasicProperties;
    use lapin::types::{LongString, ShortString};

    fn delivery(routing_key: &str, props: BasicProperties, body: &[u8]) -> Delivery {
        let mut d = Delivery::mock(
            1,
            "results".into(),
            routing_key.into(),
            false,
            body.to_vec(),
        );
        d.properties = props;
        d
    }

    fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn parses_a_contract_result() {
        let props = BasicProperties::default()
            .with_message_id("t1".into())
            .with_correlation_id("t1".into())
            .with_headers(headers(&[
                ("endpoint_id", AMQPValue::LongString(LongString::from("ep"))),
                ("status", AMQPValue::LongString(LongString::from("ok"))),
                ("exit_code", AMQPValue::LongLongInt(0)),
                ("attempts", AMQPValue::LongInt(1)),
                ("duration_ms", AMQPValue::LongLongInt(12)),
            ]));
        let r = ResultRecord::from_delivery(&delivery("ep.results", props, b"hello"));
        assert_eq!(
            r,
            ResultRecord {
                task_id: "t1".into(),
                endpoint_id: "ep".into(),
                status: "ok".into(),
                exit_code: Some(0),
                attempts: Some(1),
                duration_ms: Some(12),
                body: b"hello".to_vec(),
                redelivered: false,
                claimed_endpoint_id: Some("ep".into()),
                user_id: None,
            }
        );
        assert_eq!(r.distrust(None), None);
        assert!(r.distrust(Some("endpoint-ep")).is_some(), "no user_id");
        assert_eq!(
            r.to_json(),
            json!({"task_id": "t1", "endpoint_id": "ep", "status": "ok", "exit_code": 0, "attempts": 1,
                   "duration_ms": 12, "output": "hello"})
        );
    }

    #[test]
    fn results_are_trusted_by_routing_key_and_user() {
        let props = |claims: &str, user: &str| {
            BasicProperties::default()
                .with_message_id("t".into())
                .with_user_id(user.into())
                .with_headers(headers(&[(
                    "endpoint_id",
                    AMQPValue::LongString(LongString::from(claims)),
                )]))
        };
        let good =
            ResultRecord::from_delivery(&delivery("b.results", props("b", "endpoint-b"), b""));
        assert_eq!(good.endpoint_id, "b");
        assert_eq!(good.distrust(Some("endpoint-b")), None);
        // Sent by A for A's routing key, claiming B: for B it is not (routing key), for A it is forged.
        let forged =
            ResultRecord::from_delivery(&delivery("a.results", props("b", "endpoint-a"), b""));
        assert_eq!(forged.endpoint_id, "a");
        assert!(
            forged
                .distrust(Some("endpoint-a"))
                .unwrap()
                .contains("claims endpoint")
        );
        let other_user =
            ResultRecord::from_delivery(&delivery("b.results", props("b", "endpoint-a"), b""));
        assert!(
            other_user
                .distrust(Some("endpoint-b"))
                .unwrap()
                .contains("endpoint-a")
        );
        let mut odd = props("b", "endpoint-b");
        odd = odd.with_headers(headers(&[("endpoint_id", AMQPValue::LongLongInt(1))]));
        let not_a_string = ResultRecord::from_delivery(&delivery("b.results", odd, b""));
        assert!(
            not_a_string.distrust(None).is_some(),
            "a non-string endpoint_id header"
        );
        let for_service =
            ResultRecord::from_delivery(&delivery("b.results.svc", props("b", "endpoint-b"), b""));
        assert_eq!(for_service.endpoint_id, "b");
        assert_eq!(for_service.distrust(Some("endpoint-b")), None);
        let no_key = ResultRecord::from_delivery(&delivery("b", props("b", "endpoint-b"), b""));
        assert!(no_key.distrust(None).is_some());
    }

    #[test]
    fn integers_in_any_encoding() {
        let check =
            |v: AMQPValue, expected: Option<i64>| assert_eq!(int_value(&v), expected, "{v:?}");
        check(AMQPValue::ShortShortInt(-1), Some(-1));
        check(AMQPValue::ShortShortUInt(200), Some(200));
        check(AMQPValue::ShortInt(-300), Some(-300));
        check(AMQPValue::ShortUInt(60_000), Some(60_000));
        check(AMQPValue::LongInt(-70_000), Some(-70_000));
        check(AMQPValue::LongUInt(4_000_000_000), Some(4_000_000_000));
        check(AMQPValue::LongLongInt(i64::MIN), Some(i64::MIN));
        check(AMQPValue::Timestamp(5), Some(5));
        check(AMQPValue::LongString(LongString::from(" 42 ")), Some(42));
        check(AMQPValue::ShortString(ShortString::from("x")), None);
        check(AMQPValue::Boolean(true), None);
        check(AMQPValue::Double(1.0), None);
    }

    #[test]
    fn fallbacks_and_binary_output() {
        let props = BasicProperties::default()
            .with_correlation_id("t2".into())
            .with_headers(headers(&[
                ("status", AMQPValue::ShortString("failed".into())),
                ("attempts", AMQPValue::LongInt(-1)),
            ]));
        let r = ResultRecord::from_delivery(&delivery("ep2.results", props, &[0xff, 0x00]));
        assert_eq!(r.task_id, "t2");
        assert_eq!(r.endpoint_id, "ep2", "from the routing key");
        assert_eq!(r.status, "failed");
        assert_eq!(r.exit_code, None);
        assert_eq!(r.attempts, None, "a negative count is not a count");
        let j = r.to_json();
        assert_eq!(j["output_base64"], "/wA=");
        assert!(j.get("output").is_none());
        assert!(j["exit_code"].is_null());

        let bare = ResultRecord::from_delivery(&delivery("odd", BasicProperties::default(), b""));
        assert_eq!((bare.task_id.as_str(), bare.endpoint_id.as_str()), ("", ""));
        assert_eq!(bare.to_json()["output"], "");
    }
}
