//! Faults lose nothing: a cut broker connection, a SIGKILLed agent restarted on its data dir (killed while
//! receiving, while running tasks, while publishing), a second agent standing by and taking over (after a
//! clean stop and after a SIGKILL), a poison task that kills the agent every time it runs, a blackholed link,
//! and executor children killed by a signal or forking and hanging past their timeout.

use std::time::{Duration, Instant};
use test_support::proxy::Proxy;
use test_support::*;

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
    // Duplicates are allowed (at-least-once), but each carries its task id and none is unanswered.
    service.assert_all_ok(&ids);
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
    service.assert_all_ok(&ids);
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
    proxy.set_mode(test_support::proxy::Mode::Blackhole);
    let during = service
        .submit((0..20).map(|i| echo(&format!("during{i}"))).collect())
        .await;
    // The agent records the link as down once heartbeats stop; nothing else can tell it in a blackhole. With a
    // 1 s heartbeat that takes about two intervals; the limit below is generous for a busy machine.
    let data = dir.0.join("data");
    let link_down = || {
        local_status(&data)["link"]
            .as_str()
            .is_some_and(|l| l.starts_with("disconnected"))
    };
    let reconnects_before = local_status(&data)["reconnects"].as_u64().unwrap_or(0);
    let holed = Instant::now();
    while !link_down() && holed.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        link_down(),
        "the silent link was not noticed within 10 s (heartbeat 1 s):\n{}",
        agent.log_text()
    );
    // The path returns, with no help from the proxy (no reset): the agent reconnects on its own.
    proxy.set_mode(test_support::proxy::Mode::Pass);
    service
        .await_results(&during, Duration::from_secs(60), &[&agent])
        .await;
    for id in first.iter().chain(&during) {
        assert_eq!(service.result(id).status, "ok");
    }
    assert!(local_status(&data)["reconnects"].as_u64().unwrap_or(0) > reconnects_before);
    agent.terminate(Duration::from_secs(30));
}

