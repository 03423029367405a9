//! The round-trip benchmark: endpoint-agent against the raw broker ceiling, on the same machine in the same run.
//! Owns the command line, the matrix (payload x pattern x endpoints), the order of runs (raw and agent
//! alternating, several repetitions), the backlog-drain and replay measurements, the progress line on stderr,
//! and writing the table (stdout), JSON and SVG. How each mode works lives in the `benches` library; what the
//! figures mean is in docs/benchmarks.md. It reports the targets as met or missed; it never fails on them.

use anyhow::{Context, Result, bail};
use benches::agent::{self, AgentProc};
use benches::broker::{RunState, Service, task_id};
use benches::forward::{Forwarder, free_port};
use benches::raw::{AGENT_DEFAULT_PREFETCH, RawClient};
use benches::report::{self, Medians, Row, Sample};
use clap::Parser;
use endpoint_agent::store::Store;
use endpoint_agent::task::{Intake, NewTask};
use endpoint_wire::BrokerUrl;
use endpoint_wire::EndpointId;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use test_support::broker::{BrokerAddr, Vhost};
use test_support::build::{Profile, agent_binary};

/// Round trip of tasks through endpoint-agent vs the raw broker ceiling.
///
/// Every row runs both modes back to back, alternating which goes first, for several repetitions, and reports
/// medians and the agent/raw ratio:
///
///   raw    the broker's round-trip limit: a client with the agent's topology, prefetch and message properties
///          (persistent task in, persistent mandatory confirmed result out, ack after the confirm) but no disk
///          queue and no executor;
///
///   agent  the real `endpoint-agent` (release build, one process per endpoint, own data dir) running `echo`.
///
/// Latency is submit to result receipt, per task (HdrHistogram). Also measured: draining a backlog of tasks
/// queued before the consumer starts, and replaying results pending on disk after the path to the broker opens.
///
/// Needs RabbitMQ on AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f; `docker compose up -d`) and its
/// rabbitmqctl (or RABBITMQCTL="docker compose exec -T rabbitmq rabbitmqctl"): the bench works in a vhost of its
/// own, deleted at the end.
#[derive(Parser, Debug)]
#[command(
    name = "roundtrip",
    after_help = "Examples:
  cargo bench -p benches                      quick run (about 2 minutes), figures to check a change
  cargo bench -p benches -- --full            the documented matrix (about 15 minutes)
  cargo bench -p benches -- --only-payloads 100 --only-endpoints 1 --reps 5
  cargo bench -p benches -- --skip-matrix     only the backlog drain and the replay
  cargo bench -p benches -- --http            quick run, every agent serving HTTP (compare with a run without)
  cargo bench -p benches -- --busy            every row idle and again beside a busy core
  cargo bench -p benches -- --skip-matrix --skip-backlog --skip-replay   nothing but the warm-up
  cargo bench -p benches -- --only-payloads 100 --only-endpoints 1 --only-rates 500 --skip-python --skip-calls
                                              the classic and quorum 100 B rows only

