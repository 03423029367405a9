//! The `service-setup` command line: parses arguments, opens one broker connection, calls the library and prints.
//! Data (task ids, results, status) goes to stdout, logs and errors to stderr. It owns exit codes and printing and
//! nothing else: any AMQP logic belongs in the library, and the broker password must never be printed.

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser, Subcommand};
use service_setup::management::Management;
use service_setup::{
    BrokerUrl, CallError, Client, ClientOptions, DEFAULT_BROKER_URL, EndpointId, QueueType,
    ResultRecord, ResultsQuery, ServiceName, SetupError, SubmitOptions, Submitter, TaskSpec, Tls,
    TlsFiles,
};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_NOT_PROVISIONED: u8 = 3;
/// `call`: no agent serves the endpoint (its last heartbeat is stale or says it stopped, or there is none).
const EXIT_NOT_RUNNING: u8 = 4;
/// `call`: the endpoint's agent runs but has not answered within --timeout.
const EXIT_NO_RESULT_YET: u8 = 5;
/// EX_UNAVAILABLE from sysexits.h.
const EXIT_UNAVAILABLE: u8 = 69;

/// Tasks per confirmed batch: bounds memory and how much a failure leaves unreported.
const SUBMIT_CHUNK: u32 = 1000;

const MAIN_HELP: &str = "\
Exit codes:
  0   success (`call`: the task's status is ok)
  1   error (the message says what to do); `call`: the task failed, timed out or was rejected
  2   usage error (bad flag, bad endpoint id, bad broker URL)
  3   endpoint not provisioned: run `service-setup provision --endpoint-id <ID>`
  4   `call`: the endpoint's agent is not running (the task stays queued)
  5   `call`: the agent runs but has not answered within --timeout (the result comes later)
  69  broker unreachable or refused the connection

Environment:
  AMQP_URL   broker URL(s) when --broker-url is not given; several (a cluster's nodes) separated by commas
  RUST_LOG   log filter for stderr (default: warn)

Examples:
  service-setup provision --endpoint-id demo --heartbeat 5
  service-setup submit --endpoint-id demo --function echo --payload 'hello'
  service-setup call --endpoint-id demo --function echo --payload 'hello' --timeout 10s
  service-setup results --endpoint-id demo --max 1
  service-setup status --endpoint-id demo
  service-setup deprovision --endpoint-id demo --force";

/// Service side of endpoint-agent: provision endpoints, submit tasks, read results and check agents.
///
/// An endpoint is one agent's mailbox on RabbitMQ: a tasks queue, a registration (its settings) and a heartbeat
/// queue. Provision it once, start `endpoint-agent` with the same endpoint id, then submit tasks and read results.
#[derive(Debug, Parser)]
#[command(name = "service-setup", version, after_help = MAIN_HELP)]
struct Cli {
    /// AMQP URL of the broker, including user, password and vhost (`%2f` is the default vhost "/").
    /// The password is never printed. For a cluster, give each node's URL (repeat the flag, or separate them
    /// with commas): they are tried in random order until one accepts.
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = DEFAULT_BROKER_URL,
        global = true,
        value_name = "URL",
        value_delimiter = ','
    )]
    broker_url: Vec<String>,

    /// PEM file of a CA to trust for amqps:// URLs besides the system's. The server's certificate and host
    /// name are always verified; amqps:// never falls back to plaintext.
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate for amqps:// (with --tls-key; for auth_mechanism=external).
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create (or re-create) an endpoint's queues and write its registration; safe to run again.
    ///
    /// Declares the shared `tasks` and `results` exchanges and `results` queue, the endpoint's `<ID>.tasks`,
    /// `<ID>.registration` and `<ID>.heartbeat` queues, and publishes a fresh registration (confirmed by the
    /// broker). Running it again with another --heartbeat changes the interval; a running agent picks the new
    /// registration up when it reconnects.
    ///
    /// With --credentials FILE the endpoint gets a broker user of its own, `endpoint-<ID>`, with a generated
    /// password and only the rights its agent needs (consume its tasks, read its registration, publish its own
    /// results and heartbeats), made through the RabbitMQ management API (the service's URL's user needs the
    /// `administrator` tag); FILE (mode 0600) gets the URL the agent logs in with: start it with
    /// `--broker-url-file FILE`. Running it again rotates the password.
    ///
    /// --queue-type quorum replicates the endpoint's queues over a RabbitMQ cluster (docs/cluster.md): the
    /// endpoint keeps working while a majority of the nodes runs, and one agent at a time takes its tasks
    /// through the queue's single active consumer (a standby agent takes over the moment the active one's
    /// connection dies). Classic queues are faster and live on one node: right for a single broker.
    #[command(after_help = "\
Examples:
  service-setup provision --endpoint-id demo
  service-setup provision --endpoint-id demo --heartbeat 30 --json
  service-setup provision --endpoint-id demo --credentials demo.url
  endpoint-agent start --endpoint-id demo --broker-url-file demo.url
  AMQP_URL=amqp://u:p@rmq1:5672/%2f,amqp://u:p@rmq2:5672/%2f,amqp://u:p@rmq3:5672/%2f \\
    service-setup provision --endpoint-id demo --queue-type quorum")]
    Provision {
        #[command(flatten)]
        endpoint: EndpointArg,
        /// Seconds between the agent's heartbeats (also its AMQP heartbeat), 1 to 3600.
        #[arg(long, value_name = "SECONDS", default_value_t = 10,
              value_parser = clap::value_parser!(u16).range(1..=3600))]
        heartbeat: u16,
        /// Type of the endpoint's queues: classic (one node; the default for a new endpoint) or quorum
        /// (replicated over a cluster, single active consumer) [default: the type the endpoint already has].
        /// A queue cannot change type: to change it, deprovision the endpoint first.
        #[arg(long, value_name = "TYPE", value_parser = ["classic", "quorum"])]
        queue_type: Option<String>,
        /// Print the registration written, as JSON, instead of a summary line.
        #[arg(long)]
        json: bool,
        /// Create (or rotate) the endpoint's own broker user and write its agent's URL to FILE (mode 0600).
        #[arg(long, value_name = "FILE")]
        credentials: Option<PathBuf>,
        #[command(flatten)]
        management: ManagementArg,
    },

    /// Delete an endpoint's queues (never the shared `results` queue or exchanges); safe to run again.
    ///
    /// Refuses while tasks are still queued for the endpoint, unless --force. Results the endpoint already
    /// published stay in the shared `results` queue.
    #[command(after_help = "\
