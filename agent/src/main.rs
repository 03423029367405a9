//! The `endpoint-agent` binary: parses the command line, sets up logging and signals, and hands over to
//! `endpoint_agent::run`. Owns exit codes; no agent logic lives here.

use anyhow::Context;
use clap::{Parser, Subcommand};
use endpoint_agent::config::{BrokerOrder, BrokerSource, Config, Overrides, default_data_dir};
use endpoint_wire::{BrokerUrl, DEFAULT_BROKER_URL, EndpointId, TlsFiles, parse_broker_urls};
use std::path::PathBuf;
use std::process::ExitCode;

/// Runs tasks delivered over RabbitMQ without ever losing one.
///
/// Every task is written to a local SQLite queue before it is acked; every result is written to disk before it
/// is published and kept until the broker confirms it. Broker outages, crashes and restarts lose nothing.
#[derive(Parser, Debug)]
#[command(name = "endpoint-agent", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: `text` (colour only when stderr is a terminal) or `json` (one object per line,
    /// with `timestamp`, `level`, `target`, `message` and the event's fields, such as `task_id` on per-task
    /// lines; for log shippers).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "ENDPOINT_AGENT_LOG_FORMAT"
    )]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve one endpoint: consume `<EP>.tasks`, run tasks, publish results to the `results` exchange.
    #[command(after_help = "Examples:
  service-setup provision --endpoint-id demo
  endpoint-agent start --endpoint-id demo
  endpoint-agent start --endpoint-id demo --config agent.toml --workers 8
  endpoint-agent start --endpoint-id demo --broker-url-file /etc/endpoint-agent/demo.url
  AMQP_URL=amqps://user:pass@broker:5671/prod endpoint-agent start --endpoint-id demo --tls-ca ca.pem
  endpoint-agent start --endpoint-id demo --broker-url amqp://u:p@rmq1/%2f,amqp://u:p@rmq2/%2f,amqp://u:p@rmq3/%2f

The broker URL: --broker-url-file (AMQP_URL_FILE), else --broker-url (AMQP_URL), else the local default.
Several URLs (a cluster's nodes) are tried in random order (--broker-order listed: as given); a lost
connection moves on to the next node. `endpoint-agent status` and the log name the node in use.
A password given with --broker-url is visible to every local user in the process list: prefer the file
(`service-setup provision --credentials FILE` writes one, mode 0600) or AMQP_URL. amqps:// URLs use TLS
with the server's certificate and host name verified (the system's CAs and --tls-ca); they never fall back
to plaintext, and a certificate problem at start is an error (exit 1).

Signals: SIGINT/SIGTERM stop taking tasks, let running ones finish within grace_period_secs and publish
what is pending; a second signal exits at once (nothing is lost: unfinished work resumes at the next start).
SIGTSTP (or `endpoint-agent quiet`) quiets the agent: it gives up the tasks queue so a standby takes it, and
finishes and publishes what is on its disk; stop it with SIGTERM afterwards. SIGHUP re-reads --config:
function changes apply to tasks not yet started; other settings need a restart (the log says which).
Under systemd (Type=notify) the agent sends READY=1, STOPPING=1 and, with WatchdogSec=, WATCHDOG=1.
Logs go to stderr; RUST_LOG sets the level (default `info,lapin=off`: every broker error the agent sees is
logged by the agent itself; RUST_LOG=info,endpoint_agent=debug adds a line per task).")]
    Start {
        #[command(flatten)]
        endpoint: EndpointArgs,
        #[command(flatten)]
        broker: BrokerArgs,
        /// TOML file with limits and command functions (see README, "Configuration").
        #[arg(long, env = "ENDPOINT_AGENT_CONFIG")]
        config: Option<PathBuf>,
        /// Concurrent task slots [default: number of CPUs, or the config file's `workers`].
        #[arg(long)]
        workers: Option<usize>,
        /// Deliveries in flight from the broker before an ack [default: 256, or the config file's `prefetch`].
        #[arg(long)]
        prefetch: Option<u16>,
        /// Serve /metrics (Prometheus), /healthz, /readyz and a status page at / on ADDR, e.g. 127.0.0.1:9464
        /// [default: off, or the config file's `http_addr`].
        #[arg(long, value_name = "ADDR")]
        http: Option<std::net::SocketAddr>,
    },
    /// Quiet the agent running on an endpoint's data directory (sends it SIGTSTP): it stops consuming so a
    /// standby takes the tasks queue, finishes and publishes what is on its disk, and stays up until SIGTERM.
    #[command(after_help = "Examples:
  endpoint-agent quiet --endpoint-id demo
  endpoint-agent quiet --data-dir /var/lib/endpoint-agent/demo

