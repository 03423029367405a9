//! The real `endpoint-agent` as a measured child process: building the release binary, starting one process
//! per endpoint with its own data directory and config file, reading its CPU time (utime+stime from
//! `/proc/<pid>/stat`) and peak RSS (VmHWM from `/proc/<pid>/status`), and stopping it with SIGTERM. It never
//! reads or writes the agent's database; that is `endpoint_agent::store`'s business.

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
        let path = format!("/proc/{}/stat", self.pid());
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
        // utime is field 14 and stime field 15 of proc(5); index 0 here is field 3.
        Ok((field(11)? + field(12)?) / clock_ticks_per_sec())
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

/// The config file the bench gives every agent: defaults, except the backlog cap and a short reconnect
/// backoff (only the replay measurement reconnects) and a short grace period (echo finishes at once).
pub fn config_toml(max_backlog: u64) -> String {
    format!(
        "max_backlog = {max_backlog}\ngrace_period_secs = 10\nreconnect_min_ms = 50\nreconnect_max_ms = 100\n"
    )
}
