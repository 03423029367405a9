//! Broker connections and their life cycle: opening them with a name and the registered heartbeat, redacting
//! credentials for logs, classifying lapin's errors for retry loops, reading the service's registration, the
//! clamped jittered backoff, and the link supervisor that (re)registers, connects the subscriber and the
//! publisher on connections of their own, notices a dead link (lapin's error events, AMQP heartbeats, a
//! failed operation) and starts over. One of the three modules (with `subscriber` and `publisher`) allowed to
//! import lapin. Executors never wait on it: a lost link only pauses intake and publishing.

use crate::config::Config;
use crate::executor::Signals;
use crate::publisher::Publisher;
use crate::store::Store;
use crate::subscriber::Subscriber;
use crate::wire::AgentState;
use crate::wire::{EndpointId, PROTOCOL_VERSION, Registration};
use backon::BackoffBuilder;
use futures_lite::StreamExt;
use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The URL the agent and `service-setup` use when neither `--broker-url` nor `AMQP_URL` says otherwise.
pub const DEFAULT_BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// An AMQP URL. `Display` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl(String);

impl BrokerUrl {
    pub fn new(url: impl Into<String>) -> Result<Self, BrokerError> {
        let url = url.into();
        let parsed: Result<lapin::uri::AMQPUri, String> = url.parse();
        match parsed {
            Ok(_) => Ok(Self(url)),
            Err(e) => Err(BrokerError::BadUrl(redact(&url), e)),
        }
    }

    /// The full URL, credentials included: only for handing to the client library.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Host, port, credentials and vhost, for [`crate::raw`], which speaks AMQP without lapin.
    pub fn parts(&self) -> UrlParts {
        let uri: lapin::uri::AMQPUri = self
            .0
            .parse()
            .expect("a BrokerUrl was parsed when it was made");
        UrlParts {
            host: uri.authority.host,
            port: uri.authority.port,
            user: uri.authority.userinfo.username,
            password: uri.authority.userinfo.password,
            vhost: uri.vhost,
        }
    }

    /// This URL with `heartbeat=secs` added, unless the URL already sets a heartbeat (the operator's choice wins).
    pub fn with_heartbeat(&self, secs: u16) -> BrokerUrl {
        if self.0.contains("heartbeat=") {
            return self.clone();
        }
        let sep = if self.0.contains('?') { '&' } else { '?' };
        BrokerUrl(format!("{}{sep}heartbeat={secs}", self.0))
    }
}

/// The pieces of a [`BrokerUrl`]; `password` is secret (never log it).
pub struct UrlParts {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub vhost: String,
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

/// `amqp://user:secret@host/vhost` -> `amqp://user:***@host/vhost`.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    format!("{}{user}:***{}", &url[..scheme_end], &rest[at..])
}

/// Errors talking to the broker, classified for retry loops.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid broker url {0}: {1}")]
    BadUrl(String, String),
    // The lapin error is shown in the message and deliberately not chained as a `source`: its own Display
    // already repeats its causes, and `{:#}` would print them again.
    #[error("{context}: {cause}{}", connect_hint(cause))]
    Connect {
        context: String,
        cause: lapin::Error,
    },
    /// The connection or a consumer ended without an error from the client library.
    #[error("{0}")]
    Lost(String),
    #[error("{context}: {cause}")]
    Amqp {
        context: String,
        cause: lapin::Error,
    },
}

impl BrokerError {
    pub fn amqp(context: impl Into<String>, source: lapin::Error) -> Self {
        BrokerError::Amqp {
            context: context.into(),
            cause: source,
        }
    }

    fn soft_error(&self) -> Option<AMQPSoftError> {
        match self {
            BrokerError::Amqp { cause, .. } | BrokerError::Connect { cause, .. } => {
                soft_error(cause)
            }
            BrokerError::BadUrl(..) | BrokerError::Lost(_) => None,
        }
    }

