//! Scenarios on a real 3-node RabbitMQ cluster (`scripts/cluster`, brought up by the harness if it is not up):
//! three endpoints on quorum task queues with their agents on different nodes while the node that leads a
//! tasks queue and the node an agent is connected to are stopped and started again; a standby agent on another
//! node taking over from a SIGKILLed active one; and a classic tasks queue whose node goes away, which makes the
//! endpoint wait until it returns. Every task id is answered, nothing is lost, duplicates are identical.

use endpoint_wire::{EndpointId, QueueType};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use test_support::cluster::{Cluster, cluster};
use test_support::*;

const WAIT: Duration = Duration::from_secs(300);

/// An agent of `ep` given every node's URL, `first` first, tried in that order.
fn agent_on(ep: &EndpointId, data: &Path, first: usize) -> Agent {
    let mut opts = AgentOptions::new(ep, data);
    opts.broker_url = cluster().urls_from(first).join(",");
    opts.args = vec!["--broker-order".into(), "listed".into()];
    Agent::start(&opts)
}

/// The cluster node the agent on `data` is connected to (from `endpoint-agent status`).
fn node_of(data: &Path) -> Option<usize> {
    cluster().node_of_port(status_node_port(data)?)
}

/// The cluster node an `endpoint-agent status --json` names.
fn status_node(status: &serde_json::Value) -> Option<usize> {
    cluster().node_of_port(node_port(status)?)
}

async fn wait_node(data: &Path, node: usize) {
    let s = wait_status(data, Duration::from_secs(60), |s| {
        status_node(s) == Some(node)
    })
    .await;
    assert_eq!(status_node(&s), Some(node), "agent not on node {node}: {s}");
}

