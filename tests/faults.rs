//! Faults lose nothing: a cut broker connection, a SIGKILLed agent restarted on its data dir, a second agent
//! standing by and taking over, and a poison task that kills the agent every time it runs.

use std::time::Duration;
use tests::proxy::Proxy;
use tests::*;

fn sleepy_tasks(n: usize) -> Vec<service_setup::TaskSpec> {
    (0..n)
        .map(|i| {
            if i % 3 == 0 {
                task("sleep", b"20")
            } else {
                echo(&format!("t{i}"))
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cuts_lose_nothing() {
    let ep = unique_endpoint("cut");
    let dir = TempDir::new("cut");
    let mut service = Service::provision(&ep, 1).await;
    let proxy = Proxy::start(broker_addr()).await;
    let mut opts = AgentOptions::new(&ep, &dir.0.join("data"));
    opts.broker_url = url_via(&proxy.addr);
    let agent = Agent::start(&opts);
    let ids = service.submit(sleepy_tasks(600)).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        proxy.cut();
    }
    service
        .await_results(&ids, Duration::from_secs(120), &[&agent])
        .await;
    for id in &ids {
        assert_eq!(service.result(id).status, "ok", "{id}");
    }
    // Duplicates are allowed (at-least-once), but each carries its task id and none is unanswered.
    assert_eq!(service.received.len(), ids.len());
    let reconnects = local_status(&dir.0.join("data"))["reconnects"].as_u64();
    assert!(
        reconnects >= Some(1),
        "the cuts were noticed: {reconnects:?} reconnects"
    );
    agent.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_lose_nothing() {
    let ep = unique_endpoint("kill");
    let dir = TempDir::new("kill");
    let mut service = Service::provision(&ep, 2).await;
    let opts = AgentOptions::new(&ep, &dir.0.join("data"));
    let ids = service.submit(sleepy_tasks(900)).await;
    for round in 0..3 {
        let agent = Agent::start(&opts);
        tokio::time::sleep(Duration::from_millis(600 + 300 * round)).await;
        agent.kill9();
    }
    let agent = Agent::start(&opts);
    service
        .await_results(&ids, Duration::from_secs(120), &[&agent])
        .await;
    for id in &ids {
        assert_eq!(service.result(id).status, "ok", "{id}");
    }
    assert_eq!(service.received.len(), ids.len());
    agent.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_agent_stands_by_then_takes_over() {
    let ep = unique_endpoint("standby");
    let dir = TempDir::new("standby");
    let mut service = Service::provision(&ep, 1).await;
    let first = Agent::start(&AgentOptions::new(&ep, &dir.0.join("a")));
    let ids = service
        .submit((0..50).map(|i| echo(&format!("a{i}"))).collect())
        .await;
    service
        .await_results(&ids, Duration::from_secs(60), &[&first])
        .await;

    let second = Agent::start(&AgentOptions::new(&ep, &dir.0.join("b")));
    // The second is refused the exclusive consumer: one consumer on the queue, the first one's.
    let mut link = serde_json::Value::Null;
    for _ in 0..100 {
        link = local_status(&dir.0.join("b"))["link"].clone();
        if link.as_str().is_some_and(|l| l.starts_with("standby")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        link.as_str().is_some_and(|l| l.starts_with("standby")),
        "second agent is not standing by ({link}):\n{}",
        second.log_text()
    );
    let status = service_setup::endpoint_status(&service.conn, &ep)
        .await
        .expect("status");
    assert_eq!(status.consumers, Some(1));

    assert_eq!(first.terminate(Duration::from_secs(30)), Some(0));
    let more = service
        .submit((0..50).map(|i| echo(&format!("b{i}"))).collect())
        .await;
    service
        .await_results(&more, Duration::from_secs(60), &[&second])
        .await;
    for id in &more {
        assert_eq!(service.result(id).status, "ok");
    }
    let local = local_status(&dir.0.join("b"));
    assert_eq!(
        local["tasks_done"], 50,
        "the second agent ran the tasks after takeover"
    );
    second.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_task_fails_after_max_attempts() {
    let ep = unique_endpoint("poison");
    let dir = TempDir::new("poison");
    let mut service = Service::provision(&ep, 1).await;
    let mut opts = AgentOptions::new(&ep, &dir.0.join("data"));
    // Four workers, so the innocent task runs beside the poison one and shares its first crash: quarantine
    // (suspects run alone after a crash) must keep it from being charged for the second.
    // Kills the agent that runs it: its parent.
    opts.config.push_str("max_attempts = 2\n[functions.poison]\ncommand = [\"sh\", \"-c\", \"kill -9 $PPID; sleep 5\"]\n");
    let ids = service
        .submit(vec![task("poison", b""), echo("innocent")])
        .await;
    let mut deaths = 0;
    loop {
        assert!(
            deaths <= 3,
            "the poison task was retried past max_attempts ({deaths} agent deaths)"
        );
        let mut agent = Agent::start(&opts);
        loop {
            if let Ok(Some(_)) = agent.child.try_wait() {
                deaths += 1;
                break;
            }
            service.poll(Duration::from_millis(200)).await;
            if ids.iter().all(|id| service.received.contains_key(id)) {
                let r = service.result(&ids[0]);
                let body = String::from_utf8_lossy(&r.body);
                assert_eq!(r.status, "failed", "{body}");
                assert!(body.contains("max_attempts = 2"), "{body}");
                assert_eq!(service.result(&ids[1]).status, "ok");
                assert_eq!(deaths, 2, "the agent died once per allowed attempt");
                agent.terminate(Duration::from_secs(30));
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_link_is_noticed_by_heartbeats() {
    let ep = unique_endpoint("hole");
    let dir = TempDir::new("hole");
    // A 1 s heartbeat: lapin notices a silent link after about two missed beats.
    let mut service = Service::provision(&ep, 1).await;
    let proxy = Proxy::start(broker_addr()).await;
    let mut opts = AgentOptions::new(&ep, &dir.0.join("data"));
    opts.broker_url = url_via(&proxy.addr);
    let agent = Agent::start(&opts);
    let first = service
        .submit((0..20).map(|i| echo(&format!("before{i}"))).collect())
        .await;
    service
        .await_results(&first, Duration::from_secs(30), &[&agent])
        .await;
    proxy.set_mode(tests::proxy::Mode::Blackhole);
    let during = service
        .submit((0..20).map(|i| echo(&format!("during{i}"))).collect())
        .await;
    // The agent records the link as down once heartbeats stop; nothing else can tell it in a blackhole.
    let data = dir.0.join("data");
    let link_down = || {
        local_status(&data)["link"]
            .as_str()
            .is_some_and(|l| l.starts_with("disconnected"))
    };
    for _ in 0..100 {
        if link_down() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        link_down(),
        "the silent link was not noticed:\n{}",
        agent.log_text()
    );
    proxy.cut();
    proxy.set_mode(tests::proxy::Mode::Pass);
    service
        .await_results(&during, Duration::from_secs(60), &[&agent])
        .await;
    for id in first.iter().chain(&during) {
        assert_eq!(service.result(id).status, "ok");
    }
    agent.terminate(Duration::from_secs(30));
}