Output: progress on stderr, a table on stdout, target/bench/roundtrip.json and target/bench/roundtrip.svg
(or under --out). If a run fails because the broker restarted, run it again."
)]
struct Args {
    /// The documented size: 3 repetitions, 10,000 tasks per blast, 5 s per paced run, 1/10/100 endpoints,
    /// 100,000-task backlog and replay. Without it: 1 repetition, 2,000 tasks, 2 s, 1/10 endpoints, 10,000.
    #[arg(long)]
    full: bool,
    /// Repetitions of each row (each alternates raw and agent).
    #[arg(long)]
    reps: Option<usize>,
    /// Tasks per full-blast run (capped at 160 MiB of payload per run).
    #[arg(long)]
    tasks: Option<usize>,
    /// Seconds of open-loop submission per paced run (capped at 160 MiB of payload per run).
    #[arg(long)]
    seconds: Option<f64>,
    /// Payload sizes in bytes, comma-separated [default: 100,4096,65536].
    #[arg(long, value_delimiter = ',')]
    only_payloads: Option<Vec<usize>>,
    /// Paced rates in tasks/s in total, comma-separated [default: 500,2000].
    #[arg(long, value_delimiter = ',')]
    only_rates: Option<Vec<f64>>,
    /// Endpoint counts, comma-separated [default: 1,10 quick; 1,10,100 full]. Counts above 1 run at the
    /// smallest payload, full blast and the lowest rate only.
    #[arg(long, value_delimiter = ',')]
    only_endpoints: Option<Vec<usize>>,
    /// Tasks queued for the backlog drain and the replay [default: 10,000 quick; 100,000 full].
    #[arg(long)]
    backlog: Option<usize>,
    /// Skip the payload/pattern/endpoint matrix.
    #[arg(long)]
    skip_matrix: bool,
    /// Skip the backlog drain.
    #[arg(long)]
    skip_backlog: bool,
    /// Skip the replay after reconnect.
    #[arg(long)]
    skip_replay: bool,
    /// Skip the Python function rows (a pool of workers and a command per task, next to `echo`).
    #[arg(long)]
    skip_python: bool,
    /// Skip the `call` rows (`echo` through the service library's `Client::call`).
    #[arg(long)]
    skip_calls: bool,
    /// Skip the quorum rows (100 B full blast and the lowest rate with a quorum tasks queue, single node).
    #[arg(long)]
    skip_quorum: bool,
    /// Measure every row twice: idle, and busy, beside a process that keeps one core busy (`sh -c 'while :;
    /// do :; done'` at normal priority, started before and stopped after each busy run, raw and agent alike):
    /// the contended case users see on shared hosts. Busy rows leave out the Python and `call` modes.
    #[arg(long)]
    busy: bool,
    /// Concurrent callers in the full-blast `call` row (each calls again as soon as its call returns).
    #[arg(long, default_value_t = 64)]
    callers: usize,
    /// Start every agent with its HTTP endpoint on (`http_addr = 127.0.0.1:<free port>` in its config, the
    /// same as `--http`): metrics are then recorded on every task path. Nothing scrapes it during a run; compare
    /// the figures with a run without it (docs/benchmarks.md).
    #[arg(long)]
    http: bool,
    /// Use this endpoint-agent binary instead of building it with `cargo build --release -p endpoint-agent`.
    #[arg(long, value_name = "PATH")]
    agent_bin: Option<PathBuf>,
    /// Where the JSON, SVG and (temporary) agent data dirs go [default: <workspace>/target/bench].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Payload bytes a single run may move, so 64 KiB rows stay within the machine's time and memory.
const RUN_BYTES_CAP: usize = 160 * 1024 * 1024;

/// Tasks per run of the Python command form: an interpreter per task runs a few dozen per second per core,
/// so a run the size of the others would take minutes and say nothing more.
const COMMAND_TASKS_CAP: usize = 300;

struct Plan {
    reps: usize,
    tasks: usize,
    seconds: f64,
    payloads: Vec<usize>,
    rates: Vec<f64>,
    endpoints: Vec<usize>,
    backlog: usize,
    /// Whether the Python rows run (python3 is there and --skip-python was not given).
    python: bool,
    /// Whether the `call` rows run.
    calls: bool,
    /// Whether the quorum rows run.
    quorum: bool,
    /// Whether every row also runs busy (`--busy`).
    busy: bool,
    callers: usize,
}

impl Plan {
    fn from(a: &Args) -> Result<Plan> {
        let plan = Plan {
            reps: a.reps.unwrap_or(if a.full { 3 } else { 1 }),
            tasks: a.tasks.unwrap_or(if a.full { 10_000 } else { 2_000 }),
            seconds: a.seconds.unwrap_or(if a.full { 5.0 } else { 2.0 }),
            payloads: a
                .only_payloads
                .clone()
                .unwrap_or_else(|| vec![100, 4096, 65536]),
            rates: a.only_rates.clone().unwrap_or_else(|| vec![500.0, 2000.0]),
            endpoints: a.only_endpoints.clone().unwrap_or_else(|| {
                if a.full {
                    vec![1, 10, 100]
                } else {
                    vec![1, 10]
                }
            }),
            backlog: a.backlog.unwrap_or(if a.full { 100_000 } else { 10_000 }),
            python: !a.skip_python && agent::python_available(),
            calls: !a.skip_calls,
            quorum: !a.skip_quorum,
            busy: a.busy,
            callers: a.callers.max(1),
        };
        if !a.skip_python && !plan.python {
            eprintln!("python3 does not run here: the Python pool and command rows are skipped");
        }
        if plan.reps == 0
            || plan.tasks == 0
            || plan.backlog == 0
            || plan.seconds.is_nan()
            || plan.seconds <= 0.0
        {
            bail!("--reps, --tasks, --seconds and --backlog must be above 0");
        }
        if plan.payloads.contains(&0)
            || plan.endpoints.contains(&0)
            || plan.rates.iter().any(|r| r.is_nan() || *r <= 0.0)
        {
            bail!("payloads, endpoint counts and rates must be above 0");
        }
        Ok(plan)
    }

    /// The rows: every payload x (blast + rates) at the smallest endpoint count; the other endpoint counts at
    /// the smallest payload, full blast and the lowest rate (how cost grows with endpoints).
    fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        let row = Row::new;
        let mut eps = self.endpoints.clone();
        eps.sort_unstable();
        eps.dedup();
        let mut rates = self.rates.clone();
        rates.sort_by(f64::total_cmp);
        let Some((&first, more)) = eps.split_first() else {
            return rows;
        };
        let smallest = self.payloads.iter().copied().min().unwrap_or(100);
        for &p in &self.payloads {
            rows.push(row(p, None, first));
            for &r in &rates {
                rows.push(row(p, Some(r), first));
            }
        }
        // The Python function runs at the smallest payload, one endpoint, full blast and the lowest rate.
        for r in rows.iter_mut() {
            let measured =
                r.payload == smallest && (r.rate.is_none() || r.rate == rates.first().copied());
            r.python = self.python && measured;
            r.library = self.calls && measured;
        }
        for &n in more {
            rows.push(row(smallest, None, n));
            if let Some(&r) = rates.first() {
                rows.push(row(smallest, Some(r), n));
            }
        }
        // The cost of replication: the smallest payload, one endpoint, full blast and the lowest rate, with a
        // quorum tasks queue (on the one node here: the Raft log's cost without the network's).
        if self.quorum {
            for rate in std::iter::once(None).chain(rates.first().map(|&r| Some(r))) {
                let mut r = row(smallest, rate, first);
                r.quorum = true;
                rows.push(r);
            }
        }
        // Each row again beside a busy core, right after its idle twin (so drift hits both alike).
        if self.busy {
            rows = rows
                .into_iter()
                .flat_map(|idle| {
                    let mut busy = row(idle.payload, idle.rate, idle.endpoints);
                    busy.quorum = idle.quorum;
                    busy.busy = true;
                    [idle, busy]
                })
                .collect();
        }
        rows
    }

    fn tasks_for(&self, row: &Row, mode: Mode) -> usize {
        let wanted = match row.rate {
            None => self.tasks,
            Some(r) => (r * self.seconds).ceil() as usize,
        };
        let wanted = if mode == Mode::Command {
            wanted.min(COMMAND_TASKS_CAP)
        } else {
            wanted
        };
        wanted
            .min(RUN_BYTES_CAP / row.payload.max(1))
            .max(row.endpoints)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The broker's round-trip limit.
    Raw,
    /// The agent running the built-in `echo`.
    Agent,
    /// The agent running a Python function on a pool of workers.
    Pool,
    /// The agent running the same Python function as a command.
    Command,
    /// The agent running `echo`, called through the service library (`Client::call`).
    Call,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Raw => "raw",
            Mode::Agent => "agent",
            Mode::Pool => "pool",
            Mode::Command => "cmd",
            Mode::Call => "call",
        }
    }

    /// The function its tasks name.
    fn function(self) -> &'static str {
        match self {
            Mode::Raw | Mode::Agent | Mode::Call => endpoint_agent::config::BUILTIN_ECHO,
            Mode::Pool => agent::PY_POOL,
            Mode::Command => agent::PY_COMMAND,
        }
    }
}