A deploy: quiet the old agent, wait until `endpoint-agent status` shows nothing queued or running, then stop
it with SIGTERM. Exit status: 0 signalled, 1 no agent runs on the data directory.")]
    Quiet {
        #[command(flatten)]
        endpoint: StatusArgs,
    },
    /// Put the tasks an endpoint's data directory holds without a result back into the endpoint's tasks queue,
    /// for another agent (retiring a host that will not return). Publishes pending results first.
    #[command(after_help = "Examples:
  endpoint-agent handback --endpoint-id demo
  endpoint-agent handback --endpoint-id demo --data-dir /mnt/old-host/demo --broker-url-file demo.url

Each task goes back as it came (message_id, type, headers, reply_to, payload), mandatory and confirmed,
and is marked handed back on disk only after the broker's confirm: an interrupted hand-back loses
nothing; run it again. A task handed back twice reaches the queue twice (see docs/operations.md).
`handback_on_stop = true` in the config does the same at the end of every clean stop.
Exit status: 0 done, 1 failed part way (the rest stays on disk), 3 endpoint not provisioned,
4 an agent holds the data directory (stop it first).")]
    Handback {
        #[command(flatten)]
        endpoint: EndpointArgs,
        #[command(flatten)]
        broker: BrokerArgs,
        /// The agent's TOML config file (for the data directory, TLS and limits it names).
        #[arg(long, env = "ENDPOINT_AGENT_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Show what an endpoint's data directory holds and whether an agent is running on it.
    #[command(after_help = "Examples:
  endpoint-agent status --endpoint-id demo
  endpoint-agent status --data-dir /var/lib/endpoint-agent/demo --json")]
    Status {
        #[command(flatten)]
        endpoint: StatusArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
struct BrokerArgs {
    /// AMQP URL of the broker [default: amqp://guest:guest@127.0.0.1:5672/%2f]. For a cluster, every node's
    /// URL (repeat the flag, or separate them with commas): the agent tries them in --broker-order and, when
    /// a connection is lost, moves on to the next node. The password never appears in logs, but other local
    /// users can see the command line: prefer --broker-url-file.
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        value_name = "URL",
        value_delimiter = ','
    )]
    broker_url: Vec<String>,
    /// File of the broker URL(s): each non-empty line a URL or a comma-separated list (mode 0600; read again
    /// at every reconnect, so a rotated password is picked up).
    #[arg(long, env = "AMQP_URL_FILE", value_name = "FILE")]
    broker_url_file: Option<PathBuf>,
    /// Order to try the broker URLs in: random (agents spread over a cluster's nodes) or listed (the first
    /// while it works) [or the config file's `broker_order`; default: random].
    #[arg(long, value_name = "ORDER")]
    broker_order: Option<BrokerOrder>,
    /// PEM file of a CA to trust for amqps:// besides the system's [or the config file's `tls_ca`].
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate for amqps:// (for auth_mechanism=external) [or the config file's `tls_cert`].
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [or the config file's `tls_key`].
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl BrokerArgs {
    /// Where the URL comes from: the file wins over the URL, which wins over the default.
    fn source(self) -> anyhow::Result<(BrokerSource, TlsFiles, Option<BrokerOrder>)> {
        let tls = TlsFiles {
            ca: self.tls_ca,
            cert: self.tls_cert,
            key: self.tls_key,
        };
        let source = match self.broker_url_file {
            Some(file) => BrokerSource::File(file),
            None if self.broker_url.is_empty() => {
                BrokerSource::Url(vec![BrokerUrl::new(DEFAULT_BROKER_URL)?])
            }
            None => BrokerSource::Url(parse_broker_urls(&self.broker_url)?),
        };
        Ok((source, tls, self.broker_order))
    }
}

#[derive(clap::Args, Debug)]
struct EndpointArgs {
    /// The endpoint to serve (letters, digits, '_' and '-'); provision it first with `service-setup provision`.
    #[arg(long, env = "ENDPOINT_ID")]
    endpoint_id: EndpointId,
    /// Where the endpoint's tasks and results live [default: $XDG_STATE_HOME/endpoint-agent/<EP>, else
    /// ~/.local/state/endpoint-agent/<EP>]. One agent per data directory.
    #[arg(long, env = "ENDPOINT_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
#[group(required = true, multiple = true)]
struct StatusArgs {
    /// The endpoint whose default data directory to read.
    #[arg(long, env = "ENDPOINT_ID")]
    endpoint_id: Option<EndpointId>,
    /// The data directory to read (wins over --endpoint-id).
    #[arg(long, env = "ENDPOINT_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// Exit codes beyond 0/1: the endpoint is not provisioned, and the data directory is in use.
const EXIT_NOT_PROVISIONED: u8 = 3;
const EXIT_LOCKED: u8 = 4;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let result = match cli.command {
        Command::Start {
            endpoint,
            broker,
            config,
            workers,
            prefetch,
            http,
        } => start(endpoint, broker, config, workers, prefetch, http),
        Command::Status { endpoint, json } => status(endpoint, json),
        Command::Quiet { endpoint } => quiet(endpoint),
        Command::Handback {
            endpoint,
            broker,
            config,
        } => handback(endpoint, broker, config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let agent_error = e.downcast_ref::<endpoint_agent::AgentError>();
            match agent_error {
                Some(a) if a.is_not_provisioned() => ExitCode::from(EXIT_NOT_PROVISIONED),
                Some(a) if a.is_data_dir_locked() => ExitCode::from(EXIT_LOCKED),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Logs to stderr in `format`; `RUST_LOG` sets the level. Colour only when stderr is a terminal.
fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_ansi(false)
            .init(),
    }
}

fn start(
    endpoint: EndpointArgs,
    broker: BrokerArgs,
    config_file: Option<PathBuf>,
    workers: Option<usize>,
    prefetch: Option<u16>,
    http: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let (broker, tls, broker_order) = broker.source()?;
    let overrides = Overrides {
        endpoint_id: endpoint.endpoint_id,
        broker,
        tls,
        data_dir: endpoint.data_dir,
        workers,
        prefetch,
        broker_order,
    };
    let config = Config::load(overrides, config_file.as_deref())?;
    let config = config.with_http_flag(http);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("while starting the async runtime")?;
    runtime.block_on(async move {
        // Handlers first, before the start-up work: a signal that arrives while the agent opens its database or
        // registers is kept and stops it gracefully once it is up, instead of killing it outright.
        let mut signals = StopSignals::install();
        let shutdown = async move {
            signals.next().await;
            tokio::spawn(async move {
                signals.next().await;
                eprintln!("second signal: exiting now; unfinished tasks resume at the next start");
                std::process::exit(130);
            });
        };
        endpoint_agent::run(config, shutdown).await
    })?;
    Ok(())
}

/// SIGTERM and SIGINT, caught from the moment they are installed.
struct StopSignals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl StopSignals {
    fn install() -> StopSignals {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => StopSignals(Some((term, int))),
            // Without handlers the agent can still be stopped by SIGKILL; nothing is lost either way.
            _ => StopSignals(None),
        }
    }

    /// Resolves at the next SIGTERM or SIGINT (never, without handlers).
    async fn next(&mut self) {
        let Some((term, int)) = &mut self.0 else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

impl StatusArgs {
    fn dir(self) -> anyhow::Result<PathBuf> {
        match (self.data_dir, self.endpoint_id) {
            (Some(d), _) => Ok(d),
            (None, Some(ep)) => Ok(default_data_dir(&ep)),
            (None, None) => anyhow::bail!("pass --data-dir or --endpoint-id"),
        }
    }
}

fn quiet(args: StatusArgs) -> anyhow::Result<()> {
    let dir = args.dir()?;
    let pid = endpoint_agent::quiet(&dir).map_err(anyhow::Error::msg)?;
    println!(
        "asked the agent (pid {pid}) on {} to quiet: it takes no new tasks and finishes what is on its disk; `endpoint-agent status` shows when it is done, then stop it with SIGTERM",
        dir.display()
    );
    Ok(())
}

fn handback(
    endpoint: EndpointArgs,
    broker: BrokerArgs,
    config_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (broker, tls, broker_order) = broker.source()?;
    let overrides = Overrides {
        endpoint_id: endpoint.endpoint_id,
        broker,
        tls,
        data_dir: endpoint.data_dir,
        workers: None,
        prefetch: None,
        broker_order,
    };
    let config = Config::load(overrides, config_file.as_deref())?;
    if !config
        .data_dir
        .join(endpoint_agent::store::DB_FILE)
        .exists()
    {
        anyhow::bail!(
            "{} holds no agent database: nothing to hand back (pass the data directory with --data-dir)",
            config.data_dir.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("while starting the async runtime")?;
    let done = runtime.block_on(endpoint_agent::handback(config))?;
    println!(
        "handed back {} task(s) to the tasks queue; published {} pending result(s)",
        done.tasks_handed_back, done.results_published
    );
    Ok(())
}

fn status(args: StatusArgs, json: bool) -> anyhow::Result<()> {
    let dir = args.dir()?;
    let status = endpoint_agent::status::local_status(&dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.to_text());
    }
    Ok(())
}
