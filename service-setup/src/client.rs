//! The client a service embeds: one connection (reconnected with backoff, trying each broker URL in turn) with a
//! confirm-mode channel to submit on and a consumer on the service's own durable results queue
//! (`service.<SERVICE>.results`, bound to `*.results.<SERVICE>`), which receives exactly the results of the
//! tasks this service submitted, also those published while it was disconnected.
//!
//! Results are matched to the calls waiting for them by task id (and endpoint); a result nobody waits for (a
//! call that gave up, a task submitted with [`Client::submit`], a previous run of the service) is handed out
//! by [`Client::next_result`] / [`Client::results`]. Every result is acked only once it was handed over, so
//! a crash of the service loses none; a duplicate (at-least-once delivery) of a result already handed over is
//! acked and dropped. Memory is bounded by the consumer's prefetch: results no one takes stay in the broker.
//!
//! This module must not print; the CLI does. It must not trust a result's headers: the endpoint a result is
//! from is its routing key's (which the broker confines an endpoint's user to) and its publisher must be the
//! endpoint's broker user when the endpoint has one.

use crate::amqp::{
    amqp_err, bind, close_channel, declare_exchange, declare_queue, open_channel, type_args,
};
use crate::error::{SetupError, soft_error};
use crate::results::ResultRecord;
use crate::status::{Liveness, endpoint_status};
use crate::submit::{Submitter, TaskSpec, new_task_id};
use crate::topology::registration_of;
use endpoint_wire::amqp::queue_info;
use endpoint_wire::{
    AgentState, Backoff, BrokerUrl, EndpointId, Heartbeat, QueueType, RESULTS_EXCHANGE, ServiceName,
};
use futures_lite::StreamExt;
use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ExchangeKind};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// A task's result, as a call returns it: `status` says whether the function succeeded; `failed`, `timeout`
/// and `rejected` are results, not errors.
pub type TaskResult = ResultRecord;

/// Results the client holds at most by default (the consumer's prefetch).
pub const DEFAULT_PREFETCH: u16 = 256;

/// Task ids of results already handed over that are remembered, to drop duplicates.
const REMEMBERED: usize = 100_000;

/// How long a submit waits for the client to (re)connect before giving up.
const SUBMIT_WAIT: Duration = crate::CONNECT_TIMEOUT;

const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// How a [`Client`] is set up.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// This service instance's name. Its results queue is `service.<SERVICE>.results`: two instances with the
    /// same name share one queue (and take each other's results); give each instance a name of its own.
    pub service: ServiceName,
    /// Results held in memory at most, unacked (the consumer's prefetch). Each is up to the endpoint's
    /// `max_output_bytes`.
    pub prefetch: u16,
    /// Delete the service's queue (and any results in it) once it has had no consumer for this long
    /// (RabbitMQ's `x-expires`). `None`, the default: it stays until deleted. For short-lived callers such as
    /// the CLI. A queue's expiry cannot change once declared: every instance must pass the same value.
    pub queue_expires: Option<Duration>,
    /// What happens to a result no call waits for (a call gave up, or a previous run submitted it). `false`,
    /// the default: it waits, unacked, for [`Client::next_result`]; once `prefetch` of them are waiting the
    /// client reads no further results, so calls wait too (a warning says so): a service that makes calls and
    /// never reads unclaimed results should set this. `true`: it is acked and dropped, with a warning.
    pub drop_unclaimed: bool,
    /// The type of the service's results queue when this client makes it: `Classic` (the default) on a single
    /// broker; `Quorum` on a cluster, so the service's results stay available through the loss of a node. A
    /// queue that exists already is used as it is (a queue cannot change type).
    pub queue_type: QueueType,
}

impl ClientOptions {
    /// Options for `service` with the defaults: a prefetch of [`DEFAULT_PREFETCH`], a queue that does not expire,
    /// unclaimed results kept.
    pub fn new(service: ServiceName) -> ClientOptions {
        ClientOptions {
            service,
            prefetch: DEFAULT_PREFETCH,
            queue_expires: None,
            drop_unclaimed: false,
            queue_type: QueueType::Classic,
        }
    }
}

/// Options of one submitted task.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubmitOptions {
    /// The task id; a fresh one when `None`.
    pub task_id: Option<String>,
    /// A timeout for this task (`x-timeout-ms`); it can only shorten the function's own.
    pub timeout: Option<Duration>,
}

