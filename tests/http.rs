//! The HTTP endpoint (`--http`) of a real agent against the real broker: `/metrics` counters move by exactly
//! the tasks run, rejected and failed; `/readyz` turns 503 while the broker link is cut and 200 once it is
//! back; and the status page, rendered by headless Chromium, shows the counts `/api/status` reports.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use test_support::proxy::{Mode, Proxy};
use test_support::*;

/// A local port nothing listens on now (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("reserve a local port")
        .port()
}

/// Agent options serving HTTP on a free port, and the base URL.
fn with_http(ep: &endpoint_wire::EndpointId, data: &Path) -> (AgentOptions, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut opts = AgentOptions::new(ep, data);
    opts.args.extend(["--http".to_owned(), addr.clone()]);
    (opts, format!("http://{addr}"))
}

/// GET `url`: the status code and body (connection errors panic).
async fn get(url: &str) -> (u16, String) {
    try_get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

async fn try_get(url: &str) -> Result<(u16, String), String> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut response = agent.get(&url).call().map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        Ok((status, body))
    })
    .await
    .expect("HTTP client thread")
}

/// Polls `base + path` until `check(status, body)` holds, up to `limit`; returns the last answer (a refused
/// connection, while the agent starts, counts as status 0).
async fn wait_http(
    base: &str,
    path: &str,
    limit: Duration,
    check: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + limit;
    loop {
        let got = try_get(&format!("{base}{path}"))
            .await
            .unwrap_or_else(|e| (0, e));
        if check(got.0, &got.1) || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `/readyz` answers 200 (connected and consuming), panicking with the agent's log after `limit`.
async fn wait_ready(base: &str, agent: &Agent, limit: Duration) {
    let (status, body) = wait_http(base, "/readyz", limit, |s, _| s == 200).await;
    assert_eq!(
        status,
        200,
        "/readyz after {limit:?}: {body}; agent log tail:\n{}",
        log_tail(&[agent], 40)
    );
}

/// The value of the sample `series` (a metric name with its labels as encoded, such as
/// `endpoint_agent_tasks_finished_total{function="echo",status="ok"}`) in an exposition; 0 when absent (a
/// labelled series appears at its first increment).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

async fn status_json(base: &str) -> serde_json::Value {
    let (code, body) = get(&format!("{base}/api/status")).await;
    assert_eq!(code, 200, "/api/status: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/api/status is not JSON ({e}): {body}"))
}

/// The counters a run of tasks must move, as series of the exposition.
const RECEIVED: &str = "endpoint_agent_tasks_received_total";
const REJECTED: &str = "endpoint_agent_tasks_rejected_total";
const ECHO_OK: &str = r#"endpoint_agent_tasks_finished_total{function="echo",status="ok"}"#;
const SLEEP_OK: &str = r#"endpoint_agent_tasks_finished_total{function="sleep",status="ok"}"#;
const FAIL_FAILED: &str = r#"endpoint_agent_tasks_finished_total{function="fail",status="failed"}"#;
const UNKNOWN_REJECTED: &str =
    r#"endpoint_agent_tasks_finished_total{function="(unknown)",status="rejected"}"#;
const ECHO_STARTED: &str = r#"endpoint_agent_tasks_started_total{function="echo"}"#;
const SLEEP_STARTED: &str = r#"endpoint_agent_tasks_started_total{function="sleep"}"#;
const FAIL_STARTED: &str = r#"endpoint_agent_tasks_started_total{function="fail"}"#;
const ECHO_RUNS: &str = r#"endpoint_agent_task_run_seconds_count{function="echo"}"#;
const SLEEP_RUNS: &str = r#"endpoint_agent_task_run_seconds_count{function="sleep"}"#;
const ACKS: &str = "endpoint_agent_ingest_to_ack_seconds_count";
const CONFIRMS: &str = "endpoint_agent_result_to_confirm_seconds_count";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_tasks_exactly() {
    let ep = unique_endpoint("httpmetrics");
    let dir = TempDir::new("httpmetrics");
    let data = dir.0.join("data");
    let mut service = Service::provision(&ep, 1).await;
    let (mut opts, base) = with_http(&ep, &data);
    opts.config
        .push_str("[functions.fail]\ncommand = [\"false\"]\n");
    let agent = Agent::start(&opts);
    wait_ready(&base, &agent, Duration::from_secs(30)).await;
    let (code, body) = get(&format!("{base}/healthz")).await;
    assert_eq!((code, body.trim()), (200, "ok"), "/healthz");

    let (code, before) = get(&format!("{base}/metrics")).await;
    assert_eq!(code, 200, "{before}");
    assert!(
        before.ends_with("# EOF\n"),
        "not OpenMetrics text:\n{before}"
    );
    for (series, want) in [
        ("endpoint_agent_slots", 4.0),
        ("endpoint_agent_broker_connected", 1.0),
        ("endpoint_agent_consuming", 1.0),
        (r#"endpoint_agent_state{state="running"}"#, 1.0),
        (r#"endpoint_agent_state{state="paused"}"#, 0.0),
    ] {
        assert_eq!(sample(&before, series), want, "{series} in:\n{before}");
    }

    let (echoes, sleeps, fails, unknown) = (200, 6, 3, 1);
    let mut tasks: Vec<_> = (0..echoes).map(|i| echo(&format!("m{i}"))).collect();
    tasks.extend((0..sleeps).map(|_| task("sleep", b"50")));
    tasks.extend((0..fails).map(|_| task("fail", b"")));
    tasks.extend((0..unknown).map(|_| task("no_such_function", b"")));
    let ids = service.submit(tasks).await;
    service
        .await_results(&ids, Duration::from_secs(60), &[&agent])
        .await;
    let statuses = |status: &str| {
        ids.iter()
            .filter(|id| service.result(id).status == status)
            .count()
    };
    assert_eq!(
        (statuses("ok"), statuses("failed"), statuses("rejected")),
        (echoes + sleeps, fails, unknown)
    );

    let total = (echoes + sleeps + fails + unknown) as f64;
    let expected = [
        (RECEIVED, total),
        (ACKS, total),
        (CONFIRMS, total),
        (REJECTED, unknown as f64),
        (ECHO_OK, echoes as f64),
        (SLEEP_OK, sleeps as f64),
        (FAIL_FAILED, fails as f64),
        (UNKNOWN_REJECTED, unknown as f64),
        (ECHO_STARTED, echoes as f64),
        (SLEEP_STARTED, sleeps as f64),
        (FAIL_STARTED, fails as f64),
        (ECHO_RUNS, echoes as f64),
        (SLEEP_RUNS, sleeps as f64),
    ];
    let moved = |after: &str| -> Vec<(&str, f64)> {
        expected
            .iter()
            .map(|(s, _)| (*s, sample(after, s) - sample(&before, s)))
            .collect()
    };
    let want: Vec<(&str, f64)> = expected.to_vec();
    // A result can reach the service a moment before the agent counts the ack of its delivery (or the
    // confirm of its result): poll until every counter arrived, then require exact amounts.
    let (code, after) = wait_http(&base, "/metrics", Duration::from_secs(10), |code, text| {
        code == 200
            && moved(text)
                .iter()
                .zip(&want)
                .all(|(got, want)| got.1 >= want.1)
    })
    .await;
    assert_eq!(code, 200, "{after}");
    assert_eq!(
        moved(&after),
        want,
        "counters moved by other amounts:\n{after}"
    );
    // Nothing is left on disk, in a slot or waiting for a confirm.
    for (series, want) in [
        ("endpoint_agent_tasks_queued", 0.0),
        ("endpoint_agent_tasks_running", 0.0),
        ("endpoint_agent_slots_busy", 0.0),
        ("endpoint_agent_results_pending", 0.0),
    ] {
        assert_eq!(sample(&after, series), want, "{series} in:\n{after}");
    }

    let status = status_json(&base).await;
    assert_eq!(status["tasks_done"], total as u64, "{status:#}");
    assert_eq!(status["tasks_queued"], 0, "{status:#}");
    assert_eq!(status["endpoint_id"], ep.as_str(), "{status:#}");
    assert_eq!(status["ready"], true, "{status:#}");
    // The failed and rejected tasks are the recent failures (newest first, at most 20).
    let failures = status["recent_failures"]
        .as_array()
        .expect("recent_failures");
    let mut failed_ids: Vec<&str> = failures
        .iter()
        .filter_map(|f| f["task_id"].as_str())
        .collect();
    failed_ids.sort_unstable();
    let mut want_failed: Vec<&str> = ids[echoes + sleeps..].iter().map(String::as_str).collect();
    want_failed.sort_unstable();
    assert_eq!(failed_ids, want_failed, "{status:#}");
    // The agent's own status command agrees with the endpoint.
    assert_eq!(local_status(&data)["tasks_done"], total as u64);
    assert_eq!(agent.terminate(Duration::from_secs(30)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_broker_link() {
    let ep = unique_endpoint("httpready");
    let dir = TempDir::new("httpready");
    let mut service = Service::provision(&ep, 1).await;
    let proxy = Proxy::start(broker_addr()).await;
    let (mut opts, base) = with_http(&ep, &dir.0.join("data"));
    opts.broker_url = url_via(&proxy.addr);
    let agent = Agent::start(&opts);
    wait_ready(&base, &agent, Duration::from_secs(30)).await;
    let (_, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(body.trim(), "ready: consuming");

    // The link goes down and stays down: not ready, saying why; the process itself stays healthy.
    proxy.set_mode(Mode::Cut);
    let (code, body) = wait_http(&base, "/readyz", Duration::from_secs(30), |code, _| {
        code == 503
    })
    .await;
    assert_eq!(
        code,
        503,
        "/readyz stayed {code} with the link cut: {body}; agent log tail:\n{}",
        log_tail(&[&agent], 40)
    );
    assert!(
        body.starts_with("not ready: disconnected") && body.lines().count() == 1,
        "{body:?}"
    );
    let (code, healthz) = get(&format!("{base}/healthz")).await;
    assert_eq!(code, 200, "/healthz while disconnected: {healthz}");
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    assert_eq!(
        sample(&metrics, "endpoint_agent_broker_connected"),
        0.0,
        "{metrics}"
    );
    let status = status_json(&base).await;
    assert_eq!(
        (&status["ready"], &status["broker_connected"]),
        (
            &serde_json::Value::Bool(false),
            &serde_json::Value::Bool(false)
        ),
        "{status:#}"
    );

    // The link comes back: ready again once the agent has reconnected and consumes.
    proxy.set_mode(Mode::Pass);
    wait_ready(&base, &agent, Duration::from_secs(30)).await;
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    assert!(
        sample(&metrics, "endpoint_agent_reconnects_total") >= 1.0,
        "{metrics}"
    );
    // And it works: tasks submitted now get their results.
    let ids = service
        .submit((0..20).map(|i| echo(&format!("r{i}"))).collect())
        .await;
    service
        .await_results(&ids, Duration::from_secs(60), &[&agent])
        .await;
    service.assert_all_ok(&ids);
    assert_eq!(agent.terminate(Duration::from_secs(30)), Some(0));
}

/// Chromium's binary on PATH (`chromium`, Debian's, or `chromium-browser`).
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["chromium", "chromium-browser"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |d| d.join(name)))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "neither `chromium` nor `chromium-browser` is on PATH: the status-page scenario renders the \
                 page in headless Chromium; install it (`apt-get install -y chromium`, as .ci/run does)"
            )
        })
}

/// The DOM of `url` as headless Chromium parsed and laid it out (`--dump-dom`, after the load event), with a
/// private profile and a time limit.
async fn chromium_dom(url: &str, limit: Duration) -> String {
    let profile = TempDir::new("chromium-profile");
    let out = TempDir::new("chromium-out");
    let stdout = out.0.join("dom.html");
    let stderr = out.0.join("stderr.txt");
    let mut child = Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("chromium stdout file"))
        .stderr(std::fs::File::create(&stderr).expect("chromium stderr file"))
        .spawn()
        .expect("cannot start chromium");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish --dump-dom {url} within {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let dom = std::fs::read_to_string(&stdout).unwrap_or_default();
    assert!(
        status.success() && !dom.is_empty(),
        "chromium --dump-dom {url} failed ({status}); stderr:\n{}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    dom
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_chromium_shows_the_counts() {
    let ep = unique_endpoint("httppage");
    let dir = TempDir::new("httppage");
    let mut service = Service::provision(&ep, 1).await;
    let (mut opts, base) = with_http(&ep, &dir.0.join("data"));
    opts.workers = 1;
    let agent = Agent::start(&opts);
    wait_ready(&base, &agent, Duration::from_secs(30)).await;
    let done = 37;
    let ids = service
        .submit((0..done).map(|i| echo(&format!("p{i}"))).collect())
        .await;
    service
        .await_results(&ids, Duration::from_secs(60), &[&agent])
        .await;
    // One slot: the first long sleep runs, the others wait on disk, and nothing moves while the page renders
    // (the agent is killed at the end, long before they finish).
    let sleeps = 4;
    service
        .submit((0..sleeps).map(|_| task("sleep", b"60000")).collect())
        .await;
    let status = wait_http(
        &base,
        "/api/status",
        Duration::from_secs(20),
        |code, body| {
            let s: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            code == 200 && s["tasks_running"] == 1 && s["tasks_queued"] == sleeps - 1
        },
    )
    .await;
    let before: serde_json::Value = serde_json::from_str(&status.1).unwrap_or_default();
    assert_eq!(
        (
            &before["tasks_done"],
            &before["tasks_running"],
            &before["tasks_queued"]
        ),
        (&done.into(), &1.into(), &(sleeps - 1).into()),
        "{before:#}"
    );

    let dom = chromium_dom(&format!("{base}/"), Duration::from_secs(60)).await;
    let after = status_json(&base).await;
    for key in ["tasks_done", "tasks_queued", "tasks_running"] {
        assert_eq!(
            before[key], after[key],
            "{key} moved while the page rendered"
        );
        let card = format!("id=\"{key}\">{}<", after[key]);
        assert!(
            dom.contains(&card),
            "the rendered page has no {card}:\n{dom}"
        );
    }
    assert!(dom.contains("id=\"slots_busy\">1/1<"), "{dom}");
    assert!(
        dom.contains(&format!("<span class=\"ep\">{ep}</span>")),
        "{dom}"
    );
    assert!(dom.contains("data-ready=\"true\""), "{dom}");
    agent.kill9();
}
