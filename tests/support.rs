//! Test support for the end-to-end scenarios in `main.rs`: a broker vhost per test run, unique endpoints,
//! the real `endpoint-agent` binary as a child process (SIGTERM, SIGKILL, restart on the same data dir), a
//! service-side client that provisions, submits and collects results, and a TCP proxy that cuts or
//! blackholes the agent's connections. Talks to a real RabbitMQ; never mocks it.

pub mod proxy;

use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use service_setup::{ResultRecord, Submitter, TaskSpec};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use endpoint_agent::wire::{self, EndpointId};
use futures_lite::StreamExt;

/// Host and port of the broker under test, from AMQP_URL (default 127.0.0.1:5672).
fn broker_host() -> (String, String) {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let rest = url
        .split("://")
        .nth(1)
        .unwrap_or("127.0.0.1:5672/")
        .to_owned();
    let rest = rest.rsplit('@').next().unwrap_or(&rest).to_owned();
    let hostport = rest
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:5672")
        .to_owned();
    let userinfo = url
        .split("://")
        .nth(1)
        .and_then(|r| r.split_once('@').map(|(u, _)| u.to_owned()))
        .unwrap_or_else(|| "guest:guest".into());
    (hostport, userinfo)
}

/// The broker address (host:port) the proxy forwards to.
pub fn broker_addr() -> String {
    broker_host().0
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = rabbitmqctl_command()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl {args:?}: {e}; the tests need RabbitMQ's rabbitmqctl on PATH"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A vhost of its own for this test process, so the shared `results` queue holds only this run's results
/// and is gone with the vhost. Vhosts of earlier runs whose process has exited are deleted first.
fn vhost() -> &'static str {
    static VHOST: OnceLock<String> = OnceLock::new();
    VHOST.get_or_init(|| {
        let addr = broker_addr();
        if std::net::TcpStream::connect_timeout(
            &addr.parse().unwrap_or_else(|_| "127.0.0.1:5672".parse().expect("literal address")),
            Duration::from_secs(3),
        )
        .is_err()
        {
            panic!(
                "RabbitMQ is not reachable at {addr}: start it with `rabbitmq-server -detached` (or `docker compose up -d`), or set AMQP_URL"
            );
        }
        for line in rabbitmqctl(&["list_vhosts", "--quiet", "--no-table-headers"]).lines() {
            let name = line.trim();
            if let Some(pid) = name.strip_prefix("ea-test-")
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                rabbitmqctl(&["delete_vhost", name]);
            }
        }
        let name = format!("ea-test-{}", std::process::id());
        rabbitmqctl(&["add_vhost", &name]);
        let user = broker_host().1.split(':').next().unwrap_or("guest").to_owned();
        rabbitmqctl(&["set_permissions", "-p", &name, &user, ".*", ".*", ".*"]);
        name
    })
}

/// A broker user of this run with a generated password, for checking that passwords stay out of logs.
/// Returns (user, password); users of earlier runs whose process has exited are deleted first.
pub fn secret_user() -> &'static (String, String) {
    static USER: OnceLock<(String, String)> = OnceLock::new();
    USER.get_or_init(|| {
        let vhost = vhost();
        for line in rabbitmqctl(&["list_users", "--quiet", "--no-table-headers"]).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if let Some(pid) = name.strip_prefix("ea-test-")
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                rabbitmqctl(&["delete_user", name]);
            }
        }
        let user = format!("ea-test-{}", std::process::id());
        let password = format!(
            "pw{:x}{:x}",
            wire::now_ms(),
            std::process::id() as u64 * 7919
        );
        rabbitmqctl(&["add_user", &user, &password]);
        rabbitmqctl(&["set_permissions", "-p", vhost, &user, ".*", ".*", ".*"]);
        (user, password)
    })
}

/// AMQP URL of this run's vhost, optionally through another host:port (a proxy).
pub fn url_via(hostport: &str) -> String {
    let (_, userinfo) = broker_host();
    format!("amqp://{userinfo}@{hostport}/{}", vhost())
}

pub fn url() -> String {
    url_via(&broker_addr())
}

/// A fresh endpoint id for one test.
pub fn unique_endpoint(name: &str) -> EndpointId {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    EndpointId::new(format!("{name}-{}-{n}", std::process::id()))
        .expect("test endpoint ids are valid")
}

/// A scratch directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "ea-it-{name}-{}-{}",
            std::process::id(),
            wire::now_ms()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Path of the `endpoint-agent` binary, built once per run by cargo (a no-op when it is fresh).
pub fn agent_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "endpoint-agent",
                "--bin",
                "endpoint-agent",
                "--manifest-path",
            ])
            .arg(&manifest)
            .status()
            .expect("cannot run cargo to build endpoint-agent");
        assert!(status.success(), "building endpoint-agent failed");
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/scenarios-<hash> -> target/<profile>/endpoint-agent
        let dir = exe.parent().and_then(Path::parent).expect("target dir");
        let bin = dir.join("endpoint-agent");
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
    .clone()
}

/// Options for one agent process.
#[derive(Clone)]
pub struct AgentOptions {
    pub endpoint: EndpointId,
    pub data_dir: PathBuf,
    pub broker_url: String,
    pub workers: usize,
    /// TOML config file contents (functions, limits).
    pub config: String,
}

impl AgentOptions {
    pub fn new(endpoint: &EndpointId, data_dir: &Path) -> AgentOptions {
        AgentOptions {
            endpoint: endpoint.clone(),
            data_dir: data_dir.to_owned(),
            broker_url: url(),
            workers: 4,
            config: "reconnect_min_ms = 100\nreconnect_max_ms = 1000\ngrace_period_secs = 10\n"
                .into(),
        }
    }
}