/// The one-line progress on stderr.
#[derive(Clone, Default)]
struct Progress(Arc<Mutex<Option<Current>>>);

/// The run on the progress line: its label, its receipts and when it started.
type Current = (String, Arc<RunState>, Instant);

impl Progress {
    fn set(&self, label: String, state: &Arc<RunState>) {
        *self.0.lock().expect("progress lock is never poisoned") =
            Some((label, state.clone(), Instant::now()));
    }

    fn clear(&self) {
        let had = self
            .0
            .lock()
            .expect("progress lock is never poisoned")
            .take()
            .is_some();
        if had {
            eprint!("\r{:110}\r", "");
        }
    }

    fn note(&self, line: &str) {
        self.clear();
        eprintln!("{line}");
    }

    fn spawn(&self) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let cur =
                    me.0.lock()
                        .expect("progress lock is never poisoned")
                        .clone();
                if let Some((label, state, since)) = cur {
                    let done = state.received();
                    let width = 24;
                    let filled = (done * width)
                        .checked_div(state.total)
                        .unwrap_or(0)
                        .min(width);
                    eprint!(
                        "\r{label:<52} [{}{}] {done}/{} {:.1}s   ",
                        "#".repeat(filled),
                        ".".repeat(width - filled),
                        state.total,
                        since.elapsed().as_secs_f64()
                    );
                    let _ = std::io::stderr().flush();
                }
            }
        })
    }
}

struct Bench {
    callers: usize,
    /// Whether agents serve HTTP (`--http`).
    http: bool,
    vhost: Vhost,
    url: BrokerUrl,
    service: Service,
    agent_bin: PathBuf,
    data: PathBuf,
    progress: Progress,
    next_run: u64,
    /// Endpoints by (count, quorum tasks queue).
    endpoints: BTreeMap<(usize, bool), Vec<EndpointId>>,
}

impl Bench {
    fn run_id(&mut self) -> u64 {
        self.next_run += 1;
        self.next_run
    }

    /// The `n` endpoints of rows with `n` endpoints (with quorum tasks queues for quorum rows), provisioned
    /// on first use.
    async fn endpoints(&mut self, n: usize, quorum: bool) -> Result<Vec<EndpointId>> {
        if let Some(eps) = self.endpoints.get(&(n, quorum)) {
            return Ok(eps.clone());
        }
        let kind = if quorum { "q" } else { "" };
        let eps = (0..n)
            .map(|i| EndpointId::new(format!("bench{kind}{n}-{i}")).context("bench endpoint id"))
            .collect::<Result<Vec<_>>>()?;
        let queue_type = if quorum {
            endpoint_wire::QueueType::Quorum
        } else {
            endpoint_wire::QueueType::Classic
        };
        self.service.provision(&eps, queue_type).await?;
        self.endpoints.insert((n, quorum), eps.clone());
        Ok(eps)
    }

    fn start_agents(
        &self,
        eps: &[EndpointId],
        run: u64,
        max_backlog: u64,
        url: &str,
        python: bool,
    ) -> Result<Vec<AgentProc>> {
        let config = agent::config_toml(max_backlog, python);
        eps.iter()
            .map(|ep| {
                let dir = self.data.join(format!("run{run}-{ep}"));
                // First in the file: a key after the function tables would belong to the last of them.
                let config = if self.http {
                    format!("http_addr = \"127.0.0.1:{}\"\n{config}", free_port()?)
                } else {
                    config.clone()
                };
                AgentProc::start(&self.agent_bin, ep, &dir, url, &config)
            })
            .collect()
    }

    /// SIGTERMs every agent, waits for each, removes their data dirs.
    fn stop_agents(&self, procs: Vec<AgentProc>) -> Result<()> {
        let mut first_err = None;
        for p in &procs {
            p.terminate();
        }
        for p in procs {
            let dir = p.data_dir.clone();
            if let Err(e) = p.wait_exit(Duration::from_secs(30)) {
                first_err.get_or_insert(e);
            }
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(dir.with_extension("toml"));
            let _ = std::fs::remove_file(dir.with_extension("log"));
        }
        first_err.map_or(Ok(()), Err)
    }

