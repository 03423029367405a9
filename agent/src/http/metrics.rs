//! The agent's Prometheus metrics (`prometheus-client`, served on `/metrics` by `http`): one process-wide
//! registry behind a `OnceLock`, created by `http::bind` only when `--http` / `http_addr` is set, and tiny
//! recording functions the subscriber, publisher, link and executor slots call on their paths. Before (or
//! without) that the recording functions do nothing, so an agent without HTTP pays one atomic load per call.
//!
//! Why a process-wide registry and not an `Arc` handed down: the recording points sit in constructors and
//! loops of the session and the executor, and threading a handle through all of them would change many
//! signatures for a read-only side concern. Counts the agent already keeps (the store's counts, the disk-full
//! condition, the intake state, the pool workers) are not recorded twice: `http` copies them into gauges at
//! each scrape. Labels never carry a name a task chose freely: a function the config does not define is
//! counted as [`UNKNOWN_FUNCTION`], so hostile input cannot grow the series without bound.

use crate::config::Config;
use endpoint_wire::{AgentState, Status, WorkerCounts};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The label of a task whose function the config does not define (a typo, a hostile name).
pub(crate) const UNKNOWN_FUNCTION: &str = "(unknown)";

/// Run-time buckets: from a built-in `echo` (tens of microseconds) to the default 600 s timeout.
const RUN_BUCKETS: [f64; 21] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Latency buckets of acks and confirms: a group commit takes about a millisecond; seconds mean trouble (a
/// slow disk, a broker under an alarm).
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The intake states a `state` gauge always lists (a state this list does not know still gets its series).
const STATES: [&str; 8] = [
    "running",
    "standby",
    "paused",
    "disk_full",
    "blocked",
    "quiet",
    "draining",
    "stopped",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabel {
    function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    function: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    function: String,
    state: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric, and the registry that encodes them.
pub(crate) struct Metrics {
    registry: Registry,
    received: Counter,
    rejected: Counter,
    started: Family<FunctionLabel, Counter>,
    finished: Family<FinishedLabels, Counter>,
    /// The sum of `finished` over its labels.
    finished_all: AtomicU64,
    run_seconds: HistogramFamily<FunctionLabel>,
    ingest_to_ack: Histogram,
    result_to_confirm: Histogram,
    reconnects: Counter,
    blocked_seconds: Counter<f64, AtomicU64>,
    /// Since when the blocked time not yet added to `blocked_seconds` runs, while publishing is blocked.
    blocked_since: Mutex<Option<Instant>>,
    broker_connected: Gauge,
    publishing_blocked: Gauge,
    slots_busy: Gauge,
    // Copied from the agent's own sources at each scrape (see `Gauges`).
    consuming: Gauge,
    slots: Gauge,
    tasks_queued: Gauge,
    tasks_running: Gauge,
    results_pending: Gauge,
    disk_full: Gauge,
    state: Family<StateLabel, Gauge>,
    pool_workers: Family<WorkerLabels, Gauge>,
}

/// What the scrape copies into gauges from the agent's own sources of truth.
pub(crate) struct Gauges<'a> {
    pub slots: usize,
    pub counts: crate::task::Counts,
    pub disk_full: bool,
    /// Connected and holding the tasks consumer.
    pub consuming: bool,
    /// The intake state with the conditions over it, as heartbeats report it.
    pub state: AgentState,
    pub workers: &'a BTreeMap<String, WorkerCounts>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Creates the process's registry (once; later calls return the same one). Recording starts here.
pub(crate) fn init() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

fn get() -> Option<&'static Metrics> {
    METRICS.get()
}

fn gauge(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::with_prefix("endpoint_agent"),
            received: Counter::default(),
            rejected: Counter::default(),
            started: Family::default(),
            finished: Family::default(),
            finished_all: AtomicU64::new(0),
            run_seconds: Family::new_with_constructor(|| Histogram::new(RUN_BUCKETS)),
            ingest_to_ack: Histogram::new(LATENCY_BUCKETS),
            result_to_confirm: Histogram::new(LATENCY_BUCKETS),
            reconnects: Counter::default(),
            blocked_seconds: Counter::default(),
            blocked_since: Mutex::new(None),
            broker_connected: Gauge::default(),
            consuming: Gauge::default(),
            publishing_blocked: Gauge::default(),
            slots_busy: Gauge::default(),
            slots: Gauge::default(),
            tasks_queued: Gauge::default(),
            tasks_running: Gauge::default(),
            results_pending: Gauge::default(),
            disk_full: Gauge::default(),
            state: Family::default(),
            pool_workers: Family::default(),
        };
        m.register()
    }

    fn register(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "tasks_received",
            "Deliveries taken from the tasks queue and acked after their commit",
            self.received.clone(),
        );
        r.register(
            "tasks_rejected",
            "Deliveries answered with a `rejected` result on intake (bad input, unknown function, too large)",
            self.rejected.clone(),
        );
        r.register(
            "tasks_started",
            "Task runs started, by function (a first delivery of `echo` runs on arrival)",
            self.started.clone(),
        );
        r.register(
            "tasks_finished",
            "Results produced, by function and status (including intake's `rejected` ones)",
            self.finished.clone(),
        );
        r.register_with_unit(
            "task_run",
            "Run time of finished tasks, by function",
            Unit::Seconds,
            self.run_seconds.clone(),
        );
        r.register_with_unit(
            "ingest_to_ack",
            "From a delivery's arrival in the subscriber to its ack, sent after the commit that holds it",
            Unit::Seconds,
            self.ingest_to_ack.clone(),
        );
        r.register_with_unit(
            "result_to_confirm",
            "From a result's publish to the broker's confirm of it",
            Unit::Seconds,
            self.result_to_confirm.clone(),
        );
        r.register(
            "reconnects",
            "Broker sessions opened after the first one",
            self.reconnects.clone(),
        );
        r.register_with_unit(
            "publishing_blocked",
            "Time the broker blocked the agent's publishing (resource alarms)",
            Unit::Seconds,
            self.blocked_seconds.clone(),
        );
        r.register(
            "broker_connected",
            "1 while both broker connections (subscriber, publisher) are open",
            self.broker_connected.clone(),
        );
        r.register(
            "consuming",
            "1 while the subscriber holds the endpoint's tasks consumer",
            self.consuming.clone(),
        );
        r.register(
            "publishing_blocked",
            "1 while the broker blocks the agent's publishing",
            self.publishing_blocked.clone(),
        );
        r.register(
            "slots",
            "Executor slots (the `workers` setting)",
            self.slots.clone(),
        );
        r.register(
            "slots_busy",
            "Executor slots running a task now",
            self.slots_busy.clone(),
        );
        r.register(
            "tasks_queued",
            "Tasks queued on disk (the local backlog)",
            self.tasks_queued.clone(),
        );
        r.register(
            "tasks_running",
            "Tasks claimed by a slot or running",
            self.tasks_running.clone(),
        );
        r.register(
            "results_pending",
            "Results on disk not yet confirmed by the broker",
            self.results_pending.clone(),
        );
        r.register(
            "disk_full",
            "1 while the database cannot grow (new tasks stay in the broker)",
            self.disk_full.clone(),
        );
        r.register(
            "state",
            "The agent's state as its heartbeats report it: 1 for the current one",
            self.state.clone(),
        );
        r.register(
            "pool_workers",
            "Pool workers by function and state (idle, busy, starting, failing)",
            self.pool_workers.clone(),
        );
        self
    }

    /// The exposition (OpenMetrics text, which Prometheus reads), with the gauges copied from `g` first.
    pub(crate) fn encode(&self, g: &Gauges<'_>) -> String {
        self.settle_blocked();
        self.slots.set(gauge(g.slots));
        self.tasks_queued.set(gauge(g.counts.queued));
        self.tasks_running.set(gauge(g.counts.running));
        self.results_pending.set(gauge(g.counts.results_pending));
        self.disk_full.set(i64::from(g.disk_full));
        self.consuming.set(i64::from(g.consuming));
        let current = g.state.to_string();
        for s in STATES.iter().copied().chain([current.as_str()]) {
            let label = StateLabel {
                state: s.to_owned(),
            };
            self.state
                .get_or_create(&label)
                .set(i64::from(s == current));
        }
        self.pool_workers.clear();
        for (function, w) in g.workers {
            for (state, n) in [
                ("idle", w.idle),
                ("busy", w.busy),
                ("starting", w.starting),
                ("failing", w.failing),
            ] {
                let label = WorkerLabels {
                    function: function.clone(),
                    state: state.to_owned(),
                };
                self.pool_workers.get_or_create(&label).set(i64::from(n));
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }

    /// Adds the blocked time run so far to the counter, so a scrape during a long block sees it grow.
    fn settle_blocked(&self) {
        let mut since = self.blocked_since.lock().expect("never poisoned");
        if let Some(t) = since.as_mut() {
            let now = Instant::now();
            self.blocked_seconds
                .inc_by(now.duration_since(*t).as_secs_f64());
            *t = now;
        }
    }

    pub(crate) fn received_total(&self) -> u64 {
        self.received.get()
    }

    /// Results produced so far, every function and status (for the status page's throughput).
    pub(crate) fn finished_total(&self) -> u64 {
        self.finished_all.load(Ordering::Relaxed)
    }

    pub(crate) fn slots_busy(&self) -> i64 {
        self.slots_busy.get()
    }

    pub(crate) fn broker_connected(&self) -> bool {
        self.broker_connected.get() > 0
    }

    pub(crate) fn publishing_blocked(&self) -> bool {
        self.publishing_blocked.get() > 0
    }
}

/// The label of `function`: its name if the config defines it, else [`UNKNOWN_FUNCTION`].
fn function_label(config: &Config, function: &str) -> String {
    if config.offers(function) {
        function.to_owned()
    } else {
        UNKNOWN_FUNCTION.to_owned()
    }
}

fn finished(m: &Metrics, function: &str, status: Status, took: Option<Duration>) {
    m.finished_all.fetch_add(1, Ordering::Relaxed);
    m.finished
        .get_or_create(&FinishedLabels {
            function: function.to_owned(),
            status: status.as_str().to_owned(),
        })
        .inc();
    if let Some(took) = took {
        m.run_seconds
            .get_or_create(&FunctionLabel {
                function: function.to_owned(),
            })
            .observe(took.as_secs_f64());
    }
}

// --- Recording, called where things happen (no-ops until `init`) ---

/// A task of an intake batch that came with its result (rejected, or run on arrival), as the metrics count it.
pub(crate) struct ArrivedFinished {
    function: String,
    status: Status,
    /// Run time, for those run on arrival.
    took: Option<Duration>,
}

/// What [`intake_committed`] will count of a batch, taken before the batch moves into the store (empty
/// without `--http`).
pub(crate) fn arrived_finished(
    config: &Config,
    items: &[crate::task::Intake],
) -> Vec<ArrivedFinished> {
    use crate::task::Intake;
    if get().is_none() {
        return Vec::new();
    }
    items
        .iter()
        .filter_map(|item| match item {
            Intake::Task(_) => None,
            Intake::Rejected { function, .. } => Some(ArrivedFinished {
                function: function_label(config, function),
                status: Status::Rejected,
                took: None,
            }),
            Intake::Ran {
                function, result, ..
            } => Some(ArrivedFinished {
                function: function_label(config, function),
                status: result.status,
                took: Some(Duration::from_millis(result.duration_ms)),
            }),
        })
        .collect()
}

/// The subscriber committed what intake made of a batch: rejected ones and those run on arrival got their
/// results in that commit.
pub(crate) fn intake_committed(arrived: Vec<ArrivedFinished>) {
    let Some(m) = get() else { return };
    for f in arrived {
        match f.took {
            None => m.rejected.inc(),
            Some(_) => m
                .started
                .get_or_create(&FunctionLabel {
                    function: f.function.clone(),
                })
                .inc(),
        };
        finished(m, &f.function, f.status, f.took);
    }
}

/// The subscriber acked `n` deliveries, the oldest of which arrived at `arrived`.
pub(crate) fn deliveries_acked(arrived: Instant, n: usize) {
    let Some(m) = get() else { return };
    m.received.inc_by(n as u64);
    let latency = arrived.elapsed().as_secs_f64();
    for _ in 0..n {
        m.ingest_to_ack.observe(latency);
    }
}

/// A slot starts running a task of `function`; the slot counts as busy until the returned guard drops.
#[must_use = "the slot is busy until the guard drops"]
pub(crate) fn task_started(config: &Config, function: &str) -> BusySlot {
    let Some(m) = get() else {
        return BusySlot(None);
    };
    m.started
        .get_or_create(&FunctionLabel {
            function: function_label(config, function),
        })
        .inc();
    m.slots_busy.inc();
    BusySlot(Some(m))
}

/// A slot's task of `function` finished with `status` after `took`.
pub(crate) fn task_finished(config: &Config, function: &str, status: Status, took: Duration) {
    if let Some(m) = get() {
        finished(m, &function_label(config, function), status, Some(took));
    }
}

/// Counts a slot as busy while it lives.
pub(crate) struct BusySlot(Option<&'static Metrics>);

impl Drop for BusySlot {
    fn drop(&mut self) {
        if let Some(m) = self.0 {
            m.slots_busy.dec();
        }
    }
}

/// The broker confirmed (or refused) a result published at `sent`.
pub(crate) fn result_confirmed(sent: Instant) {
    if let Some(m) = get() {
        m.result_to_confirm.observe(sent.elapsed().as_secs_f64());
    }
}

/// The link opened its session number `n` (from 0): connected; every session after the first is a reconnect.
pub(crate) fn session_opened(n: u64) {
    if let Some(m) = get() {
        m.broker_connected.set(1);
        if n > 0 {
            m.reconnects.inc();
        }
    }
}

/// The session ended: disconnected.
pub(crate) fn session_ended() {
    if let Some(m) = get() {
        m.broker_connected.set(0);
    }
}

/// The broker blocked (`true`) or unblocked publishing.
pub(crate) fn publishing_blocked(blocked: bool) {
    let Some(m) = get() else { return };
    m.settle_blocked();
    let mut since = m.blocked_since.lock().expect("never poisoned");
    *since = blocked.then(Instant::now);
    m.publishing_blocked.set(i64::from(blocked));
}
