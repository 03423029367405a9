"""The wire contract as the Python client needs it (docs/protocol.md, version 3): names and their validation,
the result of a task (`TaskResult`) parsed from a delivery, tolerant of how AMQP clients encode integers, and
the trust check of a result (`distrust`, mirroring the Rust `ResultRecord::distrust`). Pure functions: no I/O.
"""

import calendar
import datetime
import re
import time
from dataclasses import dataclass, field
from typing import Optional

PROTOCOL_VERSION = 3
TASKS_EXCHANGE = "tasks"
RESULTS_EXCHANGE = "results"
HEADER_TIMEOUT_MS = "x-timeout-ms"
MAX_TASK_ID_LEN = 255
MAX_FUNCTION_LEN = 255

_ENDPOINT_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SERVICE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_I64 = (-(2**63), 2**63 - 1)


def is_endpoint_id(value) -> bool:
    return isinstance(value, str) and _ENDPOINT_RE.fullmatch(value) is not None


def is_service_name(value) -> bool:
    return isinstance(value, str) and _SERVICE_RE.fullmatch(value) is not None


def check_endpoint_id(value) -> str:
    if not is_endpoint_id(value):
        raise ValueError(
            f"endpoint id {value!r} is not valid: use 1 to 128 letters, digits, '_' or '-' "
            "(the id the endpoint was provisioned with)"
        )
    return value


def check_service_name(value) -> str:
    if not is_service_name(value):
        raise ValueError(
            f"service name {value!r} is not valid: use 1 to 64 letters, digits, '_' or '-' "
            "(give each service instance a name of its own)"
        )
    return value


def service_queue(service: str) -> str:
    """The durable results queue of a service: `service.<SERVICE>.results`."""
    return f"service.{service}.results"


def service_binding(service: str) -> str:
    """The key the service's queue is bound to `results` with: `*.results.<SERVICE>`."""
    return f"*.results.{service}"


def endpoint_of_routing_key(key) -> Optional[str]:
    """The endpoint of a results routing key `<EP>.results` or `<EP>.results.<SERVICE>`; None for anything else."""
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    if not isinstance(key, str):
        return None
    words = key.split(".")
    if len(words) not in (2, 3) or words[1] != "results" or not is_endpoint_id(words[0]):
        return None
    if len(words) == 3 and not is_service_name(words[2]):
        return None
    return words[0]


def rfc3339_utc(ms: int) -> str:
    """`2024-03-01T12:34:56.789Z` for `ms` milliseconds since the Unix epoch (as the Rust side prints times)."""
    t = time.gmtime(ms // 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{ms % 1000:03d}Z"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def string_value(value) -> Optional[str]:
    """A header or property as text (bytes decoded lossily); None when it is not a string."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return None


def int_value(value) -> Optional[int]:
    """A header as an integer: any AMQP integer encoding (pika decodes them all to int; a timestamp to a
    datetime), or decimal digits in a string. Booleans, decimals and anything else are not integers. (pika 1.2
    hands float and double values over truncated to int, so they count here, unlike in the Rust client; and it
    swaps the signedness of the 8-bit types, `b` and `B`. The agent sends 32- and 64-bit integers.)"""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)  # pika decodes 64-bit integers to a subclass of int
    if isinstance(value, datetime.datetime):
        return calendar.timegm(value.utctimetuple())
    text = string_value(value)
    if text is not None and _INT_RE.fullmatch(text.strip()):
        return int(text.strip())
    return None


def _claimed(headers) -> Optional[str]:
    """The `endpoint_id` header; a value that is not a string claims no valid endpoint (so it never matches)."""
    if "endpoint_id" not in headers:
        return None
    value = headers["endpoint_id"]
    text = string_value(value)
    return text if text is not None else f"<not a string: {type(value).__name__}>"


def _in_range(n: Optional[int], low: int, high: int) -> Optional[int]:
    return n if n is not None and low <= n <= high else None


@dataclass
class TaskResult:
    """One task's result. `status` is `ok`, `failed`, `timeout` or `rejected` (kept as sent); `body` is the
    output for `ok`, else a human-readable error. `endpoint_id` is the endpoint of the routing key the result
    was published with (never just the header's claim)."""

    task_id: str
    endpoint_id: str
    status: str
    exit_code: Optional[int] = None
    attempts: Optional[int] = None
    duration_ms: Optional[int] = None
    body: bytes = b""
    # What the publisher claims in the `endpoint_id` header, and the broker user that published it.
    claimed_endpoint_id: Optional[str] = field(default=None, repr=False)
    user_id: Optional[str] = field(default=None, repr=False)
    # The broker delivered it before, to a reader that did not ack it.
    redelivered: bool = field(default=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def text(self, errors: str = "replace") -> str:
        """The body as UTF-8 text (undecodable bytes replaced unless `errors` says otherwise)."""
        return self.body.decode("utf-8", errors)

    @classmethod
    def from_delivery(cls, routing_key, properties, body, redelivered=False) -> "TaskResult":
        """Parses a delivery (pika's `method.routing_key`, `BasicProperties` and body)."""
        headers = getattr(properties, "headers", None) or {}
        task_id = string_value(properties.message_id) or string_value(properties.correlation_id) or ""
        return cls(
            task_id=task_id,
            endpoint_id=endpoint_of_routing_key(routing_key) or "",
            status=string_value(headers.get("status")) or "",
            exit_code=_in_range(int_value(headers.get("exit_code")), *_I64),
            attempts=_in_range(int_value(headers.get("attempts")), 0, 2**32 - 1),
            duration_ms=_in_range(int_value(headers.get("duration_ms")), 0, 2**64 - 1),
            body=bytes(body or b""),
            claimed_endpoint_id=_claimed(headers),
            user_id=string_value(properties.user_id),
            redelivered=bool(redelivered),
        )

    def distrust(self, endpoint_user: Optional[str]) -> Optional[str]:
        """Why this result must not be trusted, if so: it was not published with an endpoint's results routing
        key, its header claims another endpoint, or (`endpoint_user`: the endpoint has a broker user of its
        own) another user published it."""
        if not self.endpoint_id:
            return "it was not published with an `<endpoint>.results` routing key"
        if self.claimed_endpoint_id is not None and self.claimed_endpoint_id != self.endpoint_id:
            return (
                f"its header claims endpoint {self.claimed_endpoint_id!r} "
                f"but it was published for {self.endpoint_id!r}"
            )
        if endpoint_user is not None and self.user_id != endpoint_user:
            return (
                f"it was published by user {self.user_id or '(none)'!r}, "
                f"not by the endpoint's user {endpoint_user!r}"
            )
        return None
