//! Bad input never stops the agent: each case ends in a `rejected` result, or is logged and acked when there
//! is no task id to answer, and the agent keeps serving.

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;
use test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_rejections() {
    let ep = unique_endpoint("bad");
    let dir = TempDir::new("bad");
    let mut service = Service::provision(&ep, 2).await;
    let mut opts = AgentOptions::new(&ep, &dir.0.join("data"));
    opts.config.push_str("max_body_bytes = 1000\n");
    let agent = Agent::start(&opts);

    let channel = service.conn.create_channel().await.expect("channel");
    let publish =
        |id: Option<&str>, kind: Option<&str>, headers: Option<FieldTable>, body: Vec<u8>| {
            let channel = channel.clone();
            let key = ep.tasks_queue();
            let mut props = BasicProperties::default().with_delivery_mode(2);
            if let Some(id) = id {
                props = props.with_message_id(id.into());
            }
            if let Some(kind) = kind {
                props = props.with_type(kind.into());
            }
            if let Some(h) = headers {
                props = props.with_headers(h);
            }
            async move { publish_task(&channel, &key, props, &body).await }
        };
    let run = format!("{}", endpoint_wire::now_ms());
    let id = |name: &str| format!("{name}-{run}");
    let mut bad_timeout = FieldTable::default();
    bad_timeout.insert("x-timeout-ms".into(), AMQPValue::Boolean(true));
    publish(None, Some("echo"), None, b"no id".to_vec()).await;
    publish(Some(&id("no-type")), None, None, b"x".to_vec()).await;
    publish(
        Some(&id("unknown")),
        Some("launch_rockets"),
        None,
        b"x".to_vec(),
    )
    .await;
    publish(Some(&id("oversized")), Some("echo"), None, vec![b'x'; 5000]).await;
    publish(
        Some(&id("bad-timeout")),
        Some("echo"),
        Some(bad_timeout),
        b"x".to_vec(),
    )
    .await;
    publish(Some(&id("empty-sleep")), Some("sleep"), None, Vec::new()).await;
    // The same task id twice with different payloads: the first one wins, the second is a duplicate.
    publish(Some(&id("twice")), Some("echo"), None, b"first".to_vec()).await;
    publish(Some(&id("twice")), Some("echo"), None, b"second".to_vec()).await;
    // And the agent still serves good tasks afterwards.
    publish(
        Some(&id("good")),
        Some("echo"),
        None,
        b"still here".to_vec(),
    )
    .await;

    let ids: Vec<String> = [
        "no-type",
        "unknown",
        "oversized",
        "bad-timeout",
        "empty-sleep",
        "twice",
        "good",
    ]
    .iter()
    .map(|n| id(n))
    .collect();
    service
        .await_results(&ids, Duration::from_secs(60), &[&agent])
        .await;
    let check = |name: &str, status: &str, says: &str| {
        let r = service.result(&id(name));
        let body = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, status, "{name}: {body}");
        assert!(body.contains(says), "{name}: {body:?} lacks {says:?}");
    };
    check("no-type", "rejected", "no `type`");
    check("unknown", "rejected", "unknown function \"launch_rockets\"");
    check("oversized", "rejected", "max_body_bytes of 1000");
    check("bad-timeout", "rejected", "x-timeout-ms");
    check("empty-sleep", "rejected", "needs a payload");
    check("twice", "ok", "first");
    check("good", "ok", "still here");
    // The id-less message was acked (the queue is empty) and nothing else answered it.
    let status = service_setup::endpoint_status(&service.conn, &ep)
        .await
        .expect("status");
    assert_eq!(status.queue_depth, Some(0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(service.received.len(), ids.len());
    assert_eq!(
        service.received[&id("twice")].len(),
        1,
        "a duplicate id is answered once"
    );
    agent.terminate(Duration::from_secs(30));
}

/// A long string field value (`S`): 4-byte length, then the bytes.
fn long_str(s: &[u8]) -> Vec<u8> {
    let mut v = u32::try_from(s.len())
        .expect("short test value")
        .to_be_bytes()
        .to_vec();
    v.extend_from_slice(s);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_properties_headers_and_outputs_get_clear_answers() {
    use endpoint_agent::raw::{RawConnection, RawProperties, table_entry};
    let ep = unique_endpoint("malformed");
    let dir = TempDir::new("malformed");
    let mut service = Service::provision(&ep, 2).await;
    let mut opts = AgentOptions::new(&ep, &dir.0.join("data"));
    opts.config
        .push_str("[functions.cat]\ncommand = [\"cat\"]\nmax_output_bytes = 100\n");
    let agent = Agent::start(&opts);
    let run = format!("{}", endpoint_wire::now_ms());
    let id = |name: &str| format!("{name}-{run}");
    let url = endpoint_wire::BrokerUrl::new(url()).expect("test url");
    let key = ep.tasks_queue();

    // Bytes no lapin-based client can send: one connection each, since the broker may close it on a refusal.
    let raw = |name: &str, message_id: Vec<u8>, kind: &[u8], headers: Option<Vec<u8>>| {
        let (url, key, name) = (url.clone(), key.clone(), name.to_owned());
        let props = RawProperties {
            message_id: Some(message_id),
            kind: Some(kind.to_vec()),
            headers,
            delivery_mode: Some(2),
            reply_to: None,
        };
        async move {
            let mut conn = RawConnection::open(&url, "test raw publisher", 0)
                .await
                .expect("raw connection");
            let sent = conn
                .publish(endpoint_wire::TASKS_EXCHANGE, &key, &props, b"raw")
                .await;
            conn.close().await;
            if let Err(e) = &sent {
                // Documented behaviour: the broker protects the agent by refusing the message.
                eprintln!("{name}: the broker refused the publish: {e}");
            }
            sent.is_ok()
        }
    };
    let no_utf8_id = raw("bad-id", b"\xff\xfe-no-utf8".to_vec(), b"echo", None).await;
    let bad_type = raw("bad-type", id("bad-type").into_bytes(), b"ec\xffho", None).await;
    let bad_key = raw(
        "bad-header-key",
        id("bad-header-key").into_bytes(),
        b"echo",
        Some(table_entry(b"x-\xff\xfe", b'S', &long_str(b"v"))),
    )
    .await;
    let bad_field = raw(
        "unknown-field-type",
        id("unknown-field-type").into_bytes(),
        b"echo",
        Some(
            [
                table_entry(b"x-fine", b'S', &long_str(b"v")),
                table_entry(b"x-odd", b'Q', &[0, 0, 0, 1]),
            ]
            .concat(),
        ),
    )
    .await;
    assert!(no_utf8_id, "the broker refused a non-UTF-8 message_id");

    // Valid AMQP, odd content: lapin can send it.
    let channel = service.conn.create_channel().await.expect("channel");
    let publish = |id: String, kind: &str, headers: FieldTable, body: Vec<u8>| {
        let channel = channel.clone();
        let key = key.clone();
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into())
            .with_type(kind.into())
            .with_headers(headers);
        async move { publish_task(&channel, &key, props, &body).await }
    };
    let mut huge = FieldTable::default();
    huge.insert(
        "x-junk".into(),
        AMQPValue::LongString("j".repeat(20 * 1024).into()),
    );
    publish(id("huge-headers"), "echo", huge, b"x".to_vec()).await;
    let mut odd = FieldTable::default();
    let mut nested = FieldTable::default();
    nested.insert("deep".into(), AMQPValue::LongLongInt(1));
    odd.insert("x-float".into(), AMQPValue::Float(1.5));
    odd.insert("x-double".into(), AMQPValue::Double(2.5));
    odd.insert(
        "x-decimal".into(),
        AMQPValue::DecimalValue(lapin::types::DecimalValue {
            scale: 2,
            value: 314,
        }),
    );
    odd.insert(
        "x-array".into(),
        AMQPValue::FieldArray(vec![AMQPValue::Boolean(true), AMQPValue::Void].into()),
    );
    odd.insert("x-table".into(), AMQPValue::FieldTable(nested));
    odd.insert(
        "x-bytes".into(),
        AMQPValue::ByteArray(vec![0u8, 255, 1].into()),
    );
    odd.insert("x-void".into(), AMQPValue::Void);
    odd.insert("x-time".into(), AMQPValue::Timestamp(1));
    publish(id("odd-headers"), "echo", odd, b"odd but fine".to_vec()).await;
    let mut float_timeout = FieldTable::default();
    float_timeout.insert("x-timeout-ms".into(), AMQPValue::Double(100.0));
    publish(id("float-timeout"), "echo", float_timeout, b"x".to_vec()).await;
    // A service name that cannot be a routing key word: rejected, and the answer goes to the shared queue.
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(id("bad-reply-to").as_str().into())
        .with_type("echo".into())
        .with_reply_to("no.such.service".into());
    publish_task(&channel, &key, props, b"x").await;
    publish(
        id("over-cap"),
        "cat",
        FieldTable::default(),
        vec![b'o'; 500],
    )
    .await;
    publish(
        id("good"),
        "echo",
        FieldTable::default(),
        b"still here".to_vec(),
    )
    .await;

    let mut expected = vec![
        ("huge-headers", "rejected", "over the limit"),
        ("odd-headers", "ok", "odd but fine"),
        ("float-timeout", "rejected", "x-timeout-ms"),
        ("bad-reply-to", "rejected", "reply_to"),
        ("over-cap", "failed", "max_output_bytes"),
        ("good", "ok", "still here"),
    ];
    for (sent, name, says) in [
        (bad_type, "bad-type", "type"),
        (bad_key, "bad-header-key", "header"),
        (bad_field, "unknown-field-type", "header"),
    ] {
        if sent {
            expected.push((name, "rejected", says));
        }
    }
    let ids: Vec<String> = expected.iter().map(|(n, _, _)| id(n)).collect();
    service
        .await_results(&ids, Duration::from_secs(60), &[&agent])
        .await;
    for (name, status, says) in &expected {
        let r = service.result(&id(name));
        let body = String::from_utf8_lossy(&r.body).to_lowercase();
        assert_eq!(&r.status, status, "{name}: {body}");
        assert!(body.contains(says), "{name}: {body:?} lacks {says:?}");
    }
    // The message without a readable id was dropped (acked, nothing answers it) and nothing is left behind.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut depth = None;
    while std::time::Instant::now() < deadline {
        depth = service_setup::endpoint_status(&service.conn, &ep)
            .await
            .expect("status")
            .queue_depth;
        if depth == Some(0) {
            break;
        }
        service.poll(Duration::from_millis(300)).await;
    }
    assert_eq!(depth, Some(0), "malformed messages stay in the tasks queue");
    service.poll(Duration::from_millis(500)).await;
    assert_eq!(
        service.received.len(),
        ids.len(),
        "something besides the expected results was answered"
    );
    assert_eq!(agent.terminate(Duration::from_secs(30)), Some(0));
}

/// Publishes a task with exactly these properties to the tasks exchange (no service-side checks) and waits for
/// the broker's confirm.
async fn publish_task(channel: &lapin::Channel, key: &str, props: BasicProperties, body: &[u8]) {
    channel
        .basic_publish(
            endpoint_wire::TASKS_EXCHANGE.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sizes_do_not_fill_memory() {
    const TASKS: usize = 256;
    const BODY: usize = 8 << 20;
    let ep = unique_endpoint("huge");
    let dir = TempDir::new("huge");
    let mut service = Service::provision(&ep, 2).await;
    // Queued before the agent starts, so the broker delivers them at once, up to the prefetch (256).
    let channel = service.conn.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let body = vec![b'x'; BODY];
    let run = endpoint_wire::now_ms();
    let ids: Vec<String> = (0..TASKS).map(|i| format!("huge-{i}-{run}")).collect();
    let key = ep.tasks_queue();
    let mut pending = std::collections::VecDeque::new();
    for id in &ids {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into())
            .with_type("echo".into());
        let confirm = channel
            .basic_publish(
                endpoint_wire::TASKS_EXCHANGE.into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .expect("publish");
        pending.push_back(confirm);
        // A few in flight at a time: the test itself need not hold 2 GiB.
        if pending.len() >= 4 {
            pending.pop_front().expect("one").await.expect("confirm");
        }
    }
    for confirm in pending {
        confirm.await.expect("confirm");
    }
    drop(body);
    let mut opts = AgentOptions::new(&ep, &dir.0.join("data"));
    opts.config.push_str("max_body_bytes = 1048576\n");
    let agent = Agent::start(&opts);
    service
        .await_results(&ids, Duration::from_secs(240), &[&agent])
        .await;
    for id in &ids {
        let r = service.result(id);
        assert_eq!(r.status, "rejected", "{id}");
        assert!(
            String::from_utf8_lossy(&r.body)
                .contains("8388608 bytes, over this endpoint's max_body_bytes of 1048576"),
            "{id}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let peak = agent.peak_rss_mib();
    eprintln!(
        "agent peak RSS after {TASKS} deliveries of {} MiB: {peak:.1} MiB",
        BODY >> 20
    );
    assert!(peak < 200.0, "the agent's peak RSS was {peak:.1} MiB");
    let good = service.submit(vec![echo("after the flood")]).await;
    service
        .await_results(&good, Duration::from_secs(60), &[&agent])
        .await;
    assert_eq!(service.result(&good[0]).status, "ok");
    agent.terminate(Duration::from_secs(30));
}