    /// lapin could not parse what the broker sent: a delivery with a non-UTF-8 short string or an unknown
    /// header type. The connection is dead and the broker will redeliver that message.
    pub fn is_unparsable(&self) -> bool {
        match self {
            BrokerError::Amqp { cause, .. } | BrokerError::Connect { cause, .. } => {
                matches!(cause.kind(), lapin::ErrorKind::ParsingError(_))
            }
            BrokerError::BadUrl(..) | BrokerError::Lost(_) => false,
        }
    }

    /// The broker said the queue or exchange does not exist (404).
    pub fn is_not_found(&self) -> bool {
        self.soft_error() == Some(AMQPSoftError::NOTFOUND)
    }

    /// Another consumer holds the queue exclusively (403 on `basic.consume`, or 405 resource locked).
    pub fn is_exclusive_conflict(&self) -> bool {
        matches!(self, BrokerError::Amqp { .. })
            && matches!(
                self.soft_error(),
                Some(AMQPSoftError::ACCESSREFUSED | AMQPSoftError::RESOURCELOCKED)
            )
    }

    /// Worth retrying with backoff: a network problem, a closed connection or channel, a broker restart.
    /// Not transient: a bad URL, or the broker refusing the login or the vhost while connecting (an operator
    /// must fix the credentials or permissions).
    pub fn is_transient(&self) -> bool {
        match self {
            BrokerError::BadUrl(..) => false,
            BrokerError::Connect { cause, .. } => !matches!(
                cause.kind(),
                lapin::ErrorKind::ProtocolError(_) | lapin::ErrorKind::AuthProviderError(_)
            ),
            BrokerError::Amqp { .. } | BrokerError::Lost(_) => true,
        }
    }
}

/// What an operator should check after a failed connect.
fn connect_hint(e: &lapin::Error) -> &'static str {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(_) | lapin::ErrorKind::AuthProviderError(_) => {
            " (check the user, password and vhost permissions in --broker-url or AMQP_URL)"
        }
        _ => {
            " (is RabbitMQ running and reachable? `rabbitmq-server -detached` or `docker compose up -d` starts one)"
        }
    }
}

/// The soft (channel-level) AMQP error behind a lapin error, if that is what it is.
pub fn soft_error(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// How long opening a connection may take: a blackholed path would otherwise hang the reconnect loop.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens a connection named `name` (shown in the management UI and `rabbitmqctl list_connections`).
pub async fn connect(url: &BrokerUrl, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url.expose(), props)).await {
        Ok(conn) => conn.map_err(|cause| BrokerError::Connect {
            context: format!("while connecting to {url}"),
            cause,
        }),
        Err(_) => Err(BrokerError::Lost(format!(
            "no answer from {url} within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// Why the agent cannot read its registration.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error(
        "endpoint {0} is not provisioned (no queue {1}): run `service-setup provision --endpoint-id {0}`"
    )]
    NotProvisioned(EndpointId, String),
    #[error(
        "endpoint {0} has no registration message in {1}: run `service-setup provision --endpoint-id {0}` again"
    )]
    Missing(EndpointId, String),
    #[error(
        "registration of endpoint {0} is not valid ({1}): run `service-setup provision --endpoint-id {0}` again"
    )]
    Invalid(EndpointId, String),
    #[error(
        "registration of endpoint {0} speaks protocol version {1}, this agent speaks {PROTOCOL_VERSION}: upgrade the agent or re-provision with a matching service-setup"
    )]
    Version(EndpointId, u32),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl RegistrationError {
    /// The broker had a problem (retry); anything else needs an operator.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistrationError::Broker(e) if e.is_transient())
    }
}

/// Depth and consumer count of `queue`, or `None` if it does not exist. Uses a channel of its own, because the
/// broker closes the channel of a passive declare that fails.
pub async fn queue_info(
    conn: &Connection,
    queue: &str,
) -> Result<Option<lapin::Queue>, BrokerError> {
    let channel = conn.create_channel().await.map_err(|e| {
        BrokerError::amqp(format!("while opening a channel to check queue {queue}"), e)
    })?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(q) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(Some(q))
        }
        Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => Ok(None),
        Err(e) => Err(BrokerError::amqp(
            format!("while checking queue {queue}"),
            e,
        )),
    }
}

