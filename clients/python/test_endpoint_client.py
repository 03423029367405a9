"""Tests of the Python client `endpoint_client`: pure parsing and verdict rules, then end to end against the real
RabbitMQ and the real `endpoint-agent` and `service-setup` binaries (round trips, the three verdicts of a call,
duplicates, untrusted results, late results, reconnecting). Every test uses endpoint and service names of its
own and removes what it made (endpoints, service queues, agents, data directories).

    python3 -m unittest discover -s clients/python

Environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f), ENDPOINT_AGENT_BIN and SERVICE_SETUP_BIN
(default target/debug/endpoint-agent and target/debug/service-setup of this repository: `cargo build` first),
RABBITMQ_MANAGEMENT_URL (default http://127.0.0.1:15672, for the endpoint-user and reconnect tests).
"""

import base64
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import pika  # noqa: E402

from endpoint_client import (  # noqa: E402
    CallError,
    Client,
    EndpointNotProvisioned,
    EndpointNotRunning,
    EndpointStatus,
    NoResultYet,
    TaskResult,
)
from endpoint_client.wire import endpoint_of_routing_key, int_value  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
AGENT_BIN = os.environ.get("ENDPOINT_AGENT_BIN", os.path.join(REPO, "target/debug/endpoint-agent"))
SETUP_BIN = os.environ.get("SERVICE_SETUP_BIN", os.path.join(REPO, "target/debug/service-setup"))
MANAGEMENT_URL = os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672")


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Props:
    """Stands in for pika's BasicProperties in the parsing tests."""

    def __init__(self, message_id=None, correlation_id=None, user_id=None, headers=None):
        self.message_id, self.correlation_id, self.user_id, self.headers = message_id, correlation_id, user_id, headers


class Parsing(unittest.TestCase):
    """What needs no broker: routing keys, header integers, trust, liveness."""

    def test_routing_keys(self):
        self.assertEqual(endpoint_of_routing_key("ep-1.results"), "ep-1")
        self.assertEqual(endpoint_of_routing_key("ep_1.results.svc"), "ep_1")
        for bad in ["ep", "ep.result", "ep.results.svc.x", "e.p.results", ".results", "ep.results.", "ep.tasks",
                    "service.svc.results", "x" * 129 + ".results", "ep.results." + "s" * 65]:
            self.assertIsNone(endpoint_of_routing_key(bad), bad)

    def test_integers_in_any_encoding(self):
        import datetime
        self.assertEqual(int_value(-5), -5)
        self.assertEqual(int_value(" 42 "), 42)
        self.assertEqual(int_value(b"-7"), -7)
        self.assertEqual(int_value(datetime.datetime(1970, 1, 1, 0, 0, 5)), 5)
        for bad in [True, 1.5, "x", "1_000", "", None, "٣"]:
            self.assertIsNone(int_value(bad), repr(bad))

    def test_result_parsing_and_trust(self):
        props = Props("t1", "t1", None, {"endpoint_id": "ep", "status": "ok", "attempts": "1",
                                         "duration_ms": 12, "exit_code": -1})
        r = TaskResult.from_delivery("ep.results.svc", props, b"\xff")
        self.assertEqual((r.task_id, r.endpoint_id, r.status, r.attempts, r.duration_ms, r.exit_code),
                         ("t1", "ep", "ok", 1, 12, -1))
        self.assertTrue(r.ok)
        self.assertEqual(r.text(), "\ufffd")
        self.assertIsNone(r.distrust(None))
        self.assertIn("endpoint's user", r.distrust("endpoint-ep"))
        claims_other = TaskResult.from_delivery("a.results.svc", Props("t", headers={"endpoint_id": "b"}), b"")
        self.assertIn("claims endpoint", claims_other.distrust(None))
        not_a_string = TaskResult.from_delivery("a.results.svc", Props("t", headers={"endpoint_id": 7}), b"")
        self.assertIsNotNone(not_a_string.distrust(None))
        bare = TaskResult.from_delivery("odd", Props(correlation_id="t2", headers={"attempts": -1}), b"")
        self.assertEqual((bare.task_id, bare.endpoint_id, bare.attempts), ("t2", "", None))
        self.assertIn("routing key", bare.distrust(None))
        self.assertFalse(bare.ok)

    def test_liveness(self):
        now = 1_709_210_096_789

        def status(state=None, age_ms=0, interval=10):
            hb = None if state is None else {"endpoint_id": "ep", "state": state, "time_ms": now - age_ms,
                                             "heartbeat_secs": interval, "seq": 1}
            return EndpointStatus("ep", True, 0, 1, 10, hb, now)

        self.assertEqual(status().liveness.kind, "never_seen")
        self.assertEqual(status("standby", 25_000).liveness.kind, "running")
        self.assertEqual(status("standby", 25_000).liveness.state, "standby")
        self.assertEqual(status("running", 25_001).liveness.kind, "not_running")
        self.assertEqual(status("paused", 25_001, interval=60).liveness.kind, "running")
        stopped = status("stopped", 1_000)
        self.assertEqual((stopped.liveness.kind, stopped.liveness.clean_stop), ("not_running", True))
        self.assertEqual(stopped.verdict, "not running since 2024-02-29T12:34:55.789Z (stopped cleanly)")
        self.assertEqual(status("running", -5_000).liveness.age_ms, 0)

    def test_names_are_validated(self):
        for bad in ["", "a.b", "x" * 65, "sp ace", None]:
            with self.assertRaises(ValueError):
                Client(AMQP_URL, bad)
        with self.assertRaises(ValueError):
            Client([], "svc")


