//! Operating an agent: quiet with a standby taking over, hand-back of a dead host's disk (by command and at a
//! clean stop), SIGHUP reload (valid and invalid files), JSON logs, and systemd's notifications. Log text is
//! read only where the log is the behaviour under test.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use test_support::*;

fn agent_cli(args: &[&str], data: &Path) -> Output {
    Command::new(agent_binary())
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env("AMQP_URL", url())
        .env("RUST_LOG", "info")
        .output()
        .expect("run endpoint-agent")
}

fn text(out: &Output) -> String {
    output_text(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_hands_the_queue_to_a_standby_and_finishes_its_disk() {
    let ep = unique_endpoint("quiet");
    let dir = TempDir::new("quiet");
    let mut service = Service::provision(&ep, 1).await;
    let (data_a, data_b) = (dir.0.join("a"), dir.0.join("b"));
    let mut opts = AgentOptions::new(&ep, &data_a);
    opts.workers = 2;
    let a = Agent::start(&opts);
    let running = service
        .submit((0..2).map(|_| task("sleep", b"2500")).collect())
        .await;
    wait_running(&data_a, 2).await;
    // A standby on another disk: it waits for the exclusive consumer A holds.
    let b = Agent::start(&AgentOptions::new(&ep, &data_b));
    wait_status(&data_b, Duration::from_secs(20), |s| {
        s["link"]
            .as_str()
            .is_some_and(|l| l.starts_with("connected"))
    })
    .await;

    let out = agent_cli(&["quiet"], &data_a);
    assert!(out.status.success(), "{}", text(&out));
    wait_status(&data_a, Duration::from_secs(10), |s| s["quiet"].is_string()).await;

    // New work goes to the standby; A finishes and publishes what it was running, and stays up.
    let ids = service
        .submit(
            (0..50)
                .map(|i| task("sleep", i.to_string().as_bytes()))
                .collect(),
        )
        .await;
    service
        .await_results(&ids, Duration::from_secs(60), &[&a, &b])
        .await;
    service
        .await_results(&running, Duration::from_secs(30), &[&a, &b])
        .await;
    let mut all = running.clone();
    all.extend(ids.iter().cloned());
    service.assert_all_ok(&all);
    let (sa, sb) = (local_status(&data_a), local_status(&data_b));
    assert_eq!(sb["tasks_done"], 50, "the standby ran the new tasks: {sb}");
    assert_eq!(
        sa["tasks_done"], 2,
        "the quiet agent ran only its own: {sa}"
    );
    assert_eq!(
        (sa["online"].as_bool(), sa["results_pending"].as_u64()),
        (Some(true), Some(0)),
        "{sa}"
    );
    // Its heartbeats say quiet, on the standby key: the active agent's beat stays the one the service reads.
    assert_eq!(service.heartbeat_state().await.as_deref(), Some("running"));
    let status = service_setup::endpoint_status(&service.conn, &ep)
        .await
        .expect("status");
    let standby = status
        .standby_heartbeat
        .clone()
        .expect("a standby heartbeat");
    assert_eq!(
        serde_json::to_value(standby.state).unwrap(),
        "quiet",
        "{}",
        status.to_text()
    );
    assert_eq!(a.terminate(Duration::from_secs(30)), Some(0));
    assert_eq!(b.terminate(Duration::from_secs(30)), Some(0));

    // Nothing to quiet: a clear refusal.
    let out = agent_cli(&["quiet"], &data_a);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no agent is running"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handback_after_a_crash_puts_every_task_back_for_another_agent() {
    let ep = unique_endpoint("handback");
    let dir = TempDir::new("handback");
    let mut service = Service::provision(&ep, 1).await;
    let (data_a, data_b) = (dir.0.join("a"), dir.0.join("b"));
    let mut opts = AgentOptions::new(&ep, &data_a);
    opts.workers = 1;
    let a = Agent::start(&opts);
    // One long task keeps A's only slot busy, so the next 1,000 wait queued on its disk (acked).
    let mut ids = service.submit(vec![task("sleep", b"4000")]).await;
    wait_running(&data_a, 1).await;
    let mut timed = task("sleep", b"3000");
    timed.timeout_ms = Some(200);
    let timed = service.submit(vec![timed]).await;
    ids.extend(timed.iter().cloned());
    ids.extend(
        service
            .submit((0..999).map(|_| task("sleep", b"1")).collect())
            .await,
    );
    wait_status(&data_a, Duration::from_secs(60), |s| {
        s["tasks_queued"] == 1000
    })
    .await;

    // Refused while the agent holds the directory.
    let out = agent_cli(&["handback", "--endpoint-id", ep.as_str()], &data_a);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    a.kill9();

    let out = agent_cli(&["handback", "--endpoint-id", ep.as_str()], &data_a);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("handed back 1001 task(s)"),
        "{}",
        text(&out)
    );
    let s = local_status(&data_a);
    assert_eq!(
        (
            s["tasks_handed_back"].as_u64(),
            s["tasks_queued"].as_u64(),
            s["tasks_running"].as_u64()
        ),
        (Some(1001), Some(0), Some(0)),
        "{s}"
    );

    // Another host's agent answers every one of them; the timeout header came back with its task.
    let mut opts = AgentOptions::new(&ep, &data_b);
    opts.workers = 4;
    let b = Agent::start(&opts);
    service
        .await_results(&ids, Duration::from_secs(120), &[&b])
        .await;
    for id in &ids {
        let want = if timed.contains(id) { "timeout" } else { "ok" };
        assert_eq!(service.result(id).status, want, "{id}");
    }
    assert_eq!(service.received.len(), ids.len());
    assert_eq!(local_status(&data_b)["tasks_done"], 1001);
    // A second hand-back finds nothing left.
    let out = agent_cli(&["handback", "--endpoint-id", ep.as_str()], &data_a);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("handed back 0 task(s)"),
        "{}",
        text(&out)
    );
    assert_eq!(b.terminate(Duration::from_secs(30)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handback_on_stop_leaves_nothing_on_a_host_that_will_not_return() {
    let ep = unique_endpoint("hbstop");
    let dir = TempDir::new("hbstop");
    let mut service = Service::provision(&ep, 1).await;
    let (data_a, data_b) = (dir.0.join("a"), dir.0.join("b"));
    let mut opts = AgentOptions::new(&ep, &data_a);
    opts.workers = 1;
    opts.config.push_str("handback_on_stop = true\n");
    let a = Agent::start(&opts);
    let mut ids = service.submit(vec![task("sleep", b"1500")]).await;
    wait_running(&data_a, 1).await;
    ids.extend(
        service
            .submit((0..200).map(|_| task("sleep", b"1")).collect())
            .await,
    );
    wait_status(&data_a, Duration::from_secs(30), |s| {
        s["tasks_queued"] == 200
    })
    .await;
    // The running task finishes within the grace period and is published; the queued ones go back.
    assert_eq!(a.terminate(Duration::from_secs(60)), Some(0));
    let s = local_status(&data_a);
    assert_eq!(
        (
            s["tasks_handed_back"].as_u64(),
            s["tasks_queued"].as_u64(),
            s["tasks_done"].as_u64(),
            s["results_pending"].as_u64()
        ),
        (Some(200), Some(0), Some(1), Some(0)),
        "{s}"
    );
    let b = Agent::start(&AgentOptions::new(&ep, &data_b));
    service
        .await_results(&ids, Duration::from_secs(60), &[&b])
        .await;
    service.assert_all_ok(&ids);
    assert_eq!(local_status(&data_b)["tasks_done"], 200);
    assert_eq!(b.terminate(Duration::from_secs(30)), Some(0));
}

/// Submits one `function` task and waits for its result: (status, body).
async fn run_one(service: &mut Service, function: &str, agent: &Agent) -> (String, String) {
    let ids = service.submit(vec![task(function, b"")]).await;
    service
        .await_results(&ids, Duration::from_secs(30), &[agent])
        .await;
    let r = service.result(&ids[0]);
    (
        r.status.clone(),
        String::from_utf8_lossy(&r.body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_functions_and_keeps_the_config_when_the_file_is_bad() {
    let ep = unique_endpoint("reload");
    let dir = TempDir::new("reload");
    let mut service = Service::provision(&ep, 1).await;
    let data = dir.0.join("data");
    let base = "reconnect_min_ms = 100\ngrace_period_secs = 10\n";
    let mut opts = AgentOptions::new(&ep, &data);
    opts.config = format!("{base}[functions.greet]\ncommand = [\"printf\", \"one\"]\n");
    let agent = Agent::start(&opts);
    let file = data.with_extension("toml");
    assert_eq!(
        run_one(&mut service, "greet", &agent).await,
        ("ok".into(), "one".into())
    );
    let (status, _) = run_one(&mut service, "added", &agent).await;
    assert_eq!(status, "rejected");

    // A valid change: greet changes, a function is added, a restart-only setting is named in the log.
    std::fs::write(
        &file,
        format!(
            "{base}max_backlog = 77\n[functions.greet]\ncommand = [\"printf\", \"two\"]\n[functions.added]\ncommand = [\"printf\", \"new\"]\n"
        ),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = run_one(&mut service, "added", &agent).await;
        if got == ("ok".into(), "new".into()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reload never applied: {got:?}\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        run_one(&mut service, "greet", &agent).await,
        ("ok".into(), "two".into())
    );
    assert!(
        agent
            .log_text()
            .contains("max_backlog changed (10000 -> 77): takes effect after a restart"),
        "{}",
        agent.log_text()
    );

    // An invalid file: logged, the running config kept, the agent up.
    std::fs::write(&file, "this is = = not toml\n").unwrap();
    agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.log_text().contains("the config file is not valid") {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        run_one(&mut service, "greet", &agent).await,
        ("ok".into(), "two".into())
    );
    assert_eq!(
        run_one(&mut service, "added", &agent).await,
        ("ok".into(), "new".into())
    );
    assert_eq!(agent.terminate(Duration::from_secs(30)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line_and_systemd_is_notified() {
    let ep = unique_endpoint("jsonlog");
    let dir = TempDir::new("jsonlog");
    let mut service = Service::provision(&ep, 1).await;
    let data = dir.0.join("data");
    let notify = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&notify).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut opts = AgentOptions::new(&ep, &data);
    opts.args = vec!["--log-format".into(), "json".into()];
    opts.env = vec![
        ("NOTIFY_SOCKET".into(), notify.display().to_string()),
        ("WATCHDOG_USEC".into(), "400000".into()),
    ];
    let agent = Agent::start(&opts);
    let mut tasks: Vec<_> = (0..20).map(|_| task("sleep", b"1")).collect();
    tasks.push(task("no-such-function", b"x"));
    tasks.push(task("echo", b"hello"));
    let ids = service.submit(tasks).await;
    service
        .await_results(&ids, Duration::from_secs(30), &[&agent])
        .await;

    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !(got.iter().any(|m: &String| m.starts_with("READY=1"))
        && got.iter().any(|m| m == "WATCHDOG=1"))
    {
        let n = sock.recv(&mut buf).expect("a notification from the agent");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    agent.signal(libc::SIGTERM);
    while !got.iter().any(|m| m.starts_with("STOPPING=1")) {
        let n = sock.recv(&mut buf).expect("STOPPING=1 from the agent");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let mut agent = agent;
    assert_eq!(agent.wait_exit(Duration::from_secs(30)), Some(0));

    let log = agent.log_text();
    let mut with_task_id = 0;
    let mut lines = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line:?}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string() && v["message"].is_string(),
            "{line}"
        );
        assert!(
            !line.contains('\u{1b}'),
            "colour codes in a JSON log: {line:?}"
        );
        if v["task_id"]
            .as_str()
            .is_some_and(|id| ids.iter().any(|i| i == id))
        {
            with_task_id += 1;
        }
        lines += 1;
    }
    assert!(lines > 10, "{log}");
    // The debug per-task lines ("running", "finished") of the 20 sleep tasks carry their task id as a field.
    assert!(
        with_task_id >= 20,
        "{with_task_id} per-task lines with a task_id:\n{log}"
    );
}
