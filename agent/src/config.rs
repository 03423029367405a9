//! The agent's validated configuration: command-line values laid over the optional TOML file, checked once
//! and passed explicitly. No `Default`, no global state; every setting the agent takes is named here (their
//! defaults live in `limits`).

use crate::limits::{
    DEFAULT_FUNCTION_TIMEOUT_SECS, DEFAULT_GRACE_SECS, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BACKLOG,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_PREFETCH, DEFAULT_RECONNECT_MAX,
    DEFAULT_RECONNECT_MIN, DEFAULT_RETENTION_SECS, MAX_WORKERS,
};
use crate::sys::{self, Limit, User};
use endpoint_wire::{BrokerUrl, EndpointId, Tls, TlsError, TlsFiles, parse_broker_urls};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Built-in functions, always available; a config file cannot redefine them.
pub const BUILTIN_ECHO: &str = "echo";
pub const BUILTIN_SLEEP: &str = "sleep";

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoint_id: EndpointId,
    /// Where the broker's URLs come from (one per node of a cluster); read with [`Config::broker_urls`] at every
    /// (re)connect.
    pub broker: BrokerSource,
    /// The order the URLs are tried in: random (the default, so agents spread over a cluster's nodes) or as
    /// listed (a preferred node first).
    pub broker_order: BrokerOrder,
    /// The CA and client certificate `amqps://` URLs connect with.
    pub tls: Tls,
    pub data_dir: PathBuf,
    /// Concurrent executor slots.
    pub workers: usize,
    /// `basic.qos` prefetch of the subscriber: deliveries in flight before an ack.
    pub prefetch: u16,
    /// Above this many queued tasks on disk the subscriber takes nothing more (work stays in the broker).
    pub max_backlog: u64,
    /// A task that was running when the agent died this many times gets a `failed` result instead of a rerun.
    pub max_attempts: u32,
    /// A task body larger than this gets a `rejected` result.
    pub max_body_bytes: usize,
    /// On SIGINT/SIGTERM, how long running tasks may take to finish before they are killed (and requeued).
    pub grace_period: Duration,
    /// How long published results (and their tasks, for de-duplication) are kept on disk.
    pub result_retention: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Timeout of the built-in functions (`sleep`); a task's `x-timeout-ms` can only shorten it.
    pub builtin_timeout: Duration,
    /// The functions this endpoint offers: shared by every clone of this `Config`, replaced by a reload
    /// (SIGHUP, [`Config::reload`]) for tasks not yet started.
    pub functions: Functions,
    /// Where to serve /metrics, /healthz, /readyz and the status page (`--http`, else `http_addr`); off if `None`.
    pub http_addr: Option<std::net::SocketAddr>,
    /// At the end of a clean stop, hand the tasks still queued on disk back to the broker (for hosts that will
    /// not return).
    pub handback_on_stop: bool,
    /// Where this config came from, for [`Config::reload`]; `None` without a config file.
    pub origin: Option<Origin>,
}

/// What a config was loaded from: the command line's values and the file, read again on reload.
#[derive(Clone, Debug)]
pub struct Origin {
    pub overrides: Overrides,
    pub file: PathBuf,
    /// `--http`, which wins over the file's `http_addr`.
    pub http_flag: Option<std::net::SocketAddr>,
}

/// The functions an endpoint offers, by name. Every clone shares one table: a reload replaces it whole, and
/// a task looks its function up when it starts, so a change applies to every task not yet started and never
/// to a running one.
#[derive(Clone, Debug)]
pub struct Functions(Arc<RwLock<Arc<BTreeMap<String, Function>>>>);

impl Functions {
    fn new(table: BTreeMap<String, Function>) -> Functions {
        Functions(Arc::new(RwLock::new(Arc::new(table))))
    }

