"""Python client of the endpoint-agent service side (wire protocol version 3, docs/protocol.md): submit tasks
to endpoints, call functions and wait for their results on this service's own queue, read the results nobody
waited for, and tell "not provisioned", "not running" and "no result yet" apart. Depends on pika only.

    from endpoint_client import Client, CallError

    with Client("amqp://guest:guest@127.0.0.1:5672/%2f", service="billing-1") as client:
        result = client.call("demo", "echo", b"hello", timeout=10)
        print(result.status, result.body)

This module only gathers the public names; see `client` (the Client), `wire` (TaskResult and the contract's
names), `status` (endpoint status and liveness) and `errors`.
"""

from .client import DEFAULT_PREFETCH, Call, Client
from .errors import BrokerError, CallError, EndpointNotProvisioned, EndpointNotRunning, NoResultYet
from .status import EndpointStatus, Liveness
from .wire import PROTOCOL_VERSION, TaskResult

__all__ = [
    "BrokerError",
    "Call",
    "CallError",
    "Client",
    "DEFAULT_PREFETCH",
    "EndpointNotProvisioned",
    "EndpointNotRunning",
    "EndpointStatus",
    "Liveness",
    "NoResultYet",
    "PROTOCOL_VERSION",
    "TaskResult",
]
