//! Starting and stopping: graceful shutdown finishes and publishes running tasks, one agent per data dir,
//! a clear refusal for an unprovisioned endpoint, and `endpoint-agent status`.

use std::time::Duration;
use test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_running_tasks() {
    let ep = unique_endpoint("graceful");
    let dir = TempDir::new("graceful");
    let mut service = Service::provision(&ep, 1).await;
    let data = dir.0.join("data");
    let mut opts = AgentOptions::new(&ep, &data);
    opts.workers = 3;
    let agent = Agent::start(&opts);
    let ids = service
        .submit((0..3).map(|_| task("sleep", b"1500")).collect())
        .await;
    // Wait until all three run, then stop: they must finish and be published before the agent exits.
    wait_running(&data, 3).await;
    assert_eq!(local_status(&data)["tasks_running"], 3);
    assert_eq!(agent.terminate(Duration::from_secs(30)), Some(0));
    service
        .await_results(&ids, Duration::from_secs(10), &[])
        .await;
    for id in &ids {
        assert_eq!(service.result(id).status, "ok");
    }
    let local = local_status(&data);
    assert_eq!(
        (local["online"].as_bool(), local["results_pending"].as_u64()),
        (Some(false), Some(0))
    );
    assert_eq!(local["agent"], "offline");
    // The service sees a clean stop.
    let status = service_setup::endpoint_status(&service.conn, &ep)
        .await
        .expect("status");
    assert!(
        matches!(
            status.liveness(),
            service_setup::Liveness::NotRunningSince {
                clean_stop: true,
                ..
            }
        ),
        "{}",
        status.to_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_over_requeues_and_resumes() {
    let ep = unique_endpoint("grace");
    let dir = TempDir::new("grace");
    let mut service = Service::provision(&ep, 1).await;
    let data = dir.0.join("data");
    let mut opts = AgentOptions::new(&ep, &data);
    opts.workers = 1;
    opts.config = "grace_period_secs = 1\nreconnect_min_ms = 100\n".into();
    let agent = Agent::start(&opts);
    let ids = service.submit(vec![task("sleep", b"4000")]).await;
    wait_running(&data, 1).await;
    assert_eq!(agent.terminate(Duration::from_secs(30)), Some(0));
    let local = local_status(&data);
    assert_eq!(
        (local["tasks_queued"].as_u64(), local["tasks_done"].as_u64()),
        (Some(1), Some(0))
    );
    let agent = Agent::start(&opts);
    service
        .await_results(&ids, Duration::from_secs(30), &[&agent])
        .await;
    let r = service.result(&ids[0]);
    assert_eq!(
        (r.status.as_str(), r.attempts),
        ("ok", Some(1)),
        "an interrupted run is not an attempt"
    );
    agent.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_per_data_dir_and_unprovisioned_endpoints_are_refused() {
    let ep = unique_endpoint("lock");
    let dir = TempDir::new("lock");
    let _service = Service::provision(&ep, 1).await;
    let opts = AgentOptions::new(&ep, &dir.0.join("data"));
    let first = Agent::start(&opts);
    for _ in 0..100 {
        if dir.0.join("data/agent.lock").exists() && first.log_text().contains("starting") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut second = Agent::start(&opts);
    assert_eq!(
        second.wait_exit(Duration::from_secs(20)),
        Some(4),
        "{}",
        second.log_text()
    );
    assert!(second.log_text().contains("is using data directory"));

    let stranger = unique_endpoint("never");
    let mut lost = Agent::start(&AgentOptions::new(&stranger, &dir.0.join("never")));
    assert_eq!(
        lost.wait_exit(Duration::from_secs(20)),
        Some(3),
        "{}",
        lost.log_text()
    );
    assert!(
        lost.log_text()
            .contains(&format!("service-setup provision --endpoint-id {stranger}"))
    );
    first.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_exits_at_once_and_work_resumes() {
    let ep = unique_endpoint("twosig");
    let dir = TempDir::new("twosig");
    let mut service = Service::provision(&ep, 1).await;
    let data = dir.0.join("data");
    let mut opts = AgentOptions::new(&ep, &data);
    opts.workers = 1;
    let mut agent = Agent::start(&opts);
    let ids = service.submit(vec![task("sleep", b"3000")]).await;
    wait_running(&data, 1).await;
    agent.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.signal(libc::SIGTERM);
    // Well before the 3 s task or the 10 s grace period could end.
    assert_eq!(agent.wait_exit(Duration::from_secs(2)), Some(130));
    let agent = Agent::start(&opts);
    service
        .await_results(&ids, Duration::from_secs(30), &[&agent])
        .await;
    assert_eq!(service.result(&ids[0]).status, "ok");
    agent.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_backlog_leaves_tasks_in_the_broker() {
    let ep = unique_endpoint("backlog");
    let dir = TempDir::new("backlog");
    let mut service = Service::provision(&ep, 1).await;
    let data = dir.0.join("data");
    let mut opts = AgentOptions::new(&ep, &data);
    opts.workers = 1;
    opts.config.push_str("max_backlog = 5\nprefetch = 5\n");
    let ids = service
        .submit((0..60).map(|_| task("sleep", b"30")).collect())
        .await;
    let agent = Agent::start(&opts);
    let started = std::time::Instant::now();
    let (mut max_local, mut saw_broker_backlog, mut saw_paused) = (0, false, false);
    while service.received.len() < ids.len() {
        let local = local_status(&data);
        max_local = max_local.max(local["tasks_queued"].as_u64().unwrap_or(0));
        let status = service_setup::endpoint_status(&service.conn, &ep)
            .await
            .expect("status");
        saw_broker_backlog |= status.queue_depth.unwrap_or(0) > 20;
        saw_paused |= status
            .last_heartbeat
            .as_ref()
            .is_some_and(|h| h.state == endpoint_wire::AgentState::Paused);
        service.poll(Duration::from_millis(100)).await;
        assert!(service.received.len() <= ids.len());
        if agent.log_text().contains("panicked") {
            panic!("{}", agent.log_text());
        }
        if started.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    service
        .await_results(&ids, Duration::from_secs(60), &[&agent])
        .await;
    // A batch is at most `prefetch` deliveries, taken only while the backlog is below its maximum.
    assert!(max_local <= 5 + 5, "local backlog reached {max_local}");
    assert!(
        saw_broker_backlog,
        "tasks stayed in the broker while the local backlog was full"
    );
    assert!(saw_paused, "heartbeats reported the paused state");
    agent.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_stay_out_of_logs() {
    let ep = unique_endpoint("secret");
    let dir = TempDir::new("secret");
    let mut service = Service::provision(&ep, 1).await;
    let (user, password) = secret_user();
    let url = url().replacen("guest:guest", &format!("{user}:{password}"), 1);
    let mut opts = AgentOptions::new(&ep, &dir.0.join("data"));
    opts.broker_url = url.clone();
    let agent = Agent::start(&opts);
    let ids = service.submit(vec![echo("x")]).await;
    service
        .await_results(&ids, Duration::from_secs(30), &[&agent])
        .await;
    let log = agent.log_text();
    assert!(
        log.contains(&format!("{user}:***@")),
        "the log names the broker, without the password"
    );
    assert!(!log.contains(password.as_str()));
    agent.terminate(Duration::from_secs(30));

    // A wrong password is an error that needs an operator: a clear exit, and still no password in the log.
    let mut opts = AgentOptions::new(&ep, &dir.0.join("other"));
    opts.broker_url = url.replacen(password.as_str(), "wrong-password-123", 1);
    let mut refused = Agent::start(&opts);
    assert_eq!(
        refused.wait_exit(Duration::from_secs(30)),
        Some(1),
        "{}",
        refused.log_text()
    );
    let log = refused.log_text();
    assert!(
        !log.contains("wrong-password-123") && !log.contains(password.as_str()),
        "{log}"
    );
}