    /// The table as it is now.
    pub fn current(&self) -> Arc<BTreeMap<String, Function>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, table: BTreeMap<String, Function>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Function {
    /// Returns the payload.
    Echo,
    /// Sleeps for the payload's number of milliseconds, returns nothing.
    Sleep,
    Command(Box<CommandSpec>),
    /// Long-lived workers speaking the worker protocol (docs/worker-protocol.md).
    Pool(Box<PoolSpec>),
}

/// A function served by persistent workers.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSpec {
    /// Workers the agent starts from `command` (0: only external workers serve the function).
    pub size: usize,
    /// How a worker is started, isolated like a command (`program` empty when `size` is 0); its `timeout` and
    /// `max_output_bytes` apply to each task.
    pub command: CommandSpec,
    /// A worker is replaced after this many tasks.
    pub max_tasks_per_worker: Option<u64>,
    /// A worker whose resident memory is above this after a task is replaced.
    pub max_worker_memory_bytes: Option<u64>,
}

impl Function {
    /// Workers the agent starts for this function.
    pub fn pool_size(&self) -> usize {
        match self {
            Function::Pool(p) => p.size,
            _ => 0,
        }
    }
}

/// A function that runs a program (no shell): payload on stdin, stdout is the result.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandSpec {
    pub program: String,
    pub args: Vec<String>,
    pub timeout: Duration,
    pub max_output_bytes: usize,
    /// Variables the command gets on top of its cleared environment: the agent's values of the names in
    /// `pass_env` (those set when the agent started), then the function's `env`, which wins.
    pub env: BTreeMap<String, String>,
    /// Where it runs; `None`: a fresh directory under the data directory, removed after the task.
    pub working_dir: Option<PathBuf>,
    /// The user it runs as (the agent must be root); `None`: the agent's user.
    pub run_as: Option<User>,
    pub limits: Vec<Limit>,
    /// `PR_SET_NO_NEW_PRIVS` (on unless the config turns it off).
    pub no_new_privileges: bool,
}

/// Where the agent finds the broker's URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerSource {
    /// Given as is (`--broker-url`, repeated or comma-separated; `AMQP_URL`; or the default).
    Url(Vec<BrokerUrl>),
    /// A file (`--broker-url-file`, `AMQP_URL_FILE`; `service-setup provision --credentials` writes one): each
    /// non-empty line a URL or a comma-separated list of them, read again at every reconnect so a rotated
    /// password is picked up; no password on the command line.
    File(PathBuf),
}

/// The order an agent tries its broker URLs in (`--broker-order`, `broker_order`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BrokerOrder {
    /// A new random order at each start: agents given the same nodes spread over them.
    #[default]
    Random,
    /// As listed: the first URL while it works, the next ones only when it fails.
    Listed,
}

impl BrokerOrder {
    /// `urls` in this order (a fresh shuffle at each call for `Random`).
    pub fn arrange(self, urls: Vec<BrokerUrl>) -> Vec<BrokerUrl> {
        match self {
            BrokerOrder::Random => endpoint_wire::random_order(&urls),
            BrokerOrder::Listed => urls,
        }
    }
}

/// Values given on the command line (or their env vars); each wins over the file.
#[derive(Clone, Debug)]
pub struct Overrides {
    pub endpoint_id: EndpointId,
    pub broker: BrokerSource,
    /// `--tls-ca`, `--tls-cert`, `--tls-key`; each wins over the file's.
    pub tls: TlsFiles,
    pub data_dir: Option<PathBuf>,
    pub workers: Option<usize>,
    pub prefetch: Option<u16>,
    /// `--broker-order`; wins over the file's `broker_order`.
    pub broker_order: Option<BrokerOrder>,
}

/// What a reload applied and what waits for a restart, one line each (for the log).
#[derive(Debug, Default)]
pub struct Reload {
    pub applied: Vec<String>,
    pub need_restart: Vec<String>,
}

