//! The happy path at volume and with external commands: every task id gets exactly the result it should.

use service_setup::TaskSpec;
use std::time::Duration;
use test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_echo_tasks_round_trip() {
    let ep = unique_endpoint("echo1k");
    let dir = TempDir::new("echo1k");
    let mut service = Service::provision(&ep, 2).await;
    let agent = Agent::start(&AgentOptions::new(&ep, &dir.0.join("data")));
    let payloads: Vec<String> = (0..1000)
        .map(|i| format!("payload-{i}-{}", "x".repeat(i % 97)))
        .collect();
    let ids = service
        .submit(payloads.iter().map(|p| echo(p)).collect())
        .await;
    assert_eq!(ids.len(), 1000);
    service
        .await_results(&ids, Duration::from_secs(120), &[&agent])
        .await;
    for (id, payload) in ids.iter().zip(&payloads) {
        let r = service.result(id);
        assert_eq!(r.status, "ok", "{id}");
        assert_eq!(r.body, payload.as_bytes(), "{id}");
        assert_eq!(r.endpoint_id, ep.as_str());
        assert_eq!(r.attempts, Some(1));
        assert!(r.duration_ms.is_some());
    }
    assert_eq!(service.received.len(), 1000);

    // The ticker reaches the service: status sees a running agent with nothing left to do.
    let mut status = service_setup::endpoint_status(&service.conn, &ep)
        .await
        .expect("status");
    for _ in 0..50 {
        if status
            .last_heartbeat
            .as_ref()
            .is_some_and(|h| h.results_pending == 0 && h.tasks_queued == 0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        status = service_setup::endpoint_status(&service.conn, &ep)
            .await
            .expect("status");
    }
    assert!(
        matches!(status.liveness(), service_setup::Liveness::Running { .. }),
        "{}",
        status.to_text()
    );
    assert_eq!(status.consumers, Some(1));
    // The agent follows the interval the service registered (2 s here).
    assert_eq!(
        status.last_heartbeat.as_ref().map(|h| h.heartbeat_secs),
        Some(2)
    );
    let local = local_status(&dir.0.join("data"));
    assert_eq!(local["online"], true);
    assert_eq!(local["tasks_done"], 1000);
    assert_eq!(local["results_pending"], 0);
    assert_eq!(local["tasks_queued"], 0);
    agent.terminate(Duration::from_secs(30));
}

/// `echo` runs on arrival: a first delivery is stored with its result in the commit that acks it, no executor
/// slot involved. A redelivered task (unacked when its channel died: perhaps its run stopped an agent) is not:
/// it goes through the disk queue and a slot, which counts its attempt before running it. The agent's debug log
/// tells the paths apart (a slot logs "running" for each task it runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_deliveries_run_on_arrival_redelivered_ones_from_the_disk_queue() {
    use futures_lite::StreamExt;
    let ep = unique_endpoint("arrival");
    let dir = TempDir::new("arrival");
    let mut service = Service::provision(&ep, 2).await;
    let again = service
        .submit((0..5).map(|i| echo(&format!("again-{i}"))).collect())
        .await;
    // Someone takes them and never acks: once its channel closes, the broker requeues them as redelivered.
    let thief = service.conn.create_channel().await.expect("channel");
    let mut consumer = thief
        .basic_consume(
            ep.tasks_queue().as_str().into(),
            "thief".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume");
    for _ in &again {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("the tasks reach the test's consumer")
            .expect("consumer open")
            .expect("delivery");
        assert!(!d.redelivered);
    }
    thief.close(200, "gone".into()).await.expect("close");

    let agent = Agent::start(&AgentOptions::new(&ep, &dir.0.join("data")));
    let fresh = service
        .submit((0..5).map(|i| echo(&format!("fresh-{i}"))).collect())
        .await;
    let all: Vec<String> = again.iter().chain(&fresh).cloned().collect();
    service
        .await_results(&all, Duration::from_secs(60), &[&agent])
        .await;
    service.assert_all_ok(&all);
    for id in &all {
        let r = service.result(id);
        assert_eq!(r.attempts, Some(1), "{id}");
        assert!(r.body.starts_with(b"again-") || r.body.starts_with(b"fresh-"));
    }
    let log = strip_ansi(&agent.log_text());
    let ran_in_slot = |id: &str| {
        log.lines()
            .any(|l| l.contains(" running ") && l.contains(&format!("task_id={id} ")))
    };
    for id in &again {
        assert!(
            ran_in_slot(id),
            "redelivered {id} should run in a slot:\n{log}"
        );
    }
    for id in &fresh {
        assert!(!ran_in_slot(id), "fresh {id} should run on arrival:\n{log}");
    }
    assert_eq!(local_status(&dir.0.join("data"))["tasks_done"], 10);
    agent.terminate(Duration::from_secs(30));
}

/// The agent's log as plain text (it colours its fields when it thinks it may).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

const COMMANDS: &str = r#"
reconnect_min_ms = 100
reconnect_max_ms = 1000
[functions.wc]
command = ["wc", "-c"]
[functions.upper]
command = ["tr", "a-z", "A-Z"]
[functions.fail]
command = ["sh", "-c", "echo 'bad things' >&2; exit 7"]
[functions.slow]
command = ["sh", "-c", "sleep 5 & sleep 30"]
timeout_secs = 1
[functions.flood]
command = ["sh", "-c", "head -c 100000 /dev/zero"]
max_output_bytes = 1000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_commands_timeouts_and_failures() {
    let ep = unique_endpoint("cmds");
    let dir = TempDir::new("cmds");
    let mut service = Service::provision(&ep, 2).await;
    let mut opts = AgentOptions::new(&ep, &dir.0.join("data"));
    opts.config = COMMANDS.into();
    let agent = Agent::start(&opts);
    let mut short_sleep = task("sleep", b"10000");
    short_sleep.timeout_ms = Some(100);
    let tasks: Vec<TaskSpec> = vec![
        task("wc", b"hello world"),
        task("upper", b"shout"),
        task("fail", b""),
        task("slow", b""),
        task("flood", b""),
        short_sleep,
        task("sleep", b"20"),
    ];
    let ids = service.submit(tasks).await;
    service
        .await_results(&ids, Duration::from_secs(60), &[&agent])
        .await;
    let r = |i: usize| service.result(&ids[i]);
    assert_eq!(
        (
            r(0).status.as_str(),
            String::from_utf8_lossy(&r(0).body).trim()
        ),
        ("ok", "11")
    );
    assert_eq!(r(0).exit_code, Some(0));
    assert_eq!(r(1).body, b"SHOUT");
    assert_eq!((r(2).status.as_str(), r(2).exit_code), ("failed", Some(7)));
    assert!(String::from_utf8_lossy(&r(2).body).contains("bad things"));
    assert_eq!(r(3).status, "timeout");
    assert_eq!(r(4).status, "failed");
    assert!(String::from_utf8_lossy(&r(4).body).contains("max_output_bytes"));
    assert_eq!(r(5).status, "timeout");
    assert_eq!(r(6).status, "ok");
    agent.terminate(Duration::from_secs(30));
}
