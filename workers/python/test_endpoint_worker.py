"""Tests of the reference worker against a fake agent on a socket pair: the frames it sends and reads, payloads
byte for byte, errors with their traceback, refusals, and how it names the functions it loads.

    python3 -m unittest discover -s workers/python
"""

import os
import socket
import struct
import sys
import tempfile
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import endpoint_worker as ew  # noqa: E402


def task_frame(task_id, function, payload, attempt=1, timeout_ms=1000):
    body = ew.put_str(task_id) + struct.pack(">I", attempt) + ew.put_str(function)
    body += struct.pack(">Q", timeout_ms) + payload
    return ew.frame(ew.TASK, body)


class FakeAgent:
    """The agent's end of a socket pair, with the worker serving the other end in a thread."""

    def __init__(self, functions, welcome=True):
        self.sock, worker_end = socket.socketpair()
        self.outcome = None

        def work():
            try:
                ew.serve(worker_end, functions, name="test")
                self.outcome = "closed"
            except Exception as e:  # the test inspects it
                self.outcome = e
            finally:
                worker_end.close()

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()
        kind, body = ew.read_frame(self.sock)
        assert kind == ew.HELLO, kind
        (self.version, self.pid) = struct.unpack_from(">HI", body, 0)
        self.name, at = ew.take_str(body, 6)
        (n,) = struct.unpack_from(">H", body, at)
        at += 2
        self.functions = []
        for _ in range(n):
            f, at = ew.take_str(body, at)
            self.functions.append(f)
        if welcome:
            self.sock.sendall(ew.frame(ew.WELCOME, struct.pack(">H", ew.PROTOCOL_VERSION)))
        else:
            self.sock.sendall(ew.frame(ew.REFUSE, ew.put_str("no such function here")))

    def run(self, task_id, function, payload):
        self.sock.sendall(task_frame(task_id, function, payload))
        kind, body = ew.read_frame(self.sock)
        got_id, at = ew.take_str(body, 0)
        assert got_id == task_id, (got_id, task_id)
        return kind, bytes(body[at:])

    def close(self):
        self.sock.close()
        self.thread.join(5)


def echo(payload):
    return payload


def shout(payload):
    return payload.decode("utf-8").upper()


def nothing(payload):
    return None


def fails(payload):
    return 1 / 0


def wrong_type(payload):
    return 42


class WorkerTest(unittest.TestCase):
    def test_hello_names_the_worker_and_its_functions(self):
        agent = FakeAgent({"b": echo, "a": echo})
        self.assertEqual(agent.version, ew.PROTOCOL_VERSION)
        self.assertEqual(agent.pid, os.getpid())
        self.assertEqual((agent.name, agent.functions), ("test", ["a", "b"]))
        agent.close()
        self.assertEqual(agent.outcome, "closed")

    def test_payloads_round_trip_byte_for_byte(self):
        agent = FakeAgent({"echo": echo})
        for payload in [b"", b"\x00\xff\xfe not utf-8", os.urandom(1 << 20)]:
            kind, out = agent.run("t", "echo", payload)
            self.assertEqual((kind, out), (ew.RESULT_OK, payload))
        agent.close()

    def test_str_and_none_outputs(self):
        agent = FakeAgent({"shout": shout, "nothing": nothing})
        self.assertEqual(agent.run("t1", "shout", b"hi"), (ew.RESULT_OK, b"HI"))
        self.assertEqual(agent.run("t2", "nothing", b"x"), (ew.RESULT_OK, b""))
        agent.close()

    def test_exceptions_become_error_results_with_the_traceback(self):
        agent = FakeAgent({"fails": fails, "wrong": wrong_type})
        kind, text = agent.run("t1", "fails", b"")
        self.assertEqual(kind, ew.RESULT_ERROR)
        self.assertIn(b"ZeroDivisionError", text)
        self.assertIn(b"Traceback", text)
        kind, text = agent.run("t2", "wrong", b"")
        self.assertEqual(kind, ew.RESULT_ERROR)
        self.assertIn(b"return bytes or str", text)
        kind, text = agent.run("t3", "unknown", b"")
        self.assertEqual(kind, ew.RESULT_ERROR)
        self.assertIn(b"does not serve", text)
        agent.close()

    def test_a_refusal_stops_the_worker(self):
        agent = FakeAgent({"echo": echo}, welcome=False)
        agent.thread.join(5)
        self.assertIsInstance(agent.outcome, ew.Refused)
        agent.sock.close()

    def test_functions_are_named_as_asked(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "ewtest_mod.py"), "w") as f:
                f.write("def double(p):\n    return p * 2\n")
            sys.path.insert(0, d)
            try:
                self.assertEqual(list(ew.load(["ewtest_mod:double"])), ["double"])
                self.assertEqual(list(ew.load(["twice=ewtest_mod:double"])), ["twice"])
                self.assertEqual(list(ew.load(["ewtest_mod:double"], "pyfn")), ["pyfn"])
                self.assertEqual(ew.load(["ewtest_mod:double"])["double"](b"ab"), b"abab")
                with self.assertRaises(SystemExit):
                    ew.load(["no-colon"])
                with self.assertRaises(ImportError):
                    ew.load(["ewtest_missing_module:f"])
            finally:
                sys.path.remove(d)


if __name__ == "__main__":
    unittest.main()
