"""The client a Python service embeds (mirroring the Rust `service_setup::Client`): one pika BlockingConnection
with a consumer on the service's own durable results queue (`service.<SERVICE>.results`, bound to
`*.results.<SERVICE>`) and a confirm-mode channel to submit tasks on; calls that wait for their result and
give a verdict when it does not come in time; and the results nobody waited for.

Guarantees: a result is acked only once it was handed out (to a call, or by `results()`), so a crash of the
service loses none; a duplicate of a result already handed out (at-least-once delivery) is acked and dropped;
results that cannot be trusted (see `TaskResult.distrust`) are acked and dropped with a warning; memory is
bounded by the prefetch (results nobody takes stay in the broker).

Not thread-safe: use one Client per thread. Deliveries are read only while the client is inside one of its
methods (`call`, `Call.wait`, `results`, `next_result`, ...); a lost connection is noticed and reopened (the
URLs in turn, backoff 0.2 s doubling to 10 s) by the next method that needs it.
"""

import functools
import logging
import time
import uuid
from collections import OrderedDict, deque
from typing import Iterator, List, Optional, Sequence, Union

import pika
import pika.exceptions

from .errors import BrokerError, EndpointNotProvisioned, EndpointNotRunning, NoResultYet
from .status import EndpointStatus, read_registration, read_status
from .wire import (
    HEADER_TIMEOUT_MS,
    MAX_FUNCTION_LEN,
    MAX_TASK_ID_LEN,
    RESULTS_EXCHANGE,
    TASKS_EXCHANGE,
    TaskResult,
    check_endpoint_id,
    check_service_name,
    service_binding,
    service_queue,
    string_value,
)

log = logging.getLogger("endpoint_client")
log.addHandler(logging.NullHandler())  # warnings show once the application configures logging

DEFAULT_PREFETCH = 256
# Results handed out whose (endpoint, task id) is remembered, to drop duplicates.
REMEMBERED = 100_000
# How long an operation waits for a (re)connection before it fails with BrokerError.
CONNECT_WAIT = 10.0
RECONNECT_MIN, RECONNECT_MAX = 0.2, 10.0
# The longest single wait for deliveries (so heartbeats and deadlines are looked at).
PUMP_SLICE = 1.0

# What a broken connection or channel raises in pika (and the socket under it).
_LOST = (pika.exceptions.AMQPError, OSError)

Payload = Union[bytes, bytearray, memoryview, str]


class Call:
    """A submitted task whose result a client waits for, from `Client.start_call`. `wait(timeout)` returns the
    result or raises a `CallError` verdict, and may be called again after a verdict; `cancel()` (or dropping
    the handle) gives up: the result then comes out of `Client.results()`."""

    def __init__(self, client: "Client", endpoint: str, task_id: str):
        self._client = client
        self.endpoint = endpoint
        self.task_id = task_id
        self._done = False

    def wait(self, timeout: float) -> TaskResult:
        """Waits up to `timeout` seconds for the result (see `Client.call` for the verdicts)."""
        return self._wait_until(time.monotonic() + timeout)

    def _wait_until(self, deadline: float) -> TaskResult:
        if self._done:
            raise ValueError(f"the result of task {self.task_id} was already returned, or the call cancelled")
        client = self._client
        while True:
            if self.task_id in client._arrived:
                self._done = True
                return client._arrived.pop(self.task_id)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                client._pump(min(remaining, PUMP_SLICE), deadline)
            except BrokerError:
                if client._closed:
                    raise
                # No connection before the deadline: wait it out, then try once more for the verdict.
                time.sleep(max(0.0, deadline - time.monotonic()))
        # Reading the status handles no delivery: a result coming meanwhile waits for the next wait() (or for
        # results(), once the call gave up).
        status = client.status(self.endpoint)
        if not status.provisioned:
            raise EndpointNotProvisioned(self.endpoint, self.task_id)
        live = status.liveness
        if live.kind == "running":
            raise NoResultYet(self.endpoint, self.task_id, live.state, status.queue_depth)
        raise EndpointNotRunning(self.endpoint, self.task_id, status.last_heartbeat)

    def cancel(self) -> None:
        """Stops waiting; a result that came meanwhile (or later) is handed out by `Client.results()`."""
        if self._done:
            return
        self._done = True
        self._client._give_up(self.task_id, self.endpoint)

    def __del__(self):
        try:
            self.cancel()
        except Exception:  # interpreter shutdown, or a client torn down already
            pass


