//! The scenario harness of the end-to-end tests (`tests/`): a broker vhost per test run, unique endpoints,
//! the real `endpoint-agent` binary as a child process (SIGTERM, SIGKILL, restart on the same data dir), a
//! service-side client that provisions, submits and collects results (and reconnects after a broker restart),
//! and the fault harness: a TCP proxy that cuts or blackholes the agent's connections (`proxy`), a broker
//! restart and a memory alarm (`rabbitmqctl`, under a broker-wide lock so they never hit a parallel test),
//! forced closes of the agent's connections, and a tiny tmpfs data dir with a ballast file for a full disk.
//! Talks to a real RabbitMQ; never mocks it. Every fault is undone by a Drop guard, also when a test panics.

use crate::broker::{self, BrokerAddr, Vhost, rabbitmqctl_command};
use crate::build::{self, Profile};
use endpoint_wire::{self as wire, EndpointId};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use service_setup::{ResultRecord, Submitter, TaskSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// This run's broker vhost (`ea-test-<pid>`), created at first use.
/// The name of this run's vhost (for `rabbitmqctl -p`).
pub fn vhost_name() -> String {
    vhost().name.clone()
}

fn vhost() -> &'static Vhost {
    static VHOST: OnceLock<Vhost> = OnceLock::new();
    VHOST.get_or_init(|| {
        let addr = BrokerAddr::from_env().unwrap_or_else(|e| panic!("{e:#}"));
        let vhost = Vhost::create("ea-test", addr).unwrap_or_else(|e| panic!("{e:#}"));
        delete_leftover_endpoint_users();
        vhost
    })
}

/// Deletes the broker users `endpoint-<name>-<pid>-<n>` of test endpoints whose test process is gone (a failed
/// run leaves them; vhosts go with their own clean-up, users do not).
fn delete_leftover_endpoint_users() {
    let Ok(listed) = broker::rabbitmqctl(&["list_users", "--quiet", "--no-table-headers"]) else {
        return;
    };
    for name in listed.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix("endpoint-") else {
            continue;
        };
        let pid = rest
            .rsplit('-')
            .nth(1)
            .filter(|p| p.chars().all(|c| c.is_ascii_digit()));
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = broker::rabbitmqctl(&["delete_user", name]);
        }
    }
}

/// The broker address (host:port) the proxy forwards to.
pub fn broker_addr() -> String {
    vhost().addr.hostport.clone()
}

fn rabbitmqctl(args: &[&str]) -> String {
    broker::rabbitmqctl(args)
        .unwrap_or_else(|e| panic!("{e:#}; the tests need RabbitMQ's rabbitmqctl"))
}

/// A broker user of this run with a generated password, for checking that passwords stay out of logs.
/// Returns (user, password); users of earlier runs whose process has exited are deleted first.
pub fn secret_user() -> &'static (String, String) {
    static USER: OnceLock<(String, String)> = OnceLock::new();
    USER.get_or_init(|| {
        let vhost = &vhost().name;
        broker::delete_leftover_users("ea-test").unwrap_or_else(|e| panic!("{e:#}"));
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
    vhost().url_via(hostport)
}

pub fn url() -> String {
    vhost().url()
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

/// Path of the `endpoint-agent` binary in the profile of this test run, built once per run by cargo (a no-op
/// when it is fresh).
pub fn agent_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        build::agent_binary(Profile::of_current_exe()).unwrap_or_else(|e| panic!("{e:#}"))
    })
    .clone()
}