/// Why a [`Client::call`] has no result.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The endpoint has no tasks queue.
    #[error("endpoint {0} is not provisioned: run `service-setup provision --endpoint-id {0}`")]
    EndpointNotProvisioned(EndpointId),
    /// No agent serves the endpoint: its last heartbeat is stale or says it stopped, or there never was one.
    /// The task stays queued and runs when an agent starts; its result then reaches this service's queue.
    #[error("{}", not_running(endpoint, task_id, last_heartbeat.as_ref()))]
    EndpointNotRunning {
        /// The endpoint called.
        endpoint: EndpointId,
        /// The task, still queued: its result comes later, unclaimed.
        task_id: String,
        /// The endpoint's last heartbeat, if it ever sent one.
        last_heartbeat: Option<Heartbeat>,
    },
    /// An agent serves the endpoint but has not answered within the timeout (the task is queued behind
    /// others, or still running). Its result will reach this service's queue.
    #[error(
        "no result yet for task {task_id}: endpoint {endpoint} is running (state {endpoint_state}) with {} task(s) queued",
        queue_depth.map_or("an unknown number of".to_owned(), |d| d.to_string())
    )]
    NoResultYet {
        /// The endpoint called.
        endpoint: EndpointId,
        /// The task: its result comes later, unclaimed.
        task_id: String,
        /// What the endpoint's last heartbeat says it is doing.
        endpoint_state: AgentState,
        /// Tasks waiting in its tasks queue (ready, not yet taken by the agent).
        queue_depth: Option<u32>,
    },
    /// The broker failed, refused, or a value passed was invalid.
    #[error(transparent)]
    Broker(#[from] SetupError),
}

fn not_running(ep: &EndpointId, task_id: &str, beat: Option<&Heartbeat>) -> String {
    let since = match beat {
        Some(b) => format!(
            "its last heartbeat was at {} (state {})",
            crate::time::rfc3339_utc(b.time_ms),
            b.state
        ),
        None => "it has never sent a heartbeat".to_owned(),
    };
    format!(
        "endpoint {ep} is not running: {since}; task {task_id} stays queued until its agent starts (`endpoint-agent start --endpoint-id {ep}`)"
    )
}

/// A connection to the broker with its submit channel.
struct Session {
    conn: Connection,
    submitter: Submitter,
}

/// A call waiting for its result.
struct Waiter {
    endpoint: EndpointId,
    tx: oneshot::Sender<ResultRecord>,
}

/// Results handed over (endpoint and task id), oldest first, bounded. Keyed by both: the same task id sent to
/// two endpoints is two tasks.
#[derive(Default)]
struct Remembered {
    order: VecDeque<(String, String)>,
    set: HashSet<(String, String)>,
}

impl Remembered {
    fn key(r: &ResultRecord) -> (String, String) {
        (r.endpoint_id.clone(), r.task_id.clone())
    }

    /// Remembers `r`; false if it was already.
    fn insert(&mut self, r: &ResultRecord) -> bool {
        let key = Self::key(r);
        if !self.set.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > REMEMBERED
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }

    fn contains(&self, r: &ResultRecord) -> bool {
        self.set.contains(&Self::key(r))
    }

    fn remove(&mut self, r: &ResultRecord) {
        self.set.remove(&Self::key(r));
    }
}

/// How long an endpoint's registered broker user is trusted before it is read again (a re-provision may add one).
const USER_CACHE: Duration = Duration::from_secs(60);

/// A result nobody waited for, with what acks it (`None`: acked already).
struct Unclaimed {
    record: ResultRecord,
    acker: Option<Acker>,
}

struct Inner {
    urls: Vec<BrokerUrl>,
    options: ClientOptions,
    session: watch::Sender<Option<Arc<Session>>>,
    waiters: Mutex<HashMap<String, Waiter>>,
    remembered: Mutex<Remembered>,
    unclaimed_tx: mpsc::Sender<Unclaimed>,
    unclaimed_rx: tokio::sync::Mutex<mpsc::Receiver<Unclaimed>>,
    /// The broker user each endpoint's registration names (`None`: no user of its own), and when it was read.
    users: Mutex<HashMap<String, (Option<String>, tokio::time::Instant)>>,
    closed: watch::Sender<bool>,
}

