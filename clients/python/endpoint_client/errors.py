"""The errors of the client: why a call has no result (`CallError` and its three verdicts, whose messages say
what to do, as the Rust `CallError` does) and `BrokerError` for a broker that cannot be reached or refused.
"""

from typing import Optional

from .wire import rfc3339_utc


class CallError(Exception):
    """Why a call (or a submit) has no result. `endpoint` and `task_id` (None when no task was queued) say
    which."""

    def __init__(self, message: str, endpoint: Optional[str] = None, task_id: Optional[str] = None):
        super().__init__(message)
        self.endpoint = endpoint
        self.task_id = task_id


class EndpointNotProvisioned(CallError):
    """The endpoint has no tasks queue: the task was not queued (unroutable), or its queue is gone."""

    def __init__(self, endpoint: str, task_id: Optional[str] = None):
        super().__init__(
            f"endpoint {endpoint} is not provisioned: run `service-setup provision --endpoint-id {endpoint}`",
            endpoint,
            task_id,
        )


class EndpointNotRunning(CallError):
    """No agent serves the endpoint: its last heartbeat (`last_heartbeat`, the agent's JSON as a dict, or None
    when there never was one) is stale or says it stopped. The task stays queued and runs when an agent starts;
    its result then reaches the service's queue (and `Client.results()`)."""

    def __init__(self, endpoint: str, task_id: str, last_heartbeat: Optional[dict]):
        if last_heartbeat is None:
            since = "it has never sent a heartbeat"
        else:
            since = (
                f"its last heartbeat was at {rfc3339_utc(last_heartbeat['time_ms'])} "
                f"(state {last_heartbeat['state']})"
            )
        super().__init__(
            f"endpoint {endpoint} is not running: {since}; task {task_id} stays queued until its agent starts "
            f"(`endpoint-agent start --endpoint-id {endpoint}`)",
            endpoint,
            task_id,
        )
        self.last_heartbeat = last_heartbeat


class NoResultYet(CallError):
    """An agent serves the endpoint (state `endpoint_state`) but has not answered in time: the task is queued
    behind others (`queue_depth` ready in the tasks queue, None if unknown) or still running. Its result will
    come out of `Client.results()`."""

    def __init__(self, endpoint: str, task_id: str, endpoint_state: str, queue_depth: Optional[int]):
        depth = "an unknown number of" if queue_depth is None else str(queue_depth)
        super().__init__(
            f"no result yet for task {task_id}: endpoint {endpoint} is running (state {endpoint_state}) "
            f"with {depth} task(s) queued",
            endpoint,
            task_id,
        )
        self.endpoint_state = endpoint_state
        self.queue_depth = queue_depth


class BrokerError(CallError):
    """The broker could not be reached (within the time allowed), refused, or the client is closed. A submit
    that fails with it may or may not have queued its task: submitting again with the same task id is safe (the
    agent runs an id once, and the client hands out one result per id)."""