Examples:
  service-setup deprovision --endpoint-id demo
  service-setup deprovision --endpoint-id demo --force   # also drops queued tasks")]
    Deprovision {
        #[command(flatten)]
        endpoint: EndpointArg,
        /// Delete the tasks queue even if tasks are still queued (they are lost).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        management: ManagementArg,
    },

    /// Queue tasks for an endpoint and print their ids, one per line, once the broker confirmed them.
    ///
    /// The payload comes from --payload, --payload-file, or stdin when neither is given. With --count N the same
    /// payload is queued N times, each under its own id. A task for an endpoint that is not provisioned is refused
    /// (exit code 3).
    #[command(after_help = "\
Examples:
  service-setup submit --endpoint-id demo --function echo --payload 'hello'
  service-setup submit --endpoint-id demo --function resize --payload-file img.png --timeout-ms 30000
  echo '{\"n\": 1}' | service-setup submit --endpoint-id demo --function process
  service-setup submit --endpoint-id demo --function echo --payload x --count 10000 > ids.txt
  service-setup submit --endpoint-id demo --function echo --payload x --task-id order-42
  service-setup submit --endpoint-id demo --function echo --payload x --service billing-1")]
    Submit {
        #[command(flatten)]
        endpoint: EndpointArg,
        /// Name of the function the agent runs (as configured on the agent).
        #[arg(long, value_name = "NAME")]
        function: String,
        /// Payload text.
        #[arg(long, value_name = "TEXT", conflicts_with = "payload_file")]
        payload: Option<String>,
        /// Read the payload (any bytes) from this file.
        #[arg(long, value_name = "FILE")]
        payload_file: Option<PathBuf>,
        /// Queue the task this many times, each with a fresh id.
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
        /// Use this task id instead of a generated one (only with --count 1). Ids are how results are matched.
        #[arg(long, value_name = "ID")]
        task_id: Option<String>,
        /// Kill the task after this many milliseconds (can only shorten the function's own timeout).
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=i64::MAX as u64))]
        timeout_ms: Option<u64>,
        /// Send the result to this service's own queue (`service.<NAME>.results`, made if missing) instead of
        /// the shared `results` queue; read it with `results --service NAME`.
        #[arg(long, value_name = "NAME")]
        service: Option<ServiceName>,
    },

    /// Run a function on an endpoint and wait for its result: print the output (raw bytes) on stdout.
    ///
    /// Exits 0 when the task's status is ok; 1 when it failed, timed out or was rejected (the status and the
    /// error text go to stderr); 4 when no agent serves the endpoint and 5 when its agent runs but has not
    /// answered within --timeout (either way the task stays queued and its result comes later). The payload
    /// comes from --payload, --payload-file, or stdin.
    ///
    /// The result comes back on a queue of this call's own (`service.cli-<PID>-<RANDOM>.results`, deleted on
    /// exit when empty; a result arriving later then goes to the shared `results` queue), or with --service
    /// NAME on that service's queue, where a late result waits for `results --service NAME`.
    #[command(after_help = "\