fn echoes(label: &str, n: usize) -> Vec<service_setup::TaskSpec> {
    (0..n).map(|i| echo(&format!("{label} {i}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_endpoints_lose_nothing_when_a_leader_and_an_agents_node_stop() {
    let _one_at_a_time = Cluster::lock().await;
    let c = cluster();
    let dir = TempDir::new("cluster");
    let eps: Vec<EndpointId> = (0..3).map(|_| unique_endpoint("qq")).collect();
    let mut services = Vec::new();
    let mut agents = Vec::new();
    let mut data: Vec<PathBuf> = Vec::new();
    for (i, ep) in eps.iter().enumerate() {
        services.push(Service::provision_on(c.urls_from(i), ep, 1, QueueType::Quorum).await);
        data.push(dir.0.join(format!("data-{i}")));
        agents.push(agent_on(ep, &data[i], i));
    }
    for (i, d) in data.iter().enumerate() {
        wait_node(d, i).await;
    }
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); 3];
    for (i, s) in services.iter_mut().enumerate() {
        ids[i].extend(s.submit(echoes("before", 2000)).await);
    }

    // The node that leads the first endpoint's tasks queue stops while tasks flow; more are submitted meanwhile.
    let leader = c.leader_of(&eps[0].tasks_queue());
    eprintln!(
        "stopping {} (leads {})",
        c.name(leader),
        eps[0].tasks_queue()
    );
    let stopped = c.stop(leader).await;
    for (i, s) in services.iter_mut().enumerate() {
        ids[i].extend(s.submit(echoes("leader down", 1500)).await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stopped.start().await;

    // Then the node an agent is connected to (one the leader stop did not move).
    let k = (0..3)
        .find(|&i| node_of(&data[i]).is_some_and(|n| n != leader))
        .unwrap_or(0);
    let node = node_of(&data[k]).expect("agent k's node");
    let reconnects_before = local_status(&data[k])["reconnects"].as_u64().unwrap_or(0);
    eprintln!("stopping {} (agent {k} is connected to it)", c.name(node));
    let stopped = c.stop(node).await;
    let moved = Instant::now();
    for (i, s) in services.iter_mut().enumerate() {
        ids[i].extend(s.submit(echoes("agent node down", 1500)).await);
    }
    // The agent moves on to another node within its backoff (reconnect_max_ms = 1000 here).
    let elsewhere = |s: &serde_json::Value| {
        s["link"]
            .as_str()
            .is_some_and(|l| l.starts_with("connected"))
            && status_node(s).is_some_and(|n| n != node)
    };
    let s = wait_status(&data[k], Duration::from_secs(60), elsewhere).await;
    assert!(elsewhere(&s), "agent {k} did not move to another node: {s}");
    eprintln!(
        "agent {k} was connected to another node at most {:?} after the stop (checked once the submissions were done)",
        moved.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stopped.start().await;

    let refs: Vec<&Agent> = agents.iter().collect();
    for (i, s) in services.iter_mut().enumerate() {
        assert_eq!(ids[i].len(), 5000);
        s.await_results(&ids[i], WAIT, &refs).await;
        s.assert_all_ok(&ids[i]);
        eprintln!(
            "endpoint {i}: 5000 answered, {} duplicates (identical)",
            s.duplicates()
        );
    }
    let s = local_status(&data[k]);
    assert!(
        s["reconnects"].as_u64().unwrap_or(0) > reconnects_before,
        "{s}"
    );
    for a in agents {
        assert_eq!(a.terminate(Duration::from_secs(60)), Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_on_another_node_takes_over_when_the_active_agent_is_killed() {
    let _one_at_a_time = Cluster::lock().await;
    let c = cluster();
    let dir = TempDir::new("cluster-standby");
    let ep = unique_endpoint("qsb");
    let mut service = Service::provision_on(c.urls_from(2), &ep, 1, QueueType::Quorum).await;
    let (data_a, data_b) = (dir.0.join("a"), dir.0.join("b"));
    let a = agent_on(&ep, &data_a, 0);
    wait_active_consumer(&data_a, Duration::from_secs(60)).await;
    let b = agent_on(&ep, &data_b, 1);
    wait_node(&data_b, 1).await;
    assert_eq!(node_of(&data_a), Some(0));
    let first = service.submit(echoes("first", 500)).await;
    service.await_results(&first, WAIT, &[&a, &b]).await;
    assert_eq!(
        local_status(&data_b)["tasks_done"],
        0,
        "one agent at a time"
    );
    assert!(
        local_status(&data_b)["link"]
            .as_str()
            .is_some_and(|l| l.starts_with("standby")),
        "{}",
        local_status(&data_b)
    );

    a.kill9();
    let took = wait_active_consumer(&data_b, Duration::from_secs(60)).await;
    eprintln!("the standby on another node was the active consumer {took:?} after the SIGKILL");
    let second = service.submit(echoes("second", 500)).await;
    service.await_results(&second, WAIT, &[&b]).await;
    let mut all = first.clone();
    all.extend(second.iter().cloned());
    service.assert_all_ok(&all);
    assert_eq!(local_status(&data_b)["tasks_done"], 500);

    // A service's own results queue, replicated too: its client makes it quorum on the cluster's nodes.
    let urls: Vec<_> = c
        .urls_from(0)
        .iter()
        .map(|u| endpoint_wire::BrokerUrl::new(u.as_str()).expect("url"))
        .collect();
    let name = service_setup::ServiceName::new(format!("svc-{}", std::process::id())).unwrap();
    let mut options = service_setup::ClientOptions::new(name.clone());
    options.queue_type = QueueType::Quorum;
    let client = service_setup::Client::connect(&urls, options)
        .await
        .expect("client");
    let r = client
        .call(&ep, "echo", b"via a quorum service queue".to_vec(), WAIT)
        .await
        .expect("call");
    assert_eq!(r.body, b"via a quorum service queue");
    client.close().await;
    let listed = test_support::cluster::ctl(
        0,
        &[
            "list_queues",
            "-p",
            &c.vhost,
            "name",
            "type",
            "--quiet",
            "--no-table-headers",
        ],
    )
    .expect("list_queues");
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&name.results_queue()) && l.contains("quorum")),
        "{listed}"
    );
    assert_eq!(b.terminate(Duration::from_secs(60)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_tasks_queue_waits_for_its_node_and_loses_nothing() {
    let _one_at_a_time = Cluster::lock().await;
    let c = cluster();
    let dir = TempDir::new("cluster-classic");
    let ep = unique_endpoint("qcl");
    // Provisioned through node 3: the classic queues live there. The service reads results on a quorum queue.
    let mut service = Service::provision_on(
        vec![c.url(2), c.url(0), c.url(1)],
        &ep,
        1,
        QueueType::Classic,
    )
    .await;
    let data = dir.0.join("data");
    let mut opts = AgentOptions::new(&ep, &data);
    opts.broker_url = [c.url(0), c.url(1)].join(",");
    opts.args = vec!["--broker-order".into(), "listed".into()];
    opts.workers = 1;
    // Few tasks on the agent's disk at a time, so most wait in the broker when the node goes.
    opts.config.push_str("max_backlog = 5\nprefetch = 5\n");
    let agent = Agent::start(&opts);
    let ids = service
        .submit((0..300).map(|_| task("sleep", b"20")).collect())
        .await;
    wait_status(&data, WAIT, |s| s["tasks_done"].as_u64() >= Some(30)).await;

    let stopped = c.stop(2).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // The endpoint waits: what the agent holds is done, nothing more arrives, the agent keeps running.
    let during = local_status(&data);
    assert_eq!(during["online"], true, "{during}");
    let done = during["tasks_done"].as_u64().unwrap_or(0);
    assert!(done < 300, "{during}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        local_status(&data)["tasks_done"].as_u64(),
        Some(done),
        "no task arrives while its queue's node is down"
    );
    eprintln!("classic queue's node down: the endpoint waits at {done} of 300 done");
    // A task submitted meanwhile is refused, naming the down node (not "not provisioned"), never dropped.
    let out = std::process::Command::new(service_setup_binary())
        .args(["submit", "--endpoint-id", ep.as_str(), "--function", "echo"])
        .args(["--payload", "while down"])
        .env("AMQP_URL", c.url(0))
        .output()
        .expect("run service-setup");
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("is down"),
        "{}",
        output_text(&out)
    );
    stopped.start().await;
    service.await_results(&ids, WAIT, &[&agent]).await;
    service.assert_all_ok(&ids);
    assert_eq!(agent.terminate(Duration::from_secs(60)), Some(0));
}
