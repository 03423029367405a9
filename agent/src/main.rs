//! The `endpoint-agent` binary: parses the command line, sets up logging and signals, and hands over to
//! `endpoint_agent::run`. Owns exit codes; no agent logic lives here.

use anyhow::Context;
use clap::{Parser, Subcommand};
use endpoint_agent::config::{BrokerSource, Config, Overrides, default_data_dir};
use endpoint_wire::{BrokerUrl, DEFAULT_BROKER_URL, EndpointId, TlsFiles};
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

The broker URL: --broker-url-file (AMQP_URL_FILE), else --broker-url (AMQP_URL), else the local default.
A password given with --broker-url is visible to every local user in the process list: prefer the file
(`service-setup provision --credentials FILE` writes one, mode 0600) or AMQP_URL. amqps:// URLs use TLS
with the server's certificate and host name verified (the system's CAs and --tls-ca); they never fall back
to plaintext, and a certificate problem at start is an error (exit 1).

Signals: SIGINT/SIGTERM stop taking tasks, let running ones finish within grace_period_secs and publish
what is pending; a second signal exits at once (nothing is lost: unfinished work resumes at the next start).
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
    /// AMQP URL of the broker [default: amqp://guest:guest@127.0.0.1:5672/%2f]. The password never appears in
    /// logs, but other local users can see the command line: prefer --broker-url-file.
    #[arg(long, env = "AMQP_URL", hide_env_values = true)]
    broker_url: Option<String>,
    /// File whose first line is the broker URL (mode 0600; read again at every reconnect, so a rotated
    /// password is picked up).
    #[arg(long, env = "AMQP_URL_FILE", value_name = "FILE")]
    broker_url_file: Option<PathBuf>,
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
    fn source(self) -> anyhow::Result<(BrokerSource, TlsFiles)> {
        let tls = TlsFiles {
            ca: self.tls_ca,
            cert: self.tls_cert,
            key: self.tls_key,
        };
        let source = match (self.broker_url_file, self.broker_url) {
            (Some(file), _) => BrokerSource::File(file),
            (None, Some(url)) => BrokerSource::Url(BrokerUrl::new(url)?),
            (None, None) => BrokerSource::Url(BrokerUrl::new(DEFAULT_BROKER_URL)?),
        };
        Ok((source, tls))
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Start {
            endpoint,
            broker,
            config,
            workers,
            prefetch,
        } => start(endpoint, broker, config, workers, prefetch),
        Command::Status { endpoint, json } => status(endpoint, json),
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

fn start(
    endpoint: EndpointArgs,
    broker: BrokerArgs,
    config_file: Option<PathBuf>,
    workers: Option<usize>,
    prefetch: Option<u16>,
) -> anyhow::Result<()> {
    let (broker, tls) = broker.source()?;
    let overrides = Overrides {
        endpoint_id: endpoint.endpoint_id,
        broker,
        tls,
        data_dir: endpoint.data_dir,
        workers,
        prefetch,
    };
    let config = Config::load(overrides, config_file.as_deref())?;
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

fn status(args: StatusArgs, json: bool) -> anyhow::Result<()> {
    let dir = match (args.data_dir, args.endpoint_id) {
        (Some(d), _) => d,
        (None, Some(ep)) => default_data_dir(&ep),
        (None, None) => anyhow::bail!("pass --data-dir or --endpoint-id"),
    };
    let status = endpoint_agent::status::local_status(&dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.to_text());
    }
    Ok(())
}