    /// One repetition of one row in one mode.
    async fn measure(
        &mut self,
        mode: Mode,
        row: &Row,
        tasks: usize,
        label: &str,
    ) -> Result<Sample> {
        let eps = self.endpoints(row.endpoints, row.quorum).await?;
        // Started before the mode's processes and stopped (dropped) after them: the same load for raw and agent.
        let _load = if row.busy {
            Some(Spinner::start()?)
        } else {
            None
        };
        let run = self.run_id();
        let state = RunState::new(run, tasks)?;
        self.service.begin(&state);
        let payload = vec![b'x'; row.payload];
        let mut raws = Vec::new();
        let mut procs = Vec::new();
        let mut cpu0 = 0.0;
        match mode {
            Mode::Raw => {
                for ep in &eps {
                    raws.push(
                        RawClient::start(&self.url, ep.clone(), AGENT_DEFAULT_PREFETCH).await?,
                    );
                }
            }
            Mode::Agent | Mode::Pool | Mode::Command | Mode::Call => {
                let python = matches!(mode, Mode::Pool | Mode::Command);
                procs = self.start_agents(&eps, run, 10_000, &self.vhost.url(), python)?;
                let mut ready = self
                    .service
                    .wait_consumers(&eps, Duration::from_secs(60))
                    .await;
                if ready.is_ok() && mode == Mode::Pool {
                    ready = pool_ready(&procs, Duration::from_secs(60)).await;
                }
                if let Err(e) = ready {
                    let tail = procs.first_mut().map(|p| p.check_alive().err());
                    self.stop_agents(procs)?;
                    return Err(match tail.flatten() {
                        Some(dead) => dead,
                        None => e,
                    });
                }
                for p in &procs {
                    cpu0 += cpu_seconds(p, mode)?;
                }
            }
        }
        self.progress.set(label.to_owned(), &state);
        let t0 = Instant::now();
        let client = match mode {
            Mode::Call => Some(self.call_client(run).await?),
            _ => None,
        };
        let submitted = match (&client, row.rate) {
            (Some(c), None) => {
                let callers = self.callers;
                benches::call::blast(c, &state, &eps[0], &payload, callers).await
            }
            (Some(c), Some(r)) => benches::call::paced(c, &state, &eps[0], &payload, r).await,
            (None, None) => {
                self.service
                    .blast(&state, &eps, mode.function(), &payload)
                    .await
            }
            (None, Some(r)) => {
                self.service
                    .paced(&state, &eps, mode.function(), &payload, r)
                    .await
            }
        };
        let limit = Duration::from_secs(120 + (tasks / 100) as u64);
        let receipts = match submitted {
            Ok(()) => state.wait_all(limit).await,
            Err(e) => Err(e),
        };
        let mut sample = receipts.as_ref().ok().map(|r| {
            let secs = r
                .last
                .map_or(0.0, |l| l.saturating_duration_since(t0).as_secs_f64());
            Sample::from_hist(r.count, secs, &r.hist, r.duplicates)
        });
        if let (false, Some(s)) = (mode == Mode::Raw, sample.as_mut()) {
            let mut cpu1 = 0.0;
            let mut peak: f64 = 0.0;
            let mut total = 0.0;
            for p in &procs {
                cpu1 += cpu_seconds(p, mode)?;
                let rss = p.peak_rss_bytes()? as f64 / (1024.0 * 1024.0);
                peak = peak.max(rss);
                total += rss;
            }
            s.cpu_per_1k = Some((cpu1 - cpu0) / tasks as f64 * 1000.0);
            s.peak_rss_mib = Some(peak);
            s.total_rss_mib = Some(total);
        }
        self.progress.clear();
        for c in raws {
            c.stop().await?;
        }
        if let Some(c) = client {
            c.close().await;
            let service = c.service().clone();
            let _ =
                service_setup::delete_service_queue_if_empty(&self.service.conn, &service).await;
        }
        self.stop_agents(procs)?;
        self.service.purge_shared_results().await?;
        receipts?;
        sample.context("no sample despite receipts")
    }

    /// A service client of its own for one `call` run (its queue is deleted after the run).
    async fn call_client(&self, run: u64) -> Result<service_setup::Client> {
        let name = service_setup::ServiceName::new(format!("bench-{}-{run}", std::process::id()))
            .context("bench service name")?;
        let mut options = service_setup::ClientOptions::new(name);
        options.queue_expires = Some(Duration::from_secs(600));
        service_setup::Client::connect(std::slice::from_ref(&self.url), options)
            .await
            .context("while connecting the bench's service client")
    }

    /// `n` tasks queued in the broker before the consumer starts; time from starting it to the last result.
    async fn drain(&mut self, mode: Mode, n: usize) -> Result<Sample> {
        let run = self.run_id();
        let ep = EndpointId::new(format!("drain{run}")).context("drain endpoint id")?;
        self.service
            .provision(std::slice::from_ref(&ep), endpoint_wire::QueueType::Classic)
            .await?;
        let state = RunState::new(run, n)?;
        self.service.begin(&state);
        self.progress
            .set(format!("backlog {n}: queueing for {}", mode.name()), &state);
        self.service
            .blast(
                &state,
                std::slice::from_ref(&ep),
                endpoint_agent::config::BUILTIN_ECHO,
                &[b'x'; 100],
            )
            .await?;
        let (queued, _) = self.service.tasks_queue(&ep).await?;
        if queued as usize != n {
            bail!(
                "{queued} of {n} tasks are queued in {}: something else consumed them",
                ep.tasks_queue()
            );
        }
        self.progress
            .set(format!("backlog {n}: {} drains", mode.name()), &state);
        let t0 = Instant::now();
        let limit = Duration::from_secs(300 + (n / 100) as u64);
        let sample = match mode {
            Mode::Raw => {
                let client =
                    RawClient::start(&self.url, ep.clone(), AGENT_DEFAULT_PREFETCH).await?;
                let r = state.wait_all(limit).await;
                client.stop().await?;
                let r = r?;
                let secs = r
                    .last
                    .map_or(0.0, |l| l.saturating_duration_since(t0).as_secs_f64());
                Sample::from_hist(r.count, secs, &r.hist, r.duplicates)
            }
            // The backlog is `echo` tasks: every agent mode drains it alike.
            Mode::Agent | Mode::Pool | Mode::Command | Mode::Call => {
                // max_backlog >= n: the whole backlog may sit on the agent's disk (the RSS target's condition).
                let procs = self.start_agents(
                    std::slice::from_ref(&ep),
                    run,
                    n.max(100_000) as u64,
                    &self.vhost.url(),
                    false,
                )?;
                let r = state.wait_all(limit).await;
                let measured = procs
                    .first()
                    .map(|p| Ok::<_, anyhow::Error>((p.cpu_seconds()?, p.peak_rss_bytes()?)));
                self.stop_agents(procs)?;
                let r = r?;
                let (cpu, rss) = measured.context("no agent process")??;
                let secs = r
                    .last
                    .map_or(0.0, |l| l.saturating_duration_since(t0).as_secs_f64());
                let mut s = Sample::from_hist(r.count, secs, &r.hist, r.duplicates);
                s.cpu_per_1k = Some(cpu / n as f64 * 1000.0);
                s.peak_rss_mib = Some(rss as f64 / (1024.0 * 1024.0));
                s.total_rss_mib = s.peak_rss_mib;
                s
            }
        };
        self.progress.clear();
        self.service.purge_shared_results().await?;
        Ok(sample)
    }