/// A running `endpoint-agent start` process. Killed (SIGKILL) when dropped.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(o: &AgentOptions) -> Agent {
        std::fs::create_dir_all(&o.data_dir).expect("data dir");
        let config = o.data_dir.with_extension("toml");
        std::fs::write(&config, &o.config).expect("config file");
        static N: AtomicU32 = AtomicU32::new(0);
        let log = o
            .data_dir
            .with_extension(format!("log.{}", N.fetch_add(1, Ordering::Relaxed)));
        let child = Command::new(agent_binary())
            .args([
                "start",
                "--endpoint-id",
                o.endpoint.as_str(),
                "--workers",
                &o.workers.to_string(),
            ])
            .arg("--data-dir")
            .arg(&o.data_dir)
            .arg("--config")
            .arg(&config)
            .env("AMQP_URL", &o.broker_url)
            .env("RUST_LOG", "endpoint_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("cannot start endpoint-agent");
        Agent { child, log }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits")
    }

    #[allow(unsafe_code)]
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill takes plain integers; the pid is our own child, not yet reaped.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for exit up to `limit`; returns the exit code.
    pub fn terminate(mut self, limit: Duration) -> Option<i32> {
        self.signal(libc::SIGTERM);
        self.wait_exit(limit)
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!(
                    "agent did not exit within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The service side of one test: provisions the endpoint, submits tasks and collects its results from a
/// queue of its own bound to the `results` exchange with `<EP>.results` (declared before any submission).
pub struct Service {
    pub conn: Connection,
    pub endpoint: EndpointId,
    submitter: Submitter,
    results: lapin::Consumer,
    _channel: Channel,
    /// Every result received, by task id, in arrival order.
    pub received: BTreeMap<String, Vec<ResultRecord>>,
}

impl Service {
    pub async fn provision(endpoint: &EndpointId, heartbeat_secs: u16) -> Service {
        let conn = endpoint_agent::connection::connect(
            &endpoint_agent::connection::BrokerUrl::new(url()).expect("test url"),
            "test service",
        )
        .await
        .expect("test service connects");
        service_setup::provision(&conn, endpoint, heartbeat_secs)
            .await
            .expect("provision");
        let channel = conn.create_channel().await.expect("channel");
        let queue = format!("test-results-{endpoint}");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare result queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                wire::RESULTS_EXCHANGE.into(),
                endpoint.results_routing_key().as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind result queue");
        let results = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume results");
        let submitter = Submitter::new(&conn).await.expect("submitter");
        Service {
            conn,
            endpoint: endpoint.clone(),
            submitter,
            results,
            _channel: channel,
            received: BTreeMap::new(),
        }
    }

    pub async fn submit(&self, tasks: Vec<TaskSpec>) -> Vec<String> {
        let mut ids = Vec::new();
        for chunk in tasks.chunks(500) {
            ids.extend(
                self.submitter
                    .submit(&self.endpoint, chunk.to_vec())
                    .await
                    .expect("submit"),
            );
        }
        ids
    }

    /// Waits until every id in `ids` has at least one result, or panics after `limit` naming what is missing.
    pub async fn await_results(&mut self, ids: &[String], limit: Duration, agent_logs: &[&Agent]) {
        let deadline = Instant::now() + limit;
        let want: BTreeSet<&String> = ids.iter().collect();
        loop {
            let missing = want
                .iter()
                .filter(|id| !self.received.contains_key(**id))
                .count();
            if missing == 0 {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let logs: String = agent_logs
                    .iter()
                    .map(|a| a.log_text())
                    .collect::<Vec<_>>()
                    .join("\n----\n");
                let tail: String = logs
                    .lines()
                    .rev()
                    .take(60)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!(
                    "{missing} of {} tasks have no result after {limit:?}; agent log tail:\n{tail}",
                    want.len()
                );
            }
            self.poll(left.min(Duration::from_millis(500))).await;
        }
    }

    /// Receives whatever results arrive within `wait`.
    pub async fn poll(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while let Ok(Some(Ok(d))) = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            self.results.next(),
        )
        .await
        {
            let r = ResultRecord::from_delivery(&d);
            d.ack(BasicAckOptions::default()).await.expect("ack result");
            self.received.entry(r.task_id.clone()).or_default().push(r);
        }
    }

    /// The first result of `id`.
    pub fn result(&self, id: &str) -> &ResultRecord {
        self.received
            .get(id)
            .and_then(|v| v.first())
            .unwrap_or_else(|| panic!("no result for {id}"))
    }
}

pub fn echo(payload: &str) -> TaskSpec {
    task("echo", payload.as_bytes())
}

pub fn task(function: &str, payload: &[u8]) -> TaskSpec {
    TaskSpec {
        task_id: None,
        function: function.into(),
        payload: payload.to_vec(),
        timeout_ms: None,
    }
}

/// Waits (up to 5 s) until the agent on `data_dir` reports `n` tasks running.
pub async fn wait_running(data_dir: &Path, n: u64) {
    for _ in 0..100 {
        if local_status(data_dir)["tasks_running"] == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `endpoint-agent status --data-dir DIR --json` and parses it.
pub fn local_status(data_dir: &Path) -> serde_json::Value {
    // A freshly started agent may not have created its database yet.
    for _ in 0..200 {
        if data_dir.join(endpoint_agent::store::DB_FILE).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new(agent_binary())
        .args(["status", "--json", "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("run endpoint-agent status");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status prints JSON")
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
