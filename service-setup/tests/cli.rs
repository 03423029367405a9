//! Black-box tests of the `service-setup` binary against a real RabbitMQ: every test runs the built binary with
//! `std::process::Command` and checks exit codes, stdout and the broker's state (read with lapin directly). The
//! whole process uses one vhost of its own, `ea-cli-<pid>`, so the shared `results` queue of other runs and of
//! the default vhost is never touched; stale vhosts of dead test processes are deleted on start. Tests must not
//! assert on log text, only on exit codes, data on stdout and broker state.

use endpoint_wire::{
    AgentState, EndpointId, HEADER_ATTEMPTS, HEADER_DURATION_MS, HEADER_ENDPOINT_ID,
    HEADER_EXIT_CODE, HEADER_STATUS, HEADER_TIMEOUT_MS, Heartbeat, PROTOCOL_VERSION,
    RESULTS_EXCHANGE, RESULTS_QUEUE, TASKS_EXCHANGE, now_ms,
};
use endpoint_wire::{BrokerUrl, amqp::connect, registration::fetch_registration};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation, Connection};
use std::collections::HashSet;
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_service-setup");

/// Tests that read the shared `results` queue hold this: a filtered reader keeps other endpoints' results unacked
/// until it exits, which would hide them from a concurrent test's reader.
static RESULTS_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------------------------

/// The broker URL of this process's vhost, created on first use.
fn broker_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let base = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let (scheme_and_authority, host_port) = split_url(&base);
        if let Err(e) = host_port
            .to_socket_addrs()
            .map_err(|e| e.to_string())
            .and_then(|mut addrs| addrs.next().ok_or_else(|| "no address".to_owned()))
            .and_then(|addr| {
                TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())
            })
        {
            panic!(
                "RabbitMQ is not reachable at {host_port} ({e}): start it with `rabbitmq-server -detached` \
                 (or point AMQP_URL at a running broker)"
            );
        }
        let vhost = format!("ea-cli-{}", std::process::id());
        remove_stale_vhosts();
        rabbitmqctl(&["add_vhost", &vhost]);
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        format!("{scheme_and_authority}/{vhost}")
    })
}

/// `amqp://u:p@h:1/v?x` -> (`amqp://u:p@h:1`, `h:1`).
fn split_url(url: &str) -> (String, String) {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_end..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        let port = if url.starts_with("amqps") { 5671 } else { 5672 };
        format!("{host_port}:{port}")
    };
    (format!("{}{authority}", &url[..scheme_end]), host_port)
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = rabbitmqctl_command()
        .arg("-s")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run rabbitmqctl ({e}): install RabbitMQ's CLI tools and start the broker"
            )
        });
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes `ea-cli-<pid>` vhosts whose process is gone (earlier runs cannot clean up after themselves).
fn remove_stale_vhosts() {
    for vhost in rabbitmqctl(&["list_vhosts", "name"]).lines().map(str::trim) {
        let Some(pid) = vhost
            .strip_prefix("ea-cli-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            rabbitmqctl(&["delete_vhost", vhost]);
        }
    }
}

/// A fresh endpoint id for one test.
fn unique_ep() -> EndpointId {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let n = N.fetch_add(1, Ordering::Relaxed);
    EndpointId::new(format!("cli-{}-{nanos}-{n}", std::process::id())).expect("a valid endpoint id")
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success; stderr: {}", self.stderr);
        self
    }

    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

fn cli(args: &[&str]) -> Run {
    cli_with_stdin(args, None)
}

fn cli_with_stdin(args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut child = Command::new(BIN)
        .arg("--broker-url")
        .arg(broker_url())
        .args(args)
        .env_remove("AMQP_URL")
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the service-setup binary runs");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(bytes).expect("write stdin");
    }
    let out: Output = child.wait_with_output().expect("service-setup finishes");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn amqp() -> Connection {
    let url = BrokerUrl::new(broker_url()).expect("valid test url");
    connect(&url, "service-setup cli tests")
        .await
        .expect("the test connects to its vhost")
}

/// Message count of `queue`, or `None` if it does not exist.
async fn depth(conn: &Connection, queue: &str) -> Option<u32> {
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = ch.close(200, "OK".into()).await;
    Some(q.message_count())
}