/// A service's connection to its endpoints: submit tasks, call functions and wait for their results, read the
/// results nobody waited for. Cheap to clone (all clones share one connection); thousands of calls may be in
/// flight at once.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use service_setup::{BrokerUrl, Client, ClientOptions, EndpointId, ServiceName};
/// use std::time::Duration;
/// let url = BrokerUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f")?;
/// let client = Client::connect(&[url], ClientOptions::new(ServiceName::new("billing-1")?)).await?;
/// let result = client
///     .call(&EndpointId::new("demo")?, "echo", b"hello".to_vec(), Duration::from_secs(10))
///     .await?;
/// println!("{}: {}", result.status, String::from_utf8_lossy(&result.body));
/// client.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects to the first of `urls` that accepts (each within [`crate::CONNECT_TIMEOUT`]; a cluster's nodes
    /// are tried in random order, so that a service's instances spread over them), declares the service's
    /// results queue and starts consuming it. Later, a lost connection is reopened in the background (the next
    /// URL first, then the others in turn, with backoff); calls in flight keep waiting, submits fail until then.
    pub async fn connect(urls: &[BrokerUrl], options: ClientOptions) -> Result<Client, SetupError> {
        if urls.is_empty() {
            return Err(SetupError::InvalidArgument(
                "no broker URL given: pass at least one".into(),
            ));
        }
        if options.prefetch == 0 {
            return Err(SetupError::InvalidArgument(
                "prefetch 0 would hold every result in memory: pass 1 to 65535".into(),
            ));
        }
        let (unclaimed_tx, unclaimed_rx) = mpsc::channel(usize::from(options.prefetch));
        let inner = Arc::new(Inner {
            urls: crate::random_order(urls),
            options,
            session: watch::channel(None).0,
            waiters: Mutex::default(),
            remembered: Mutex::default(),
            unclaimed_tx: unclaimed_tx.clone(),
            unclaimed_rx: tokio::sync::Mutex::new(unclaimed_rx),
            users: Mutex::default(),
            closed: watch::channel(false).0,
        });
        // The first connection is made here, so that a wrong URL or password is the caller's error at once.
        let (session, consumer) = inner.open(0).await?;
        inner.session.send_replace(Some(session));
        tokio::spawn(Inner::receive(inner.clone(), consumer, unclaimed_tx));
        Ok(Client { inner })
    }

    /// This client's service name.
    pub fn service(&self) -> &ServiceName {
        &self.inner.options.service
    }

    /// Submits one task to `endpoint` (confirmed by the broker, `mandatory`); its result goes to this service's
    /// queue, where a [`Client::call`] for it or [`Client::next_result`] picks it up. Returns the task id.
    pub async fn submit(
        &self,
        endpoint: &EndpointId,
        function: &str,
        payload: impl Into<Vec<u8>>,
        options: SubmitOptions,
    ) -> Result<String, SetupError> {
        let spec = TaskSpec {
            task_id: options.task_id,
            function: function.to_owned(),
            payload: payload.into(),
            timeout_ms: options.timeout.map(|t| t.as_millis() as u64),
            reply_to: None,
        };
        let mut ids = self.submit_many(endpoint, vec![spec]).await?;
        Ok(ids.pop().expect("one task submitted, one id"))
    }

    /// Submits many tasks to `endpoint`, pipelined (all published, then every confirm awaited), each naming
    /// this service for its result (whatever `reply_to` the specs carry). Returns their ids in order. On error
    /// some of them may have been queued.
    pub async fn submit_many(
        &self,
        endpoint: &EndpointId,
        tasks: Vec<TaskSpec>,
    ) -> Result<Vec<String>, SetupError> {
        let tasks = tasks
            .into_iter()
            .map(|t| TaskSpec {
                reply_to: Some(self.inner.options.service.clone()),
                ..t
            })
            .collect();
        let session = self.inner.current_session().await?;
        session
            .submitter
            .submit_on(&session.conn, endpoint, tasks)
            .await
    }

    /// Submits a task and waits up to `timeout` (from now, submit included) for its result. A result with
    /// status `failed`, `timeout` or `rejected` is a result, not an error. Without a result in time, the error
    /// says whether the endpoint's agent is not running ([`CallError::EndpointNotRunning`]) or running but
    /// not done yet ([`CallError::NoResultYet`]); either way the task stays queued and its result comes later
    /// through [`Client::next_result`].
    pub async fn call(
        &self,
        endpoint: &EndpointId,
        function: &str,
        payload: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> Result<TaskResult, CallError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let options = SubmitOptions {
            task_id: None,
            timeout: None,
        };
        let mut call = self
            .start_call(endpoint, function, payload, options)
            .await?;
        call.wait_until(deadline).await
    }

    /// Submits a task and returns a [`Call`], a handle that waits for its result. The handle is registered
    /// before the task is published, so a result cannot arrive unseen.
    pub async fn start_call(
        &self,
        endpoint: &EndpointId,
        function: &str,
        payload: impl Into<Vec<u8>>,
        options: SubmitOptions,
    ) -> Result<Call, CallError> {
        let task_id = options.task_id.clone().unwrap_or_else(new_task_id);
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self.inner.waiters.lock().expect("waiters lock");
            if waiters.contains_key(&task_id) {
                return Err(SetupError::InvalidArgument(format!(
                    "a call for task {task_id} is already waiting: give each call a task id of its own"
                ))
                .into());
            }
            waiters.insert(
                task_id.clone(),
                Waiter {
                    endpoint: endpoint.clone(),
                    tx,
                },
            );
        }
        let call = Call {
            client: self.clone(),
            endpoint: endpoint.clone(),
            task_id: task_id.clone(),
            rx: Some(rx),
        };
        let submitted = self
            .submit(
                endpoint,
                function,
                payload,
                SubmitOptions {
                    task_id: Some(task_id),
                    ..options
                },
            )
            .await;
        match submitted {
            Ok(_) => Ok(call),
            Err(SetupError::NotProvisioned(ep)) => Err(CallError::EndpointNotProvisioned(ep)),
            Err(e) => Err(e.into()),
        }
    }

    /// The next result no call waited for, acked as it is handed over; `None` once the client is closed.
    /// Waits while there is none. One reader at a time: concurrent callers take turns.
    pub async fn next_result(&self) -> Option<TaskResult> {
        let mut rx = self.inner.unclaimed_rx.lock().await;
        let mut closed = self.inner.closed.subscribe();
        loop {
            let got = tokio::select! {
                got = rx.recv() => got,
                _ = closed.wait_for(|c| *c) => None,
            };
            let Unclaimed { record, acker } = got?;
            let Some(acker) = acker else {
                // Acked already (its call gave up after it arrived); a duplicate may have come out meanwhile.
                if self.inner.first_time(&record) {
                    return Some(record);
                }
                continue;
            };
            if !self.inner.first_time(&record) {
                let _ = acker.ack(BasicAckOptions::default()).await;
                continue;
            }
            if let Err(e) = acker.ack(BasicAckOptions::default()).await {
                // The channel went away: the broker hands the result out again, and it is dropped then as a
                // duplicate of this one.
                tracing::debug!(task_id = %record.task_id, error = %e, "could not ack a result handed over");
            }
            return Some(record);
        }
    }

    /// [`Client::next_result`] as a stream (boxed, so it can be polled without pinning it first).
    pub fn results(&self) -> futures_lite::stream::Boxed<TaskResult> {
        Box::pin(futures_lite::stream::unfold(
            self.clone(),
            |client| async move { client.next_result().await.map(|r| (r, client)) },
        ))
    }

    /// Closes the connection. Results not handed over yet stay in the service's queue for the next start.
    pub async fn close(&self) {
        self.inner.closed.send_replace(true);
        if let Some(session) = self.inner.session.send_replace(None)
            && let Err(e) = endpoint_wire::amqp::close(&session.conn, "client closed").await
        {
            tracing::debug!(error = %e, "closing the connection failed");
        }
    }
}

