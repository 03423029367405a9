//! The agent's own AMQP reader (`endpoint_agent::raw`) against the real broker: it publishes and reads the
//! property bytes lapin cannot parse, requeues and acks. (Its codec is unit-tested in the agent; this is the
//! part that needs a broker.)

use endpoint_agent::raw::{FIELD_SIGNED_64, RawConnection, RawProperties, table_entry};
use endpoint_wire::BrokerUrl;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use test_support::*;

#[tokio::test]
async fn publishes_and_gets_bytes_lapin_cannot_parse() {
    let _broker = BrokerLock::shared().await;
    let url = BrokerUrl::new(url()).expect("test url");
    let queue = format!(
        "raw-test-{}-{}",
        std::process::id(),
        endpoint_wire::now_ms()
    );
    let conn = endpoint_wire::amqp::connect(&url, "raw test")
        .await
        .expect("the test connects");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    let mut raw = RawConnection::open(&url, "raw test", 0)
        .await
        .expect("raw connect");
    let props = RawProperties {
        message_id: Some(b"id-\xff\xfe".to_vec()),
        kind: Some(b"ech\xc3".to_vec()),
        headers: Some(table_entry(b"k\xff", FIELD_SIGNED_64, &5i64.to_be_bytes())),
        delivery_mode: Some(2),
        reply_to: Some(b"svc-\xff".to_vec()),
    };
    // Larger than a frame: the body goes out and comes back in several.
    let body = vec![7u8; 300_000];
    raw.publish("", &queue, &props, &body)
        .await
        .expect("publish");
    let got = raw.get(&queue).await.expect("get").expect("a message");
    assert_eq!(
        (got.properties, got.body.len(), got.redelivered),
        (props, body.len(), false)
    );
    raw.requeue(got.delivery_tag).await.expect("requeue");
    let again = raw
        .get(&queue)
        .await
        .expect("get")
        .expect("the message again");
    assert!(again.redelivered);
    raw.ack(again.delivery_tag).await.expect("ack");
    assert_eq!(raw.get(&queue).await.expect("get"), None);
    raw.close().await;
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
}