/// Declares `queue` durable with `args` on a channel of its own: `Ok` only if it is equivalent to what exists.
async fn redeclare(conn: &Connection, queue: &str, args: FieldTable) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await?;
    let _ = ch.close(200, "OK".into()).await;
    Ok(())
}

fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(k.into(), v);
    }
    t
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Publishes with confirms and asserts the message was routed.
async fn publish(
    conn: &Connection,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert_eq!(
        confirm,
        Confirmation::Ack(None),
        "{exchange}/{key} must be routed"
    );
    let _ = ch.close(200, "OK".into()).await;
}

/// Drains `queue` (destructively: only for a test's own queues), returning every message.
async fn drain(conn: &Connection, queue: &str) -> Vec<lapin::message::Delivery> {
    let ch = conn.create_channel().await.expect("channel");
    let mut out = Vec::new();
    while let Some(msg) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        out.push(msg.delivery);
    }
    let _ = ch.close(200, "OK".into()).await;
    out
}

fn provision(ep: &EndpointId, extra: &[&str]) -> Run {
    let mut args = vec!["provision", "--endpoint-id", ep.as_str()];
    args.extend_from_slice(extra);
    cli(&args).ok()
}

// ---------------------------------------------------------------------------------------------------------------
// provision
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_is_idempotent_and_declares_the_contract_topology() {
    let ep = unique_ep();
    let first = provision(&ep, &[]);
    assert!(
        first.stdout.contains(&format!("provisioned endpoint {ep}")),
        "{}",
        first.stdout
    );
    provision(&ep, &[]);

    let conn = amqp().await;
    let classic = || table(vec![("x-queue-type", long_string("classic"))]);
    let latest_only = || {
        table(vec![
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", long_string("drop-head")),
        ])
    };
    // Re-declaring with the contract's arguments succeeds only if the queue has exactly those.
    redeclare(&conn, &ep.tasks_queue(), classic())
        .await
        .expect("tasks queue as contracted");
    redeclare(&conn, &ep.registration_queue(), latest_only())
        .await
        .expect("registration queue");
    redeclare(&conn, &ep.heartbeat_queue(), latest_only())
        .await
        .expect("heartbeat queue");
    redeclare(&conn, RESULTS_QUEUE, FieldTable::default())
        .await
        .expect("results queue");
    // ...and declaring them without their arguments is refused, so the arguments really are set.
    assert!(
        redeclare(&conn, &ep.registration_queue(), FieldTable::default())
            .await
            .is_err()
    );

    // Exactly one registration after two provisions, and it is the contract's JSON.
    assert_eq!(depth(&conn, &ep.registration_queue()).await, Some(1));
    let reg = fetch_registration(&conn, &ep)
        .await
        .expect("a valid registration");
    assert_eq!(reg.heartbeat_secs, 10);
    assert_eq!(reg.tasks_queue, ep.tasks_queue());

    // The tasks queue is bound to the `tasks` exchange with its own name.
    publish(
        &conn,
        TASKS_EXCHANGE,
        &ep.tasks_queue(),
        b"x",
        BasicProperties::default(),
    )
    .await;
    assert_eq!(depth(&conn, &ep.tasks_queue()).await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_with_another_heartbeat_replaces_the_registration() {
    let ep = unique_ep();
    provision(&ep, &["--heartbeat", "5"]);
    let again = provision(&ep, &["--heartbeat", "7", "--json"]);
    let json: serde_json::Value =
        serde_json::from_str(again.stdout.trim()).expect("--json prints JSON");
    assert_eq!(json["heartbeat_secs"], 7);
    assert_eq!(json["endpoint_id"], ep.as_str());

    let conn = amqp().await;
    assert_eq!(depth(&conn, &ep.registration_queue()).await, Some(1));
    let reg = fetch_registration(&conn, &ep)
        .await
        .expect("a valid registration");
    assert_eq!(reg.heartbeat_secs, 7);

    let out = cli(&[
        "provision",
        "--endpoint-id",
        ep.as_str(),
        "--heartbeat",
        "0",
    ]);
    assert_eq!(out.code, 2, "heartbeat 0 is a usage error: {}", out.stderr);
}

// ---------------------------------------------------------------------------------------------------------------
// submit
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn submit_to_an_unprovisioned_endpoint_exits_3_with_the_fix() {
    let ep = unique_ep();
    let out = cli(&[
        "submit",
        "--endpoint-id",
        ep.as_str(),
        "--function",
        "echo",
        "--payload",
        "x",
    ]);
    assert_eq!(out.code, 3, "stderr: {}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("service-setup provision --endpoint-id {ep}")),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout.is_empty(),
        "no id is printed for a task that was not queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_count_queues_distinct_contract_shaped_tasks() {
    let ep = unique_ep();
    provision(&ep, &[]);
    let out = cli(&[
        "submit",
        "--endpoint-id",
        ep.as_str(),
        "--function",
        "echo",
        "--payload",
        "hello",
        "--count",
        "5",
        "--timeout-ms",
        "1500",
    ])
    .ok();
    let ids: Vec<&str> = out.lines();
    assert_eq!(ids.len(), 5, "{}", out.stdout);
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), 5);

    let conn = amqp().await;
    assert_eq!(depth(&conn, &ep.tasks_queue()).await, Some(5));
    let msgs = drain(&conn, &ep.tasks_queue()).await;
    let got: Vec<String> = msgs
        .iter()
        .map(|d| {
            d.properties
                .message_id()
                .as_ref()
                .expect("message_id")
                .to_string()
        })
        .collect();
    assert_eq!(got, ids, "queued in order, under the printed ids");
    for d in &msgs {
        assert_eq!(
            d.properties.kind().as_ref().map(|s| s.as_str()),
            Some("echo")
        );
        assert_eq!(*d.properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(d.data, b"hello");
        let headers = d.properties.headers().as_ref().expect("headers");
        assert_eq!(
            headers.inner().get(HEADER_TIMEOUT_MS),
            Some(&AMQPValue::LongLongInt(1500))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_reads_the_payload_from_a_file_or_stdin() {
    let ep = unique_ep();
    provision(&ep, &[]);
    let binary: Vec<u8> = (0..=255u8).collect();
    let file = std::env::temp_dir().join(format!("{ep}.payload"));
    std::fs::write(&file, &binary).expect("write payload file");
    let path = file.to_str().expect("utf-8 temp path");
    let from_file = cli(&[
        "submit",
        "--endpoint-id",
        ep.as_str(),
        "--function",
        "f",
        "--payload-file",
        path,
    ])
    .ok();
    let _ = std::fs::remove_file(&file);
    let from_stdin = cli_with_stdin(
        &[
            "submit",
            "--endpoint-id",
            ep.as_str(),
            "--function",
            "g",
            "--task-id",
            "my-task",
        ],
        Some(b"piped\n"),
    )
    .ok();
    assert_eq!(from_stdin.stdout.trim(), "my-task");

    let conn = amqp().await;
    let msgs = drain(&conn, &ep.tasks_queue()).await;
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        msgs[0]
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        Some(from_file.stdout.trim().to_owned())
    );
    assert_eq!(msgs[0].data, binary);
    assert!(
        msgs[0].properties.headers().is_none(),
        "no timeout header unless asked"
    );
    assert_eq!(msgs[1].data, b"piped\n");
    assert_eq!(
        msgs[1].properties.kind().as_ref().map(|s| s.as_str()),
        Some("g")
    );
}

#[test]
fn task_id_with_a_count_above_one_is_a_usage_error() {
    let ep = unique_ep();
    let out = cli(&[
        "submit",
        "--endpoint-id",
        ep.as_str(),
        "--function",
        "f",
        "--payload",
        "x",
        "--count",
        "2",
        "--task-id",
        "t",
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--task-id"), "{}", out.stderr);
}

// ---------------------------------------------------------------------------------------------------------------
// results
// ---------------------------------------------------------------------------------------------------------------

fn result_props(
    task_id: &str,
    ep: &EndpointId,
    status: &str,
    exit_code: Option<i64>,
) -> BasicProperties {
    let mut headers = vec![
        (HEADER_ENDPOINT_ID, long_string(ep.as_str())),
        (HEADER_STATUS, long_string(status)),
        (HEADER_ATTEMPTS, AMQPValue::LongInt(1)),
        (HEADER_DURATION_MS, AMQPValue::LongLongInt(42)),
    ];
    if let Some(code) = exit_code {
        headers.push((HEADER_EXIT_CODE, AMQPValue::LongLongInt(code)));
    }
    BasicProperties::default()
        .with_message_id(task_id.into())
        .with_correlation_id(task_id.into())
        .with_delivery_mode(2)
        .with_headers(table(headers))
}

fn json_lines(run: &Run) -> Vec<serde_json::Value> {
    run.lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_prints_only_the_endpoints_results_and_leaves_the_others() {
    let _serial = RESULTS_LOCK.lock().await;
    let (mine, other) = (unique_ep(), unique_ep());
    provision(&mine, &[]); // declares the shared results exchange and queue
    let conn = amqp().await;
    let key = mine.results_routing_key();
    publish(
        &conn,
        RESULTS_EXCHANGE,
        &key,
        b"out-1",
        result_props("r1", &mine, "ok", Some(0)),
    )
    .await;
    publish(
        &conn,
        RESULTS_EXCHANGE,
        &other.results_routing_key(),
        b"theirs",
        result_props("o1", &other, "ok", Some(0)),
    )
    .await;
    publish(
        &conn,
        RESULTS_EXCHANGE,
        &key,
        &[0xff, 0xfe],
        result_props("r2", &mine, "failed", None),
    )
    .await;

    let run = cli(&[
        "results",
        "--endpoint-id",
        mine.as_str(),
        "--idle-ms",
        "500",
    ])
    .ok();
    let lines = json_lines(&run);
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    assert_eq!(
        lines[0],
        serde_json::json!({"task_id": "r1", "endpoint_id": mine.as_str(), "status": "ok", "exit_code": 0,
                           "attempts": 1, "duration_ms": 42, "output": "out-1"})
    );
    assert_eq!(lines[1]["task_id"], "r2");
    assert_eq!(lines[1]["status"], "failed");
    assert!(lines[1]["exit_code"].is_null());
    assert_eq!(lines[1]["output_base64"], "//4=");

    // Mine were acked; the other endpoint's result is still there for its own reader.
    let again = cli(&[
        "results",
        "--endpoint-id",
        mine.as_str(),
        "--idle-ms",
        "300",
    ])
    .ok();
    assert!(again.stdout.is_empty(), "{}", again.stdout);
    let theirs = cli(&[
        "results",
        "--endpoint-id",
        other.as_str(),
        "--idle-ms",
        "500",
    ])
    .ok();
    let lines = json_lines(&theirs);
    assert_eq!(lines.len(), 1, "{}", theirs.stdout);
    assert_eq!(lines[0]["task_id"], "o1");
    assert_eq!(lines[0]["output"], "theirs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_max_stops_early_and_keeps_the_rest() {
    let _serial = RESULTS_LOCK.lock().await;
    let ep = unique_ep();
    provision(&ep, &[]);
    let conn = amqp().await;
    for id in ["m1", "m2", "m3"] {
        publish(
            &conn,
            RESULTS_EXCHANGE,
            &ep.results_routing_key(),
            id.as_bytes(),
            result_props(id, &ep, "ok", Some(0)),
        )
        .await;
    }
    let two = cli(&[
        "results",
        "--endpoint-id",
        ep.as_str(),
        "--max",
        "2",
        "--idle-ms",
        "5000",
    ])
    .ok();
    let ids: Vec<String> = json_lines(&two)
        .iter()
        .map(|v| v["task_id"].to_string())
        .collect();
    assert_eq!(ids, ["\"m1\"", "\"m2\""]);
    let rest = cli(&["results", "--endpoint-id", ep.as_str(), "--idle-ms", "500"]).ok();
    let lines = json_lines(&rest);
    assert_eq!(lines.len(), 1, "{}", rest.stdout);
    assert_eq!(lines[0]["task_id"], "m3");
}

// ---------------------------------------------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------------------------------------------

fn heartbeat(ep: &EndpointId, state: AgentState, time_ms: u64, seq: u64) -> Heartbeat {
    Heartbeat {
        protocol_version: PROTOCOL_VERSION,
        endpoint_id: ep.clone(),
        state,
        tasks_queued: 0,
        tasks_running: 0,
        results_pending: 0,
        seq,
        time_ms,
        heartbeat_secs: 5,
        agent_version: "test".into(),
        workers: Default::default(),
        host: "test-host".into(),
        pid: 4242,
        instance: "test-instance".into(),
        role: endpoint_wire::Role::Active,
        node: "127.0.0.1:5672".into(),
    }
}

async fn beat(conn: &Connection, hb: &Heartbeat) {
    let body = serde_json::to_vec(hb).expect("heartbeat JSON");
    publish(
        conn,
        "",
        &hb.endpoint_id.heartbeat_queue(),
        &body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await;
}

fn status_json(ep: &EndpointId) -> serde_json::Value {
    let out = cli(&["status", "--endpoint-id", ep.as_str(), "--json"]).ok();
    serde_json::from_str(out.stdout.trim()).expect("status --json prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_never_seen_running_stale_and_stopped() {
    let ep = unique_ep();
    provision(&ep, &["--heartbeat", "5"]);
    cli(&[
        "submit",
        "--endpoint-id",
        ep.as_str(),
        "--function",
        "f",
        "--payload",
        "x",
        "--count",
        "2",
    ])
    .ok();

    let text = cli(&["status", "--endpoint-id", ep.as_str()]).ok().stdout;
    assert!(text.contains("verdict         never seen"), "{text}");
    assert!(text.contains("tasks queued    2"), "{text}");
    assert!(text.contains("consumer        no"), "{text}");
    assert!(text.contains("every 5s"), "{text}");

    let conn = amqp().await;
    beat(&conn, &heartbeat(&ep, AgentState::Running, now_ms(), 1)).await;
    let s = status_json(&ep);
    assert_eq!(s["liveness"]["kind"], "running", "{s}");
    assert_eq!(s["liveness"]["state"], "running", "{s}");
    assert_eq!(s["last_heartbeat"]["seq"], 1);
    assert_eq!(s["queue_depth"], 2);
    assert_eq!(s["heartbeat_secs"], 5);
    // Reading is non-destructive: the heartbeat is still there.
    assert_eq!(depth(&conn, &ep.heartbeat_queue()).await, Some(1));

    let old = now_ms() - 60_000;
    beat(&conn, &heartbeat(&ep, AgentState::Running, old, 2)).await;
    let s = status_json(&ep);
    assert_eq!(s["liveness"]["kind"], "not_running", "{s}");
    assert_eq!(s["liveness"]["clean_stop"], false);
    assert_eq!(s["liveness"]["since_ms"], old);
    let text = cli(&["status", "--endpoint-id", ep.as_str()]).ok().stdout;
    assert!(text.contains("not running since "), "{text}");
    assert!(text.contains("(no heartbeat for 6"), "{text}");

    beat(&conn, &heartbeat(&ep, AgentState::Stopped, now_ms(), 3)).await;
    let s = status_json(&ep);
    assert_eq!(s["liveness"]["kind"], "not_running", "{s}");
    assert_eq!(s["liveness"]["clean_stop"], true);
    let text = cli(&["status", "--endpoint-id", ep.as_str()]).ok().stdout;
    assert!(text.contains("(stopped cleanly)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_judges_by_the_sequence_and_standby_beats_stay_apart() {
    let ep = unique_ep();
    provision(&ep, &["--heartbeat", "1"]);
    let conn = amqp().await;
    // The agent's clock is a minute behind: by age it looks dead, by its moving sequence it is alive.
    let skewed = || now_ms() - 60_000;
    let mut hb = heartbeat(&ep, AgentState::Running, skewed(), 1);
    hb.heartbeat_secs = 1;
    beat(&conn, &hb).await;
    assert_eq!(status_json(&ep)["liveness"]["kind"], "not_running");
    let later = {
        let ep = ep.clone();
        let mut hb = hb.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(700)).await;
            hb.seq = 2;
            hb.time_ms = now_ms() - 60_000;
            let conn = amqp().await;
            beat(&conn, &hb).await;
            let _ = ep;
        })
    };
    let out = cli(&["status", "--endpoint-id", ep.as_str(), "--watch", "--json"]).ok();
    later.await.expect("second beat");
    let s: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    assert_eq!(s["liveness"]["kind"], "running", "{s}");
    assert_eq!(s["judged_by"]["kind"], "sequence", "{s}");
    assert_eq!(s["judged_by"]["moved"], true, "{s}");
    // No new beat within 2.5 intervals: not running, whatever the clock.
    hb.time_ms = now_ms() + 3_600_000;
    hb.seq = 3;
    beat(&conn, &hb).await;
    let text = cli(&["status", "--endpoint-id", ep.as_str(), "--watch"])
        .ok()
        .stdout;
    assert!(text.contains("no new heartbeat in 2"), "{text}");
    assert!(
        text.contains("judged by       the heartbeat sequence"),
        "{text}"
    );
    // A standby's beat goes to its own queue and is shown apart; the active one stands.
    let mut standby = heartbeat(&ep, AgentState::Standby, now_ms(), 9);
    standby.role = endpoint_wire::Role::Standby;
    standby.instance = "the-standby".into();
    let body = serde_json::to_vec(&standby).expect("JSON");
    publish(
        &conn,
        "",
        &ep.standby_heartbeat_queue(),
        &body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await;
    let s = status_json(&ep);
    assert_eq!(s["last_heartbeat"]["seq"], 3, "{s}");
    assert_eq!(s["standby_heartbeat"]["instance"], "the-standby", "{s}");
    let text = cli(&["status", "--endpoint-id", ep.as_str()]).ok().stdout;
    assert!(text.contains("standby         "), "{text}");
    assert!(
        text.contains("on test-host pid 4242 (instance test-instance)"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// deprovision
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deprovision_refuses_queued_tasks_unless_forced() {
    let ep = unique_ep();
    provision(&ep, &[]);
    cli(&[
        "submit",
        "--endpoint-id",
        ep.as_str(),
        "--function",
        "f",
        "--payload",
        "x",
        "--count",
        "3",
    ])
    .ok();

    let refused = cli(&["deprovision", "--endpoint-id", ep.as_str()]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(refused.stderr.contains("3 task(s)"), "{}", refused.stderr);
    assert!(refused.stderr.contains("--force"), "{}", refused.stderr);
    let conn = amqp().await;
    assert_eq!(
        depth(&conn, &ep.tasks_queue()).await,
        Some(3),
        "nothing was deleted"
    );
    assert!(
        depth(&conn, &ep.registration_queue()).await.is_some(),
        "nothing was deleted"
    );

    let forced = cli(&["deprovision", "--endpoint-id", ep.as_str(), "--force"]).ok();
    assert!(
        forced.stdout.contains("3 queued task(s) dropped"),
        "{}",
        forced.stdout
    );
    for queue in [
        ep.tasks_queue(),
        ep.registration_queue(),
        ep.heartbeat_queue(),
    ] {
        assert_eq!(depth(&conn, &queue).await, None, "{queue} is gone");
    }
    assert!(
        depth(&conn, RESULTS_QUEUE).await.is_some(),
        "the shared results queue stays"
    );

    let status = cli(&["status", "--endpoint-id", ep.as_str()]);
    assert_eq!(status.code, 3, "{}", status.stderr);
    assert!(
        status.stdout.contains("provisioned     no"),
        "{}",
        status.stdout
    );
    assert!(
        status
            .stderr
            .contains(&format!("service-setup provision --endpoint-id {ep}"))
    );

    // Idempotent, and an empty endpoint needs no --force.
    cli(&["deprovision", "--endpoint-id", ep.as_str()]).ok();
    provision(&ep, &[]);
    cli(&["deprovision", "--endpoint-id", ep.as_str()]).ok();
}

// ---------------------------------------------------------------------------------------------------------------
// usage and connection errors
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn an_endpoint_id_with_a_dot_is_a_usage_error() {
    let out = cli(&["provision", "--endpoint-id", "a.b"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--endpoint-id"), "{}", out.stderr);
    assert!(out.stderr.contains("'.'"), "{}", out.stderr);
}

#[test]
fn an_unreachable_broker_exits_69_without_printing_the_password() {
    let out = Command::new(BIN)
        .args([
            "--broker-url",
            "amqp://guest:s3cret@127.0.0.1:1/%2f",
            "status",
            "--endpoint-id",
            "x",
        ])
        .output()
        .expect("service-setup runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("rabbitmq-server -detached"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[test]
fn help_documents_every_command() {
    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("service-setup runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for word in [
        "provision",
        "deprovision",
        "submit",
        "results",
        "status",
        "Examples:",
        "Exit codes:",
    ] {
        assert!(help.contains(word), "--help lacks {word}:\n{help}");
    }
}

/// `rabbitmqctl`, or the command in RABBITMQCTL (e.g. `docker compose exec -T rabbitmq rabbitmqctl` when the
/// broker runs in the repository's docker-compose.yml).
fn rabbitmqctl_command() -> Command {
    let line = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = line.split_whitespace();
    let mut cmd = Command::new(words.next().unwrap_or("rabbitmqctl"));
    cmd.args(words);
    cmd
}