    /// `n` results pending on an agent's disk, published once its path to the broker opens. The tasks are put
    /// on disk with the agent's own store (as its subscriber would), the agent runs them while its broker
    /// address refuses connections, then a forwarder opens the path; timed from then to the last result.
    async fn replay(&mut self, n: usize) -> Result<Value> {
        let run = self.run_id();
        let ep = EndpointId::new(format!("replay{run}")).context("replay endpoint id")?;
        self.service
            .provision(std::slice::from_ref(&ep), endpoint_wire::QueueType::Classic)
            .await?;
        let dir = self.data.join(format!("run{run}-{ep}"));
        {
            let (store, _) =
                Store::open(&dir, 3).context("while opening a store to queue replay tasks")?;
            for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
                let items = chunk
                    .iter()
                    .map(|s| {
                        Intake::Task(NewTask {
                            task_id: task_id(run, *s),
                            function: endpoint_agent::config::BUILTIN_ECHO.to_owned(),
                            payload: vec![b'x'; 100],
                            timeout_ms: None,
                            reply_to: None,
                            headers: None,
                        })
                    })
                    .collect();
                store
                    .ingest(items)
                    .await
                    .context("while queueing replay tasks on disk")?;
            }
        }
        // The store's writer thread finishes and closes the database once its last handle is gone.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let port = free_port()?;
        let url = self.vhost.url_via(&format!("127.0.0.1:{port}"));
        let state = RunState::new(run, n)?;
        self.service.begin(&state);
        self.progress.note(&format!(
            "replay {n}: agent runs {n} tasks offline (broker path closed)"
        ));
        let mut procs = self.start_agents(
            std::slice::from_ref(&ep),
            run,
            (n as u64).max(100_000),
            &url,
            false,
        )?;
        let t_start = Instant::now();
        let offline = loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if let Some(p) = procs.first_mut() {
                p.check_alive()?;
            }
            if let Ok((c, _)) = endpoint_agent::store::read_status(&dir)
                && c.queued == 0
                && c.running == 0
                && c.results_pending == n as u64
            {
                break t_start.elapsed().as_secs_f64();
            }
            if t_start.elapsed() > Duration::from_secs(600) {
                bail!("the offline agent did not finish {n} tasks within 600 s");
            }
        };
        let cpu0 = procs
            .first()
            .map(|p| p.cpu_seconds())
            .transpose()?
            .unwrap_or(0.0);
        self.progress
            .set(format!("replay {n}: path open, agent publishes"), &state);
        let t0 = Instant::now();
        let fwd = Forwarder::open(port, self.vhost.addr.hostport.clone()).await?;
        let r = state
            .wait_all(Duration::from_secs(300 + (n / 100) as u64))
            .await;
        let measured = procs
            .first()
            .map(|p| Ok::<_, anyhow::Error>((p.cpu_seconds()?, p.peak_rss_bytes()?)));
        self.progress.clear();
        self.stop_agents(procs)?;
        drop(fwd);
        self.service.purge_shared_results().await?;
        let r = r?;
        let (cpu1, rss) = measured.context("no agent process")??;
        let secs = r
            .last
            .map_or(0.0, |l| l.saturating_duration_since(t0).as_secs_f64());
        Ok(json!({
            "results": n, "offline_run_secs": offline,
            "replay_secs": secs, "results_per_s": n as f64 / secs,
            "cpu_s_per_1k_results": (cpu1 - cpu0) / n as f64 * 1000.0,
            "peak_rss_mib": rss as f64 / (1024.0 * 1024.0), "duplicates": r.duplicates,
        }))
    }
}

/// CPU seconds an agent has used: its own for `echo`; with its workers' and commands' for the Python modes.
fn cpu_seconds(p: &AgentProc, mode: Mode) -> Result<f64> {
    match mode {
        Mode::Pool | Mode::Command => p.tree_cpu_seconds(),
        Mode::Raw | Mode::Agent | Mode::Call => p.cpu_seconds(),
    }
}

/// Waits until every agent's pool workers have connected (`workers` in its status), so the Python pool's
/// start-up is not measured as latency.
async fn pool_ready(procs: &[AgentProc], limit: Duration) -> Result<()> {
    let want = agent::pool_size();
    let deadline = Instant::now() + limit;
    for p in procs {
        loop {
            let idle = endpoint_agent::store::read_status(&p.data_dir)
                .ok()
                .and_then(|(_, meta)| {
                    let (_, v) = meta.into_iter().find(|(k, _)| k == "workers")?;
                    let v: Value = serde_json::from_str(&v).ok()?;
                    v[agent::PY_POOL]["idle"].as_u64()
                });
            if idle >= Some(want as u64) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {want} Python pool workers connected to {}'s agent after {limit:?}; log tail:\n{}",
                    idle.unwrap_or(0),
                    p.endpoint,
                    p.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut t) => {
                t.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|m| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown".into());
    let rabbit = test_support::broker::rabbitmqctl(&["version"])
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": model, "mem_total": mem, "rabbitmq": rabbit,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
    })
}

