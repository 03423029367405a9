#!/usr/bin/env python3
"""A persistent worker for endpoint-agent pools, standard library only.

    python3 endpoint_worker.py [NAME=]MODULE:FUNCTION [[NAME=]MODULE:FUNCTION ...]

Each MODULE is imported once (from the current directory or PYTHONPATH); each FUNCTION takes the task's
payload as ``bytes`` and returns ``bytes`` or ``str`` (``None`` is an empty output); an exception becomes an
error result carrying the traceback's tail. A function is served under NAME, else under the agent's function
name when the agent started this worker for one function (ENDPOINT_AGENT_FUNCTION), else under FUNCTION's
own name.

The worker connects to the Unix socket in ENDPOINT_AGENT_SOCKET (or --socket PATH), says hello, and answers
one task at a time (docs/worker-protocol.md). A worker the agent started (ENDPOINT_AGENT_POOL_WORKER=1)
exits when the agent closes the connection; any other reconnects with backoff, so it survives an agent
restart.
"""

import importlib
import os
import random
import socket
import struct
import sys
import time
import traceback

PROTOCOL_VERSION = 1
HELLO, WELCOME, REFUSE, TASK, RESULT_OK, RESULT_ERROR = 1, 2, 3, 4, 5, 6
# How much of a traceback an error result carries (its end: where it failed).
TRACEBACK_TAIL = 4000
RECONNECT_MIN, RECONNECT_MAX = 0.1, 5.0


class Refused(Exception):
    """The agent refused the hello."""


def put_str(s):
    data = s.encode("utf-8")[:0xFFFF]
    return struct.pack(">H", len(data)) + data


def frame(kind, body):
    return struct.pack(">IB", len(body) + 1, kind) + body


def hello(functions, name=None):
    body = struct.pack(">HI", PROTOCOL_VERSION, os.getpid())
    body += put_str(name or f"python pid {os.getpid()}")
    body += struct.pack(">H", len(functions))
    for f in functions:
        body += put_str(f)
    return frame(HELLO, body)


def ok(task_id, output):
    return frame(RESULT_OK, put_str(task_id) + output)


def error(task_id, message):
    return frame(RESULT_ERROR, put_str(task_id) + message.encode("utf-8", "replace"))


def recv_exact(sock, n):
    """Exactly n bytes, or None if the peer closed the connection first."""
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(sock):
    """(type, body) of the next frame, or None when the connection closed."""
    head = recv_exact(sock, 4)
    if head is None:
        return None
    (length,) = struct.unpack(">I", head)
    content = recv_exact(sock, length)
    if content is None or not content:
        return None
    return content[0], content[1:]


def take_str(body, at):
    (n,) = struct.unpack_from(">H", body, at)
    return body[at + 2 : at + 2 + n].decode("utf-8"), at + 2 + n


def decode_task(body):
    """(task_id, attempt, function, timeout_ms, payload) of a TASK frame's body."""
    task_id, at = take_str(body, 0)
    (attempt,) = struct.unpack_from(">I", body, at)
    function, at = take_str(body, at + 4)
    (timeout_ms,) = struct.unpack_from(">Q", body, at)
    return task_id, attempt, function, timeout_ms, bytes(body[at + 8 :])


def as_output(value):
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"the function returned {type(value).__name__}: return bytes or str")


def run(function, payload):
    """The frame answering one task: OK with the output, or ERROR with the traceback's tail."""
    try:
        return True, as_output(function(payload))
    except Exception:
        return False, traceback.format_exc()[-TRACEBACK_TAIL:]


def serve(sock, functions, name=None):
    """Says hello on a connected socket and answers tasks until the agent closes it."""
    sock.sendall(hello(sorted(functions), name))
    reply = read_frame(sock)
    if reply is None:
        raise ConnectionError("the agent closed the connection before its welcome")
    kind, body = reply
    if kind == REFUSE:
        raise Refused(take_str(body, 0)[0])
    if kind != WELCOME:
        raise ConnectionError(f"expected a welcome, got message type {kind}")
    while True:
        got = read_frame(sock)
        if got is None:
            return
        kind, body = got
        if kind != TASK:
            raise ConnectionError(f"expected a task, got message type {kind}")
        task_id, _attempt, function, _timeout_ms, payload = decode_task(body)
        fn = functions.get(function)
        if fn is None:
            sock.sendall(error(task_id, f"this worker does not serve {function!r}"))
            continue
        good, out = run(fn, payload)
        sock.sendall(ok(task_id, out) if good else error(task_id, out))


def load(specs, default_name=None):
    """{name: function} for NAME=MODULE:FUNCTION arguments (modules imported once)."""
    functions = {}
    for spec in specs:
        name, _, target = spec.rpartition("=")
        module_name, sep, attr = target.partition(":")
        if not sep or not module_name or not attr:
            raise SystemExit(f"{spec!r}: write MODULE:FUNCTION or NAME=MODULE:FUNCTION")
        module = importlib.import_module(module_name)
        fn = getattr(module, attr)
        if not callable(fn):
            raise SystemExit(f"{target} is not callable")
        if not name:
            name = default_name if (default_name and len(specs) == 1) else attr
        functions[name] = fn
    return functions


def main(argv):
    args = list(argv)
    path = os.environ.get("ENDPOINT_AGENT_SOCKET")
    if len(args) >= 2 and args[0] == "--socket":
        path, args = args[1], args[2:]
    if not args or not path:
        print(__doc__.strip(), file=sys.stderr)
        print("\nneed MODULE:FUNCTION arguments and ENDPOINT_AGENT_SOCKET (or --socket PATH)", file=sys.stderr)
        return 2
    sys.path.insert(0, os.getcwd())
    # Importing first: a module that fails to import stops the worker at once, with its traceback.
    functions = load(args, os.environ.get("ENDPOINT_AGENT_FUNCTION"))
    owned = os.environ.get("ENDPOINT_AGENT_POOL_WORKER") == "1"
    delay = RECONNECT_MIN
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            delay = RECONNECT_MIN
            serve(sock, functions)
        except Refused as e:
            print(f"endpoint_worker: the agent refused this worker: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            if owned:
                print(f"endpoint_worker: lost the agent: {e}", file=sys.stderr)
                return 1
        finally:
            sock.close()
        if owned:
            return 0
        time.sleep(delay * (0.5 + random.random() / 2))
        delay = min(delay * 2, RECONNECT_MAX)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
