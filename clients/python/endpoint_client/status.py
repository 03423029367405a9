"""Reading what the broker knows about an endpoint, without changing anything: its tasks queue (checked
passively), its registration and its latest heartbeat (peeked with basic.get, never acked; closing the channel
returns them), and the verdict on whether its agent runs (mirroring the Rust `EndpointStatus::liveness`).
"""

import json
import time
from dataclasses import asdict, dataclass
from typing import Optional

import pika.exceptions

from .wire import PROTOCOL_VERSION, now_ms, rfc3339_utc

# At most this many messages are looked at in a queue meant to hold one.
PEEK_LIMIT = 16
# Extra reads of an empty max-length-1 queue: another reader (an agent connecting, another client's status
# read) may hold its one message unacked for a moment.
EMPTY_RETRIES = 3
EMPTY_RETRY_DELAY = 0.05


def queue_info(conn, queue: str):
    """`(message_count, consumer_count)` of `queue`, or None if it does not exist."""
    channel = conn.channel()
    try:
        ok = channel.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            return None
        raise
    _close(channel)
    return ok.method.message_count, ok.method.consumer_count


def peek_all(conn, queue: str):
    """The bodies in `queue`, read without consuming them; None if the queue does not exist."""
    channel = conn.channel()
    bodies = []
    try:
        while len(bodies) < PEEK_LIMIT:
            method, _props, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            bodies.append(body)
    except pika.exceptions.ChannelClosedByBroker as e:
        if e.reply_code == 404:
            return None
        raise
    _close(channel)  # the unacked messages go back to the queue
    return bodies


def _close(channel):
    try:
        channel.close()
    except pika.exceptions.AMQPError:
        pass


def _int(value) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _json_objects(bodies, endpoint: str):
    for body in bodies:
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(value, dict) and value.get("endpoint_id") == endpoint:
            yield value


def latest(conn, queue: str, endpoint: str, valid, key, retry_empty: bool = True):
    """The newest (by `key`) message of `queue` that is a JSON object naming `endpoint` and passes `valid`."""
    for attempt in range(EMPTY_RETRIES + 1):
        bodies = peek_all(conn, queue)
        if bodies is None:
            return None
        if not bodies and retry_empty and attempt < EMPTY_RETRIES:
            time.sleep(EMPTY_RETRY_DELAY)
            continue
        candidates = [v for v in _json_objects(bodies, endpoint) if valid(v)]
        return max(candidates, key=key) if candidates else None
    return None


def _valid_registration(r) -> bool:
    return _int(r.get("provisioned_at_ms")) is not None and _int(r.get("heartbeat_secs")) is not None


def _valid_heartbeat(h) -> bool:
    return isinstance(h.get("state"), str) and _int(h.get("time_ms")) is not None


def read_registration(conn, endpoint: str, version_only: bool = False):
    """The endpoint's newest valid registration (a dict), or None (no queue, no message, none valid).
    With `version_only`, only a registration of this protocol version counts."""

    def valid(r):
        return _valid_registration(r) and (not version_only or r.get("protocol_version") == PROTOCOL_VERSION)

    return latest(conn, f"{endpoint}.registration", endpoint, valid, lambda r: r["provisioned_at_ms"])


@dataclass(frozen=True)
class Liveness:
    """Whether the endpoint's agent runs, from its last heartbeat. `kind` is `running` (fresh heartbeat;
    `state` and `age_ms` set), `not_running` (the last heartbeat says it stopped, `clean_stop`, or is older than
    2.5 heartbeat intervals; `since_ms` set) or `never_seen` (no heartbeat at all)."""

    kind: str
    state: Optional[str] = None
    age_ms: Optional[int] = None
    since_ms: Optional[int] = None
    clean_stop: Optional[bool] = None


@dataclass
class EndpointStatus:
    """What the broker says about one endpoint at `now_ms` (like the Rust `EndpointStatus`)."""

    endpoint_id: str
    provisioned: bool  # its tasks queue exists
    queue_depth: Optional[int]  # ready tasks in its tasks queue
    consumers: Optional[int]  # consumers of its tasks queue (a running agent holds one)
    heartbeat_secs: Optional[int]  # from its registration
    last_heartbeat: Optional[dict]  # the newest heartbeat, as the agent sent it
    now_ms: int

    @property
    def liveness(self) -> Liveness:
        hb = self.last_heartbeat
        if hb is None:
            return Liveness("never_seen")
        if hb["state"] == "stopped":
            return Liveness("not_running", since_ms=hb["time_ms"], clean_stop=True)
        # The heartbeat's own interval is what the agent follows; the registration's is only a fallback.
        interval = _int(hb.get("heartbeat_secs")) or self.heartbeat_secs or 0
        age_ms = max(0, self.now_ms - hb["time_ms"])
        if age_ms * 2 > interval * 5000:
            return Liveness("not_running", since_ms=hb["time_ms"], clean_stop=False)
        return Liveness("running", state=hb["state"], age_ms=age_ms)

    @property
    def running(self) -> bool:
        return self.liveness.kind == "running"

    @property
    def verdict(self) -> str:
        """One line: `running (state S, last heartbeat Ns ago)`, `not running since T (stopped cleanly)`,
        `not running since T (no heartbeat for Ns)` or `never seen`."""
        live = self.liveness
        if live.kind == "running":
            return f"running (state {live.state}, last heartbeat {live.age_ms // 1000}s ago)"
        if live.kind == "not_running":
            since = rfc3339_utc(live.since_ms)
            if live.clean_stop:
                return f"not running since {since} (stopped cleanly)"
            return f"not running since {since} (no heartbeat for {(self.now_ms - live.since_ms) // 1000}s)"
        return "never seen"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["liveness"] = {k: v for k, v in asdict(self.liveness).items() if v is not None}
        d["verdict"] = self.verdict
        return d


def read_status(conn, endpoint: str) -> EndpointStatus:
    """Reads the status of `endpoint` over `conn` (a pika BlockingConnection). A missing tasks queue means
    `provisioned=False`, not an error."""
    tasks = queue_info(conn, f"{endpoint}.tasks")
    registration = read_registration(conn, endpoint)
    heartbeat = latest(
        conn,
        f"{endpoint}.heartbeat",
        endpoint,
        _valid_heartbeat,
        lambda h: (h["time_ms"], _int(h.get("seq")) or 0),
    )
    return EndpointStatus(
        endpoint_id=endpoint,
        provisioned=tasks is not None,
        queue_depth=tasks[0] if tasks is not None else None,
        consumers=tasks[1] if tasks is not None else None,
        heartbeat_secs=registration["heartbeat_secs"] if registration else None,
        last_heartbeat=heartbeat,
        now_ms=now_ms(),
    )