Examples:
  service-setup call --endpoint-id demo --function echo --payload hello
  service-setup call --endpoint-id demo --function resize --payload-file img.png --timeout 2m > small.png
  service-setup call --endpoint-id demo --function echo --payload hi --json | jq .status
  if ! out=$(service-setup call --endpoint-id demo --function check --payload x --timeout 5s); then
    case $? in 4) echo 'agent down';; 5) echo 'still running';; *) echo 'task failed';; esac
  fi")]
    Call {
        #[command(flatten)]
        endpoint: EndpointArg,
        /// Name of the function the agent runs (as configured on the agent).
        #[arg(long, value_name = "NAME")]
        function: String,
        /// Payload text.
        #[arg(long, value_name = "TEXT", conflicts_with = "payload_file")]
        payload: Option<String>,
        /// Read the payload (any bytes) from this file.
        #[arg(long, value_name = "FILE")]
        payload_file: Option<PathBuf>,
        /// How long to wait for the result: `500ms`, `10s`, `2m`, `1h` (a bare number is seconds).
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
        /// Use this task id instead of a generated one.
        #[arg(long, value_name = "ID")]
        task_id: Option<String>,
        /// Receive the result on this service's queue (made if missing, kept after exit).
        #[arg(long, value_name = "NAME")]
        service: Option<ServiceName>,
        /// Print the whole result as one JSON object (as `results` does) instead of the raw output.
        #[arg(long)]
        json: bool,
    },

    /// Print results as JSON lines, acknowledging (removing) each one after it was printed.
    ///
    /// Reads the shared `results` queue (results of tasks submitted without a service), or with --service NAME
    /// that service's own queue. Each line is {"task_id", "endpoint_id", "status", "exit_code", "attempts",
    /// "duration_ms", "output"} ("output_base64" instead when the output is not UTF-8). Status is ok, failed,
    /// timeout or rejected. At most 256 results are held in memory at once.
    ///
    /// With --endpoint-id, results of other endpoints are not printed and not acknowledged: they are handed
    /// back to the queue within a second, for their own reader (with --follow the reader then steps away for
    /// a pause of 1 to 30 s so that reader gets them). If the first 256 results in the queue are all other
    /// endpoints', the ones behind them are out of reach until those are read: a warning says so; a queue of
    /// your own (--service) avoids it. A result may be printed twice if this command dies between printing and
    /// acknowledging it; deduplicate on task_id.
    #[command(after_help = "\