/// Path of the `service-setup` binary in the profile of this test run, built once per run.
pub fn service_setup_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        build::binary("service-setup", "service-setup", Profile::of_current_exe())
            .unwrap_or_else(|e| panic!("{e:#}"))
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
    /// Extra environment variables of the agent process.
    pub env: Vec<(String, String)>,
    /// Extra arguments of `endpoint-agent start`.
    pub args: Vec<String>,
    /// Leave `AMQP_URL` unset (the URL comes from `args`, e.g. `--broker-url-file`).
    pub no_url_env: bool,
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
            env: Vec::new(),
            args: Vec::new(),
            no_url_env: false,
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
        let mut cmd = Command::new(agent_binary());
        cmd.args([
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
        .args(&o.args)
        .env_remove("AMQP_URL")
        .env_remove("AMQP_URL_FILE")
        .env("RUST_LOG", "endpoint_agent=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
        if !o.no_url_env {
            cmd.env("AMQP_URL", &o.broker_url);
        }
        let child = cmd
            .envs(o.env.iter().map(|(k, v)| (k, v)))
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

    /// The process's peak resident set (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the agent's /proc status");
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kib / 1024.0
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

/// Broker-wide faults (a broker restart, a resource alarm) hit every test of this binary at once, and cargo runs
/// tests on parallel threads. Ordinary scenarios hold this lock shared for their whole life (inside [`Service`]);
/// a scenario that stops the broker or raises an alarm holds it exclusively. A tokio lock in a static works
/// across the per-test runtimes.
static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A test's hold on the broker: shared (ordinary scenario) or exclusive (broker-global faults allowed).
pub enum BrokerLock {
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    Exclusive(tokio::sync::RwLockWriteGuard<'static, ()>),
    /// The scenario runs on the cluster, not on the single node.
    Elsewhere,
}

impl BrokerLock {
    pub async fn shared() -> BrokerLock {
        BrokerLock::Shared(BROKER.read().await)
    }

    pub async fn exclusive() -> BrokerLock {
        BrokerLock::Exclusive(BROKER.write().await)
    }

    /// Not the single node at all (a scenario on the cluster, `crate::cluster`).
    pub fn elsewhere() -> BrokerLock {
        BrokerLock::Elsewhere
    }

    fn assert_exclusive(&self, what: &str) {
        assert!(
            matches!(self, BrokerLock::Exclusive(_)),
            "{what} affects every test on the broker: provision with Service::provision_exclusive"
        );
    }
}

/// The service side of one test: provisions the endpoint, submits tasks and collects its results from a durable
/// queue of its own bound to the `results` exchange with `<EP>.results` (declared before any submission). The
/// connection is reopened after a broker restart or a forced close; the queue keeps what arrived meanwhile.
pub struct Service {
    pub conn: Connection,
    pub endpoint: EndpointId,
    submitter: Submitter,
    results: lapin::Consumer,
    _channel: Channel,
    /// Every result received, by task id, in arrival order.
    pub received: BTreeMap<String, Vec<ResultRecord>>,
    /// Results the broker delivered to this service again because its ack was lost with its connection (they
    /// are also in `received`): consumer-side duplicates, not the agent's.
    pub redelivered_to_service: u64,
    /// How often the service side reconnected.
    pub reconnects: u64,
    broker: BrokerLock,
    /// The broker URLs (one per node of a cluster) and the next one to try on a reconnect.
    urls: Vec<String>,
    next_url: usize,
    /// The type of the service's results queue (quorum on a cluster, so a node's loss loses no result).
    results_type: wire::QueueType,
}

/// Opens the service's connection, submitter and results consumer (declaring and binding its queue).
async fn open_service(
    endpoint: &EndpointId,
    url: &str,
    results_type: wire::QueueType,
) -> Result<(Connection, Submitter, Channel, lapin::Consumer), String> {
    let url = endpoint_wire::BrokerUrl::new(url).map_err(|e| e.to_string())?;
    let conn = endpoint_wire::amqp::connect(&url, "test service")
        .await
        .map_err(|e| e.to_string())?;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    let queue = format!("test-results-{endpoint}");
    let mut args = FieldTable::default();
    if results_type == wire::QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
    }
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .map_err(|e| format!("declare result queue: {e}"))?;
    channel
        .queue_bind(
            queue.as_str().into(),
            wire::RESULTS_EXCHANGE.into(),
            endpoint.results_routing_key().as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("bind result queue: {e}"))?;
    channel
        .basic_qos(1000, BasicQosOptions::default())
        .await
        .map_err(|e| format!("qos: {e}"))?;
    let results = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("consume results: {e}"))?;
    let submitter = Submitter::new(&conn)
        .await
        .map_err(|e| format!("submitter: {e}"))?;
    Ok((conn, submitter, channel, results))
}

impl Service {
    /// Provisions `endpoint` for an ordinary scenario (broker lock shared).
    pub async fn provision(endpoint: &EndpointId, heartbeat_secs: u16) -> Service {
        let lock = BrokerLock::shared().await;
        Service::provision_with(endpoint, heartbeat_secs, lock, vec![url()], None).await
    }

    /// Provisions `endpoint` with queues of `queue_type` on the single node (broker lock shared).
    pub async fn provision_typed(
        endpoint: &EndpointId,
        heartbeat_secs: u16,
        queue_type: wire::QueueType,
    ) -> Service {
        let lock = BrokerLock::shared().await;
        Service::provision_with(
            endpoint,
            heartbeat_secs,
            lock,
            vec![url()],
            Some(queue_type),
        )
        .await
    }

    /// Provisions `endpoint` with queues of `queue_type` through the first of `urls` (a cluster's nodes); the
    /// service's own results queue is a quorum queue and a lost connection moves on to the next URL.
    pub async fn provision_on(
        urls: Vec<String>,
        endpoint: &EndpointId,
        heartbeat_secs: u16,
        queue_type: wire::QueueType,
    ) -> Service {
        let lock = BrokerLock::elsewhere();
        Service::provision_with(endpoint, heartbeat_secs, lock, urls, Some(queue_type)).await
    }

    /// Provisions `endpoint` for a scenario that restarts the broker or raises an alarm: waits until no other
    /// scenario uses the broker and keeps it to itself.
    pub async fn provision_exclusive(endpoint: &EndpointId, heartbeat_secs: u16) -> Service {
        let lock = BrokerLock::exclusive().await;
        Service::provision_with(endpoint, heartbeat_secs, lock, vec![url()], None).await
    }

    async fn provision_with(
        endpoint: &EndpointId,
        heartbeat_secs: u16,
        broker: BrokerLock,
        urls: Vec<String>,
        queue_type: Option<wire::QueueType>,
    ) -> Service {
        let conn = endpoint_wire::amqp::connect(
            &endpoint_wire::BrokerUrl::new(urls[0].as_str()).expect("test url"),
            "test service provisioning",
        )
        .await
        .expect("test service connects");
        match queue_type {
            None => service_setup::provision(&conn, endpoint, heartbeat_secs).await,
            Some(t) => {
                service_setup::provision_typed(&conn, endpoint, heartbeat_secs, None, Some(t)).await
            }
        }
        .expect("provision");
        let _ = conn.close(200, "provisioned".into()).await;
        // The service's results queue is replicated where the cluster's nodes are given.
        let results_type = if urls.len() > 1 {
            wire::QueueType::Quorum
        } else {
            wire::QueueType::Classic
        };
        let (conn, submitter, channel, results) = open_service(endpoint, &urls[0], results_type)
            .await
            .unwrap_or_else(|e| panic!("test service cannot open its connection: {e}"));
        Service {
            conn,
            endpoint: endpoint.clone(),
            submitter,
            results,
            _channel: channel,
            received: BTreeMap::new(),
            redelivered_to_service: 0,
            reconnects: 0,
            broker,
            urls,
            next_url: 0,
            results_type,
        }
    }

    /// Reopens the connection, retrying for up to two minutes (a broker restart takes a few seconds).
    async fn reconnect(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.next_url += 1;
            let url = &self.urls[self.next_url % self.urls.len()];
            match open_service(&self.endpoint, url, self.results_type).await {
                Ok((conn, submitter, channel, results)) => {
                    let old = std::mem::replace(&mut self.conn, conn);
                    let _ = tokio::time::timeout(Duration::from_secs(2), old.close(200, "".into()))
                        .await;
                    self.submitter = submitter;
                    self._channel = channel;
                    self.results = results;
                    self.reconnects += 1;
                    return;
                }
                Err(e) if Instant::now() > deadline => {
                    panic!("the test service cannot reconnect to the broker: {e}")
                }
                Err(_) => {}
            }
        }
    }

    /// Submits `tasks` (ids are assigned here when absent, so a retry after a lost connection republishes the
    /// same ids: the agent answers a task id once) and returns their ids.
    pub async fn submit(&mut self, tasks: Vec<TaskSpec>) -> Vec<String> {
        let mut tasks = tasks;
        for t in &mut tasks {
            t.task_id.get_or_insert_with(service_setup::new_task_id);
        }
        let mut ids = Vec::new();
        for chunk in tasks.chunks(500) {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                match self.submitter.submit(&self.endpoint, chunk.to_vec()).await {
                    Ok(got) => {
                        ids.extend(got);
                        break;
                    }
                    Err(e)
                        if (e.is_transient() || !self.conn.status().connected())
                            && Instant::now() < deadline =>
                    {
                        self.reconnect().await;
                    }
                    Err(e) => panic!("submit: {e}"),
                }
            }
        }
        ids
    }

    /// Waits until every id in `ids` has at least one result, or panics after `limit` naming what is missing.
    pub async fn await_results(&mut self, ids: &[String], limit: Duration, agent_logs: &[&Agent]) {
        let deadline = Instant::now() + limit;
        loop {
            let missing = self.missing(ids);
            if missing == 0 {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "{missing} of {} tasks have no result after {limit:?}; agent log tail:\n{}",
                    ids.len(),
                    log_tail(agent_logs, 60)
                );
            }
            self.poll(left.min(Duration::from_millis(500))).await;
        }
    }

    /// How many of `ids` have no result yet.
    pub fn missing(&self, ids: &[String]) -> usize {
        ids.iter()
            .filter(|id| !self.received.contains_key(*id))
            .count()
    }

    /// Receives whatever results arrive within `wait`, reconnecting if the broker went away.
    pub async fn poll(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.results.next()).await {
                Err(_) => return,
                Ok(Some(Ok(d))) => {
                    let r = ResultRecord::from_delivery(&d);
                    if d.redelivered && self.received.contains_key(&r.task_id) {
                        self.redelivered_to_service += 1;
                    }
                    self.received.entry(r.task_id.clone()).or_default().push(r);
                    if d.ack(BasicAckOptions::default()).await.is_err() {
                        self.reconnect().await;
                    }
                }
                Ok(Some(Err(_)) | None) => self.reconnect().await,
            }
            if left.is_zero() {
                return;
            }
        }
    }

    /// The first result of `id`.
    pub fn result(&self, id: &str) -> &ResultRecord {
        self.received
            .get(id)
            .and_then(|v| v.first())
            .unwrap_or_else(|| panic!("no result for {id}"))
    }

    /// Results received beyond the first per task id (at-least-once duplicates).
    pub fn duplicates(&self) -> usize {
        self.received.values().map(|v| v.len() - 1).sum()
    }

    /// Every duplicate must be the same result: same task id, status, attempts and body (both copies come from
    /// one stored row). Panics naming the first task whose copies differ.
    pub fn assert_duplicates_identical(&self) {
        for (id, copies) in &self.received {
            for c in copies {
                assert_eq!(&c.task_id, id, "a result keyed {id} carries another id");
                assert_eq!(
                    (&c.status, c.attempts, &c.body),
                    (&copies[0].status, copies[0].attempts, &copies[0].body),
                    "two different results for task {id}"
                );
            }
        }
    }

    /// Every id in `ids` has an `ok` result, no result came for an id not in `ids`, and duplicates are identical.
    pub fn assert_all_ok(&self, ids: &[String]) {
        for id in ids {
            assert_eq!(self.result(id).status, "ok", "{id}");
        }
        assert_eq!(self.received.len(), ids.len(), "a result for an unknown id");
        self.assert_duplicates_identical();
    }

    /// The latest heartbeat's state as the service reads it (`running`, `disk_full`, ...), if any.
    pub async fn heartbeat_state(&self) -> Option<String> {
        let status = service_setup::endpoint_status(&self.conn, &self.endpoint)
            .await
            .ok()?;
        let beat = status.last_heartbeat?;
        serde_json::to_value(beat.state)
            .ok()?
            .as_str()
            .map(str::to_owned)
    }

    /// Stops the broker application (`rabbitmqctl stop_app`), waits `down`, starts it again and waits until AMQP
    /// answers. Needs [`Service::provision_exclusive`]. The broker is started again even if this panics.
    pub async fn restart_broker(&mut self, down: Duration) {
        self.broker.assert_exclusive("a broker restart");
        let stopped = BrokerStopped::stop().await;
        tokio::time::sleep(down).await;
        stopped.start().await;
    }

    /// Raises a memory alarm on the broker (high watermark 0): every connection that publishes is blocked until
    /// the returned guard is cleared or dropped. Needs [`Service::provision_exclusive`].
    pub async fn memory_alarm(&self) -> MemoryAlarm {
        self.broker.assert_exclusive("a resource alarm");
        MemoryAlarm::raise().await
    }
}

