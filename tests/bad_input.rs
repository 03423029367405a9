//! Bad input never stops the agent: each case ends in a `rejected` result, or is logged and acked when there
//! is no task id to answer, and the agent keeps serving.

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;
use tests::*;

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
            async move {
                channel
                    .basic_publish(
                        "tasks".into(),
                        key.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm");
            }
        };
    let run = format!("{}", endpoint_agent::wire::now_ms());
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