Examples:
  service-setup results --endpoint-id demo                 # what has arrived, then exit
  service-setup results --endpoint-id demo --follow        # keep printing until Ctrl-C
  service-setup results --service billing-1 --follow       # a service's own results
  service-setup results --endpoint-id demo --max 1 --idle-ms 60000   # wait up to 60s for one result
  service-setup results | jq -r 'select(.status != \"ok\") | .task_id'")]
    Results {
        /// Read this service's queue instead of the shared one.
        #[arg(long, value_name = "NAME")]
        service: Option<ServiceName>,
        /// Only print (and acknowledge) results of this endpoint.
        #[arg(long, value_name = "ID")]
        endpoint_id: Option<EndpointId>,
        /// Keep waiting for results until Ctrl-C (or SIGTERM).
        #[arg(long)]
        follow: bool,
        /// Without --follow, exit once no result has arrived for this many milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 1000)]
        idle_ms: u64,
        /// Exit after printing this many results.
        #[arg(long, value_name = "N")]
        max: Option<u64>,
    },

    /// Show an endpoint's queue depth, consumer, heartbeat interval, last heartbeat and whether its agent runs.
    ///
    /// The verdict is `running (...)`, `not running since <time> (stopped cleanly | no heartbeat for Ns)`
    /// (no heartbeat for 2.5 intervals by this machine's clock) or `never seen`. With --watch it waits up to 2.5
    /// heartbeat intervals for a new heartbeat and judges by the sequence number moving instead, so a clock
    /// skewed between the agent's host and this one cannot mislead it; the output says which rule was used.
    /// Heartbeats name the agent's host, pid, instance and role; a standby (or quieted) agent's beat is shown
    /// on a line of its own and never hides the active one's. Reads without changing anything. Exits 3 (after
    /// printing) when the endpoint is not provisioned.
    #[command(after_help = "\
Examples:
  service-setup status --endpoint-id demo
  service-setup status --endpoint-id demo --watch          # up to 2.5 heartbeat intervals
  service-setup status --endpoint-id demo --json | jq .liveness")]
    Status {
        #[command(flatten)]
        endpoint: EndpointArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Wait for a new heartbeat (up to 2.5 intervals) and judge liveness by the sequence moving.
        #[arg(long)]
        watch: bool,
    },
}

#[derive(Debug, clap::Args)]
struct ManagementArg {
    /// The RabbitMQ management API, for endpoint users (`rabbitmq-plugins enable rabbitmq_management`).
    #[arg(long, value_name = "URL", env = "RABBITMQ_MANAGEMENT_URL",
          default_value = service_setup::management::DEFAULT_MANAGEMENT_URL)]
    management_url: String,
}

