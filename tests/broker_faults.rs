//! Faults on the broker side lose nothing: a broker restart (`rabbitmqctl stop_app` / `start_app`), forced
//! closes of the agent's connections (`rabbitmqctl close_connection`), and a resource alarm that blocks every
//! publishing connection. Restart and alarm hit the whole broker, so those scenarios hold it exclusively.

use std::time::{Duration, Instant};
use test_support::*;

fn mixed_tasks(n: usize, tag: &str) -> Vec<service_setup::TaskSpec> {
    (0..n)
        .map(|i| {
            if i % 4 == 0 {
                task("sleep", b"25")
            } else {
                echo(&format!("{tag}{i}"))
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_nothing() {
    let ep = unique_endpoint("restart");
    let dir = TempDir::new("restart");
    let mut service = Service::provision_exclusive(&ep, 1).await;
    let data = dir.0.join("data");
    let agent = Agent::start(&AgentOptions::new(&ep, &data));
    let mut ids = service.submit(mixed_tasks(800, "before")).await;
    // Restart while tasks are queued in the broker, on disk and running.
    wait_status(&data, Duration::from_secs(60), |s| {
        s["tasks_done"].as_u64() >= Some(50)
    })
    .await;
    service.restart_broker(Duration::from_secs(3)).await;
    ids.extend(service.submit(mixed_tasks(200, "after")).await);
    service
        .await_results(&ids, Duration::from_secs(180), &[&agent])
        .await;
    service.assert_all_ok(&ids);
    let status = local_status(&data);
    assert!(
        status["reconnects"].as_u64() >= Some(1),
        "the restart was not noticed: {status}"
    );
    assert_eq!(agent.terminate(Duration::from_secs(60)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_connection_closes_lose_nothing() {
    let ep = unique_endpoint("close");
    let dir = TempDir::new("close");
    let mut service = Service::provision(&ep, 1).await;
    let data = dir.0.join("data");
    let agent = Agent::start(&AgentOptions::new(&ep, &data));
    let ids = service.submit(mixed_tasks(900, "c")).await;
    let mut closed = Vec::new();
    let reconnects = |s: &serde_json::Value| s["reconnects"].as_u64().unwrap_or(0);
    for kind in ["subscriber", "publisher", ""] {
        // Close only once the agent's session is up (its connections are listed, the previous close was
        // answered by a reconnect): a close that hits a session already ending would not count as a fault.
        let before = reconnects(&local_status(&data));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut n = 0;
        while n == 0 && Instant::now() < deadline {
            service.poll(Duration::from_millis(300)).await;
            n = close_agent_connections(&ep, kind).await;
        }
        closed.push((kind, n));
        wait_status(&data, Duration::from_secs(60), |s| reconnects(s) > before).await;
    }
    assert!(
        closed.iter().all(|(_, n)| *n >= 1),
        "not every kind of agent connection was found and closed: {closed:?}\n{}",
        log_tail(&[&agent], 40)
    );
    service
        .await_results(&ids, Duration::from_secs(120), &[&agent])
        .await;
    service.assert_all_ok(&ids);
    assert!(local_status(&data)["reconnects"].as_u64() >= Some(3));
    assert_eq!(agent.terminate(Duration::from_secs(60)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_publishing_pauses_then_resumes() {
    let ep = unique_endpoint("blocked");
    let dir = TempDir::new("blocked");
    let mut service = Service::provision_exclusive(&ep, 1).await;
    let data = dir.0.join("data");
    // Submitted before the alarm: the alarm blocks the service's publishing too.
    let ids = service
        .submit((0..40).map(|_| task("sleep", b"100")).collect())
        .await;
    let alarm = service.memory_alarm().await;
    let agent = Agent::start(&AgentOptions::new(&ep, &data));
    // Consuming is not blocked: the agent takes and runs every task while its results cannot leave.
    let during = wait_status(&data, Duration::from_secs(90), |s| {
        s["tasks_done"] == 40 && s["publishing_blocked"].is_string()
    })
    .await;
    service.poll(Duration::from_secs(1)).await;
    let received_during = service.received.len();
    alarm.clear().await;
    assert_eq!(
        during["tasks_done"],
        40,
        "tasks stopped running while publishing was blocked: {during}\n{}",
        log_tail(&[&agent], 40)
    );
    assert_eq!(
        (during["results_pending"].as_u64(), received_during),
        (Some(40), 0),
        "results left while the broker blocked publishing: {during}"
    );
    assert!(
        during["publishing_blocked"].is_string(),
        "status does not say publishing is blocked: {during}\n{}",
        log_tail(&[&agent], 40)
    );
    service
        .await_results(&ids, Duration::from_secs(120), &[&agent])
        .await;
    for id in &ids {
        assert_eq!(service.result(id).status, "ok", "{id}");
    }
    let after = wait_status(&data, Duration::from_secs(60), |s| {
        s["publishing_blocked"].is_null() && s["results_pending"] == 0
    })
    .await;
    assert!(
        after["publishing_blocked"].is_null() && after["results_pending"] == 0,
        "status still says blocked after the alarm cleared: {after}"
    );
    assert_eq!(agent.terminate(Duration::from_secs(60)), Some(0));
}