/// A submitted task's result to come, from [`Client::start_call`]. Dropping it gives up waiting: the result
/// then goes to [`Client::next_result`].
pub struct Call {
    client: Client,
    endpoint: EndpointId,
    task_id: String,
    rx: Option<oneshot::Receiver<ResultRecord>>,
}

impl Call {
    /// The id of the task this call waits for.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// Waits up to `timeout` for the result; see [`Client::call`] for the errors. May be called again after
    /// a timeout.
    pub async fn wait(&mut self, timeout: Duration) -> Result<TaskResult, CallError> {
        self.wait_until(tokio::time::Instant::now() + timeout).await
    }

    async fn wait_until(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<TaskResult, CallError> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(SetupError::InvalidArgument(format!(
                "the result of task {} was already returned",
                self.task_id
            ))
            .into());
        };
        let mut closed = self.client.inner.closed.subscribe();
        tokio::select! {
            got = rx => {
                self.rx = None;
                return match got {
                    Ok(r) => Ok(r),
                    Err(_) => Err(SetupError::ClientClosed.into()),
                };
            }
            _ = closed.wait_for(|c| *c) => {
                return Err(SetupError::ClientClosed.into());
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
        let session = self.client.inner.current_session().await?;
        let status = endpoint_status(&session.conn, &self.endpoint).await?;
        // The result may have come while the status was read.
        if let Some(Ok(r)) = self.rx.as_mut().map(oneshot::Receiver::try_recv) {
            self.rx = None;
            return Ok(r);
        }
        if !status.provisioned {
            return Err(CallError::EndpointNotProvisioned(self.endpoint.clone()));
        }
        Err(match status.liveness() {
            Liveness::Running { state, .. } => CallError::NoResultYet {
                endpoint: self.endpoint.clone(),
                task_id: self.task_id.clone(),
                endpoint_state: state,
                queue_depth: status.queue_depth,
            },
            Liveness::NotRunningSince { .. } | Liveness::NeverSeen => {
                CallError::EndpointNotRunning {
                    endpoint: self.endpoint.clone(),
                    task_id: self.task_id.clone(),
                    last_heartbeat: status.last_heartbeat,
                }
            }
        })
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let inner = &self.client.inner;
        inner
            .waiters
            .lock()
            .expect("waiters lock")
            .remove(&self.task_id);
        // Its result came but was not taken: it is nobody's now (already acked).
        if let Ok(record) = rx.try_recv() {
            inner
                .remembered
                .lock()
                .expect("remembered lock")
                .remove(&record);
            let item = Unclaimed {
                record,
                acker: None,
            };
            if let Err(mpsc::error::TrySendError::Full(item)) = inner.unclaimed_tx.try_send(item)
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                let tx = inner.unclaimed_tx.clone();
                rt.spawn(async move {
                    let _ = tx.send(item).await;
                });
            }
        }
    }
}