#[derive(Debug, clap::Args)]
struct EndpointArg {
    /// Endpoint id: 1 to 128 letters, digits, '_' or '-' (the same id the agent is started with).
    #[arg(long, value_name = "ID")]
    endpoint_id: EndpointId,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // Checked here rather than by clap, whose error would echo the value, password included.
    let urls = match service_setup::parse_broker_urls(&cli.broker_url) {
        Ok(urls) => urls,
        Err(e) => {
            eprintln!("error: {e}: pass an amqp:// or amqps:// URL with --broker-url or AMQP_URL");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let tls = TlsFiles {
        ca: cli.tls_ca.clone(),
        cert: cli.tls_cert.clone(),
        key: cli.tls_key.clone(),
    };
    let urls: Vec<BrokerUrl> = match Tls::load(&tls) {
        Ok(tls) => urls.into_iter().map(|u| u.with_tls(tls.clone())).collect(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Command::Submit {
        count,
        task_id: Some(_),
        ..
    } = &cli.command
        && *count != 1
    {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--task-id can only be used with --count 1: ids must be unique, drop --task-id to get generated ones",
            )
            .exit();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(run(cli.command, urls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", render(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // lapin logs expected refusals (a 404 on a passive declare) as errors; every failure that matters reaches
        // the user through our own error message.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin=off"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .init();
}

fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(v) = e.chain().find_map(|c| c.downcast_ref::<Verdict>()) {
        return v.code;
    }
    match e.chain().find_map(|c| c.downcast_ref::<SetupError>()) {
        Some(s) if s.is_not_provisioned() => EXIT_NOT_PROVISIONED,
        Some(s) if s.is_connect_failure() => EXIT_UNAVAILABLE,
        _ => EXIT_ERROR,
    }
}

/// Like `{:#}`, but skips a cause whose text the previous message already ends with (`BrokerError` prints its
/// source in its own message as well).
fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

async fn run(command: Command, urls: Vec<BrokerUrl>) -> anyhow::Result<()> {
    // The connect error already says what to check (credentials, or whether the broker runs).
    let (conn, url) = service_setup::connect_any(&urls).await?;
    tracing::debug!(node = %url.node(), "connected");
    // The node connected to first, then the others (the endpoint user's URL file lists them in this order).
    let mut urls: Vec<BrokerUrl> = urls.into_iter().filter(|u| *u != url).collect();
    urls.insert(0, url);
    let outcome = dispatch(command, &conn, &urls).await;
    if let Err(e) = endpoint_wire::amqp::close(&conn, "OK").await {
        tracing::debug!(error = %e, "closing the connection failed");
    }
    outcome
}

async fn dispatch(
    command: Command,
    conn: &lapin::Connection,
    urls: &[BrokerUrl],
) -> anyhow::Result<()> {
    // The node this command is connected to.
    let url = &urls[0];
    match command {
        Command::Provision {
            endpoint: EndpointArg { endpoint_id: ep },
            heartbeat,
            queue_type,
            json,
            credentials,
            management,
        } => {
            let queue_type = queue_type
                .map(|t| t.parse::<QueueType>().map_err(anyhow::Error::msg))
                .transpose()?;
            let reg = match &credentials {
                // One read of the registration: its user, and its type unless --queue-type names one.
                None if queue_type.is_none() => {
                    service_setup::provision(conn, &ep, heartbeat).await
                }
                None => {
                    let user = service_setup::endpoint_user_of(conn, &ep).await?;
                    service_setup::provision_typed(conn, &ep, heartbeat, user, queue_type).await
                }
                Some(file) => {
                    let api = Management::new(&management.management_url, url)?;
                    let (user, password) =
                        api.create_endpoint_user(&ep).await.with_context(|| {
                            format!("while creating the broker user of endpoint {ep}")
                        })?;
                    // Every node's URL, so the agent can fail over as the service does.
                    let agent_url = urls
                        .iter()
                        .map(|u| service_setup::management::agent_url(u, &user, &password))
                        .collect::<Vec<_>>()
                        .join(",");
                    service_setup::management::write_credentials(file, &agent_url).map_err(
                        |err| SetupError::Credentials {
                            path: file.clone(),
                            err,
                        },
                    )?;
                    service_setup::provision_typed(conn, &ep, heartbeat, Some(user), queue_type)
                        .await
                }
            }
            .with_context(|| format!("while provisioning endpoint {ep}"))?;
            if reg.tasks_queue_type == QueueType::Classic && urls.len() > 1 {
                tracing::warn!(
                    nodes = urls.len(),
                    "several broker URLs were given (a cluster?) but the endpoint's queues are classic: a classic tasks queue lives on one node and the endpoint waits while that node is down; to replicate them, deprovision and provision with --queue-type quorum"
                );
            }
            if json {
                let text =
                    serde_json::to_string(&reg).context("while encoding the registration")?;
                print_line(&text)?;
            } else {
                print_line(&format!(
                    "provisioned endpoint {ep}: tasks queue {} ({}), heartbeat every {}s, registration written at {}",
                    reg.tasks_queue,
                    reg.tasks_queue_type,
                    reg.heartbeat_secs,
                    service_setup::rfc3339_utc(reg.provisioned_at_ms)
                ))?;
                if let (Some(file), Some(user)) = (&credentials, &reg.endpoint_user) {
                    print_line(&format!(
                        "broker user {user} made; its agent's URL is in {} (mode 0600): endpoint-agent start --endpoint-id {ep} --broker-url-file {}",
                        file.display(),
                        file.display()
                    ))?;
                }
            }
        }
        Command::Deprovision {
            endpoint: EndpointArg { endpoint_id: ep },
            force,
            management,
        } => {
            let api = Management::new(&management.management_url, url).ok();
            let done = service_setup::deprovision(conn, &ep, force, api.as_ref())
                .await
                .with_context(|| format!("while deprovisioning endpoint {ep}"))?;
            if let Some(user) = &done.deleted_user {
                print_line(&format!("deleted broker user {user}"))?;
            }
            if done.deleted_queues.is_empty() {
                print_line(&format!("endpoint {ep} had no queues: nothing to delete"))?;
            } else {
                print_line(&format!(
                    "deprovisioned endpoint {ep}: deleted {} ({} queued task(s) dropped)",
                    done.deleted_queues.join(", "),
                    done.dropped_tasks
                ))?;
            }
        }
        Command::Submit {
            endpoint: EndpointArg { endpoint_id: ep },
            function,
            payload,
            payload_file,
            count,
            task_id,
            timeout_ms,
            service,
        } => {
            let payload = read_payload(payload, payload_file)?;
            if let Some(service) = &service {
                service_setup::declare_service_queue(conn, service, None)
                    .await
                    .with_context(|| {
                        format!("while making the results queue of service {service}")
                    })?;
            }
            let submitter = Submitter::new(conn)
                .await
                .context("while preparing to submit tasks")?;
            let mut left = count;
            let mut task_id = task_id;
            while left > 0 {
                let n = left.min(SUBMIT_CHUNK);
                let tasks = (0..n)
                    .map(|_| TaskSpec {
                        task_id: task_id.take(),
                        function: function.clone(),
                        payload: payload.clone(),
                        timeout_ms,
                        reply_to: service.clone(),
                    })
                    .collect();
                let ids = submitter
                    .submit_on(conn, &ep, tasks)
                    .await
                    .with_context(|| format!("while submitting tasks to endpoint {ep}"))?;
                print_line(&ids.join("\n"))?;
                left -= n;
            }
            submitter.close().await;
        }
        Command::Call {
            endpoint: EndpointArg { endpoint_id: ep },
            function,
            payload,
            payload_file,
            timeout,
            task_id,
            service,
            json,
        } => {
            let payload = read_payload(payload, payload_file)?;
            return call(
                conn, urls, &ep, &function, payload, timeout, task_id, service, json,
            )
            .await;
        }
        Command::Results {
            service,
            endpoint_id,
            follow,
            idle_ms,
            max,
        } => {
            let query = ResultsQuery {
                service,
                endpoint: endpoint_id,
                follow,
                idle: Duration::from_millis(idle_ms),
                max,
            };
            let read =
                service_setup::read_results(conn, &query, shutdown_signal(), print_result).await;
            match read {
                Ok(n) => tracing::info!(results = n, "done"),
                // A closed pipe (`| head`) is the reader's way of saying it has enough.
                Err(SetupError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) => return Err(e).context("while reading results"),
            }
        }
        Command::Status {
            endpoint: EndpointArg { endpoint_id: ep },
            json,
            watch,
        } => {
            let status = if watch {
                service_setup::watch_status(conn, &ep).await
            } else {
                service_setup::endpoint_status(conn, &ep).await
            };
            let status =
                status.with_context(|| format!("while reading the status of endpoint {ep}"))?;
            if json {
                print_line(&status.to_json().to_string())?;
            } else {
                let text = status.to_text();
                print_line(text.trim_end())?;
            }
            if !status.provisioned {
                return Err(SetupError::NotProvisioned(ep).into());
            }
        }
    }
    Ok(())
}

/// The `call` command: its own client (so the result comes back to its own queue), the verdict as exit code.
#[allow(clippy::too_many_arguments)]
async fn call(
    conn: &lapin::Connection,
    urls: &[BrokerUrl],
    ep: &EndpointId,
    function: &str,
    payload: Vec<u8>,
    timeout: Duration,
    task_id: Option<String>,
    service: Option<ServiceName>,
    json: bool,
) -> anyhow::Result<()> {
    let ephemeral = service.is_none();
    let service = match service {
        Some(s) => s,
        None => ServiceName::new(format!(
            "cli-{}-{}",
            std::process::id(),
            &service_setup::new_task_id()[..8]
        ))
        .expect("a valid generated service name"),
    };
    let mut options = ClientOptions::new(service.clone());
    if ephemeral {
        // Deleted on exit when empty; if this process dies first, the broker deletes it after a day unused.
        options.queue_expires = Some(Duration::from_secs(24 * 3600));
    }
    let client = Client::connect(urls, options).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let submit = SubmitOptions {
        task_id,
        timeout: None,
    };
    let outcome = match client.start_call(ep, function, payload, submit).await {
        Ok(mut handle) => {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            handle.wait(left).await
        }
        Err(e) => Err(e),
    };
    client.close().await;
    if ephemeral {
        // Empty: delete it, so a result that comes later goes to the shared `results` queue (the agent falls
        // back there when a service's queue is gone) instead of waiting for a reader that will never come.
        let deleted = service_setup::delete_service_queue_if_empty(conn, &service).await;
        if let Err(e) = deleted {
            tracing::debug!(error = %e, "could not delete this call's results queue");
        }
    }
    match outcome {
        Ok(result) => {
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer(&mut out, &result.to_json())
                    .context("while encoding the result")?;
                out.write_all(b"\n").context("while writing to stdout")?;
            } else {
                out.write_all(&result.body)
                    .context("while writing to stdout")?;
            }
            out.flush().context("while writing to stdout")?;
            if result.status == "ok" {
                return Ok(());
            }
            Err(CallFailed(format!(
                "task {} ended with status {} (its output, on stdout, says why)",
                result.task_id, result.status
            ))
            .into())
        }
        Err(CallError::Broker(e)) => Err(e).context("while calling"),
        Err(CallError::EndpointNotProvisioned(ep)) => Err(SetupError::NotProvisioned(ep).into()),
        Err(e) => {
            let code = match e {
                CallError::EndpointNotRunning { .. } => EXIT_NOT_RUNNING,
                _ => EXIT_NO_RESULT_YET,
            };
            let mut text = e.to_string();
            if ephemeral {
                text.push_str(&format!(
                    "; its result will arrive in the shared `results` queue (`service-setup results --endpoint-id {ep}`; pass --service NAME to keep results apart)"
                ));
            } else {
                text.push_str(&format!(
                    "; its result will arrive in service {service}'s queue (`service-setup results --service {service}`)"
                ));
            }
            Err(Verdict { code, text }.into())
        }
    }
}

/// A `call` whose task ended with a status other than ok (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CallFailed(String);

/// A `call` that has no result, with its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
struct Verdict {
    code: u8,
    text: String,
}

/// `500ms`, `10s`, `2m`, `1h`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: write 500ms, 10s, 2m or 1h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: use ms, s, m or h"
            ));
        }
    };
    if !(secs > 0.0 && secs < 366.0 * 24.0 * 3600.0) {
        return Err(format!(
            "{s:?} is out of range: pass more than 0 and less than a year"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn read_payload(payload: Option<String>, file: Option<PathBuf>) -> anyhow::Result<Vec<u8>> {
    if let Some(text) = payload {
        return Ok(text.into_bytes());
    }
    if let Some(path) = file {
        return std::fs::read(&path)
            .with_context(|| format!("while reading the payload file {}", path.display()));
    }
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        bail!(
            "no payload: pass --payload TEXT or --payload-file FILE, or pipe the payload on stdin"
        );
    }
    let mut bytes = Vec::new();
    stdin
        .read_to_end(&mut bytes)
        .context("while reading the payload from stdin")?;
    Ok(bytes)
}

fn print_line(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .context("while writing to stdout")
}

fn print_result(record: &ResultRecord) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &record.to_json()).map_err(std::io::Error::other)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; use Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("3d").unwrap_err().contains("unit"));
    }

    #[test]
    fn render_skips_repeated_causes() {
        let inner = std::io::Error::other("connection refused");
        let e = anyhow::Error::new(inner).context("while connecting: connection refused");
        assert_eq!(render(&e), "while connecting: connection refused");
        let e = anyhow::anyhow!("b").context("a");
        assert_eq!(render(&e), "a: b");
    }
}