/// The TOML file, as written by an operator. See README "Configuration".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    workers: Option<usize>,
    prefetch: Option<u16>,
    max_backlog: Option<u64>,
    max_attempts: Option<u32>,
    max_body_bytes: Option<usize>,
    grace_period_secs: Option<u64>,
    result_retention_secs: Option<u64>,
    reconnect_min_ms: Option<u64>,
    reconnect_max_ms: Option<u64>,
    builtin_timeout_secs: Option<u64>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    http_addr: Option<std::net::SocketAddr>,
    broker_order: Option<BrokerOrder>,
    #[serde(default)]
    handback_on_stop: bool,
    #[serde(default)]
    functions: BTreeMap<String, FileFunction>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFunction {
    /// Program and arguments, e.g. `["wc", "-c"]`.
    #[serde(default)]
    command: Vec<String>,
    /// Run the command as this many long-lived workers (the worker protocol) instead of once per task; 0:
    /// only workers the agent did not start serve it.
    pool: Option<usize>,
    max_tasks_per_worker: Option<u64>,
    max_worker_memory_bytes: Option<u64>,
    timeout_secs: Option<u64>,
    max_output_bytes: Option<usize>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    working_dir: Option<PathBuf>,
    /// Names of the agent's environment variables the command gets (it gets no others).
    #[serde(default)]
    pass_env: Vec<String>,
    run_as_user: Option<String>,
    max_memory_bytes: Option<u64>,
    max_open_files: Option<u64>,
    max_processes: Option<u64>,
    max_cpu_secs: Option<u64>,
    no_new_privileges: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config file {0} is not valid: {1}")]
    Parse(PathBuf, String),
    #[error("invalid setting: {0}")]
    Invalid(String),
    #[error("cannot read the broker URL from {0}: {1}")]
    UrlFile(PathBuf, String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl Config {
    /// Reads the file (if any), lays the overrides over it and validates the result.
    pub fn load(overrides: Overrides, file: Option<&Path>) -> Result<Config, ConfigError> {
        let origin = file.map(|f| Origin {
            overrides: overrides.clone(),
            file: f.to_owned(),
            http_flag: None,
        });
        let parsed = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(path.to_owned(), e))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError::Parse(path.to_owned(), e.to_string()))?
            }
            None => FileConfig::default(),
        };
        let mut config = Self::build(overrides, parsed)?;
        config.origin = origin;
        Ok(config)
    }

    fn build(o: Overrides, f: FileConfig) -> Result<Config, ConfigError> {
        let data_dir = match o.data_dir.or(f.data_dir) {
            Some(d) => d,
            None => default_data_dir(&o.endpoint_id),
        };
        let functions = functions(f.functions)?;
        // Every pool worker can be busy at once only with a slot each.
        let pool_workers: usize = functions.values().map(Function::pool_size).sum();
        let default_workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(pool_workers);
        let workers = o.workers.or(f.workers).unwrap_or(default_workers);
        let prefetch = o.prefetch.or(f.prefetch).unwrap_or(DEFAULT_PREFETCH);
        let reconnect_min = f
            .reconnect_min_ms
            .map_or(DEFAULT_RECONNECT_MIN, Duration::from_millis);
        let reconnect_max = f
            .reconnect_max_ms
            .map_or(DEFAULT_RECONNECT_MAX, Duration::from_millis);
        let tls_files = TlsFiles {
            ca: o.tls.ca.or(f.tls_ca),
            cert: o.tls.cert.or(f.tls_cert),
            key: o.tls.key.or(f.tls_key),
        };
        let config = Config {
            endpoint_id: o.endpoint_id,
            broker: o.broker,
            broker_order: o.broker_order.or(f.broker_order).unwrap_or_default(),
            tls: Tls::load(&tls_files)?,
            data_dir,
            workers,
            prefetch,
            max_backlog: f.max_backlog.unwrap_or(DEFAULT_MAX_BACKLOG),
            max_attempts: f.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            max_body_bytes: f.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
            grace_period: Duration::from_secs(f.grace_period_secs.unwrap_or(DEFAULT_GRACE_SECS)),
            result_retention: Duration::from_secs(
                f.result_retention_secs.unwrap_or(DEFAULT_RETENTION_SECS),
            ),
            reconnect_min,
            reconnect_max,
            builtin_timeout: Duration::from_secs(
                f.builtin_timeout_secs
                    .unwrap_or(DEFAULT_FUNCTION_TIMEOUT_SECS),
            ),
            functions: Functions::new(functions),
            http_addr: f.http_addr,
            handback_on_stop: f.handback_on_stop,
            origin: None,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        // The file is read once now, so a wrong path stops the start instead of every reconnect.
        self.broker_urls()?;
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return bad(format!(
                "workers is {}: use 1 to {MAX_WORKERS}",
                self.workers
            ));
        }
        if self.prefetch == 0 {
            return bad("prefetch is 0 (unlimited): use 1 to 65535".into());
        }
        if self.max_backlog == 0 {
            return bad("max_backlog is 0: use at least 1".into());
        }
        if self.max_attempts == 0 {
            return bad("max_attempts is 0: use at least 1".into());
        }
        if self.max_body_bytes == 0 {
            return bad("max_body_bytes is 0: use at least 1".into());
        }
        if self.builtin_timeout.is_zero() {
            return bad("builtin_timeout_secs is 0: use at least 1".into());
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return bad(format!(
                "reconnect_min_ms ({:?}) must be above 0 and at most reconnect_max_ms ({:?})",
                self.reconnect_min, self.reconnect_max
            ));
        }
        Ok(())
    }

    /// The broker's URLs as listed (at least one), with the TLS material: read from the file each time for
    /// [`BrokerSource::File`].
    pub fn broker_urls(&self) -> Result<Vec<BrokerUrl>, ConfigError> {
        let urls = match &self.broker {
            BrokerSource::Url(urls) => urls.clone(),
            BrokerSource::File(path) => read_url_file(path)?,
        };
        if urls.is_empty() {
            return Err(ConfigError::Invalid(
                "no broker URL: pass --broker-url (or AMQP_URL)".into(),
            ));
        }
        Ok(urls
            .into_iter()
            .map(|u| u.with_tls(self.tls.clone()))
            .collect())
    }

    /// [`Config::broker_urls`] in the order to try them ([`BrokerOrder`]).
    pub fn ordered_broker_urls(&self) -> Result<Vec<BrokerUrl>, ConfigError> {
        Ok(self.broker_order.arrange(self.broker_urls()?))
    }

    /// `--http` wins over the file's `http_addr` (kept out of [`Overrides`] so that its other users need not
    /// change).
    pub fn with_http_flag(mut self, flag: Option<std::net::SocketAddr>) -> Config {
        self.http_addr = flag.or(self.http_addr);
        if let Some(origin) = &mut self.origin {
            origin.http_flag = flag;
        }
        self
    }

    /// The function named by a task's `type`, if this endpoint offers it (as the config is now: see
    /// [`Config::reload`]).
    pub fn function(&self, name: &str) -> Option<Function> {
        self.functions.current().get(name).cloned()
    }

    /// Whether this endpoint offers `name` now.
    pub fn offers(&self, name: &str) -> bool {
        self.functions.current().contains_key(name)
    }

    /// Reads the config file again (SIGHUP) and applies what can change while the agent runs: the functions
    /// that are not pools (added, changed or removed), for every task not yet started. Pool functions keep
    /// their definition and every other setting its value until a restart; each such difference is returned
    /// as a note to log. An unreadable or invalid file changes nothing and is the error.
    pub fn reload(&self) -> Result<Reload, ConfigError> {
        let Some(origin) = &self.origin else {
            return Ok(Reload {
                applied: Vec::new(),
                need_restart: vec![
                    "the agent was started without a config file (--config): there is nothing to re-read"
                        .into(),
                ],
            });
        };
        let new = Config::load(origin.overrides.clone(), Some(&origin.file))?
            .with_http_flag(origin.http_flag);
        let old_table = self.functions.current();
        let new_table = new.functions.current();
        let mut table = BTreeMap::new();
        let mut applied = Vec::new();
        let mut need_restart = Vec::new();
        let names: std::collections::BTreeSet<&String> =
            old_table.keys().chain(new_table.keys()).collect();
        for name in names {
            let (old, new) = (old_table.get(name), new_table.get(name));
            let pool = |f: Option<&Function>| matches!(f, Some(Function::Pool(_)));
            if old == new {
                if let Some(f) = old {
                    table.insert(name.clone(), f.clone());
                }
            } else if pool(old) || pool(new) {
                if let Some(f) = old {
                    table.insert(name.clone(), f.clone());
                }
                need_restart.push(format!(
                    "function {name:?} is a pool function: its change takes effect after a restart"
                ));
            } else {
                match new {
                    Some(f) => {
                        table.insert(name.clone(), f.clone());
                        applied.push(format!(
                            "function {name:?} {}",
                            if old.is_some() { "changed" } else { "added" }
                        ));
                    }
                    None => applied.push(format!("function {name:?} removed")),
                }
            }
        }
        for (key, was, is) in new.restart_only_differences(self) {
            need_restart.push(format!(
                "{key} changed ({was} -> {is}): takes effect after a restart"
            ));
        }
        self.functions.replace(table);
        Ok(Reload {
            applied,
            need_restart,
        })
    }

    /// The settings a reload does not apply that differ between `self` and `running`.
    fn restart_only_differences(&self, running: &Config) -> Vec<(&'static str, String, String)> {
        let mut out = Vec::new();
        let mut cmp = |key: &'static str, new: String, old: String| {
            if new != old {
                out.push((key, old, new));
            }
        };
        let d = |d: Duration| format!("{d:?}");
        cmp(
            "data_dir",
            self.data_dir.display().to_string(),
            running.data_dir.display().to_string(),
        );
        cmp(
            "workers",
            self.workers.to_string(),
            running.workers.to_string(),
        );
        cmp(
            "prefetch",
            self.prefetch.to_string(),
            running.prefetch.to_string(),
        );
        cmp(
            "max_backlog",
            self.max_backlog.to_string(),
            running.max_backlog.to_string(),
        );
        cmp(
            "max_attempts",
            self.max_attempts.to_string(),
            running.max_attempts.to_string(),
        );
        cmp(
            "max_body_bytes",
            self.max_body_bytes.to_string(),
            running.max_body_bytes.to_string(),
        );
        cmp(
            "grace_period_secs",
            d(self.grace_period),
            d(running.grace_period),
        );
        cmp(
            "result_retention_secs",
            d(self.result_retention),
            d(running.result_retention),
        );
        cmp(
            "reconnect_min_ms",
            d(self.reconnect_min),
            d(running.reconnect_min),
        );
        cmp(
            "reconnect_max_ms",
            d(self.reconnect_max),
            d(running.reconnect_max),
        );
        cmp(
            "builtin_timeout_secs",
            d(self.builtin_timeout),
            d(running.builtin_timeout),
        );
        cmp(
            "http_addr",
            format!("{:?}", self.http_addr),
            format!("{:?}", running.http_addr),
        );
        cmp(
            "handback_on_stop",
            self.handback_on_stop.to_string(),
            running.handback_on_stop.to_string(),
        );
        if self.tls != running.tls {
            out.push((
                "tls_ca/tls_cert/tls_key",
                "the files read at start".into(),
                "other contents".into(),
            ));
        }
        out
    }
}