/// The last `n` lines of the agents' logs, for failure messages.
pub fn log_tail(agents: &[&Agent], n: usize) -> String {
    let logs: String = agents
        .iter()
        .map(|a| a.log_text())
        .collect::<Vec<_>>()
        .join("\n----\n");
    let lines: Vec<&str> = logs.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn rabbitmqctl_async(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rabbitmqctl(&args)
    })
    .await
    .expect("rabbitmqctl thread")
}

/// The broker application stopped; started again when dropped (also on panic).
struct BrokerStopped {
    started: bool,
}

impl BrokerStopped {
    async fn stop() -> BrokerStopped {
        vhost();
        rabbitmqctl_async(&["stop_app"]).await;
        BrokerStopped { started: false }
    }

    async fn start(mut self) {
        rabbitmqctl_async(&["start_app"]).await;
        self.started = true;
        wait_for_amqp().await;
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        if !self.started {
            let _ = rabbitmqctl_command().arg("start_app").status();
        }
    }
}

/// Waits until the broker accepts an AMQP connection on this run's vhost (up to two minutes).
async fn wait_for_amqp() {
    let url = endpoint_wire::BrokerUrl::new(url()).expect("test url");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match endpoint_wire::amqp::connect(&url, "test broker probe").await {
            Ok(conn) => {
                let _ = conn.close(200, "".into()).await;
                return;
            }
            Err(e) if Instant::now() > deadline => {
                panic!("the broker did not come back after start_app: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// A broker memory alarm: `set_vm_memory_high_watermark 0` blocks every publishing connection. The previous
/// watermark is restored by [`MemoryAlarm::clear`] or on drop (also on panic).
pub struct MemoryAlarm {
    previous: Vec<String>,
    cleared: bool,
}

impl MemoryAlarm {
    async fn raise() -> MemoryAlarm {
        let now =
            rabbitmqctl_async(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]).await;
        let previous = watermark_args(now.trim());
        let alarm = MemoryAlarm {
            previous,
            cleared: false,
        };
        rabbitmqctl_async(&["set_vm_memory_high_watermark", "0"]).await;
        for _ in 0..100 {
            if memory_alarm_on().await {
                return alarm;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the broker raised no memory alarm after set_vm_memory_high_watermark 0");
    }

    pub async fn clear(mut self) {
        let args: Vec<&str> = std::iter::once("set_vm_memory_high_watermark")
            .chain(self.previous.iter().map(String::as_str))
            .collect();
        rabbitmqctl_async(&args).await;
        self.cleared = true;
        for _ in 0..100 {
            if !memory_alarm_on().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the broker's memory alarm did not clear");
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        if !self.cleared {
            let _ = rabbitmqctl_command()
                .arg("set_vm_memory_high_watermark")
                .args(&self.previous)
                .status();
        }
    }
}

async fn memory_alarm_on() -> bool {
    rabbitmqctl_async(&["eval", "rabbit_alarm:get_alarms()."])
        .await
        .contains("memory")
}

/// `rabbitmqctl set_vm_memory_high_watermark` arguments restoring `current` (the output of
/// `vm_memory_monitor:get_vm_memory_high_watermark()`: `0.4` or `{absolute,N}`). A value near zero is what a
/// crashed earlier run left behind: the default 0.4 is restored instead.
fn watermark_args(current: &str) -> Vec<String> {
    if let Some(n) = current
        .strip_prefix("{absolute,")
        .and_then(|r| r.strip_suffix('}'))
    {
        return vec!["absolute".into(), n.trim().into()];
    }
    match current.parse::<f64>() {
        Ok(f) if f >= 0.05 => vec![current.to_owned()],
        _ => vec!["0.4".into()],
    }
}

/// Closes (`rabbitmqctl close_connection`) the agent connections of `ep` whose name ends with `kind`
/// (`subscriber`, `publisher`, `registration`, or "" for all). Returns how many were closed.
pub async fn close_agent_connections(ep: &EndpointId, kind: &str) -> usize {
    // Tab-separated rows: `<rabbit@host.N.M.0>\t[..., {"connection_name","endpoint-agent EP subscriber"}, ...]`.
    let listing = rabbitmqctl_async(&[
        "list_connections",
        "--quiet",
        "--no-table-headers",
        "pid",
        "client_properties",
    ])
    .await;
    let wanted = format!("{{\"connection_name\",\"endpoint-agent {ep} {kind}");
    let mut closed = 0;
    for line in listing.lines() {
        let Some((pid, props)) = line.split_once('\t') else {
            continue;
        };
        if !props.contains(&wanted) {
            continue;
        }
        let out = rabbitmqctl_command()
            .args(["close_connection", pid.trim(), "test: forced close"])
            .output();
        if out.is_ok_and(|o| o.status.success()) {
            closed += 1;
        }
    }
    closed
}

/// The peer ports, as the broker sees them, of every connection of `ep`'s agent (named `endpoint-agent <ep> ...`).
pub async fn agent_connection_ports(ep: &EndpointId) -> Vec<u16> {
    let listing = rabbitmqctl_async(&[
        "list_connections",
        "--quiet",
        "--no-table-headers",
        "peer_port",
        "client_properties",
    ])
    .await;
    let wanted = format!("{{\"connection_name\",\"endpoint-agent {ep} ");
    listing
        .lines()
        .filter(|line| line.contains(&wanted))
        .filter_map(|line| line.split('\t').next()?.trim().parse().ok())
        .collect()
}

/// A tiny tmpfs mounted at a directory (the agent's data dir), with a ballast file that fills it to simulate
/// a full disk. Unmounted when dropped (the agent using it must be gone by then).
pub struct TinyFs {
    pub dir: PathBuf,
}

impl TinyFs {
    /// Mounts a tmpfs of `size_kib` at `dir` (created). Needs root.
    pub fn mount(dir: &Path, size_kib: u64) -> TinyFs {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("cannot run mount: the disk-full scenario needs `mount -t tmpfs` (root)");
        assert!(
            out.status.success(),
            "mount -t tmpfs failed (the disk-full scenario needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TinyFs {
            dir: dir.to_owned(),
        }
    }

    fn ballast_path(&self) -> PathBuf {
        self.dir.join("ballast")
    }

    /// Writes a ballast file until the filesystem has no room left; returns its size.
    pub fn fill(&self) -> u64 {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.ballast_path())
            .expect("ballast file");
        let mut written = 0u64;
        for chunk in [64 * 1024, 4096, 512, 1] {
            let buf = vec![0u8; chunk];
            while f.write_all(&buf).is_ok() {
                written += chunk as u64;
            }
        }
        let _ = f.sync_all();
        written
    }

    /// Deletes the ballast: space returns.
    pub fn free(&self) {
        let _ = std::fs::remove_file(self.ballast_path());
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        self.free();
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A small deterministic random number generator (SplitMix64), so a chaos run is repeatable from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo)
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
        reply_to: None,
    }
}

/// Polls `endpoint-agent status --json` of `data_dir` until `check` holds, up to `limit`; returns the last
/// status.
pub async fn wait_status(
    data_dir: &Path,
    limit: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = local_status(data_dir);
        if check(&s) || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (up to 5 s) until the agent on `data_dir` reports `n` tasks running.
pub async fn wait_running(data_dir: &Path, n: u64) {
    wait_status(data_dir, Duration::from_secs(5), |s| {
        s["tasks_running"] == n
    })
    .await;
}

/// Waits (up to `limit`) until the agent on `data_dir` says it is its tasks queue's active consumer (a quorum
/// queue's single active consumer: the broker delivered to it, a task or its probe); panics if it does not.
/// Returns how long that took.
pub async fn wait_active_consumer(data_dir: &Path, limit: Duration) -> Duration {
    let start = Instant::now();
    let active = |s: &serde_json::Value| {
        s["link"]
            .as_str()
            .is_some_and(|l| l.contains("the active consumer"))
    };
    let s = wait_status(data_dir, limit, active).await;
    assert!(active(&s), "not the active consumer after {limit:?}: {s}");
    start.elapsed()
}

/// The port of the broker node the agent on `data_dir` says it uses (`endpoint-agent status`'s `node`).
pub fn status_node_port(data_dir: &Path) -> Option<u16> {
    node_port(&local_status(data_dir))
}

/// The port of the broker node an `endpoint-agent status --json` names (its `node`).
pub fn node_port(status: &serde_json::Value) -> Option<u16> {
    let node = status["node"].as_str()?;
    let hostport = node.split('@').nth(1)?.split('/').next()?;
    hostport.rsplit(':').next()?.parse().ok()
}

/// A finished command's exit code, stdout and stderr, for assertion messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
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
