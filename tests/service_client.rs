//! The service side as a library and the `call` command: results reach the service instance that submitted the
//! task (its own durable queue), calls resolve to their own results and say "not running" or "no result yet"
//! when none comes in time, a service that was away gets every result when it comes back, and `results
//! --follow` for one endpoint neither holds nor acks other endpoints' results and stays small.

use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use service_setup::{CallError, Client, ClientOptions, ServiceName, TaskSpec};
use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use test_support::*;

const WAIT: Duration = Duration::from_secs(60);

fn unique_service(name: &str) -> ServiceName {
    let ep = unique_endpoint(name);
    ServiceName::new(ep.as_str().chars().take(64).collect::<String>()).expect("service name")
}

async fn client(service: &ServiceName) -> Client {
    let url = endpoint_wire::BrokerUrl::new(url()).expect("test url");
    Client::connect(&[url], ClientOptions::new(service.clone()))
        .await
        .expect("client connects")
}

/// Takes `n` results nobody waited for, each within `WAIT`.
async fn take(client: &Client, n: usize) -> Vec<service_setup::TaskResult> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(WAIT, client.next_result()).await {
            Ok(Some(r)) => got.push(r),
            Ok(None) => panic!("the client closed after {} of {n} results", got.len()),
            Err(_) => panic!("only {} of {n} results within {WAIT:?}", got.len()),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_resolve_to_their_own_results_and_services_get_only_theirs() {
    let ep = unique_endpoint("calls");
    let dir = TempDir::new("calls");
    let _service = Service::provision(&ep, 1).await;
    let agent = Agent::start(&AgentOptions::new(&ep, &dir.0.join("data")));
    let a = client(&unique_service("svca")).await;

    // 100 calls at once from one client, each to its own payload.
    let calls = (0..100).map(|i| {
        let (a, ep) = (a.clone(), ep.clone());
        async move {
            let payload = format!("call {i}");
            let r = a
                .call(&ep, "echo", payload.clone().into_bytes(), WAIT)
                .await;
            (payload, r)
        }
    });
    let mut set = tokio::task::JoinSet::new();
    for c in calls {
        set.spawn(c);
    }
    let mut answered = 0;
    while let Some(done) = set.join_next().await {
        let (payload, r) = done.expect("call task");
        let r = r.unwrap_or_else(|e| panic!("{payload}: {e}"));
        assert_eq!(
            (r.status.as_str(), r.body.as_slice()),
            ("ok", payload.as_bytes())
        );
        answered += 1;
    }
    assert_eq!(answered, 100);
    // A failed task is a result, not an error.
    let r = a
        .call(&ep, "no-such-function", b"x".to_vec(), WAIT)
        .await
        .expect("a rejected task is a result");
    assert_eq!(r.status, "rejected");

    // Two service instances reading at once: each gets exactly the results of its own tasks.
    let b = client(&unique_service("svcb")).await;
    let specs = |tag: &str| -> Vec<TaskSpec> {
        (0..200)
            .map(|i| TaskSpec::new("echo", format!("{tag}{i}")))
            .collect()
    };
    let ids_a: BTreeSet<String> = a
        .submit_many(&ep, specs("a"))
        .await
        .expect("submit a")
        .into_iter()
        .collect();
    let ids_b: BTreeSet<String> = b
        .submit_many(&ep, specs("b"))
        .await
        .expect("submit b")
        .into_iter()
        .collect();
    let (got_a, got_b) = tokio::join!(take(&a, 200), take(&b, 200));
    let got_a: BTreeSet<String> = got_a.into_iter().map(|r| r.task_id).collect();
    let got_b: BTreeSet<String> = got_b.into_iter().map(|r| r.task_id).collect();
    assert_eq!(got_a, ids_a, "service a got exactly its own results");
    assert_eq!(got_b, ids_b, "service b got exactly its own results");
    // Nothing more arrives for either (no one else's, no duplicate handed out twice).
    let extra = tokio::time::timeout(Duration::from_secs(2), a.next_result()).await;
    assert!(extra.is_err(), "an extra result for a: {extra:?}");
    let extra = tokio::time::timeout(Duration::from_millis(200), b.results().next()).await;
    assert!(extra.is_err(), "an extra result for b: {extra:?}");
    a.close().await;
    b.close().await;
    agent.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_was_away_gets_every_result_when_it_comes_back() {
    let ep = unique_endpoint("away");
    let dir = TempDir::new("away");
    let _service = Service::provision(&ep, 1).await;
    let data = dir.0.join("data");
    let agent = Agent::start(&AgentOptions::new(&ep, &data));
    let name = unique_service("away");
    let c = client(&name).await;
    let ids: BTreeSet<String> = c
        .submit_many(&ep, (0..60).map(|_| TaskSpec::new("sleep", "50")).collect())
        .await
        .expect("submit")
        .into_iter()
        .collect();
    // Gone before any result is published.
    c.close().await;
    wait_status(&data, WAIT, |s| {
        s["tasks_done"].as_u64() >= Some(60) && s["results_pending"] == 0
    })
    .await;
    let c = client(&name).await;
    let got: BTreeSet<String> = take(&c, 60).await.into_iter().map(|r| r.task_id).collect();
    assert_eq!(got, ids);
    c.close().await;
    agent.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_say_not_running_or_no_result_yet() {
    let ep = unique_endpoint("verdict");
    let dir = TempDir::new("verdict");
    let _service = Service::provision(&ep, 1).await;
    let data = dir.0.join("data");
    let c = client(&unique_service("verdict")).await;

    // Never started: not running, within the timeout.
    let started = Instant::now();
    let e = c
        .call(&ep, "echo", b"x".to_vec(), Duration::from_secs(2))
        .await
        .expect_err("no agent");
    assert!(
        matches!(
            &e,
            CallError::EndpointNotRunning {
                last_heartbeat: None,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    // Running, with a task that outlasts the timeout: no result yet; the result comes later, unclaimed.
    let agent = Agent::start(&AgentOptions::new(&ep, &data));
    wait_status(&data, WAIT, |s| s["state"] == "running").await;
    let e = c
        .call(&ep, "sleep", b"3000".to_vec(), Duration::from_secs(1))
        .await
        .expect_err("slower than the timeout");
    let CallError::NoResultYet { task_id, .. } = &e else {
        panic!("{e}");
    };
    // The echo queued while nothing ran comes out too (its call gave up).
    let late: BTreeSet<String> = take(&c, 2).await.into_iter().map(|r| r.task_id).collect();
    assert!(late.contains(task_id), "{late:?}");

    // Stopped cleanly: not running, with its last heartbeat.
    agent.terminate(Duration::from_secs(30));
    let e = c
        .call(&ep, "echo", b"x".to_vec(), Duration::from_secs(2))
        .await
        .expect_err("agent stopped");
    match &e {
        CallError::EndpointNotRunning {
            last_heartbeat: Some(beat),
            ..
        } => assert_eq!(beat.state, endpoint_wire::AgentState::Stopped),
        other => panic!("{other}"),
    }
    let missing = endpoint_wire::EndpointId::new(format!("{ep}-none")).expect("id");
    let e = c
        .call(&missing, "echo", b"x".to_vec(), Duration::from_secs(2))
        .await
        .expect_err("not provisioned");
    assert!(matches!(e, CallError::EndpointNotProvisioned(_)), "{e}");
    c.close().await;
}

fn call_cli(args: &[&str]) -> (i32, Vec<u8>, String) {
    let out = Command::new(service_setup_binary())
        .args(["--broker-url", &url(), "call"])
        .args(args)
        .env_remove("AMQP_URL")
        .output()
        .expect("run service-setup call");
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_command_prints_the_output_and_exits_with_the_verdict() {
    let ep = unique_endpoint("callcli");
    let dir = TempDir::new("callcli");
    let _service = Service::provision(&ep, 1).await;
    let data = dir.0.join("data");
    let e = ep.as_str();
    let (code, _, err) = call_cli(&[
        "--endpoint-id",
        e,
        "--function",
        "echo",
        "--payload",
        "x",
        "--timeout",
        "2s",
    ]);
    assert_eq!(code, 4, "not running: {err}");
    let agent = Agent::start(&AgentOptions::new(&ep, &data));
    wait_status(&data, WAIT, |s| s["state"] == "running").await;
    let payload = dir.0.join("payload.bin");
    std::fs::write(&payload, [0u8, 0xff, 0xfe, b'\n']).expect("payload file");
    let (code, out, err) = call_cli(&[
        "--endpoint-id",
        e,
        "--function",
        "echo",
        "--payload-file",
        &payload.display().to_string(),
        "--timeout",
        "30s",
    ]);
    assert_eq!(
        (code, out.as_slice()),
        (0, &[0u8, 0xff, 0xfe, b'\n'][..]),
        "{err}"
    );
    let (code, out, err) = call_cli(&["--endpoint-id", e, "--function", "nope", "--payload", "x"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        String::from_utf8_lossy(&out).contains("unknown function"),
        "{err}"
    );
    assert!(err.contains("rejected"), "{err}");
    let (code, _, err) = call_cli(&[
        "--endpoint-id",
        e,
        "--function",
        "sleep",
        "--payload",
        "3000",
        "--timeout",
        "500ms",
    ]);
    assert_eq!(code, 5, "no result yet: {err}");
    let (code, _, err) = call_cli(&[
        "--endpoint-id",
        &format!("{e}-none"),
        "--function",
        "echo",
        "--payload",
        "x",
    ]);
    assert_eq!(code, 3, "{err}");
    // Its own queue is gone after each call (the late `sleep` result goes to the shared queue instead).
    let queues = test_support::broker::rabbitmqctl(&["list_queues", "-p", &vhost_name(), "name"])
        .expect("list queues");
    assert!(!queues.contains("service.cli-"), "{queues}");
    agent.terminate(Duration::from_secs(30));
}

/// Publishes a result-shaped message to the `results` exchange with `key`; returns its pending confirm.
async fn publish(
    channel: &lapin::Channel,
    key: &str,
    props: BasicProperties,
) -> lapin::PublisherConfirm {
    channel
        .basic_publish(
            endpoint_wire::RESULTS_EXCHANGE.into(),
            key.into(),
            BasicPublishOptions::default(),
            &[b'r'; 100],
            props,
        )
        .await
        .expect("publish")
}

/// Ready results in the shared `results` queue.
async fn depth(conn: &lapin::Connection) -> u32 {
    endpoint_wire::amqp::queue_info(conn, endpoint_wire::RESULTS_QUEUE)
        .await
        .expect("queue info")
        .expect("results queue")
        .message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_for_one_endpoint_neither_hold_nor_take_other_endpoints_results() {
    // A vhost of its own: 100,000 results in its shared queue must not get in other scenarios' way.
    let addr = test_support::broker::BrokerAddr::from_env().expect("broker address");
    let vhost = test_support::broker::Vhost::create("ea-test-follow", addr).expect("vhost");
    let _lock = BrokerLock::shared().await;
    let broker_url = vhost.broker_url().expect("vhost url");
    let conn = endpoint_wire::amqp::connect(&broker_url, "follow test")
        .await
        .expect("connect");
    let ep = endpoint_wire::EndpointId::new("mine").expect("id");
    service_setup::provision(&conn, &ep, 10)
        .await
        .expect("provision");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let result = |task: String, ep: &str| {
        let mut headers = FieldTable::default();
        headers.insert("endpoint_id".into(), AMQPValue::LongString(ep.into()));
        headers.insert("status".into(), AMQPValue::LongString("ok".into()));
        BasicProperties::default()
            .with_message_id(task.as_str().into())
            .with_delivery_mode(2)
            .with_headers(headers)
    };
    for i in 0..3 {
        publish(
            &channel,
            "mine.results",
            result(format!("mine-{i}"), "mine"),
        )
        .await
        .await
        .expect("confirm");
    }
    const OTHERS: usize = 100_000;
    let mut confirms = Vec::with_capacity(1000);
    for i in 0..OTHERS {
        confirms.push(
            publish(
                &channel,
                "other.results",
                result(format!("other-{i}"), "other"),
            )
            .await,
        );
        if confirms.len() == 1000 {
            for c in confirms.drain(..) {
                c.await.expect("confirm");
            }
        }
    }
    for c in confirms.drain(..) {
        c.await.expect("confirm");
    }
    // Two more of ours behind the others: out of reach until the others are read.
    for i in 3..5 {
        publish(
            &channel,
            "mine.results",
            result(format!("mine-{i}"), "mine"),
        )
        .await
        .await
        .expect("confirm");
    }
    let child = Command::new(service_setup_binary())
        .args([
            "--broker-url",
            &vhost.url(),
            "results",
            "--endpoint-id",
            "mine",
            "--follow",
        ])
        .env_remove("AMQP_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start results --follow");
    // Let it read, hand back and come back a few times.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("its /proc status");
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    // It holds none of the others now and then: with only the follower on the queue, some are always
    // unacked while it looks; between its looks they are all ready.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut ready_seen = 0;
    while Instant::now() < deadline && ready_seen != OTHERS + 2 {
        ready_seen = depth(&conn).await as usize;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    #[allow(unsafe_code)]
    // SAFETY: kill with plain integers on our own child, not yet reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().expect("results exits");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let printed: Vec<&str> = stdout.lines().collect();
    assert_eq!(printed.len(), 3, "{stdout}\n{stderr}");
    assert!(
        printed
            .iter()
            .all(|l| l.contains("\"endpoint_id\":\"mine\"")),
        "{stdout}"
    );
    assert_eq!(
        ready_seen,
        OTHERS + 2,
        "every other result (and ours behind them) back in the queue, ready"
    );
    assert!(
        stderr.contains("other endpoints'"),
        "the reader says why the rest is out of reach: {stderr}"
    );
    assert!(
        peak_kib < 50 * 1024,
        "results --follow peaked at {peak_kib} KiB"
    );
    // None of the others was taken.
    assert_eq!(depth(&conn).await as usize, OTHERS + 2);
    let _ = conn.close(200, "done".into()).await;
    vhost.delete().expect("delete vhost");
}