fn functions(
    file: BTreeMap<String, FileFunction>,
) -> Result<BTreeMap<String, Function>, ConfigError> {
    let mut out = BTreeMap::new();
    out.insert(BUILTIN_ECHO.to_owned(), Function::Echo);
    out.insert(BUILTIN_SLEEP.to_owned(), Function::Sleep);
    for (name, f) in file {
        if out.contains_key(&name) {
            return Err(ConfigError::Invalid(format!(
                "function {name:?} is built in: choose another name in [functions]"
            )));
        }
        let mut words = f.command.into_iter();
        let program = words.next().unwrap_or_default();
        let external_only = f.pool == Some(0);
        if program.is_empty() && !external_only {
            return Err(ConfigError::Invalid(format!(
                "function {name:?} has an empty command: give the program and its arguments, e.g. command = [\"wc\", \"-c\"] (or pool = 0 for a function only external workers serve)"
            )));
        }
        if f.pool.is_none()
            && (f.max_tasks_per_worker.is_some() || f.max_worker_memory_bytes.is_some())
        {
            return Err(ConfigError::Invalid(format!(
                "function {name:?} sets max_tasks_per_worker or max_worker_memory_bytes without pool: they apply to pool workers"
            )));
        }
        if f.pool.is_some_and(|n| n > MAX_WORKERS) {
            return Err(ConfigError::Invalid(format!(
                "function {name:?} has pool = {}: use 0 to {MAX_WORKERS}",
                f.pool.unwrap_or_default()
            )));
        }
        let timeout = Duration::from_secs(f.timeout_secs.unwrap_or(DEFAULT_FUNCTION_TIMEOUT_SECS));
        if timeout.is_zero() {
            return Err(ConfigError::Invalid(format!(
                "function {name:?} has timeout_secs = 0: use at least 1"
            )));
        }
        let mut env: BTreeMap<String, String> = f
            .pass_env
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
            .collect();
        env.extend(f.env);
        let run_as = match &f.run_as_user {
            None => None,
            Some(user) => {
                let found = sys::lookup_user(user).map_err(|e| {
                    ConfigError::Invalid(format!("function {name:?}: run_as_user: {e}"))
                })?;
                let me = sys::euid();
                if me != 0 {
                    return Err(ConfigError::Invalid(format!(
                        "function {name:?} has run_as_user = {user:?}, which needs the agent to run as root (it runs as uid {me}): start it as root, or remove run_as_user"
                    )));
                }
                Some(found)
            }
        };
        let mut limits = Vec::new();
        let positive = |key: &str, v: Option<u64>| match v {
            Some(0) => Err(ConfigError::Invalid(format!(
                "function {name:?} has {key} = 0: use at least 1, or leave it out for no limit"
            ))),
            v => Ok(v),
        };
        if let Some(n) = positive("max_memory_bytes", f.max_memory_bytes)? {
            limits.push(Limit::MemoryBytes(n));
        }
        if let Some(n) = positive("max_open_files", f.max_open_files)? {
            limits.push(Limit::OpenFiles(n));
        }
        if let Some(n) = positive("max_processes", f.max_processes)? {
            limits.push(Limit::Processes(n));
        }
        if let Some(n) = positive("max_cpu_secs", f.max_cpu_secs)? {
            limits.push(Limit::CpuSecs(n));
        }
        let spec = CommandSpec {
            program,
            args: words.collect(),
            timeout,
            max_output_bytes: f.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES),
            env,
            working_dir: f.working_dir,
            run_as,
            limits,
            no_new_privileges: f.no_new_privileges.unwrap_or(true),
        };
        let function = match f.pool {
            None => Function::Command(Box::new(spec)),
            Some(size) => Function::Pool(Box::new(PoolSpec {
                size,
                command: spec,
                max_tasks_per_worker: positive("max_tasks_per_worker", f.max_tasks_per_worker)?,
                max_worker_memory_bytes: positive(
                    "max_worker_memory_bytes",
                    f.max_worker_memory_bytes,
                )?,
            })),
        };
        out.insert(name, function);
    }
    Ok(out)
}