async fn run(args: Args) -> Result<()> {
    let plan = Plan::from(&args)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"));
    std::fs::create_dir_all(&out).with_context(|| format!("while creating {}", out.display()))?;
    let agent_bin = match &args.agent_bin {
        Some(p) => p.clone(),
        None => {
            eprintln!("building endpoint-agent (cargo build --release -p endpoint-agent)");
            agent_binary(Profile::Release)?
        }
    };
    let vhost = Vhost::create("ea-bench", BrokerAddr::from_env()?)?;
    let url = vhost.broker_url()?;
    let service = match Service::connect(&url).await {
        Ok(s) => s,
        Err(e) => {
            let _ = vhost.delete();
            return Err(e);
        }
    };
    // The data dirs live on the output dir's disk, never tmpfs: the agent's fsyncs must be real.
    let data = out.join(format!("data-{}", std::process::id()));
    let mut bench = Bench {
        callers: plan.callers,
        http: args.http,
        vhost,
        url,
        service,
        agent_bin,
        data: data.clone(),
        progress: Progress::default(),
        next_run: 0,
        endpoints: BTreeMap::new(),
    };
    let ticker = bench.progress.spawn();
    // On Ctrl-C or SIGTERM the measurement future is dropped: agent processes are killed (AgentProc's Drop),
    // raw clients go with the runtime, and the vhost is still deleted below.
    let result = tokio::select! {
        r = measure_all(&mut bench, &plan, &args, &out) => r,
        _ = interrupted() => Err(anyhow::anyhow!("interrupted: nothing was written")),
    };
    ticker.abort();
    bench.progress.clear();
    let _ = std::fs::remove_dir_all(&data);
    let Bench { vhost, service, .. } = bench;
    service.stop();
    if let Err(e) = vhost.delete() {
        eprintln!("warning: could not delete vhost {}: {e:#}", vhost.name);
    }
    result
}

