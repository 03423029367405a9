//! Pool functions on real Python workers (workers/python/endpoint_worker.py, functions in
//! tests/fixtures/pyfns.py): volume, exact payloads, a worker dying mid-task, one that fails at import, a
//! timeout, recycling, an external worker across an agent restart, and a SIGKILLed agent.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use test_support::*;

const WAIT: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn worker_script() -> String {
    repo()
        .join("workers/python/endpoint_worker.py")
        .canonicalize()
        .expect("the reference worker")
        .display()
        .to_string()
}

fn fixtures() -> String {
    repo()
        .join("tests/fixtures")
        .canonicalize()
        .expect("tests/fixtures")
        .display()
        .to_string()
}

/// `[functions.NAME]` running `pyfns:FUNCTION` on `pool` workers, plus `extra` lines.
fn pool_function(name: &str, function: &str, pool: usize, extra: &str) -> String {
    format!(
        "[functions.{name}]\ncommand = [\"python3\", \"{}\", \"{function}\"]\npool = {pool}\nenv = {{ PYTHONPATH = \"{}\" }}\n{extra}",
        worker_script(),
        fixtures()
    )
}

fn body(service: &Service, id: &str) -> String {
    String::from_utf8_lossy(&service.result(id).body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_two_answers_every_task_exactly() {
    let ep = unique_endpoint("pool");
    let dir = TempDir::new("pool");
    let mut service = Service::provision(&ep, 2).await;
    let data = dir.0.join("data");
    let mut opts = AgentOptions::new(&ep, &data);
    opts.config
        .push_str(&pool_function("pyecho", "pyfns:echo", 2, ""));
    let agent = Agent::start(&opts);
    let specs: Vec<_> = (0..2000)
        .map(|i| {
            task(
                "pyecho",
                format!("payload {i} {}", "y".repeat(i % 50)).as_bytes(),
            )
        })
        .collect();
    let payloads: Vec<Vec<u8>> = specs.iter().map(|t| t.payload.clone()).collect();
    let ids = service.submit(specs).await;
    service.await_results(&ids, WAIT, &[&agent]).await;
    service.assert_all_ok(&ids);
    for (id, payload) in ids.iter().zip(&payloads) {
        assert_eq!(&service.result(id).body, payload, "{id}");
    }
    // Empty, 1 MiB and non-UTF-8 payloads, byte for byte.
    let odd: Vec<Vec<u8>> = vec![
        Vec::new(),
        (0..(1 << 20)).map(|i| (i % 251) as u8).collect(),
        vec![0xff, 0xfe, 0x00, 0xc3, 0x28],
    ];
    let ids = service
        .submit(odd.iter().map(|p| task("pyecho", p)).collect())
        .await;
    service.await_results(&ids, WAIT, &[&agent]).await;
    for (id, payload) in ids.iter().zip(&odd) {
        assert_eq!(service.result(id).status, "ok");
        assert_eq!(&service.result(id).body, payload, "{} bytes", payload.len());
    }
    // The heartbeat and the local status show the workers.
    let status = wait_status(&data, Duration::from_secs(10), |s| {
        s["workers"]["pyecho"]["idle"] == 2
    })
    .await;
    assert_eq!(status["workers"]["pyecho"]["idle"], 2, "{status}");
    let remote = service_setup::endpoint_status(&service.conn, &ep)
        .await
        .expect("status");
    let beat = remote.last_heartbeat.expect("a heartbeat");
    assert!(beat.workers.contains_key("pyecho"), "{:?}", beat.workers);
    agent.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_die_time_out_or_fail_at_import_are_handled() {
    let ep = unique_endpoint("poolfault");
    let dir = TempDir::new("poolfault");
    let mut service = Service::provision(&ep, 2).await;
    let data = dir.0.join("data");
    let broken_log = dir.0.join("broken.log");
    let mut opts = AgentOptions::new(&ep, &data);
    opts.config.push_str("max_attempts = 3\n");
    opts.config
        .push_str(&pool_function("crash_once", "pyfns:crash_once", 2, ""));
    opts.config
        .push_str(&pool_function("always_crash", "pyfns:always_crash", 1, ""));
    opts.config.push_str(&pool_function(
        "slow",
        "pyfns:slow",
        1,
        "timeout_secs = 1\n",
    ));
    opts.config.push_str(&pool_function(
        "pid",
        "pyfns:pid",
        1,
        "max_tasks_per_worker = 3\n",
    ));
    opts.config.push_str(&pool_function(
        "hog",
        "pyfns:hog",
        1,
        "max_worker_memory_bytes = 41943040\n",
    ));
    opts.config.push_str(&format!(
        "[functions.broken]\ncommand = [\"python3\", \"{}\", \"broken_import:f\"]\npool = 1\nenv = {{ PYTHONPATH = \"{}\", BROKEN_LOG = \"{}\" }}\n",
        worker_script(),
        fixtures(),
        broken_log.display()
    ));
    let agent = Agent::start(&opts);
    let marker = dir.0.join("crash-once.marker");
    let ids = service
        .submit(vec![
            task("crash_once", marker.display().to_string().as_bytes()),
            task("always_crash", b""),
            task("slow", b"30"),
        ])
        .await;
    service.await_results(&ids, WAIT, &[&agent]).await;
    // Died once mid-task: charged an attempt, ran again on another worker.
    let r = service.result(&ids[0]);
    assert_eq!(
        (r.status.as_str(), r.attempts),
        ("ok", Some(2)),
        "{}",
        body(&service, &ids[0])
    );
    assert_eq!(r.body, b"survived");
    // Dies every time: failed after max_attempts, with the worker's exit status.
    let r = service.result(&ids[1]);
    assert_eq!((r.status.as_str(), r.attempts), ("failed", Some(3)));
    assert!(
        body(&service, &ids[1]).contains("exit status 1"),
        "{}",
        body(&service, &ids[1])
    );
    // Past its timeout: the worker was killed and replaced.
    assert_eq!(
        service.result(&ids[2]).status,
        "timeout",
        "{}",
        body(&service, &ids[2])
    );
    let after = service.submit(vec![task("slow", b"0")]).await;
    service.await_results(&after, WAIT, &[&agent]).await;
    assert_eq!(service.result(&after[0]).body, b"slept");

    // Recycled every 3 tasks: 9 tasks see at least 3 processes.
    let ids = service
        .submit((0..9).map(|_| task("pid", b"")).collect())
        .await;
    service.await_results(&ids, WAIT, &[&agent]).await;
    let pids: BTreeSet<String> = ids.iter().map(|id| body(&service, id)).collect();
    assert!(pids.len() >= 3, "recycling after 3 tasks: {pids:?}");
    // Past 40 MiB resident after every task: each of 3 tasks sees a fresh worker.
    let ids = service
        .submit((0..3).map(|_| task("hog", b"")).collect())
        .await;
    service.await_results(&ids, WAIT, &[&agent]).await;
    for id in &ids {
        assert_eq!(service.result(id).status, "ok", "{}", body(&service, id));
    }
    let pids: BTreeSet<String> = ids.iter().map(|id| body(&service, id)).collect();
    assert_eq!(
        pids.len(),
        3,
        "recycling past max_worker_memory_bytes: {pids:?}"
    );

    // Fails at import: reported as failing, no hot loop, its tasks fail with the reason, the others serve.
    let status = wait_status(&data, Duration::from_secs(30), |s| {
        s["workers"]["broken"]["failing"] == 1
    })
    .await;
    assert_eq!(status["workers"]["broken"]["failing"], 1, "{status}");
    let failing_since = Instant::now();
    let ids = service
        .submit(vec![
            task("broken", b""),
            task("crash_once", marker.display().to_string().as_bytes()),
        ])
        .await;
    service.await_results(&ids, WAIT, &[&agent]).await;
    assert_eq!(service.result(&ids[0]).status, "failed");
    assert!(
        body(&service, &ids[0]).contains("broken on purpose"),
        "{}",
        body(&service, &ids[0])
    );
    assert_eq!(service.result(&ids[1]).status, "ok");
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(failing_since.elapsed())).await;
    let tries = std::fs::read_to_string(&broken_log)
        .unwrap_or_default()
        .lines()
        .count();
    let running_for = status["workers"].to_string();
    assert!(
        (3..=8).contains(&tries),
        "a worker failing at import was started {tries} times in its first seconds ({running_for})"
    );
    agent.terminate(Duration::from_secs(30));
}

/// An external worker serving `ext` on `socket`.
fn external_worker(socket: &Path) -> Child {
    Command::new("python3")
        .arg(worker_script())
        .arg("ext=pyfns:echo")
        .env("ENDPOINT_AGENT_SOCKET", socket)
        .env("PYTHONPATH", fixtures())
        .env_remove("ENDPOINT_AGENT_POOL_WORKER")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start an external python worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_workers_serve_and_come_back_after_the_agent_restarts() {
    let ep = unique_endpoint("poolext");
    let dir = TempDir::new("poolext");
    let mut service = Service::provision(&ep, 1).await;
    let data = dir.0.join("data");
    let mut opts = AgentOptions::new(&ep, &data);
    opts.config
        .push_str("[functions.ext]\npool = 0\ntimeout_secs = 60\n");
    opts.config
        .push_str(&pool_function("slowpool", "pyfns:slow", 2, ""));
    let agent = Agent::start(&opts);
    let mut worker = external_worker(&data.join("workers.sock"));
    let first = service
        .submit(
            (0..50)
                .map(|i| task("ext", format!("e{i}").as_bytes()))
                .collect(),
        )
        .await;
    service.await_results(&first, WAIT, &[&agent]).await;
    service.assert_all_ok(&first);
    // The agent dies with pool tasks running and queued; the external worker waits for the next one.
    let slow: Vec<_> = (0..40).map(|_| task("slowpool", b"0.05")).collect();
    let more: Vec<_> = (0..50)
        .map(|i| task("ext", format!("f{i}").as_bytes()))
        .collect();
    let mut ids = service.submit(slow).await;
    ids.extend(service.submit(more).await);
    wait_status(&data, Duration::from_secs(30), |s| {
        s["tasks_done"].as_u64() > Some(60)
    })
    .await;
    agent.kill9();
    let agent = Agent::start(&opts);
    service.await_results(&ids, WAIT, &[&agent]).await;
    for id in ids.iter().chain(&first) {
        assert_eq!(
            service.result(id).status,
            "ok",
            "{id}: {}",
            body(&service, id)
        );
    }
    assert!(
        worker.try_wait().expect("worker status").is_none(),
        "the external worker reconnected"
    );
    let status = wait_status(&data, Duration::from_secs(10), |s| {
        s["workers"]["ext"]["external"] == 1
    })
    .await;
    assert_eq!(status["workers"]["ext"]["external"], 1, "{status}");
    agent.terminate(Duration::from_secs(30));
    let _ = worker.kill();
    let _ = worker.wait();
}
