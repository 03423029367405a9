//! The broker under test, as both the scenarios and the bench reach it: its address from `AMQP_URL`,
//! `rabbitmqctl` (or the command in `RABBITMQCTL`), and a vhost of its own per test or bench process, deleted
//! with the process's leftovers by the next run. Talks to a real RabbitMQ; never mocks it.

use anyhow::{Context, Result, anyhow, bail};
use endpoint_wire::{BrokerUrl, DEFAULT_BROKER_URL};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The broker from `AMQP_URL` (default guest on 127.0.0.1:5672).
#[derive(Clone, Debug)]
pub struct BrokerAddr {
    /// `user:password`
    pub userinfo: String,
    /// `host:port`
    pub hostport: String,
}

impl BrokerAddr {
    pub fn from_env() -> Result<BrokerAddr> {
        let url = std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_BROKER_URL.to_owned());
        let rest = url.split_once("://").map(|(_, r)| r).ok_or_else(|| {
            anyhow!("AMQP_URL has no scheme: use amqp://user:pass@host:port/vhost")
        })?;
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (u.to_owned(), h.to_owned()),
            None => ("guest:guest".to_owned(), authority.to_owned()),
        };
        let hostport = if hostport.contains(':') {
            hostport
        } else {
            format!("{hostport}:5672")
        };
        Ok(BrokerAddr { userinfo, hostport })
    }

    pub fn user(&self) -> &str {
        self.userinfo.split(':').next().unwrap_or("guest")
    }

    /// Fails with how to start a broker when nothing answers on the address.
    pub fn check_reachable(&self) -> Result<()> {
        let addr = self
            .hostport
            .parse()
            .unwrap_or_else(|_| "127.0.0.1:5672".parse().expect("a literal address"));
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_err() {
            bail!(
                "RabbitMQ is not reachable at {}: start it with `rabbitmq-server -detached` (or `docker compose up -d`), or set AMQP_URL",
                self.hostport
            );
        }
        Ok(())
    }
}

/// `rabbitmqctl`, or the command in `RABBITMQCTL` (e.g. `docker compose exec -T rabbitmq rabbitmqctl` when the
/// broker runs in the repository's docker-compose.yml).
pub fn rabbitmqctl_command() -> Command {
    let line = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = line.split_whitespace();
    let mut cmd = Command::new(words.next().unwrap_or("rabbitmqctl"));
    cmd.args(words);
    cmd
}

/// Runs `rabbitmqctl args` and returns its standard output.
pub fn rabbitmqctl(args: &[&str]) -> Result<String> {
    let out = rabbitmqctl_command().args(args).output().with_context(|| {
        format!(
            "while running rabbitmqctl {args:?}: install RabbitMQ's rabbitmqctl or set RABBITMQCTL"
        )
    })?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of the form `<prefix>-<pid>` listed by `rabbitmqctl list`-ish output whose process is gone.
fn leftovers<'a>(listing: &'a str, prefix: &str) -> Vec<&'a str> {
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| {
            name.strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        })
        .collect()
}

/// This process's vhost `<prefix>-<pid>`, with full permissions for the broker user; vhosts of earlier
/// processes with the same prefix that are gone are deleted first.
pub struct Vhost {
    pub name: String,
    pub addr: BrokerAddr,
}

impl Vhost {
    pub fn create(prefix: &str, addr: BrokerAddr) -> Result<Vhost> {
        addr.check_reachable()?;
        let listed = rabbitmqctl(&["list_vhosts", "--quiet", "--no-table-headers"])?;
        for name in leftovers(&listed, prefix) {
            rabbitmqctl(&["delete_vhost", name])?;
        }
        let name = format!("{prefix}-{}", std::process::id());
        rabbitmqctl(&["add_vhost", &name])?;
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &name,
            addr.user(),
            ".*",
            ".*",
            ".*",
        ])?;
        Ok(Vhost { name, addr })
    }

    /// The AMQP URL of this vhost, through `hostport` (the broker itself, or a proxy in front of it).
    pub fn url_via(&self, hostport: &str) -> String {
        format!("amqp://{}@{hostport}/{}", self.addr.userinfo, self.name)
    }

    pub fn url(&self) -> String {
        self.url_via(&self.addr.hostport)
    }

    pub fn broker_url(&self) -> Result<BrokerUrl> {
        BrokerUrl::new(self.url()).context("while building the vhost's url")
    }

    /// Deletes the vhost and everything in it.
    pub fn delete(&self) -> Result<()> {
        rabbitmqctl(&["delete_vhost", &self.name]).map(|_| ())
    }
}

/// Deletes broker users named `<prefix>-<pid>` whose process is gone.
pub fn delete_leftover_users(prefix: &str) -> Result<()> {
    let listed = rabbitmqctl(&["list_users", "--quiet", "--no-table-headers"])?;
    for name in leftovers(&listed, prefix) {
        rabbitmqctl(&["delete_user", name])?;
    }
    Ok(())
}