async fn measure_all(bench: &mut Bench, plan: &Plan, args: &Args, out: &Path) -> Result<()> {
    let started = Instant::now();
    let mut rows = if args.skip_matrix {
        Vec::new()
    } else {
        plan.rows()
    };
    let modes_of = |row: &Row| {
        let mut modes = vec![Mode::Raw, Mode::Agent];
        if row.library {
            modes.push(Mode::Call);
        }
        if row.python {
            modes.extend([Mode::Pool, Mode::Command]);
        }
        modes
    };
    let total_runs: usize = rows.iter().map(|r| modes_of(r).len() * plan.reps).sum();
    if !rows.is_empty() {
        // Warm-up, not recorded: first connections, first agent start, broker caches, Python's bytecode cache.
        let warm = Row::new(100, None, 1);
        let mut modes = vec![Mode::Raw, Mode::Agent];
        if plan.python {
            modes.push(Mode::Pool);
        }
        for mode in modes {
            bench
                .measure(mode, &warm, 1000, &format!("warm-up {}", mode.name()))
                .await?;
        }
    }
    let mut done = 0;
    for row in rows.iter_mut() {
        for rep in 0..plan.reps {
            // Alternate the order of modes so drift (page cache, broker state, neighbours) hits all alike.
            let mut order = modes_of(row);
            if rep % 2 == 1 {
                order.reverse();
            }
            for mode in order {
                let tasks = plan.tasks_for(row, mode);
                done += 1;
                let label = format!(
                    "[{done}/{total_runs}] {} {} rep {}/{}",
                    row.label(),
                    mode.name(),
                    rep + 1,
                    plan.reps
                );
                let s = bench
                    .measure(mode, row, tasks, &label)
                    .await
                    .with_context(|| format!("in {label}"))?;
                match mode {
                    Mode::Raw => row.raw.push(s),
                    Mode::Agent => row.agent.push(s),
                    Mode::Pool => row.pool.push(s),
                    Mode::Command => row.command.push(s),
                    Mode::Call => row.call.push(s),
                }
            }
        }
        let (r, a) = (Medians::of(&row.raw), Medians::of(&row.agent));
        bench.progress.note(&format!(
            "{:<22} raw {:>7.0}/s p50 {:.2} p99 {:.2} | agent {:>7.0}/s p50 {:.2} p99 {:.2} | ratio {:.3}",
            row.label(),
            r.tasks_per_s,
            r.p50_ms,
            r.p99_ms,
            a.tasks_per_s,
            a.p50_ms,
            a.p99_ms,
            a.tasks_per_s / r.tasks_per_s
        ));
        if row.library {
            let c = Medians::of(&row.call);
            bench.progress.note(&format!(
                "{:<22} library call {:>7.0}/s p50 {:.2} p99 {:.2} ({:.3} of agent throughput, p50 x{:.3})",
                "",
                c.tasks_per_s,
                c.p50_ms,
                c.p99_ms,
                c.tasks_per_s / a.tasks_per_s,
                c.p50_ms / a.p50_ms
            ));
        }
        if row.python {
            let (p, c) = (Medians::of(&row.pool), Medians::of(&row.command));
            bench.progress.note(&format!(
                "{:<22} python pool {:>7.0}/s p50 {:.2} p99 {:.2} ({:.3} of echo) | command {:>5.0}/s p50 {:.0} | pool/command {:.1}",
                "",
                p.tasks_per_s,
                p.p50_ms,
                p.p99_ms,
                p.tasks_per_s / a.tasks_per_s,
                c.tasks_per_s,
                c.p50_ms,
                p.tasks_per_s / c.tasks_per_s
            ));
        }
    }
    let mut backlog = Value::Null;
    if !args.skip_backlog {
        let raw = bench
            .drain(Mode::Raw, plan.backlog)
            .await
            .context("in the raw backlog drain")?;
        let agent = bench
            .drain(Mode::Agent, plan.backlog)
            .await
            .context("in the agent backlog drain")?;
        let j = |s: &Sample| json!({"secs": s.secs, "tasks_per_s": s.tasks_per_s(), "cpu_s_per_1k_tasks": s.cpu_per_1k, "peak_rss_mib": s.peak_rss_mib, "duplicates": s.duplicates});
        backlog = json!({"tasks": plan.backlog, "payload_bytes": 100, "raw": j(&raw), "agent": j(&agent), "agent_over_raw_secs": agent.secs / raw.secs});
        bench.progress.note(&format!(
            "backlog {}: raw {:.1}s ({:.0}/s) | agent {:.1}s ({:.0}/s, cpu/1k {:.3}s, peak RSS {:.1} MiB)",
            plan.backlog,
            raw.secs,
            raw.tasks_per_s(),
            agent.secs,
            agent.tasks_per_s(),
            agent.cpu_per_1k.unwrap_or(f64::NAN),
            agent.peak_rss_mib.unwrap_or(f64::NAN)
        ));
    }
    let mut replay = Value::Null;
    if !args.skip_replay {
        replay = bench.replay(plan.backlog).await.context("in the replay")?;
        let f = |k: &str| replay[k].as_f64().unwrap_or(f64::NAN);
        bench.progress.note(&format!(
            "replay {}: ran offline in {:.1}s; after the path opened all published in {:.2}s ({:.0}/s, cpu/1k {:.3}s, peak RSS {:.1} MiB)",
            plan.backlog,
            f("offline_run_secs"),
            f("replay_secs"),
            f("results_per_s"),
            f("cpu_s_per_1k_results"),
            f("peak_rss_mib")
        ));
    }

    let table = report::table(&rows);
    if args.http {
        println!("\nevery agent served HTTP (--http): metrics recorded, not scraped");
    }
    println!("\n{table}");
    if !backlog.is_null() {
        println!(
            "backlog drain of {} x 100 B: raw {:.2} s, agent {:.2} s (agent peak RSS {:.1} MiB, max_backlog >= tasks)",
            plan.backlog,
            backlog["raw"]["secs"].as_f64().unwrap_or(f64::NAN),
            backlog["agent"]["secs"].as_f64().unwrap_or(f64::NAN),
            backlog["agent"]["peak_rss_mib"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
    }
    if !replay.is_null() {
        println!(
            "replay of {} pending results after the path opens: {:.2} s ({:.0} results/s); raw has no equivalent",
            plan.backlog,
            replay["replay_secs"].as_f64().unwrap_or(f64::NAN),
            replay["results_per_s"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let targets = targets(&rows, &backlog, plan.callers);
    for line in &targets {
        println!("target: {line}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("bench took {elapsed:.0} s");

    let doc = json!({
        "bench": "roundtrip",
        "size": if args.full { "full" } else { "quick" },
        "agent_http": args.http,
        "plan": {"reps": plan.reps, "blast_tasks": plan.tasks, "paced_seconds": plan.seconds, "run_bytes_cap": RUN_BYTES_CAP,
                 "payloads": plan.payloads, "rates": plan.rates, "endpoints": plan.endpoints, "backlog": plan.backlog,
                 "prefetch": AGENT_DEFAULT_PREFETCH},
        "machine": machine(),
        "elapsed_secs": elapsed,
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "backlog_drain": backlog,
        "replay": replay,
        "targets": targets,
    });
    let json_path = out.join("roundtrip.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&doc).context("while encoding JSON")?,
    )
    .with_context(|| format!("while writing {}", json_path.display()))?;
    let svg_path = out.join("roundtrip.svg");
    if !rows.is_empty() {
        let title = format!(
            "endpoint-agent vs raw broker: medians of {} reps ({})",
            plan.reps,
            if args.full { "full" } else { "quick" }
        );
        std::fs::write(&svg_path, report::svg(&rows, &title))
            .with_context(|| format!("while writing {}", svg_path.display()))?;
    }
    eprintln!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}

/// A process that keeps one core busy for the `--busy` rows: a shell loop at normal priority, killed when
/// dropped.
struct Spinner(std::process::Child);

impl Spinner {
    fn start() -> Result<Spinner> {
        let child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("while starting the --busy load (sh -c 'while :; do :; done')")?;
        Ok(Spinner(child))
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The issue's targets, stated as met or missed (never asserted).
fn targets(rows: &[Row], backlog: &Value, callers: usize) -> Vec<String> {
    let mut out = Vec::new();
    let find_in = |rate: Option<f64>, quorum: bool| {
        rows.iter()
            .find(|r| r.payload == 100 && r.endpoints == 1 && r.rate == rate && r.quorum == quorum)
    };
    let find = |rate: Option<f64>| find_in(rate, false);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    if let Some(r) = find(None) {
        let ratio = Medians::of(&r.agent).tasks_per_s / Medians::of(&r.raw).tasks_per_s;
        out.push(format!(
            "full-blast 100 B throughput agent/raw = {ratio:.3} (>= 0.85): {}",
            verdict(ratio >= 0.85)
        ));
    }
    if let Some(r) = find(Some(500.0)) {
        let (raw, agent) = (Medians::of(&r.raw), Medians::of(&r.agent));
        let (d50, d99) = (agent.p50_ms - raw.p50_ms, agent.p99_ms - raw.p99_ms);
        out.push(format!(
            "paced 500/s p50 agent - raw = {d50:.2} ms (<= 1 ms): {}",
            verdict(d50 <= 1.0)
        ));
        out.push(format!(
            "paced 500/s p99 agent - raw = {d99:.2} ms (<= 3 ms): {}",
            verdict(d99 <= 3.0)
        ));
    }
    let python = |rate: Option<f64>| find(rate).filter(|r| r.python && !r.pool.is_empty());
    if let Some(r) = python(None) {
        let (echo, pool, command) = (
            Medians::of(&r.agent),
            Medians::of(&r.pool),
            Medians::of(&r.command),
        );
        let of_echo = pool.tasks_per_s / echo.tasks_per_s;
        out.push(format!(
            "full-blast 100 B Python pool / echo throughput = {of_echo:.3} (>= 0.7): {}",
            verdict(of_echo >= 0.7)
        ));
        let of_command = pool.tasks_per_s / command.tasks_per_s;
        out.push(format!(
            "full-blast 100 B Python pool / Python command throughput = {of_command:.1} (>= 20): {}",
            verdict(of_command >= 20.0)
        ));
        let cpu = |m: &Medians| m.cpu_per_1k.map_or("-".to_owned(), |c| format!("{c:.3} s"));
        out.push(format!(
            "CPU per 1,000 tasks (100 B blast, agent and its task processes): echo {}, Python pool {}, Python command {} (stated)",
            cpu(&echo),
            cpu(&pool),
            cpu(&command)
        ));
    }
    if let Some(r) = find(Some(500.0)).filter(|r| r.library && !r.call.is_empty()) {
        let (agent, call) = (Medians::of(&r.agent), Medians::of(&r.call));
        let ratio = call.p50_ms / agent.p50_ms;
        out.push(format!(
            "paced 500/s p50 library call / bench client = {ratio:.3} ({:.2} vs {:.2} ms; <= 1.10): {}",
            call.p50_ms,
            agent.p50_ms,
            verdict(ratio <= 1.10)
        ));
    }
    if let Some(r) = find(None).filter(|r| r.library && !r.call.is_empty()) {
        let (agent, call) = (Medians::of(&r.agent), Medians::of(&r.call));
        out.push(format!(
            "full-blast 100 B library calls ({callers} concurrent callers) = {:.0} calls/s, {:.3} of the bench client's pipelined submit (stated)",
            call.tasks_per_s,
            call.tasks_per_s / agent.tasks_per_s
        ));
    }
    if let Some(r) = python(Some(500.0)) {
        let d50 = Medians::of(&r.pool).p50_ms - Medians::of(&r.agent).p50_ms;
        out.push(format!(
            "paced 500/s p50 Python pool - echo = {d50:.2} ms (<= 1 ms): {}",
            verdict(d50 <= 1.0)
        ));
    }
    if let Some(rss) = backlog["agent"]["peak_rss_mib"].as_f64() {
        let n = backlog["tasks"].as_u64().unwrap_or(0);
        out.push(format!(
            "agent peak RSS draining {n} queued tasks = {rss:.1} MiB (< 64 MiB): {}",
            verdict(rss < 64.0)
        ));
    }
    if let Some(r) = find(None)
        && let Some(cpu) = Medians::of(&r.agent).cpu_per_1k
    {
        out.push(format!(
            "agent CPU per 1,000 tasks (100 B blast, 1 endpoint) = {cpu:.3} s (stated)"
        ));
    }
    // Tail latency and large payloads, idle and (with --busy) beside a busy core.
    for busy in [false, true] {
        let when = if busy { "busy" } else { "idle" };
        let at = |payload: usize, rate: Option<f64>| {
            rows.iter().find(|r| {
                r.payload == payload
                    && r.endpoints == 1
                    && r.rate == rate
                    && !r.quorum
                    && r.busy == busy
            })
        };
        if let Some(r) = at(100, Some(500.0)) {
            let (raw, agent) = (Medians::of(&r.raw), Medians::of(&r.agent));
            let (d50, d99) = (agent.p50_ms - raw.p50_ms, agent.p99_ms - raw.p99_ms);
            out.push(format!(
                "{when}: paced 500/s 100 B agent - raw p50 = {d50:.2} ms (<= 0.5 ms): {}; p99 = {d99:.2} ms (<= 2 ms): {}",
                verdict(d50 <= 0.5),
                verdict(d99 <= 2.0)
            ));
        }
        if let Some(r) = at(100, None) {
            let ratio = Medians::of(&r.agent).tasks_per_s / Medians::of(&r.raw).tasks_per_s;
            out.push(format!(
                "{when}: full-blast 100 B agent/raw = {ratio:.3} (>= 1.0): {}",
                verdict(ratio >= 1.0)
            ));
        }
        if let Some(r) = at(65536, None) {
            let ratio = Medians::of(&r.agent).tasks_per_s / Medians::of(&r.raw).tasks_per_s;
            out.push(format!(
                "{when}: full-blast 64 KiB agent/raw = {ratio:.3} (>= 0.8): {}",
                verdict(ratio >= 0.8)
            ));
        }
        if let Some(r) = at(65536, Some(2000.0)) {
            let kept = Medians::of(&r.agent).tasks_per_s / 2000.0;
            out.push(format!(
                "{when}: 64 KiB at 2,000/s agent keeps up = {kept:.3} of the offered rate (>= 0.95): {}",
                verdict(kept >= 0.95)
            ));
        }
    }
    // The cost of a quorum tasks queue, from the same run (stated, no target).
    if let (Some(c), Some(q)) = (find(None), find_in(None, true)) {
        let m = |s: &[report::Sample]| Medians::of(s).tasks_per_s;
        out.push(format!(
            "quorum tasks queue, 100 B full blast: agent/raw = {:.3}; quorum/classic throughput: raw {:.3}, agent {:.3} (stated)",
            m(&q.agent) / m(&q.raw),
            m(&q.raw) / m(&c.raw),
            m(&q.agent) / m(&c.agent)
        ));
    }
    if let (Some(c), Some(q)) = (find(Some(500.0)), find_in(Some(500.0), true)) {
        let (cr, ca, qr, qa) = (
            Medians::of(&c.raw),
            Medians::of(&c.agent),
            Medians::of(&q.raw),
            Medians::of(&q.agent),
        );
        out.push(format!(
            "quorum tasks queue, paced 500/s: agent - raw p50 {:.2} ms, p99 {:.2} ms; quorum - classic p50: raw {:.2} ms, agent {:.2} ms (stated)",
            qa.p50_ms - qr.p50_ms,
            qa.p99_ms - qr.p99_ms,
            qr.p50_ms - cr.p50_ms,
            qa.p50_ms - ca.p50_ms
        ));
    }
    out
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nerror: {e:#}");
            ExitCode::FAILURE
        }
    }
}
