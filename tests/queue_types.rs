//! Quorum task queues and several broker URLs on the single node: one active agent at a time through the
//! queue's single active consumer (a standby takes over when the active agent is SIGKILLed, and learns it
//! from a probe on an idle queue), `service-setup provision --queue-type` (and its refusal to change a queue's
//! type), an endpoint's own broker user on quorum queues, and an agent given several URLs that moves on to the
//! next one when its connection is cut. The same on a real 3-node cluster is `tests/cluster.rs`.

use endpoint_wire::QueueType;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use test_support::proxy::{Mode, Proxy};
use test_support::*;

const WAIT: Duration = Duration::from_secs(60);

fn link(data: &Path) -> String {
    local_status(data)["link"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queue_has_one_active_agent_and_a_standby_takes_over_on_kill() {
    let ep = unique_endpoint("sac");
    let dir = TempDir::new("sac");
    let mut service = Service::provision_typed(&ep, 1, QueueType::Quorum).await;
    let (data_a, data_b) = (dir.0.join("a"), dir.0.join("b"));
    let a = Agent::start(&AgentOptions::new(&ep, &data_a));
    // Nothing queued: the probe tells A it is the active consumer.
    wait_active_consumer(&data_a, Duration::from_secs(30)).await;
    let b = Agent::start(&AgentOptions::new(&ep, &data_b));
    wait_status(&data_b, Duration::from_secs(30), |s| {
        s["link"]
            .as_str()
            .is_some_and(|l| l.contains("registered as a consumer"))
    })
    .await;
    // B's probes keep reaching A (the active one), so B stays a standby.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(link(&data_b).starts_with("standby"), "{}", link(&data_b));

    let first = service
        .submit((0..300).map(|i| echo(&format!("first {i}"))).collect())
        .await;
    service.await_results(&first, WAIT, &[&a, &b]).await;
    let (sa, sb) = (local_status(&data_a), local_status(&data_b));
    assert_eq!(sa["tasks_done"], 300, "{sa}");
    assert_eq!(sb["tasks_done"], 0, "the standby received nothing: {sb}");
    let status = service_setup::endpoint_status(&service.conn, &ep)
        .await
        .expect("status");
    let active = status.last_heartbeat.clone().expect("active heartbeat");
    let standby = status.standby_heartbeat.clone().expect("standby heartbeat");
    assert_eq!(
        (active.pid, standby.pid),
        (a.pid() as u32, b.pid() as u32),
        "{}",
        status.to_text()
    );

    // The active agent dies: the broker moves the queue to B at once; B learns it from its probe.
    a.kill9();
    let took = wait_active_consumer(&data_b, Duration::from_secs(30)).await;
    eprintln!("the standby knew it was the active consumer {took:?} after the SIGKILL");
    let second = service
        .submit((0..300).map(|i| echo(&format!("second {i}"))).collect())
        .await;
    service.await_results(&second, WAIT, &[&b]).await;
    let mut all = first.clone();
    all.extend(second.iter().cloned());
    service.assert_all_ok(&all);
    assert_eq!(local_status(&data_b)["tasks_done"], 300);
    assert_eq!(b.terminate(Duration::from_secs(30)), Some(0));
}

fn service_setup_cli(urls: &str, args: &[&str]) -> Output {
    Command::new(service_setup_binary())
        .args(args)
        .env("AMQP_URL", urls)
        .output()
        .expect("run service-setup")
}

fn text(out: &Output) -> String {
    output_text(out)
}

/// `name type arguments` of the vhost's queues of `ep`.
fn queues_of(ep: &endpoint_wire::EndpointId) -> Vec<String> {
    let listed = test_support::broker::rabbitmqctl(&[
        "list_queues",
        "-p",
        &vhost_name(),
        "name",
        "type",
        "arguments",
        "--quiet",
        "--no-table-headers",
    ])
    .expect("rabbitmqctl list_queues");
    let mut lines: Vec<String> = listed
        .lines()
        .filter(|l| l.starts_with(&format!("{ep}.")))
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_makes_quorum_queues_and_refuses_to_change_a_queue_type() {
    let ep = unique_endpoint("qtype");
    let dir = TempDir::new("qtype");
    // Several URLs, one of them dead: service-setup tries them in random order until one accepts.
    let urls = format!("{},{}", url(), url_via("127.0.0.1:1"));
    let file = dir.0.join("ep.url");
    let out = service_setup_cli(
        &urls,
        &[
            "provision",
            "--endpoint-id",
            ep.as_str(),
            "--heartbeat",
            "1",
            "--queue-type",
            "quorum",
            "--credentials",
            &file.display().to_string(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("(quorum)"), "{}", text(&out));
    let queues = queues_of(&ep);
    assert_eq!(queues.len(), 4, "{queues:?}");
    for q in &queues {
        assert!(q.contains("quorum"), "{q}");
    }
    let tasks = queues
        .iter()
        .find(|q| q.starts_with(&format!("{ep}.tasks")))
        .expect("tasks queue");
    assert!(tasks.contains("x-single-active-consumer"), "{tasks}");
    for q in queues
        .iter()
        .filter(|q| !q.starts_with(&format!("{ep}.tasks")))
    {
        assert!(q.contains("drop-head"), "one message each: {q}");
    }
    // The agent's URL file names every node given (here the live one and the dead one).
    let file_text = std::fs::read_to_string(&file).expect("credentials");
    assert_eq!(file_text.trim().split(',').count(), 2, "{file_text}");

    // A queue cannot change type: a clear refusal that names the way out; nothing changes.
    let out = service_setup_cli(
        &url(),
        &[
            "provision",
            "--endpoint-id",
            ep.as_str(),
            "--queue-type",
            "classic",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("cannot change its type") && text(&out).contains("deprovision"),
        "{}",
        text(&out)
    );
    // Without --queue-type a re-provision keeps the type (and the endpoint's user).
    let out = service_setup_cli(
        &url(),
        &["provision", "--endpoint-id", ep.as_str(), "--json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let reg: serde_json::Value = serde_json::from_slice(&out.stdout).expect("registration JSON");
    assert_eq!(reg["tasks_queue_type"], "quorum", "{reg}");
    assert_eq!(reg["endpoint_user"], format!("endpoint-{ep}"), "{reg}");

    // The endpoint's own user runs it: it learns it is active from its probe (through the hand-back exchange,
    // its own routing key only), then answers tasks. The dead URL in its file is skipped.
    let mut opts = AgentOptions::new(&ep, &dir.0.join("data"));
    opts.no_url_env = true;
    opts.args = vec![
        "--broker-url-file".into(),
        file.display().to_string(),
        "--broker-order".into(),
        "listed".into(),
    ];
    let agent = Agent::start(&opts);
    wait_active_consumer(&opts.data_dir, Duration::from_secs(30)).await;
    let mut service = Service::provision_typed(&ep, 1, QueueType::Quorum).await;
    let ids = service
        .submit((0..50).map(|i| echo(&format!("own user {i}"))).collect())
        .await;
    service.await_results(&ids, WAIT, &[&agent]).await;
    service.assert_all_ok(&ids);
    assert_eq!(
        service.result(&ids[0]).user_id.as_deref(),
        Some(format!("endpoint-{ep}").as_str())
    );
    assert_eq!(agent.terminate(Duration::from_secs(30)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_several_urls_moves_on_to_the_next_when_its_link_is_cut() {
    let ep = unique_endpoint("urls");
    let dir = TempDir::new("urls");
    let mut service = Service::provision(&ep, 1).await;
    // Two ways to the same broker stand for two nodes; a dead URL comes first.
    let (p1, p2) = (
        Proxy::start(broker_addr()).await,
        Proxy::start(broker_addr()).await,
    );
    let port = |p: &Proxy| -> u16 { p.addr.rsplit(':').next().unwrap().parse().unwrap() };
    let data = dir.0.join("data");
    let mut opts = AgentOptions::new(&ep, &data);
    opts.broker_url = [url_via("127.0.0.1:1"), url_via(&p1.addr), url_via(&p2.addr)].join(",");
    opts.args = vec!["--broker-order".into(), "listed".into()];
    let agent = Agent::start(&opts);
    let ids = service
        .submit((0..200).map(|i| echo(&format!("one {i}"))).collect())
        .await;
    service.await_results(&ids, WAIT, &[&agent]).await;
    assert_eq!(
        status_node_port(&data),
        Some(port(&p1)),
        "{}",
        local_status(&data)
    );

    // The first node goes away for good: the agent moves on to the next one and goes on.
    p1.set_mode(Mode::Cut);
    let s = wait_status(&data, WAIT, |s| {
        s["node"]
            .as_str()
            .is_some_and(|n| n.contains(&format!(":{}/", port(&p2))))
            && s["link"]
                .as_str()
                .is_some_and(|l| l.starts_with("connected"))
    })
    .await;
    assert_eq!(status_node_port(&data), Some(port(&p2)), "{s}");
    let more = service
        .submit((0..200).map(|i| echo(&format!("two {i}"))).collect())
        .await;
    service.await_results(&more, WAIT, &[&agent]).await;
    let mut all = ids.clone();
    all.extend(more.iter().cloned());
    service.assert_all_ok(&all);
    let s = local_status(&data);
    assert!(s["reconnects"].as_u64() >= Some(1), "{s}");
    // The log names the node, never the password.
    let log = agent.log_text();
    assert!(log.contains(&format!("127.0.0.1:{}", port(&p2))), "{log}");
    assert!(!log.contains("guest:guest"), "a password in the log");
    assert_eq!(agent.terminate(Duration::from_secs(30)), Some(0));
}