class Broker:
    """The test's own connection: forging results, deleting queues."""

    def __init__(self):
        self.conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.conn.channel()
        self.channel.confirm_delivery()

    def publish_result(self, exchange, routing_key, task_id, endpoint_claimed, body=b"", status="ok", user_id=None):
        headers = {"status": status, "attempts": 1, "duration_ms": 0}
        if endpoint_claimed is not None:
            headers["endpoint_id"] = endpoint_claimed
        props = pika.BasicProperties(message_id=task_id, correlation_id=task_id, delivery_mode=2,
                                     headers=headers, user_id=user_id)
        self.channel.basic_publish(exchange, routing_key, body, props, mandatory=True)

    def delete_queue(self, name):
        channel = self.conn.channel()
        channel.queue_delete(name)
        channel.close()

    def close(self):
        self.conn.close()


def management(method, path):
    parts = urllib.parse.urlsplit(AMQP_URL)
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    request = urllib.request.Request(MANAGEMENT_URL.rstrip("/") + path, method=method)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        data = response.read()
    return json.loads(data) if data else None


class EndToEnd(unittest.TestCase):
    """Base: helpers that provision endpoints, start agents and make clients, each undone at cleanup."""

    @classmethod
    def setUpClass(cls):
        for path in (AGENT_BIN, SETUP_BIN):
            if not os.access(path, os.X_OK):
                raise AssertionError(
                    f"{path} is missing: run `cargo build -p endpoint-agent -p service-setup` (or set "
                    "ENDPOINT_AGENT_BIN / SERVICE_SETUP_BIN)"
                )

    def setUp(self):
        self.env = dict(os.environ, AMQP_URL=AMQP_URL, RUST_LOG="warn")
        self.broker = Broker()
        self.addCleanup(self.broker.close)

    def setup_cli(self, *args):
        done = subprocess.run([SETUP_BIN, *args], env=self.env, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, f"service-setup {' '.join(args)}: {done.stderr}")
        return done.stdout

    def endpoint(self, provision=True, credentials=None):
        ep = unique("pyc")
        if provision:
            extra = ["--credentials", credentials] if credentials else []
            self.setup_cli("provision", "--endpoint-id", ep, "--heartbeat", "1", *extra)
        self.addCleanup(self.setup_cli, "deprovision", "--endpoint-id", ep, "--force")
        return ep

    def client(self, **options):
        service = unique("pysvc")
        # Removed after the client closed and the agents stopped (cleanups run last-in first-out).
        self.addCleanup(self.broker.delete_queue, f"service.{service}.results")
        client = Client(AMQP_URL, service, **options)
        self.addCleanup(client.close)
        return client

    def agent(self, ep, client, extra=()):
        """Starts an agent for `ep` and waits until its heartbeat says it runs."""
        data_dir = tempfile.mkdtemp(prefix=f"{ep}-")
        self.addCleanup(shutil.rmtree, data_dir, True)
        log = open(os.path.join(data_dir, "agent.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [AGENT_BIN, "start", "--endpoint-id", ep, "--data-dir", os.path.join(data_dir, "data"), *extra],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        self.addCleanup(self.stop, proc)
        deadline = time.monotonic() + 15
        while not client.status(ep).running:
            if proc.poll() is not None:
                with open(log.name, "rb") as f:
                    self.fail(f"the agent exited: {f.read()[-2000:]!r}")
            self.assertLess(time.monotonic(), deadline, "the agent did not send a heartbeat within 15 s")
            time.sleep(0.1)
        return proc

    def collect(self, client, count, settle=0.4):
        """The next `count` results of `client.results()` (each within 5 s), then checks none follows within
        `settle` seconds."""
        got = []
        for _ in range(count):
            result = client.next_result(timeout=5)
            self.assertIsNotNone(result, f"only {len(got)} of {count} results came: {got}")
            got.append(result)
        extra = client.next_result(timeout=settle)
        self.assertIsNone(extra, "no further result")
        return got

    @staticmethod
    def stop(proc):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode


class RoundTrip(EndToEnd):
    def test_echo_returns_the_payload_byte_for_byte(self):
        ep = self.endpoint()
        client = self.client()
        self.agent(ep, client)
        for payload in [b"hello", b"", bytes(range(256)), b"\xff\xfe\x00\x80 not utf-8"]:
            result = client.call(ep, "echo", payload, timeout=10)
            self.assertEqual(result.status, "ok", result)
            self.assertTrue(result.ok)
            self.assertEqual(result.body, payload)
            self.assertEqual(result.endpoint_id, ep)
            self.assertEqual(result.attempts, 1)
            self.assertIsInstance(result.duration_ms, int)
        text = client.call(ep, "echo", "h\u00e9llo", timeout=10, task_id="my-own-id")
        self.assertEqual((text.task_id, text.text(), text.body), ("my-own-id", "h\u00e9llo", "h\u00e9llo".encode()))
        # Nothing is left over for results().
        self.assertEqual(list(client.results(timeout=0.3)), [])

    def test_unknown_function_is_a_rejected_result(self):
        ep = self.endpoint()
        client = self.client()
        self.agent(ep, client)
        result = client.call(ep, "no-such-function", b"x", timeout=10)
        self.assertEqual(result.status, "rejected")
        self.assertFalse(result.ok)
        self.assertIn("no-such-function", result.text())
        self.assertEqual(result.attempts, 0)


class Verdicts(EndToEnd):
    def test_stopped_agent_is_not_running(self):
        ep = self.endpoint()
        client = self.client()
        proc = self.agent(ep, client)
        self.assertEqual(self.stop(proc), 0)
        started = time.monotonic()
        with self.assertRaises(EndpointNotRunning) as caught:
            client.call(ep, "echo", b"queued", timeout=3)
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 3)
        self.assertLess(elapsed, 3 + 3)
        e = caught.exception
        self.assertIsInstance(e, CallError)
        self.assertEqual(e.last_heartbeat["state"], "stopped")
        self.assertEqual(e.endpoint, ep)
        self.assertTrue(e.task_id)
        self.assertIn(f"endpoint-agent start --endpoint-id {ep}", str(e))
        status = client.status(ep)
        self.assertEqual((status.liveness.kind, status.liveness.clean_stop), ("not_running", True))
        self.assertEqual(status.queue_depth, 1, "the task stays queued")
        self.assertEqual(status.consumers, 0)

    def test_never_started_agent_is_not_running(self):
        ep = self.endpoint()
        client = self.client()
        with self.assertRaises(EndpointNotRunning) as caught:
            client.call(ep, "echo", b"x", timeout=0.5)
        self.assertIsNone(caught.exception.last_heartbeat)
        self.assertIn("never sent a heartbeat", str(caught.exception))
        self.assertEqual(client.status(ep).liveness.kind, "never_seen")

    def test_busy_agent_has_no_result_yet(self):
        ep = self.endpoint()
        client = self.client()
        self.agent(ep, client)
        started = time.monotonic()
        with self.assertRaises(NoResultYet) as caught:
            client.call(ep, "sleep", "5000", timeout=1)
        self.assertLess(time.monotonic() - started, 1 + 3)
        e = caught.exception
        self.assertEqual(e.endpoint_state, "running")
        self.assertEqual(e.queue_depth, 0, "the agent took the task")
        self.assertIn(f"no result yet for task {e.task_id}", str(e))

    def test_unprovisioned_endpoint(self):
        ep = self.endpoint(provision=False)
        client = self.client()
        started = time.monotonic()
        with self.assertRaises(EndpointNotProvisioned) as caught:
            client.call(ep, "echo", b"x", timeout=5)
        self.assertLess(time.monotonic() - started, 2, "an unroutable task is known at once")
        self.assertIn(f"service-setup provision --endpoint-id {ep}", str(caught.exception))
        with self.assertRaises(EndpointNotProvisioned):
            client.submit(ep, "echo", b"x")
        self.assertFalse(client.status(ep).provisioned)
        # The channel survived the returned task.
        self.assertTrue(client.submit(self.endpoint(), "echo", b"x"))

    def test_tasks_queue_deleted_while_waiting(self):
        ep = self.endpoint()
        client = self.client()
        pending = client.start_call(ep, "echo", b"x")
        self.setup_cli("deprovision", "--endpoint-id", ep, "--force")
        with self.assertRaises(EndpointNotProvisioned) as caught:
            pending.wait(0.5)
        self.assertEqual(caught.exception.task_id, pending.task_id)
        pending.cancel()


class Duplicates(EndToEnd):
    def test_a_duplicate_is_not_handed_out_again(self):
        ep = self.endpoint()
        client = self.client()
        self.agent(ep, client)
        key = f"{ep}.results.{client.service}"
        # A called result, then a copy of it as the broker would redeliver it.
        called = client.call(ep, "echo", b"first", timeout=10)
        self.broker.publish_result("results", key, called.task_id, ep, b"first")
        # A submitted result, handed out by results(), then a copy of it.
        submitted = client.submit(ep, "echo", b"second")
        got = self.collect(client, 1)
        self.assertEqual([(r.task_id, r.body) for r in got], [(submitted, b"second")])
        self.broker.publish_result("results", key, submitted, ep, b"second")
        # Two copies of a result nobody has seen yet, then a marker that shows the copies were read.
        fresh = str(uuid.uuid4())
        self.broker.publish_result("results", key, fresh, ep, b"fresh")
        self.broker.publish_result("results", key, fresh, ep, b"fresh")
        self.broker.publish_result("results", key, "marker", ep, b"marker")
        got = self.collect(client, 2)
        self.assertEqual([(r.task_id, r.body) for r in got], [(fresh, b"fresh"), ("marker", b"marker")])
        self.assertEqual(self.queue_depth(f"service.{client.service}.results"), 0, "duplicates are acked")
        # The same task id answered by two endpoints is two results, not a duplicate.
        other = unique("pyc-other")
        self.broker.publish_result("results", key, "shared-id", ep, b"from ep")
        self.broker.publish_result("results", f"{other}.results.{client.service}", "shared-id", other, b"from other")
        got = self.collect(client, 2)
        self.assertEqual([(r.endpoint_id, r.body) for r in got], [(ep, b"from ep"), (other, b"from other")])

    def queue_depth(self, queue):
        channel = self.broker.conn.channel()
        ok = channel.queue_declare(queue, passive=True)
        channel.close()
        return ok.method.message_count

    def test_fifty_calls_in_flight_each_get_their_own_result(self):
        ep = self.endpoint()
        client = self.client()
        self.agent(ep, client)
        payloads = [f"payload {i}".encode() + bytes([i]) for i in range(50)]
        calls = [client.start_call(ep, "echo", p) for p in payloads]
        self.assertEqual(len({c.task_id for c in calls}), 50)
        # Waited for in reverse: the results of the others arrive meanwhile and are kept for their calls.
        results = {c.task_id: c.wait(15) for c in reversed(calls)}
        for call, payload in zip(calls, payloads):
            self.assertEqual(results[call.task_id].task_id, call.task_id)
            self.assertEqual(results[call.task_id].body, payload)
        self.assertEqual(list(client.results(timeout=0.3)), [])
        # submit_many: ids in order, results through results().
        ids = client.submit_many(ep, "echo", [b"a", b"b", "c"])
        got = {r.task_id: r.body for r in self.collect(client, 3)}
        self.assertEqual(got, {ids[0]: b"a", ids[1]: b"b", ids[2]: b"c"})


class Trust(EndToEnd):
    def test_a_result_claiming_another_endpoint_is_dropped(self):
        ep = self.endpoint()
        other = unique("pyc-other")
        client = self.client()
        with self.assertLogs("endpoint_client", logging.WARNING) as logs:
            # Published for `other` (its routing key) but claiming to be ep's.
            self.broker.publish_result("results", f"{other}.results.{client.service}", "forged", ep, b"evil")
            # Straight into the queue, without a results routing key at all.
            self.broker.publish_result("", f"service.{client.service}.results", "forged2", ep, b"evil")
            self.broker.publish_result("results", f"{ep}.results.{client.service}", "genuine", ep, b"good")
            got = self.collect(client, 1)
        self.assertEqual([(r.task_id, r.endpoint_id, r.body) for r in got], [("genuine", ep, b"good")])
        text = "\n".join(logs.output)
        self.assertIn("claims endpoint", text)
        self.assertIn("routing key", text)

    def test_a_result_from_another_endpoint_is_not_the_calls(self):
        ep = self.endpoint()
        other = unique("pyc-other")
        client = self.client()
        self.agent(ep, client)
        pending = client.start_call(ep, "sleep", "700")
        # Another endpoint answers the same task id first (honestly, as itself).
        self.broker.publish_result("results", f"{other}.results.{client.service}", pending.task_id, other, b"no")
        result = pending.wait(10)
        self.assertEqual((result.endpoint_id, result.status, result.body), (ep, "ok", b""))
        got = self.collect(client, 1)
        self.assertEqual([(r.task_id, r.endpoint_id, r.body) for r in got], [(pending.task_id, other, b"no")])

    def test_an_endpoint_with_a_user_is_trusted_only_as_that_user(self):
        try:
            management("GET", "/api/overview")
        except OSError as e:
            self.fail(f"the RabbitMQ management API ({MANAGEMENT_URL}) is needed: {e}")
        workdir = tempfile.mkdtemp(prefix="pyc-cred-")
        self.addCleanup(shutil.rmtree, workdir, True)
        credentials = os.path.join(workdir, "agent.url")
        ep = self.endpoint(credentials=credentials)
        client = self.client()
        with open(credentials) as f:
            agent_url = f.readline().strip()
        as_endpoint = pika.BlockingConnection(pika.URLParameters(agent_url))
        self.addCleanup(as_endpoint.close)
        channel = as_endpoint.channel()
        channel.confirm_delivery()
        user = f"endpoint-{ep}"
        props = pika.BasicProperties(message_id="real", user_id=user, delivery_mode=2,
                                     headers={"endpoint_id": ep, "status": "ok"})
        key = f"{ep}.results.{client.service}"
        with self.assertLogs("endpoint_client", logging.WARNING) as logs:
            self.broker.publish_result("results", key, "as-guest", ep, b"evil")
            channel.basic_publish("results", key, b"good", props, mandatory=True)
            got = self.collect(client, 1)
        self.assertEqual([(r.task_id, r.user_id, r.body) for r in got], [("real", user, b"good")])
        self.assertIn(f"not by the endpoint's user '{user}'", "\n".join(logs.output))


class LateResults(EndToEnd):
    def test_a_result_that_came_too_late_comes_out_of_results(self):
        ep = self.endpoint()
        client = self.client()
        self.agent(ep, client)
        with self.assertRaises(NoResultYet) as caught:
            client.call(ep, "sleep", "1500", timeout=0.5)
        task_id = caught.exception.task_id
        got = client.next_result(timeout=5)
        self.assertIsNotNone(got, "the late result never came")
        self.assertEqual((got.task_id, got.endpoint_id, got.status), (task_id, ep, "ok"))
        self.assertIsNone(client.next_result(timeout=0.3))

    def test_results_nobody_took_stay_in_the_queue_for_the_next_client(self):
        ep = self.endpoint()
        client = self.client()
        self.agent(ep, client)
        task_id = client.submit(ep, "echo", b"kept")
        time.sleep(0.5)
        client.close()  # the result was received (held unacked), never handed out
        again = Client(AMQP_URL, client.service)
        self.addCleanup(again.close)
        got = again.next_result(timeout=5)
        self.assertEqual((got.task_id, got.body), (task_id, b"kept"))


class Options(EndToEnd):
    def test_queue_expires_and_drop_unclaimed(self):
        ep = self.endpoint(provision=False)
        client = self.client(queue_expires=30, drop_unclaimed=True)
        queue = management("GET", f"/api/queues/%2F/service.{client.service}.results")
        self.assertEqual(queue["arguments"], {"x-expires": 30000})
        self.assertTrue(queue["durable"])
        with self.assertRaises(CallError) as caught:
            Client(AMQP_URL, client.service, queue_expires=60)
        self.assertIn("same queue_expires", str(caught.exception))
        with self.assertLogs("endpoint_client", logging.WARNING) as logs:
            self.broker.publish_result("results", f"{ep}.results.{client.service}", "unclaimed", ep, b"x")
            self.assertIsNone(client.next_result(timeout=0.5))
        self.assertIn("drop_unclaimed", "\n".join(logs.output))

    def test_a_closed_client_refuses_at_once(self):
        client = self.client()
        client.close()
        started = time.monotonic()
        with self.assertRaises(CallError):
            client.next_result(timeout=5)
        with self.assertRaises(CallError):
            client.submit("anything", "echo", b"")
        self.assertLess(time.monotonic() - started, 1)


class Reconnect(EndToEnd):
    def test_a_closed_connection_is_reopened_by_the_next_call(self):
        ep = self.endpoint()
        client = self.client()
        self.agent(ep, client)
        self.assertEqual(client.call(ep, "echo", b"before", timeout=10).body, b"before")
        name = f"endpoint_client {client.service}"
        deadline = time.monotonic() + 10
        while True:
            conns = [c for c in management("GET", "/api/connections?columns=name,client_properties")
                     if c.get("client_properties", {}).get("connection_name") == name]
            if conns or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # the management API's statistics lag a little
        self.assertEqual(len(conns), 1, "the client's connection is listed by the management API")
        management("DELETE", "/api/connections/" + urllib.parse.quote(conns[0]["name"], safe=""))
        time.sleep(0.3)
        self.assertEqual(client.call(ep, "echo", b"after", timeout=10).body, b"after")


if __name__ == "__main__":
    unittest.main()