/// Kills the agent (SIGKILL) as soon as `moment` holds for its status, or after `limit`. Returns whether the
/// moment was caught.
async fn kill_when(
    agent: Agent,
    data: &std::path::Path,
    limit: Duration,
    moment: impl Fn(&serde_json::Value) -> bool,
) -> (bool, u64) {
    let deadline = Instant::now() + limit;
    let mut caught = false;
    while Instant::now() < deadline {
        if moment(&local_status(data)) {
            caught = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.kill9();
    // What the dead agent's disk says was running: exactly the tasks the next start charges an attempt and
    // reruns (a slot claims several short tasks in one commit, so this can exceed the number of slots).
    let running = local_status(data)["tasks_running"]
        .as_u64()
        .expect("status has tasks_running");
    (caught, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_receiving_running_and_publishing() {
    let ep = unique_endpoint("kill3");
    let dir = TempDir::new("kill3");
    let mut service = Service::provision(&ep, 1).await;
    let data = dir.0.join("data");
    let opts = AgentOptions::new(&ep, &data);
    let workers = opts.workers as u64;
    let mut ids = service
        .submit((0..3000).map(|i| echo(&format!("r{i}"))).collect())
        .await;
    // While receiving: tasks are arriving on disk, most are still in the broker.
    let agent = Agent::start(&opts);
    let (receiving, running_1) = kill_when(agent, &data, Duration::from_secs(30), |s| {
        s["tasks_queued"].as_u64() > Some(0) || s["tasks_done"].as_u64() > Some(0)
    })
    .await;
    // While running tasks: every slot busy with a long sleep.
    ids.extend(
        service
            .submit((0..8).map(|_| task("sleep", b"3000")).collect())
            .await,
    );
    let agent = Agent::start(&opts);
    let (running, running_2) = kill_when(agent, &data, Duration::from_secs(60), |s| {
        s["tasks_running"].as_u64() == Some(workers)
    })
    .await;
    // While publishing: results are on disk and going out.
    ids.extend(
        service
            .submit((0..3000).map(|i| echo(&format!("p{i}"))).collect())
            .await,
    );
    let agent = Agent::start(&opts);
    let (publishing, running_3) = kill_when(agent, &data, Duration::from_secs(60), |s| {
        s["tasks_done"].as_u64() > Some(500) && s["results_pending"].as_u64() > Some(0)
    })
    .await;
    assert!(
        receiving && running && publishing,
        "moments caught: receiving {receiving}, running {running}, publishing {publishing}"
    );
    let agent = Agent::start(&opts);
    service
        .await_results(&ids, Duration::from_secs(180), &[&agent])
        .await;
    service.assert_all_ok(&ids);
    // A task runs again only if it was running (claimed) when the agent died.
    let charged = running_1 + running_2 + running_3;
    let rerun: Vec<(&String, Option<u32>)> = service
        .received
        .iter()
        .map(|(id, r)| (id, r[0].attempts))
        .filter(|(_, a)| *a > Some(1))
        .collect();
    assert!(
        rerun.len() as u64 <= charged && rerun.iter().all(|(_, a)| *a <= Some(4)),
        "more reruns than the {charged} tasks that were running at the kills: {rerun:?}"
    );
    assert_eq!(agent.terminate(Duration::from_secs(60)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_sigkill() {
    let ep = unique_endpoint("hot");
    let dir = TempDir::new("hot");
    let mut service = Service::provision(&ep, 1).await;
    let (a_dir, b_dir) = (dir.0.join("a"), dir.0.join("b"));
    let a_opts = AgentOptions::new(&ep, &a_dir);
    let a = Agent::start(&a_opts);
    let warm = service.submit(vec![echo("warm")]).await;
    service
        .await_results(&warm, Duration::from_secs(60), &[&a])
        .await;
    let b = Agent::start(&AgentOptions::new(&ep, &b_dir));
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && !local_status(&b_dir)["link"]
            .as_str()
            .is_some_and(|l| l.starts_with("standby"))
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ids = service
        .submit(
            (0..600)
                .map(|i| {
                    if i % 3 == 0 {
                        task("sleep", b"30")
                    } else {
                        echo(&format!("a{i}"))
                    }
                })
                .collect(),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && local_status(&a_dir)["tasks_done"].as_u64() < Some(100) {
        service.poll(Duration::from_millis(100)).await;
    }
    a.kill9();
    let after = service
        .submit((0..200).map(|i| echo(&format!("b{i}"))).collect())
        .await;
    // The standby takes the queue over and answers everything submitted after the kill...
    service
        .await_results(&after, Duration::from_secs(90), &[&b])
        .await;
    assert!(local_status(&b_dir)["tasks_done"].as_u64() >= Some(200));
    // ...and what is still unanswered is exactly what the killed agent had acked: it lives on its disk.
    service.poll(Duration::from_secs(1)).await;
    let on_a_disk = local_status(&a_dir);
    let held = ["tasks_queued", "tasks_running", "results_pending"]
        .iter()
        .map(|k| on_a_disk[k].as_u64().unwrap_or(0))
        .sum::<u64>();
    let missing = service.missing(&ids) as u64;
    assert!(
        missing <= held,
        "{missing} tasks are unanswered but the killed agent's disk holds only {held}: {on_a_disk}"
    );
    // Restarted on its data dir, the killed agent stands by, runs what it had and publishes the results.
    let a = Agent::start(&a_opts);
    ids.extend(after);
    service
        .await_results(&ids, Duration::from_secs(120), &[&a, &b])
        .await;
    for id in &ids {
        assert_eq!(service.result(id).status, "ok", "{id}");
    }
    assert_eq!(service.received.len(), ids.len() + warm.len());
    service.assert_duplicates_identical();
    assert_eq!(a.terminate(Duration::from_secs(60)), Some(0));
    assert_eq!(b.terminate(Duration::from_secs(60)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_children_killed_or_hanging_are_answered() {
    let ep = unique_endpoint("children");
    let dir = TempDir::new("children");
    let pids = dir.0.join("pids");
    std::fs::create_dir_all(&pids).expect("pids dir");
    let mut service = Service::provision(&ep, 1).await;
    let mut opts = AgentOptions::new(&ep, &dir.0.join("data"));
    opts.config.push_str(&format!(
        r#"
[functions.selfkill]
command = ["sh", "-c", "kill -KILL $$"]
[functions.segv]
command = ["sh", "-c", "kill -SEGV $$"]
[functions.forker]
command = ["sh", "-c", "sleep 300 & echo $! >> $PIDS/$ENDPOINT_AGENT_TASK_ID; (sleep 300; true) & echo $! >> $PIDS/$ENDPOINT_AGENT_TASK_ID; echo $$ >> $PIDS/$ENDPOINT_AGENT_TASK_ID; wait"]
timeout_secs = 1
env = {{ PIDS = "{}" }}
"#,
        pids.display()
    ));
    let agent = Agent::start(&opts);
    let ids = service
        .submit(vec![
            task("selfkill", b""),
            task("segv", b""),
            task("forker", b""),
            task("forker", b""),
            echo("still serving"),
        ])
        .await;
    service
        .await_results(&ids, Duration::from_secs(60), &[&agent])
        .await;
    let r = |i: usize| service.result(&ids[i]);
    for i in [0, 1] {
        assert_eq!(
            (r(i).status.as_str(), r(i).exit_code),
            ("failed", None),
            "{}",
            String::from_utf8_lossy(&r(i).body)
        );
        assert!(
            String::from_utf8_lossy(&r(i).body).contains("signal"),
            "{}",
            String::from_utf8_lossy(&r(i).body)
        );
    }
    for i in [2, 3] {
        assert_eq!(r(i).status, "timeout");
        let recorded = std::fs::read_to_string(pids.join(&ids[i])).expect("forker wrote its pids");
        let pids: Vec<&str> = recorded.split_whitespace().collect();
        assert_eq!(pids.len(), 3, "{recorded}");
        // Every process of the group is gone (or a zombie waiting for init): none hangs on.
        let deadline = Instant::now() + Duration::from_secs(10);
        let alive = || {
            pids.iter()
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                        stat.rsplit(')')
                            .next()
                            .map(str::trim_start)
                            .is_some_and(|s| !s.starts_with('Z'))
                    })
                })
                .count()
        };
        while alive() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            alive(),
            0,
            "children of a timed-out task still run: {recorded}"
        );
    }
    assert_eq!(r(4).status, "ok");
    assert_eq!(service.received.len(), ids.len());
    assert_eq!(agent.terminate(Duration::from_secs(30)), Some(0));
}
