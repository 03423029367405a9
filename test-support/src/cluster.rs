//! The local 3-node RabbitMQ cluster of the cluster scenarios (`scripts/cluster`, nodes `ea-c1..3@localhost` on
//! AMQP ports 5681-5683, beside the single node the other scenarios use): brought up once per test process if
//! it is not up yet, a vhost per process on it, the nodes' URLs, the node that leads a quorum queue, and
//! stopping and starting a node's application (started again by a Drop guard, also when a test panics). One
//! cluster scenario at a time ([`Cluster::lock`]): they stop nodes. Talks to the real cluster; never mocks it.

use crate::broker::rabbitmqctl_command;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The nodes as `scripts/cluster` names them, with their AMQP ports.
const NODES: [(&str, u16); 3] = [
    ("ea-c1@localhost", 5681),
    ("ea-c2@localhost", 5682),
    ("ea-c3@localhost", 5683),
];

/// The cluster, with this process's vhost on it.
pub struct Cluster {
    pub vhost: String,
}

/// The cluster, brought up (`scripts/cluster up`, idempotent) at first use, with a fresh vhost of this process.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| Cluster::up().unwrap_or_else(|e| panic!("{e:#}")))
}

/// Runs `rabbitmqctl -n node args` and returns its standard output.
pub fn ctl(node: usize, args: &[&str]) -> Result<String> {
    let out = rabbitmqctl_command()
        .args(["-n", NODES[node].0])
        .args(args)
        .output()
        .with_context(|| format!("while running rabbitmqctl -n {} {args:?}", NODES[node].0))?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl -n {} {args:?} failed: {}",
            NODES[node].0,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Cluster {
    fn up() -> Result<Cluster> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster");
        let out = std::process::Command::new(&script)
            .arg("up")
            .output()
            .with_context(|| format!("while running {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "`scripts/cluster up` failed (the cluster scenarios need RabbitMQ's rabbitmq-server): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let prefix = "ea-cluster";
        let listed = ctl(0, &["list_vhosts", "--quiet", "--no-table-headers"])?;
        for name in listed.lines().map(str::trim) {
            if let Some(pid) = name.strip_prefix(&format!("{prefix}-"))
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                ctl(0, &["delete_vhost", name])?;
            }
        }
        let vhost = format!("{prefix}-{}", std::process::id());
        ctl(0, &["add_vhost", &vhost])?;
        ctl(
            0,
            &["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"],
        )?;
        Ok(Cluster { vhost })
    }

    /// One cluster scenario at a time: hold this for the whole scenario.
    pub async fn lock() -> tokio::sync::MutexGuard<'static, ()> {
        static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        LOCK.lock().await
    }

    pub fn len(&self) -> usize {
        NODES.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The node's name (`ea-c1@localhost`).
    pub fn name(&self, node: usize) -> &'static str {
        NODES[node].0
    }

    /// The node's AMQP port.
    pub fn port(&self, node: usize) -> u16 {
        NODES[node].1
    }

    /// The AMQP URL of this process's vhost on `node`.
    pub fn url(&self, node: usize) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/{}",
            NODES[node].1, self.vhost
        )
    }

    /// Every node's URL, `first` first and the others after it in turn.
    pub fn urls_from(&self, first: usize) -> Vec<String> {
        (0..NODES.len())
            .map(|i| self.url((first + i) % NODES.len()))
            .collect()
    }

    /// The node whose AMQP port is `port`.
    pub fn node_of_port(&self, port: u16) -> Option<usize> {
        NODES.iter().position(|(_, p)| *p == port)
    }

    /// The node that leads quorum queue `queue` now, asked of any running node.
    pub fn leader_of(&self, queue: &str) -> usize {
        for asked in 0..NODES.len() {
            let Ok(listed) = ctl(
                asked,
                &[
                    "list_queues",
                    "-p",
                    &self.vhost,
                    "name",
                    "leader",
                    "--quiet",
                    "--no-table-headers",
                ],
            ) else {
                continue;
            };
            for line in listed.lines() {
                let mut words = line.split_whitespace();
                if words.next() == Some(queue)
                    && let Some(leader) = words.next()
                    && let Some(i) = NODES.iter().position(|(n, _)| *n == leader)
                {
                    return i;
                }
            }
        }
        panic!("no running node names the leader of {queue}")
    }

    /// Stops `node`'s RabbitMQ application (`rabbitmqctl stop_app`): its clients are disconnected and its
    /// queue replicas stop. Started again by [`NodeStopped::start`], or when the guard is dropped.
    pub async fn stop(&self, node: usize) -> NodeStopped {
        blocking(move || ctl(node, &["stop_app"])).await;
        NodeStopped {
            node,
            started: false,
        }
    }
}

/// A node whose application is stopped.
pub struct NodeStopped {
    node: usize,
    started: bool,
}

impl NodeStopped {
    /// Starts the node's application and waits until it runs in the cluster and answers AMQP.
    pub async fn start(mut self) {
        let node = self.node;
        blocking(move || ctl(node, &["start_app"])).await;
        blocking(move || ctl(node, &["await_startup", "--timeout", "120"])).await;
        self.started = true;
        let url = endpoint_wire::BrokerUrl::new(cluster().url(node)).expect("cluster url");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match endpoint_wire::amqp::connect(&url, "test cluster probe").await {
                Ok(conn) => {
                    let _ = endpoint_wire::amqp::close(&conn, "probed").await;
                    return;
                }
                Err(e) if Instant::now() > deadline => {
                    panic!("node {} did not come back: {e}", NODES[node].0)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
}

impl Drop for NodeStopped {
    fn drop(&mut self) {
        if !self.started {
            let _ = ctl(self.node, &["start_app"]);
        }
    }
}

async fn blocking(f: impl FnOnce() -> Result<String> + Send + 'static) -> String {
    tokio::task::spawn_blocking(f)
        .await
        .expect("rabbitmqctl task")
        .unwrap_or_else(|e| panic!("{e:#}"))
}
