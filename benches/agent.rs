//! The real `endpoint-agent` as a measured child process: building the release binary, starting one process
//! per endpoint with its own data directory and config file, reading its CPU time (utime+stime from
//! `/proc/<pid>/stat`, with its task processes' where asked) and peak RSS (VmHWM from `/proc/<pid>/status`),
//! and stopping it with SIGTERM. Also the config files it is given, including the Python function in its two
//! forms (a pool of workers, a command per task). It never reads or writes the agent's database; that is
//! `endpoint_agent::store`'s business.

use anyhow::{Context, Result, anyhow, bail};
use endpoint_wire::EndpointId;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Seconds per clock tick of `/proc/<pid>/stat` times.
fn clock_ticks_per_sec() -> f64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf reads a constant of the running system and has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// One running agent process.
pub struct AgentProc {
    pub endpoint: EndpointId,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Child,
}

impl AgentProc {
    /// Starts `bin start --endpoint-id EP --data-dir DIR --config DIR.toml` with `config` as the file and
    /// `url` as `AMQP_URL`; stderr goes to `DIR.log`.
    pub fn start(
        bin: &Path,
        endpoint: &EndpointId,
        data_dir: &Path,
        url: &str,
        config: &str,
    ) -> Result<AgentProc> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("while creating {}", data_dir.display()))?;
        let config_path = data_dir.with_extension("toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("while writing {}", config_path.display()))?;
        let log = data_dir.with_extension("log");
        let stderr = std::fs::File::create(&log)
            .with_context(|| format!("while creating {}", log.display()))?;
        let child = Command::new(bin)
            .args(["start", "--endpoint-id", endpoint.as_str()])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--config")
            .arg(&config_path)
            .env("AMQP_URL", url)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("while starting {}", bin.display()))?;
        Ok(AgentProc {
            endpoint: endpoint.clone(),
            data_dir: data_dir.to_owned(),
            log,
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("while checking the agent")? {
            bail!(
                "endpoint-agent for {} exited ({status}); log tail:\n{}",
                self.endpoint,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// User plus system CPU seconds the process has used so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        Ok(ProcStat::read(self.pid())?.own)
    }

    /// CPU seconds of the agent and of every process under it: the live ones (pool workers, running
    /// commands) and the exited ones it has reaped. Differences between two readings count what task
    /// processes used in between, as long as none of them is still running unreaped across a reading.
    pub fn tree_cpu_seconds(&self) -> Result<f64> {
        let all = ProcStat::all();
        let mut total = 0.0;
        let mut stack = vec![self.pid()];
        while let Some(pid) = stack.pop() {
            let Some(s) = all.iter().find(|s| s.pid == pid) else {
                if pid == self.pid() {
                    bail!("endpoint-agent {} is not running", self.pid());
                }
                continue;
            };
            total += s.own + s.reaped_children;
            stack.extend(all.iter().filter(|c| c.ppid == pid).map(|c| c.pid));
        }
        Ok(total)
    }

    /// Peak resident set size (VmHWM) in bytes.
    pub fn peak_rss_bytes(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status =
            std::fs::read_to_string(&path).with_context(|| format!("while reading {path}"))?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| anyhow!("{path} has no VmHWM line"))?;
        Ok(kib * 1024)
    }

    fn signal(&self, sig: i32) {
        let Ok(pid) = i32::try_from(self.pid()) else {
            return;
        };
        #[allow(unsafe_code)]
        // SAFETY: kill takes plain integers; the pid is our own child, not yet reaped (we hold its `Child`).
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// Sends SIGTERM (the agent stops taking tasks, publishes what is pending and exits).
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits for the exit up to `limit` (then SIGKILL). Errors if it did not exit cleanly.
    pub fn wait_exit(mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .context("while waiting for the agent")?
            {
                if status.success() {
                    return Ok(());
                }
                bail!(
                    "endpoint-agent for {} exited with {status}; log tail:\n{}",
                    self.endpoint,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                self.signal(libc::SIGKILL);
                let _ = self.child.wait();
                bail!(
                    "endpoint-agent for {} did not stop within {limit:?} of SIGTERM; killed",
                    self.endpoint
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What `/proc/<pid>/stat` says about one process's CPU time.
struct ProcStat {
    pid: u32,
    ppid: u32,
    /// utime + stime, seconds.
    own: f64,
    /// cutime + cstime: children it has waited for, seconds.
    reaped_children: f64,
}

impl ProcStat {
    fn read(pid: u32) -> Result<ProcStat> {
        let path = format!("/proc/{pid}/stat");
        let stat =
            std::fs::read_to_string(&path).with_context(|| format!("while reading {path}"))?;
        // Fields after the command name (which may contain spaces) start at field 3 (state).
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| anyhow!("{path} has no command name"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| -> Result<f64> {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .ok_or_else(|| anyhow!("{path} has no field {}", i + 3))
        };
        let tick = clock_ticks_per_sec();
        // proc(5): ppid is field 4, utime 14, stime 15, cutime 16, cstime 17; index 0 here is field 3.
        Ok(ProcStat {
            pid,
            ppid: field(1)? as u32,
            own: (field(11)? + field(12)?) / tick,
            reaped_children: (field(13)? + field(14)?) / tick,
        })
    }

    /// Every process readable now (those exiting while we look are left out).
    fn all() -> Vec<ProcStat> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| ProcStat::read(pid).ok())
            .collect()
    }
}

/// The config file the bench gives every agent: defaults, except the backlog cap and a short reconnect
/// backoff (only the replay measurement reconnects) and a short grace period (echo finishes at once).
/// With `python`, the Python function's two forms too (agents that do not run them do not start its pool).
pub fn config_toml(max_backlog: u64, python: bool) -> String {
    format!(
        "max_backlog = {max_backlog}\ngrace_period_secs = 10\nreconnect_min_ms = 50\nreconnect_max_ms = 100\n{}",
        if python {
            python_functions()
        } else {
            String::new()
        }
    )
}

/// The Python function that returns its payload (`echo` in examples/python-pool/tasks.py), as a pool of
/// `workers` long-lived processes.
pub const PY_POOL: &str = "py_pool";
/// The same Python function as a command: a fresh interpreter per task, payload on stdin, result on stdout.
pub const PY_COMMAND: &str = "py_command";

/// The repository's root (the Python worker and the example module live there).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// Both forms of the Python function, as config sections. The pool's size is the agent's default
/// `workers` (one per CPU), so it runs as many tasks at once as the command form does.
fn python_functions() -> String {
    let repo = repo();
    let worker = repo.join("workers/python/endpoint_worker.py");
    let module_dir = repo.join("examples/python-pool");
    let workers = pool_size();
    let quoted = |p: &Path| format!("{:?}", p.display().to_string());
    format!(
        "[functions.{PY_POOL}]\ncommand = [\"python3\", {worker}, \"{PY_POOL}=tasks:echo\"]\npool = {workers}\nenv = {{ PYTHONPATH = {path} }}\n\n\
         [functions.{PY_COMMAND}]\ncommand = [\"python3\", \"-c\", \"import sys, tasks; sys.stdout.buffer.write(tasks.echo(sys.stdin.buffer.read()))\"]\nenv = {{ PYTHONPATH = {path} }}\n",
        worker = quoted(&worker),
        path = quoted(&module_dir),
    )
}

/// Workers in the Python pool: the agent's default `workers`, one per CPU.
pub fn pool_size() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Whether `python3` runs here (the Python rows need it).
pub fn python_available() -> bool {
    Command::new("python3")
        .arg("-c")
        .arg("pass")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