/// At most this many messages are looked at by [`peek_all`]; a max-length-1 queue holds one, or two for a
/// moment when a reader requeues the old message while the writer adds a new one.
const PEEK_LIMIT: usize = 16;

/// Reads the messages of `queue` without consuming them: `basic.get` until empty, then one `basic.nack` with
/// `multiple` and `requeue` puts them all back in order. `None` if the queue does not exist.
pub async fn peek_all(conn: &Connection, queue: &str) -> Result<Option<Vec<Vec<u8>>>, BrokerError> {
    let channel = conn.create_channel().await.map_err(|e| {
        BrokerError::amqp(format!("while opening a channel to read queue {queue}"), e)
    })?;
    let mut bodies = Vec::new();
    let mut last_tag = None;
    while bodies.len() < PEEK_LIMIT {
        match channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
        {
            Ok(Some(msg)) => {
                last_tag = Some(msg.delivery.delivery_tag);
                bodies.push(msg.delivery.data);
            }
            Ok(None) => break,
            Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => return Ok(None),
            Err(e) => return Err(BrokerError::amqp(format!("while reading queue {queue}"), e)),
        }
    }
    if let Some(tag) = last_tag {
        let requeue = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        channel.basic_nack(tag, requeue).await.map_err(|e| {
            BrokerError::amqp(
                format!("while returning the messages read to queue {queue}"),
                e,
            )
        })?;
    }
    let _ = channel.close(200, "read".into()).await;
    Ok(Some(bodies))
}

/// Reads the service's registration for `ep` without consuming it, using the newest valid message. Another
/// reader may hold the single message unacked for a moment, so an empty queue is retried briefly.
pub async fn fetch_registration(
    conn: &Connection,
    ep: &EndpointId,
) -> Result<Registration, RegistrationError> {
    let queue = ep.registration_queue();
    for attempt in 0..10 {
        let Some(bodies) = peek_all(conn, &queue).await? else {
            return Err(RegistrationError::NotProvisioned(ep.clone(), queue));
        };
        if !bodies.is_empty() {
            return newest_registration(ep, &bodies);
        }
        if attempt < 9 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Err(RegistrationError::Missing(ep.clone(), queue))
}

/// The most recently provisioned valid registration among `bodies`, else the first one's error.
fn newest_registration(
    ep: &EndpointId,
    bodies: &[Vec<u8>],
) -> Result<Registration, RegistrationError> {
    let mut parsed: Vec<_> = bodies.iter().map(|b| parse_registration(ep, b)).collect();
    parsed.sort_by_key(|r| std::cmp::Reverse(r.as_ref().map_or(0, |r| r.provisioned_at_ms)));
    let first_ok = parsed.iter().position(Result::is_ok);
    parsed.swap_remove(first_ok.unwrap_or(0))
}

fn parse_registration(ep: &EndpointId, body: &[u8]) -> Result<Registration, RegistrationError> {
    let reg: Registration = serde_json::from_slice(body)
        .map_err(|e| RegistrationError::Invalid(ep.clone(), e.to_string()))?;
    if reg.protocol_version != PROTOCOL_VERSION {
        return Err(RegistrationError::Version(ep.clone(), reg.protocol_version));
    }
    if &reg.endpoint_id != ep {
        return Err(RegistrationError::Invalid(
            ep.clone(),
            format!("it names endpoint {}", reg.endpoint_id),
        ));
    }
    if reg.heartbeat_secs == 0 {
        return Err(RegistrationError::Invalid(
            ep.clone(),
            "heartbeat_secs is 0".into(),
        ));
    }
    Ok(reg)
}

/// Jittered exponential backoff between `min` and `max`. backon's jitter adds up to 100% of the delay, which
/// can overshoot the maximum, so every delay is clamped to `max`.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    inner: backon::ExponentialBackoff,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            inner: Self::build(min, max),
        }
    }

    fn build(min: Duration, max: Duration) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::new()
            .with_jitter()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }

    /// The next delay to wait, never above the maximum.
    pub fn next_delay(&mut self) -> Duration {
        self.inner.next().unwrap_or(self.max).min(self.max)
    }

    /// Start over from the minimum delay (after a success).
    pub fn reset(&mut self) {
        self.inner = Self::build(self.min, self.max);
    }
}