/// Declares `service`'s durable results queue (`service.<SERVICE>.results`, classic, with `x-expires` when
/// `expires` is given; one that exists is used as it is) and binds it to the `results` exchange with
/// `*.results.<SERVICE>`. Idempotent. A client does this itself; it is for tools that submit with a service
/// name before its client ever ran.
pub async fn declare_service_queue(
    conn: &Connection,
    service: &ServiceName,
    expires: Option<Duration>,
) -> Result<(), SetupError> {
    let exists = queue_info(conn, &service.results_queue()).await?.is_some();
    let channel = open_channel(conn, "declare a service's results queue").await?;
    let declared = declare_on(&channel, service, expires, QueueType::Classic, exists).await;
    close_channel(&channel).await;
    declared
}

/// `exists`: the queue is there already and is only bound (a declare with other arguments would be refused).
async fn declare_on(
    channel: &lapin::Channel,
    service: &ServiceName,
    expires: Option<Duration>,
    queue_type: QueueType,
    exists: bool,
) -> Result<(), SetupError> {
    let queue = service.results_queue();
    let mut args = type_args(queue_type);
    if let Some(expires) = expires {
        let ms = i64::try_from(expires.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
    declare_exchange(channel, RESULTS_EXCHANGE, ExchangeKind::Topic).await?;
    if !exists {
        declare_queue(channel, &queue, args).await?;
    }
    bind(
        channel,
        &queue,
        RESULTS_EXCHANGE,
        &service.results_binding(),
    )
    .await
}

/// Deletes `service`'s results queue if it holds no result (true: deleted or already gone). Results published
/// for the service afterwards go to the shared `results` queue (the agent falls back there).
pub async fn delete_service_queue_if_empty(
    conn: &Connection,
    service: &ServiceName,
) -> Result<bool, SetupError> {
    let channel = open_channel(conn, "delete a service's results queue").await?;
    let queue = service.results_queue();
    let deleted = channel
        .queue_delete(
            queue.as_str().into(),
            QueueDeleteOptions {
                if_empty: true,
                ..QueueDeleteOptions::default()
            },
        )
        .await;
    match deleted {
        Ok(_) => {
            close_channel(&channel).await;
            Ok(true)
        }
        // Not empty: the broker refuses (and closes the channel).
        Err(e) if soft_error(&e) == Some(AMQPSoftError::PRECONDITIONFAILED) => Ok(false),
        Err(e) => Err(amqp_err(format!("while deleting queue {queue}"))(e)),
    }
}

impl Inner {
    /// The current session, waiting up to [`SUBMIT_WAIT`] for a reconnect.
    async fn current_session(&self) -> Result<Arc<Session>, SetupError> {
        let mut rx = self.session.subscribe();
        let wait = rx.wait_for(|s| s.as_ref().is_some_and(|s| s.conn.status().connected()));
        match tokio::time::timeout(SUBMIT_WAIT, wait).await {
            Ok(Ok(s)) => Ok(s.clone().expect("waited for some")),
            _ => Err(SetupError::ConnectTimeout {
                url: self.urls[0].to_string(),
                secs: SUBMIT_WAIT.as_secs(),
            }),
        }
    }

    /// Connects (URLs in turn from `start`), declares the service's queue and starts consuming it.
    async fn open(&self, start: usize) -> Result<(Arc<Session>, lapin::Consumer), SetupError> {
        let mut last = None;
        for i in 0..self.urls.len() {
            let url = &self.urls[(start + i) % self.urls.len()];
            match self.open_one(url).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    tracing::warn!(url = %url, error = %e, "cannot open the service's connection");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one URL"))
    }

    async fn open_one(
        &self,
        url: &BrokerUrl,
    ) -> Result<(Arc<Session>, lapin::Consumer), SetupError> {
        let conn = crate::connect(url).await?;
        let channel = open_channel(&conn, "consume the service's results").await?;
        let service = &self.options.service;
        let queue = service.results_queue();
        let exists = queue_info(&conn, &queue).await?.is_some();
        declare_on(
            &channel,
            service,
            self.options.queue_expires,
            self.options.queue_type,
            exists,
        )
        .await?;
        channel
            .basic_qos(self.options.prefetch, BasicQosOptions::default())
            .await
            .map_err(amqp_err(
                "while setting the prefetch of the results consumer",
            ))?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp_err(format!("while consuming queue {queue}")))?;
        let submitter = Submitter::new(&conn).await?;
        Ok((Arc::new(Session { conn, submitter }), consumer))
    }

    /// Whether `r` is handed over for the first time (and remembers it).
    fn first_time(&self, r: &ResultRecord) -> bool {
        self.remembered.lock().expect("remembered lock").insert(r)
    }

    /// The broker user endpoint `ep` publishes as, from its registration (read again after [`USER_CACHE`]). An
    /// endpoint whose registration cannot be read now (not provisioned, or being re-provisioned) is not
    /// remembered: its results are checked by routing key and header only, and it is read again next time.
    async fn endpoint_user(
        &self,
        conn: &Connection,
        ep: &str,
    ) -> Result<Option<String>, SetupError> {
        if let Some((u, at)) = self.users.lock().expect("users lock").get(ep)
            && at.elapsed() < USER_CACHE
        {
            return Ok(u.clone());
        }
        let Ok(id) = EndpointId::new(ep) else {
            return Ok(None);
        };
        let Some(registration) = registration_of(conn, &id).await? else {
            return Ok(None);
        };
        let user = registration.endpoint_user;
        self.users
            .lock()
            .expect("users lock")
            .insert(ep.to_owned(), (user.clone(), tokio::time::Instant::now()));
        Ok(user)
    }

    /// Consumes the service's queue for the life of the client, reconnecting when the connection is lost.
    async fn receive(
        inner: Arc<Inner>,
        mut consumer: lapin::Consumer,
        unclaimed: mpsc::Sender<Unclaimed>,
    ) {
        let mut closed = inner.closed.subscribe();
        let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
        let mut next_url = 0;
        loop {
            let ended = tokio::select! {
                e = inner.consume(&mut consumer, &unclaimed, &mut backoff) => e,
                _ = closed.wait_for(|c| *c) => return,
            };
            let delay = backoff.next_delay();
            tracing::warn!(error = %ended, ?delay, "lost the service's results consumer; reconnecting");
            inner.session.send_replace(None);
            // Waits even before the first try: a consumer that fails at once (say, a registration it may not
            // read) must not spin. The wait grows until a result is handed over again.
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = closed.wait_for(|c| *c) => return,
            }
            loop {
                if *closed.borrow() {
                    return;
                }
                next_url = (next_url + 1) % inner.urls.len();
                let opened = tokio::select! {
                    o = inner.open(next_url) => o,
                    _ = closed.wait_for(|c| *c) => return,
                };
                match opened {
                    Ok((session, c)) => {
                        inner.session.send_replace(Some(session));
                        consumer = c;
                        break;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %e, ?delay, "cannot reconnect the service's client");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = closed.wait_for(|c| *c) => return,
                        }
                    }
                }
            }
        }
    }

    /// Hands each delivery to its call, or to the unclaimed results (resetting `backoff` as it goes); returns
    /// why the consumer ended.
    async fn consume(
        &self,
        consumer: &mut lapin::Consumer,
        unclaimed: &mpsc::Sender<Unclaimed>,
        backoff: &mut Backoff,
    ) -> SetupError {
        loop {
            let delivery = match consumer.next().await {
                Some(Ok(d)) => d,
                Some(Err(e)) => return amqp_err("while reading the service's results")(e),
                None => {
                    return SetupError::ConsumerCancelled {
                        queue: self.options.service.results_queue(),
                    };
                }
            };
            let record = ResultRecord::from_delivery(&delivery);
            let acker = delivery.acker;
            let session = self.session.borrow().clone();
            let user = match session {
                Some(s) => self.endpoint_user(&s.conn, &record.endpoint_id).await,
                None => Ok(None),
            };
            let user = match user {
                Ok(u) => u,
                Err(e) => return e,
            };
            // The session works: a later loss starts again from the shortest wait.
            backoff.reset();
            if let Some(why) = record.distrust(user.as_deref()) {
                tracing::warn!(task_id = %record.task_id, user_id = ?record.user_id,
                    "dropped a result that cannot be trusted: {why}");
                let _ = acker.ack(BasicAckOptions::default()).await;
                continue;
            }
            let waiter = {
                let mut waiters = self.waiters.lock().expect("waiters lock");
                match waiters.get(&record.task_id) {
                    Some(w) if w.endpoint.as_str() == record.endpoint_id => {
                        waiters.remove(&record.task_id)
                    }
                    Some(w) => {
                        tracing::warn!(task_id = %record.task_id, from = %record.endpoint_id, sent_to = %w.endpoint,
                            "a result for a task id a call waits for came from another endpoint: not that call's");
                        None
                    }
                    None => None,
                }
            };
            if let Some(waiter) = waiter {
                self.remembered
                    .lock()
                    .expect("remembered lock")
                    .insert(&record);
                // Acked before the call sees it, so that a caller who closes the client right after its call
                // returns does not race the ack (the result would go back to the queue).
                let _ = acker.ack(BasicAckOptions::default()).await;
                if let Err(record) = waiter.tx.send(record) {
                    // The call gave up in between: the result is nobody's yet (and already acked).
                    self.remembered
                        .lock()
                        .expect("remembered lock")
                        .remove(&record);
                    let item = Unclaimed {
                        record,
                        acker: None,
                    };
                    if unclaimed.send(item).await.is_err() {
                        return SetupError::ClientClosed;
                    }
                }
                continue;
            }
            if self
                .remembered
                .lock()
                .expect("remembered lock")
                .contains(&record)
            {
                tracing::debug!(task_id = %record.task_id, "dropped a duplicate of a result already handed over");
                let _ = acker.ack(BasicAckOptions::default()).await;
                continue;
            }
            if self.options.drop_unclaimed {
                tracing::warn!(task_id = %record.task_id, endpoint = %record.endpoint_id, status = %record.status,
                    "dropped a result no call waits for (drop_unclaimed)");
                let _ = acker.ack(BasicAckOptions::default()).await;
                continue;
            }
            // Nobody waits for it: held (unacked) until `next_result` takes it; a full buffer stops reading,
            // and the prefetch keeps the rest in the broker.
            let item = Unclaimed {
                record,
                acker: Some(acker),
            };
            let item = match unclaimed.try_send(item) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Closed(_)) => return SetupError::ClientClosed,
                Err(mpsc::error::TrySendError::Full(item)) => item,
            };
            tracing::warn!(
                held = self.options.prefetch,
                "results no call waits for fill the client's buffer: no further results (calls' included) are read until some are taken with next_result()"
            );
            if unclaimed.send(item).await.is_err() {
                return SetupError::ClientClosed;
            }
        }
    }
}