/// The broker URLs of `path`: every non-empty line, each a URL or a comma-separated list of them.
fn read_url_file(path: &Path) -> Result<Vec<BrokerUrl>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::UrlFile(path.to_owned(), e.to_string()))?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return Err(ConfigError::UrlFile(
            path.to_owned(),
            "the file is empty".into(),
        ));
    }
    parse_broker_urls(&lines).map_err(|e| ConfigError::UrlFile(path.to_owned(), e.to_string()))
}

/// `$XDG_STATE_HOME/endpoint-agent/<EP>`, else `~/.local/state/endpoint-agent/<EP>`, else
/// `./endpoint-agent-data/<EP>`.
pub fn default_data_dir(ep: &EndpointId) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")));
    match base {
        Some(b) => b.join("endpoint-agent").join(ep.as_str()),
        None => PathBuf::from("endpoint-agent-data").join(ep.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides() -> Overrides {
        Overrides {
            endpoint_id: EndpointId::new("ep").unwrap(),
            broker: BrokerSource::Url(vec![BrokerUrl::new("amqp://h/%2f").unwrap()]),
            tls: TlsFiles::default(),
            data_dir: Some("/tmp/x".into()),
            workers: None,
            prefetch: None,
            broker_order: None,
        }
    }

    fn check(toml: &str, expected: Result<(), &str>) -> Option<Config> {
        let parsed = toml::from_str::<FileConfig>(toml).map_err(|e| e.to_string());
        let built = parsed.and_then(|f| Config::build(overrides(), f).map_err(|e| e.to_string()));
        match (&built, expected) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(want)) => assert!(e.contains(want), "{e:?} should contain {want:?}"),
            (got, want) => panic!("{toml:?}: got {got:?}, want {want:?}"),
        }
        built.ok()
    }

    #[test]
    fn broker_lists_and_their_order() {
        let c = check("", Ok(())).unwrap();
        assert_eq!(c.broker_order, BrokerOrder::Random);
        let c = check("broker_order = \"listed\"", Ok(())).unwrap();
        assert_eq!(c.broker_order, BrokerOrder::Listed);
        assert_eq!(c.ordered_broker_urls().unwrap()[0].node(), "h:5672");
        check("broker_order = \"first\"", Err("unknown variant"));
        // A URL file: every non-empty line, each a URL or a comma-separated list.
        let dir = std::env::temp_dir().join(format!("ea-urls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("urls");
        std::fs::write(
            &file,
            "amqp://u:p@n1:5681/%2f,amqp://u:p@n2:5682/%2f\n\namqp://u:p@n3:5683/%2f\n",
        )
        .unwrap();
        let nodes: Vec<_> = read_url_file(&file)
            .unwrap()
            .iter()
            .map(BrokerUrl::node)
            .collect();
        assert_eq!(nodes, ["n1:5681", "n2:5682", "n3:5683"]);
        std::fs::write(&file, "\n \n").unwrap();
        assert!(
            read_url_file(&file)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn file_settings() {
        let c = check("", Ok(())).unwrap();
        assert_eq!(c.max_attempts, 3);
        assert!(c.function("echo").is_some() && c.function("sleep").is_some());
        let c = check(
            "workers = 3\nmax_backlog = 5\n[functions.wc]\ncommand = [\"wc\", \"-c\"]\ntimeout_secs = 2\n",
            Ok(()),
        )
        .unwrap();
        assert_eq!(c.workers, 3);
        let Some(Function::Command(wc)) = c.function("wc") else {
            panic!("wc missing")
        };
        assert_eq!(
            (wc.program.as_str(), wc.args.clone(), wc.timeout),
            ("wc", vec!["-c".to_owned()], Duration::from_secs(2))
        );
        check("workers = 0", Err("workers is 0"));
        check("prefetch = 0", Err("prefetch is 0"));
        check("wrokers = 2", Err("unknown field"));
        check("[functions.echo]\ncommand = [\"cat\"]", Err("is built in"));
        check("[functions.x]\ncommand = []", Err("empty command"));
        check(
            "[functions.x]\ncommand = [\"cat\"]\ntimeout_secs = 0",
            Err("timeout_secs = 0"),
        );
        check(
            "reconnect_min_ms = 5000\nreconnect_max_ms = 10",
            Err("reconnect_min_ms"),
        );
    }

    #[test]
    fn isolation_settings() {
        let c = check(
            "[functions.x]\ncommand = [\"env\"]\npass_env = [\"PATH\", \"EA_NOT_SET\"]\nenv = { PATH = \"/mine\", A = \"1\" }\nmax_memory_bytes = 1024\nmax_cpu_secs = 2\nno_new_privileges = false\n",
            Ok(()),
        )
        .unwrap();
        let Some(Function::Command(x)) = c.function("x") else {
            panic!("x missing")
        };
        // The function's own env wins over a passed variable; an unset one is not passed.
        assert_eq!(x.env.get("PATH").map(String::as_str), Some("/mine"));
        assert!(!x.env.contains_key("EA_NOT_SET"));
        assert_eq!(x.limits, vec![Limit::MemoryBytes(1024), Limit::CpuSecs(2)]);
        assert!(!x.no_new_privileges);
        let c = check("[functions.y]\ncommand = [\"id\"]\n", Ok(())).unwrap();
        let Some(Function::Command(y)) = c.function("y") else {
            panic!("y missing")
        };
        assert!(y.no_new_privileges && y.limits.is_empty() && y.run_as.is_none());
        check(
            "[functions.x]\ncommand = [\"id\"]\nmax_open_files = 0",
            Err("max_open_files = 0"),
        );
        check(
            "[functions.x]\ncommand = [\"id\"]\nrun_as_user = \"no-such-user-ea\"",
            Err("no user \"no-such-user-ea\""),
        );
        if sys::euid() == 0 {
            check(
                "[functions.x]\ncommand = [\"id\"]\nrun_as_user = \"nobody\"",
                Ok(()),
            );
        } else {
            check(
                "[functions.x]\ncommand = [\"id\"]\nrun_as_user = \"nobody\"",
                Err("needs the agent to run as root"),
            );
        }
        check("builtin_timeout_secs = 0", Err("builtin_timeout_secs is 0"));
    }

    #[test]
    fn pool_settings() {
        let c = check(
            "[functions.py]\ncommand = [\"python3\", \"w.py\"]\npool = 3\nmax_tasks_per_worker = 100\n[functions.gpu]\npool = 0\n",
            Ok(()),
        )
        .unwrap();
        let Some(Function::Pool(py)) = c.function("py") else {
            panic!("py is a pool function")
        };
        assert_eq!((py.size, py.max_tasks_per_worker), (3, Some(100)));
        assert_eq!(c.function("gpu").as_ref().map(Function::pool_size), Some(0));
        // Every pool worker can run at once.
        assert!(c.workers >= 3);
        check("[functions.x]\npool = 2\n", Err("empty command"));
        check(
            "[functions.x]\ncommand = [\"cat\"]\nmax_tasks_per_worker = 5\n",
            Err("without pool"),
        );
        check(
            "[functions.x]\ncommand = [\"cat\"]\npool = 1\nmax_worker_memory_bytes = 0\n",
            Err("max_worker_memory_bytes = 0"),
        );
    }

    #[test]
    fn command_line_wins() {
        let mut o = overrides();
        o.workers = Some(7);
        let f = toml::from_str::<FileConfig>("workers = 2\ndata_dir = \"/elsewhere\"").unwrap();
        let c = Config::build(o, f).unwrap();
        assert_eq!((c.workers, c.data_dir), (7, PathBuf::from("/tmp/x")));
    }

    #[test]
    fn http_address() {
        assert_eq!(check("", Ok(())).unwrap().http_addr, None);
        let c = check("http_addr = \"127.0.0.1:9464\"", Ok(())).unwrap();
        assert_eq!(c.http_addr, Some("127.0.0.1:9464".parse().unwrap()));
        let flag = "0.0.0.0:9000".parse().unwrap();
        assert_eq!(c.clone().with_http_flag(Some(flag)).http_addr, Some(flag));
        assert_eq!(
            c.with_http_flag(None).http_addr,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        check("http_addr = \"localhost\"", Err("http_addr"));
    }

    #[test]
    fn reload_applies_functions_and_names_what_needs_a_restart() {
        let file = std::env::temp_dir().join(format!("ea-unit-reload-{}.toml", std::process::id()));
        let write = |text: &str| std::fs::write(&file, text).unwrap();
        write(
            "workers = 2\n[functions.a]\ncommand = [\"true\"]\n[functions.gone]\ncommand = [\"true\"]\n\
             [functions.p]\ncommand = [\"w\"]\npool = 1\n",
        );
        let config = Config::load(overrides(), Some(&file)).unwrap();
        let shared = config.clone();
        write(
            "workers = 3\n[functions.a]\ncommand = [\"false\"]\n[functions.b]\ncommand = [\"true\"]\n\
             [functions.p]\ncommand = [\"w2\"]\npool = 1\n[functions.q]\ncommand = [\"w\"]\npool = 1\n",
        );
        let r = config.reload().unwrap();
        assert_eq!(
            r.applied,
            [
                "function \"a\" changed",
                "function \"b\" added",
                "function \"gone\" removed"
            ]
        );
        assert_eq!(r.need_restart.len(), 3, "{:?}", r.need_restart);
        assert!(r.need_restart[2].starts_with("workers changed (2 -> 3)"));
        // Every clone sees the new table; pool functions keep their definition, a new pool waits.
        let Some(Function::Command(a)) = shared.function("a") else {
            panic!("a is a command")
        };
        assert_eq!(a.program, "false");
        assert!(shared.offers("b") && !shared.offers("gone") && !shared.offers("q"));
        let Some(Function::Pool(p)) = shared.function("p") else {
            panic!("p is a pool")
        };
        assert_eq!(p.command.program, "w");
        // A bad file changes nothing.
        write("workers = \"many\"\n");
        assert!(config.reload().is_err());
        assert!(shared.offers("b"));
        let _ = std::fs::remove_file(&file);
    }
}