/// A session up at least this long resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Keys of the conditions recorded for `endpoint-agent status` (empty value: not in effect).
pub(crate) const PUBLISHING_BLOCKED: &str = "publishing_blocked";
pub(crate) const DISK_FULL: &str = "disk_full";

/// What the link supervisor needs; built once by `crate::run`.
pub(crate) struct Link {
    pub config: Arc<Config>,
    pub store: Store,
    pub signals: Arc<Signals>,
    pub state: watch::Sender<AgentState>,
    /// Sessions opened so far; every one after the first is a reconnect.
    pub sessions: AtomicU64,
}

/// How a session with the broker ended.
enum SessionEnd {
    /// `drain` was cancelled and every result is published.
    Drained,
    Failed(BrokerError),
}

impl Link {
    /// Keeps the endpoint connected until `drain` is cancelled and every result is published. `stop_intake`
    /// stops consuming. Fails only when the first registration fails for a reason no retry can fix (the
    /// endpoint is not provisioned, the credentials are refused): later failures are logged and retried.
    pub async fn run(
        self,
        stop_intake: CancellationToken,
        drain: CancellationToken,
    ) -> Result<(), RegistrationError> {
        let config = self.config.clone();
        let ep = &config.endpoint_id;
        let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
        let mut ever_registered = false;
        let blocked = watch::channel(None).0;
        let publisher = Publisher {
            config: config.clone(),
            store: self.store.clone(),
            signals: self.signals.clone(),
            state: self.state.subscribe(),
            seq: Arc::new(AtomicU64::new(0)),
            blocked: blocked.subscribe(),
        };
        let subscriber = Subscriber {
            config: config.clone(),
            store: self.store.clone(),
            signals: self.signals.clone(),
            state: self.state.clone(),
            unparsable: AtomicBool::new(false),
        };
        loop {
            let registered = async {
                let conn = connect(
                    &config.broker_url,
                    &format!("endpoint-agent {ep} registration"),
                )
                .await?;
                let reg = fetch_registration(&conn, ep).await;
                let _ = conn.close(200, "registered".into()).await;
                reg
            };
            let reg = match registered.await {
                Ok(reg) => reg,
                Err(e) if !ever_registered && !e.is_transient() => return Err(e),
                Err(e) => {
                    let delay = backoff.next_delay();
                    if e.is_transient() {
                        tracing::warn!(error = %e, ?delay, "broker unreachable; tasks on disk keep running; retrying");
                    } else {
                        tracing::error!(error = %e, ?delay, "cannot register; tasks on disk keep running; retrying");
                    }
                    self.note(format!("disconnected since {}: {e}", wire_time()))
                        .await;
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            if !ever_registered {
                tracing::info!(endpoint = %ep, heartbeat_secs = reg.heartbeat_secs, broker = %config.broker_url, "registered");
            }
            ever_registered = true;
            let started = std::time::Instant::now();
            let end = self
                .session(
                    &reg,
                    &subscriber,
                    &publisher,
                    &blocked,
                    &stop_intake,
                    &drain,
                )
                .await;
            // A session that stayed up a while proves the path works: the next outage starts over from the
            // shortest delay instead of the longest one reached by earlier outages.
            if started.elapsed() >= STABLE_SESSION {
                backoff.reset();
            }
            match end {
                SessionEnd::Drained => return Ok(()),
                SessionEnd::Failed(e) => {
                    if e.is_unparsable() {
                        tracing::warn!(
                            "a task could not be parsed by the AMQP client library; reading it with our own reader next"
                        );
                        subscriber.unparsable.store(true, Ordering::Relaxed);
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "lost the broker; tasks keep running, results wait on disk; reconnecting");
                    self.note(format!("disconnected since {}: {e}", wire_time()))
                        .await;
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn set_blocked(&self, blocked: &watch::Sender<Option<String>>, why: Option<String>) {
        record_link(
            &self.store,
            PUBLISHING_BLOCKED,
            why.clone().unwrap_or_default(),
        )
        .await;
        blocked.send_replace(why);
    }

    async fn note(&self, link: String) {
        record_link(&self.store, "link", link).await;
    }

    async fn session(
        &self,
        reg: &Registration,
        subscriber: &Subscriber,
        publisher: &Publisher,
        blocked: &watch::Sender<Option<String>>,
        stop_intake: &CancellationToken,
        drain: &CancellationToken,
    ) -> SessionEnd {
        let ep = &self.config.endpoint_id;
        let url = self.config.broker_url.with_heartbeat(reg.heartbeat_secs);
        let connected = async {
            let sub = connect(&url, &format!("endpoint-agent {ep} subscriber")).await?;
            let publ = connect(&url, &format!("endpoint-agent {ep} publisher")).await?;
            Ok::<_, BrokerError>((sub, publ))
        };
        let (sub_conn, pub_conn) = match connected.await {
            Ok(c) => c,
            Err(e) => return SessionEnd::Failed(e),
        };
        tracing::info!(broker = %self.config.broker_url, "connected");
        self.note(format!("connected since {}", wire_time())).await;
        let sessions = self
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        record_link(&self.store, "reconnects", sessions.to_string()).await;
        let interval = Duration::from_secs(u64::from(reg.heartbeat_secs));
        let intake = async {
            match subscriber.run(&sub_conn, stop_intake).await {
                Ok(()) => std::future::pending().await,
                Err(e) => e,
            }
        };
        let watchdog = async {
            let mut events = sub_conn.events_listener().or(pub_conn.events_listener());
            while let Some(event) = events.next().await {
                match event {
                    // A channel-level (soft) error, such as the exclusive consume being refused, also arrives
                    // here; it is handled where it happened and leaves the connection alive.
                    lapin::Event::Error(e) if !e.is_amqp_soft_error() => {
                        return BrokerError::amqp("the broker connection failed", e);
                    }
                    // Only the publisher connection publishes, so only it is ever blocked.
                    lapin::Event::ConnectionBlocked(reason) => {
                        tracing::warn!(reason = %reason, "the broker blocked publishing (resource alarm): results wait on disk, tasks keep running; it resumes when the broker unblocks");
                        self.set_blocked(blocked, Some(format!("since {}: {reason}", wire_time())))
                            .await;
                    }
                    lapin::Event::ConnectionUnblocked => {
                        tracing::info!(
                            "the broker unblocked publishing: sending the results that waited"
                        );
                        self.set_blocked(blocked, None).await;
                    }
                    _ => {}
                }
            }
            BrokerError::Lost("the broker connection closed".into())
        };
        let end = tokio::select! {
            e = intake => SessionEnd::Failed(e),
            e = watchdog => SessionEnd::Failed(e),
            r = publisher.ticker(&pub_conn, interval) => SessionEnd::Failed(r.err().unwrap_or_else(|| BrokerError::Lost("the heartbeat ticker stopped".into()))),
            r = publisher.run(&pub_conn, drain) => match r {
                Ok(()) => SessionEnd::Drained,
                Err(e) => SessionEnd::Failed(e),
            },
        };
        if matches!(end, SessionEnd::Drained) {
            if let Err(e) = publisher.final_heartbeat(&pub_conn, interval).await {
                tracing::warn!(error = %e, "cannot publish the final heartbeat");
            }
            self.note(format!("stopped at {}", wire_time())).await;
        }
        // A new connection starts unblocked (the broker blocks it again at its first publish if it must).
        if blocked.borrow().is_some() {
            self.set_blocked(blocked, None).await;
        }
        for conn in [&sub_conn, &pub_conn] {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                conn.close(200, "endpoint-agent".into()),
            )
            .await;
        }
        end
    }
}

/// Records a fact about the broker link for `endpoint-agent status` (best effort: it is only for display).
pub(crate) async fn record_link(store: &Store, key: &str, value: String) {
    if let Err(e) = store.set_meta(key, value).await {
        tracing::debug!(error = %e, key, "cannot record the link state");
    }
}

/// Now as RFC 3339 UTC, for the link state `endpoint-agent status` shows.
pub(crate) fn wire_time() -> String {
    crate::wire::rfc3339_utc(crate::wire::now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, expected: &str) {
        assert_eq!(redact(url), expected);
    }

    #[test]
    fn redacts_passwords() {
        check(
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqp://guest:***@127.0.0.1:5672/%2f",
        );
        check(
            "amqps://u:p%40ss@h/v?heartbeat=5",
            "amqps://u:***@h/v?heartbeat=5",
        );
        check("amqp://127.0.0.1:5672/%2f", "amqp://127.0.0.1:5672/%2f");
        check("amqp://user@h/", "amqp://user:***@h/");
        let url = BrokerUrl::new("amqp://a:secret@h:5672/%2f").unwrap();
        assert!(!format!("{url} {url:?}").contains("secret"));
    }

    #[test]
    fn heartbeat_is_added_once() {
        let url = BrokerUrl::new("amqp://h:5672/%2f").unwrap();
        assert_eq!(
            url.with_heartbeat(5).expose(),
            "amqp://h:5672/%2f?heartbeat=5"
        );
        let url = BrokerUrl::new("amqp://h/%2f?frame_max=8192").unwrap();
        assert_eq!(
            url.with_heartbeat(5).expose(),
            "amqp://h/%2f?frame_max=8192&heartbeat=5"
        );
        let url = BrokerUrl::new("amqp://h/%2f?heartbeat=9").unwrap();
        assert_eq!(url.with_heartbeat(5).expose(), "amqp://h/%2f?heartbeat=9");
    }

    #[test]
    fn bad_url_is_refused_without_leaking() {
        let err = BrokerUrl::new("http://u:secret@h").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_clamped_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(min, max);
        let delays: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= min && *d <= max), "{delays:?}");
        assert_eq!(delays[19], max);
        b.reset();
        assert!(b.next_delay() <= min * 2);
    }

    #[test]
    fn newest_valid_registration_wins() {
        let ep = EndpointId::new("ep").unwrap();
        let old = serde_json::to_vec(&Registration::new(ep.clone(), 5, 100)).unwrap();
        let new = serde_json::to_vec(&Registration::new(ep.clone(), 9, 200)).unwrap();
        let got = newest_registration(&ep, &[old.clone(), new.clone()]).unwrap();
        assert_eq!(got.heartbeat_secs, 9);
        let got = newest_registration(&ep, &[new, old.clone()]).unwrap();
        assert_eq!(got.heartbeat_secs, 9);
        let got = newest_registration(&ep, &[b"junk".to_vec(), old]).unwrap();
        assert_eq!(got.heartbeat_secs, 5);
        assert!(newest_registration(&ep, &[b"junk".to_vec()]).is_err());
    }

    #[test]
    fn registration_checks() {
        let ep = EndpointId::new("ep").unwrap();
        let good = serde_json::to_vec(&Registration::new(ep.clone(), 5, 1)).unwrap();
        assert!(parse_registration(&ep, &good).is_ok());
        let other = EndpointId::new("other").unwrap();
        assert!(matches!(
            parse_registration(&other, &good),
            Err(RegistrationError::Invalid(..))
        ));
        assert!(matches!(
            parse_registration(&ep, b"{"),
            Err(RegistrationError::Invalid(..))
        ));
        let mut v2 = Registration::new(ep.clone(), 5, 1);
        v2.protocol_version = 2;
        let v2 = serde_json::to_vec(&v2).unwrap();
        assert!(matches!(
            parse_registration(&ep, &v2),
            Err(RegistrationError::Version(..))
        ));
    }
}