class Client:
    """A service's connection to its endpoints: submit tasks, call functions and wait for their results, read
    the results nobody waited for.

    `urls`: an AMQP URL or a list of them (tried in order). `service`: this service instance's name (1 to 64 of
    A-Z a-z 0-9 _ -); instances with the same name share one results queue. `prefetch`: results held unacked
    at most. `queue_expires`: seconds after which the broker deletes the service's queue once it has no
    consumer (every instance must pass the same). `drop_unclaimed`: ack and drop (with a warning) results no
    call waits for, instead of holding them for `results()`; set it when the service never reads them,
    since `prefetch` unread ones stop all reading."""

    def __init__(
        self,
        urls: Union[str, Sequence[str]],
        service: str,
        prefetch: int = DEFAULT_PREFETCH,
        queue_expires: Optional[float] = None,
        drop_unclaimed: bool = False,
    ):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("no broker URL given: pass at least one")
        self._service = check_service_name(service)
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 1 <= prefetch <= 65535:
            raise ValueError(f"prefetch {prefetch!r} is out of range: pass 1 to 65535")
        if queue_expires is not None and not queue_expires > 0:
            raise ValueError(f"queue_expires {queue_expires!r} must be a positive number of seconds, or None")
        self._params = []
        for url in urls:
            params = pika.URLParameters(url)
            if not params.client_properties:
                params.client_properties = {"connection_name": f"endpoint_client {service}"}
            self._params.append(params)
        self._prefetch = prefetch
        self._expires_ms = None if queue_expires is None else max(1, int(queue_expires * 1000))
        self._drop_unclaimed = bool(drop_unclaimed)

        self._conn = None
        self._consume_ch = None
        self._publish_ch = None
        self._cancelled = False  # the broker cancelled the consumer (its queue was deleted)
        self._generation = 0  # bumped on each connection: delivery tags of older ones are void
        self._next_url = 0
        self._delay = RECONNECT_MIN
        self._closed = False

        self._raw = deque()  # deliveries as the consumer callback got them: (generation, method, props, body)
        self._waiters = {}  # task id -> endpoint, of the calls waiting
        self._arrived = {}  # task id -> TaskResult, for waiting calls (acked)
        self._unclaimed = deque()  # (TaskResult, delivery tag or None when acked, generation)
        self._remembered = OrderedDict()  # (endpoint, task id) of the results handed out, oldest first
        self._users = {}  # endpoint -> its broker user (None: none of its own), from its registration
        self._warned_full = False

        # The first connection is made here, each URL once, so a wrong URL or password is the caller's error.
        last = None
        for i in range(len(self._params)):
            try:
                self._open(i)
                return
            except BrokerError:
                raise
            except _LOST as e:
                log.warning("cannot connect to %s: %r", self._describe(i), e)
                last = e
        raise BrokerError(f"cannot connect to the broker ({last!r}): check the URL, the password and the vhost")

    # ---- public API ----

    @property
    def service(self) -> str:
        return self._service

    def submit(
        self,
        endpoint: str,
        function: str,
        payload: Payload,
        task_id: Optional[str] = None,
        timeout_ms: Optional[int] = None,
    ) -> str:
        """Queues one task for `endpoint` (persistent, mandatory, confirmed by the broker) and returns its id.
        Its result comes back to this service's queue: a call waiting for it, or `results()`. Raises
        EndpointNotProvisioned when the endpoint has no tasks queue, BrokerError when the broker fails."""
        task = self._prepare(endpoint, function, payload, task_id, timeout_ms)
        return self._publish(endpoint, [task])[0]

    def submit_many(self, endpoint: str, function: str, payloads: Sequence[Payload]) -> List[str]:
        """Queues one task per payload (fresh ids, in order) and returns their ids. pika's BlockingConnection
        awaits each publisher confirm before the next publish: one broker round trip per task. On error, the
        tasks before the failing one are queued."""
        tasks = [self._prepare(endpoint, function, p, None, None) for p in payloads]
        return self._publish(endpoint, tasks)

    def start_call(
        self,
        endpoint: str,
        function: str,
        payload: Payload,
        task_id: Optional[str] = None,
        timeout_ms: Optional[int] = None,
    ) -> Call:
        """Submits a task and returns a `Call` that waits for its result (registered before the task is
        published, so the result cannot be missed). Many calls may be started, then waited for."""
        task = self._prepare(endpoint, function, payload, task_id, timeout_ms)
        tid = task[0]
        if tid in self._waiters or tid in self._arrived:
            raise ValueError(f"a call for task {tid} is already waiting: give each call a task id of its own")
        self._waiters[tid] = endpoint
        try:
            self._publish(endpoint, [task])
        except BaseException:
            self._waiters.pop(tid, None)
            raise
        return Call(self, endpoint, tid)

    def call(
        self,
        endpoint: str,
        function: str,
        payload: Payload,
        timeout: float,
        task_id: Optional[str] = None,
        timeout_ms: Optional[int] = None,
    ) -> TaskResult:
        """Runs `function` on `endpoint` and waits up to `timeout` seconds (submit included) for the result. A
        result with status `failed`, `timeout` or `rejected` is returned, not raised. Without a result in
        time it raises, after reading the endpoint's status: EndpointNotProvisioned (no tasks queue),
        EndpointNotRunning (no fresh heartbeat: the task stays queued) or NoResultYet (the agent runs but has
        not answered); in the last two cases the result comes out of `results()` later."""
        deadline = time.monotonic() + timeout
        pending = self.start_call(endpoint, function, payload, task_id, timeout_ms)
        try:
            return pending._wait_until(deadline)
        finally:
            pending.cancel()

    def next_result(self, timeout: Optional[float] = None) -> Optional[TaskResult]:
        """The next result no call waited for, acked as it is handed out; None after `timeout` seconds
        without one (None: wait for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            result = self._take_unclaimed()
            if result is not None:
                return result
            slice_ = PUMP_SLICE
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                slice_ = min(slice_, remaining)
            try:
                self._pump(slice_, deadline)
            except BrokerError:
                if deadline is None or self._closed:
                    raise
                time.sleep(max(0.0, deadline - time.monotonic()))

    def results(self, timeout: Optional[float] = None) -> Iterator[TaskResult]:
        """The results no call waited for (a call that gave up, `submit`, a previous run of the service), each
        acked as it is yielded; stops after `timeout` seconds without one (None: never)."""
        while True:
            result = self.next_result(timeout)
            if result is None:
                return
            yield result

    def status(self, endpoint: str) -> EndpointStatus:
        """What the broker says about `endpoint` (tasks queue, registration, last heartbeat) and the verdict on
        whether its agent runs (`.liveness`, `.running`, `.verdict`). Changes nothing on the broker."""
        check_endpoint_id(endpoint)
        self._ensure(time.monotonic() + CONNECT_WAIT)
        try:
            return read_status(self._conn, endpoint)
        except pika.exceptions.ChannelClosedByBroker as e:  # the connection is fine
            raise BrokerError(
                f"the broker refused to show endpoint {endpoint}'s queues ({e.reply_code} {e.reply_text}): "
                "this user needs to read (basic.get) its registration and heartbeat queues",
                endpoint,
            ) from None
        except _LOST as e:
            self._lost(e)
            raise BrokerError(f"lost the connection while reading the status of endpoint {endpoint}: {e!r}")

    def close(self) -> None:
        """Closes the connection. Results not handed out yet stay in the service's queue for the next start."""
        self._closed = True
        self._drop_session()
        self._waiters.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- submitting ----

    def _prepare(self, endpoint, function, payload, task_id, timeout_ms):
        """Validates a task: (task id, body, properties)."""
        check_endpoint_id(endpoint)
        tid = str(uuid.uuid4()) if task_id is None else task_id
        if not isinstance(tid, str) or not 1 <= len(tid.encode("utf-8")) <= MAX_TASK_ID_LEN:
            raise ValueError(
                f"task id {tid!r} must be a string of 1 to {MAX_TASK_ID_LEN} UTF-8 bytes, or None for a fresh one"
            )
        if not isinstance(function, str) or not 1 <= len(function.encode("utf-8")) <= MAX_FUNCTION_LEN:
            raise ValueError(f"function name {function!r} must be a string of 1 to {MAX_FUNCTION_LEN} UTF-8 bytes")
        if isinstance(payload, str):
            body = payload.encode("utf-8")
        elif isinstance(payload, (bytes, bytearray, memoryview)):
            body = bytes(payload)
        else:
            raise TypeError(f"payload must be bytes or str, not {type(payload).__name__}")
        headers = None
        if timeout_ms is not None:
            if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or not 0 <= timeout_ms < 2**63:
                raise ValueError(f"timeout_ms {timeout_ms!r} must be an integer of milliseconds, 0 to 2**63-1")
            headers = {HEADER_TIMEOUT_MS: timeout_ms}
        props = pika.BasicProperties(
            message_id=tid,
            type=function,
            delivery_mode=2,
            reply_to=self._service,
            headers=headers,
        )
        return tid, body, props

    def _publish(self, endpoint, tasks) -> List[str]:
        self._ensure(time.monotonic() + CONNECT_WAIT)
        ids = []
        for tid, body, props in tasks:
            try:
                self._publish_ch.basic_publish(TASKS_EXCHANGE, f"{endpoint}.tasks", body, props, mandatory=True)
            except pika.exceptions.UnroutableError:
                raise EndpointNotProvisioned(endpoint, tid) from None
            except pika.exceptions.NackError:
                raise BrokerError(
                    f"the broker refused task {tid} (negative confirm): submit it again", endpoint, tid
                ) from None
            except _LOST as e:
                self._lost(e)
                raise BrokerError(
                    f"lost the connection while submitting task {tid} ({e!r}): it may or may not be queued; "
                    "submit it again with the same task id (the agent runs an id once)",
                    endpoint,
                    tid,
                ) from None
            ids.append(tid)
        return ids

    # ---- the connection ----

    def _describe(self, i: int) -> str:
        p = self._params[i]
        return f"amqp://{p.host}:{p.port}/{p.virtual_host}"  # no credentials in logs

    def _open(self, i: int) -> None:
        """Connects to URL `i`, declares the service's queue, consumes it and opens the publishing channel."""
        conn = pika.BlockingConnection(self._params[i])
        queue = service_queue(self._service)
        try:
            consume = conn.channel()
            consume.exchange_declare(RESULTS_EXCHANGE, "topic", durable=True)
            args = None if self._expires_ms is None else {"x-expires": self._expires_ms}
            try:
                consume.queue_declare(queue, durable=True, arguments=args)
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code == 406:
                    raise BrokerError(
                        f"queue {queue} exists with other arguments ({e.reply_text}): every instance of service "
                        f"{self._service} must pass the same queue_expires (or delete the queue when it is empty)"
                    ) from None
                raise
            consume.queue_bind(queue, RESULTS_EXCHANGE, routing_key=service_binding(self._service))
            consume.basic_qos(prefetch_count=self._prefetch)
            generation = self._generation + 1
            consume.basic_consume(queue, functools.partial(self._on_delivery, generation), auto_ack=False)
            consume.add_on_cancel_callback(self._on_cancel)
            publish = conn.channel()
            publish.confirm_delivery()
            # Publishing to a missing exchange closes the channel (404); with `tasks` declared, a task for an
            # unprovisioned endpoint comes back unroutable instead, which names the fix.
            publish.exchange_declare(TASKS_EXCHANGE, "direct", durable=True)
        except BaseException:
            try:
                conn.close()
            except _LOST:
                pass
            raise
        self._conn, self._consume_ch, self._publish_ch = conn, consume, publish
        self._generation = generation
        self._cancelled = False
        self._next_url = (i + 1) % len(self._params)

    def _alive(self) -> bool:
        return (
            self._conn is not None
            and self._conn.is_open
            and self._consume_ch.is_open
            and self._publish_ch.is_open
            and not self._cancelled
        )

    def _ensure(self, deadline: Optional[float]) -> None:
        """A working connection, reopened if need be (the URLs in turn, with backoff) until `deadline`
        (monotonic; None: for ever). Raises BrokerError when the deadline passes first."""
        if self._closed:
            raise BrokerError("the client is closed")
        if self._alive():
            try:
                # Reads what the socket holds, so a connection the broker closed meanwhile is noticed here,
                # not halfway through a publish.
                self._conn.process_data_events(time_limit=0)
            except _LOST as e:
                self._lost(e)
            if self._alive():
                return
        self._drop_session()
        last = None
        while True:
            for _ in range(len(self._params)):
                i = self._next_url
                self._next_url = (i + 1) % len(self._params)
                try:
                    self._open(i)
                    self._delay = RECONNECT_MIN
                    log.info("connected to %s", self._describe(i))
                    return
                except BrokerError:
                    raise
                except _LOST as e:
                    log.warning("cannot connect to %s: %r", self._describe(i), e)
                    last = e
            delay, self._delay = self._delay, min(self._delay * 2, RECONNECT_MAX)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise BrokerError(f"cannot reach the broker ({last!r}): is it running? it is retried on the next call")
            time.sleep(delay)

    def _lost(self, error) -> None:
        log.warning("lost the connection to the broker (%r); it is reopened on the next operation", error)
        self._drop_session()

    def _drop_session(self) -> None:
        """Forgets the connection. Results held unacked go back to the queue (the broker redelivers them)."""
        conn, self._conn, self._consume_ch, self._publish_ch = self._conn, None, None, None
        self._raw.clear()
        self._unclaimed = deque(u for u in self._unclaimed if u[1] is None)
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except _LOST:
                pass

    def _on_delivery(self, generation, _channel, method, properties, body) -> None:
        self._raw.append((generation, method, properties, body))

    def _on_cancel(self, _frame) -> None:
        log.warning("the broker cancelled the consumer of %s (queue deleted?); it is declared again",
                    service_queue(self._service))
        self._cancelled = True

    def _pump(self, time_limit: float, deadline: Optional[float]) -> None:
        """Waits up to `time_limit` seconds for deliveries and handles them."""
        self._ensure(deadline)
        try:
            if not self._raw:  # (else _ensure's look at the socket brought some: handle them first)
                self._conn.process_data_events(time_limit=time_limit)
            self._drain()
        except _LOST as e:
            self._lost(e)

    # ---- results ----

    def _drain(self) -> None:
        while self._raw:
            generation, method, properties, body = self._raw.popleft()
            if generation == self._generation:
                self._handle(method, properties, body)

    def _handle(self, method, properties, body) -> None:
        record = TaskResult.from_delivery(method.routing_key, properties, body, method.redelivered)
        tag = method.delivery_tag
        user = self._endpoint_user(record.endpoint_id) if record.endpoint_id else None
        why = record.distrust(user)
        if why is not None:
            log.warning(
                "dropped a result that cannot be trusted (task %s, routing key %s, user %s): %s",
                record.task_id, method.routing_key, record.user_id, why,
            )
            self._consume_ch.basic_ack(tag)
            return
        sent_to = self._waiters.get(record.task_id)
        if sent_to is not None:
            if sent_to == record.endpoint_id:
                del self._waiters[record.task_id]
                self._remember(record)
                self._arrived[record.task_id] = record
                self._consume_ch.basic_ack(tag)
                return
            log.warning(
                "a result for task %s, which a call waits for from endpoint %s, came from endpoint %s: "
                "not that call's", record.task_id, sent_to, record.endpoint_id,
            )
        if _key(record) in self._remembered:
            log.debug("dropped a duplicate of the result of task %s, already handed out", record.task_id)
            self._consume_ch.basic_ack(tag)
            return
        if self._drop_unclaimed:
            log.warning(
                "dropped the result of task %s (endpoint %s, status %s): no call waits for it (drop_unclaimed)",
                record.task_id, record.endpoint_id, record.status,
            )
            self._consume_ch.basic_ack(tag)
            return
        self._unclaimed.append((record, tag, self._generation))
        if len(self._unclaimed) >= self._prefetch and not self._warned_full:
            self._warned_full = True
            log.warning(
                "%d results no call waits for fill the client's buffer: no further results (calls' included) "
                "are read until some are taken with results(), or pass drop_unclaimed=True", self._prefetch,
            )

    def _take_unclaimed(self) -> Optional[TaskResult]:
        while self._unclaimed:
            record, tag, generation = self._unclaimed.popleft()
            if tag is not None and generation != self._generation:
                continue  # its channel is gone: the broker delivers it again
            duplicate = _key(record) in self._remembered
            if tag is not None:
                try:
                    self._consume_ch.basic_ack(tag)
                except _LOST as e:
                    # Delivered again later, and dropped then as a duplicate of this one.
                    self._lost(e)
            if duplicate:
                log.debug("dropped a duplicate of the result of task %s, already handed out", record.task_id)
                continue
            self._remember(record)
            if len(self._unclaimed) < self._prefetch:
                self._warned_full = False
            return record
        return None

    def _give_up(self, task_id: str, endpoint: str) -> None:
        """A call stopped waiting: its result (if it came, acked already) becomes an unclaimed one."""
        if self._waiters.get(task_id) == endpoint:
            del self._waiters[task_id]
        record = self._arrived.pop(task_id, None)
        if record is not None:
            self._remembered.pop(_key(record), None)
            self._unclaimed.appendleft((record, None, self._generation))

    def _remember(self, record: TaskResult) -> None:
        key = _key(record)
        self._remembered[key] = None
        self._remembered.move_to_end(key)
        while len(self._remembered) > REMEMBERED:
            self._remembered.popitem(last=False)

    def _endpoint_user(self, endpoint: str) -> Optional[str]:
        """The broker user `endpoint` publishes as, from its registration (read once, then cached)."""
        if endpoint in self._users:
            return self._users[endpoint]
        try:
            registration = read_registration(self._conn, endpoint, version_only=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            log.warning(
                "cannot read the registration of endpoint %s (%s %s): its results are not checked against its "
                "broker user; let this user read queue %s.registration", endpoint, e.reply_code, e.reply_text,
                endpoint,
            )
            return None
        if registration is None:
            # No registration to read (not provisioned, or its one message held by another reader right now):
            # no user to check against, and asked again for the next result.
            return None
        user = string_value(registration.get("endpoint_user"))
        self._users[endpoint] = user
        return user


def _key(record: TaskResult):
    """What makes two results copies of one: the same task on the same endpoint (the same id sent to two
    endpoints gets two results, and another endpoint cannot make a result be dropped by sending one first)."""
    return record.endpoint_id, record.task_id


__all__ = ["Call", "Client", "DEFAULT_PREFETCH"]
