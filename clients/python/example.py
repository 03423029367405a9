#!/usr/bin/env python3
"""A runnable example of the Python client: calls `echo` on an endpoint and prints the result or the verdict,
then prints any result that came in for this service without a call waiting for it.

    service-setup provision --endpoint-id demo
    endpoint-agent start --endpoint-id demo &
    python3 clients/python/example.py --endpoint-id demo

Exit codes follow `service-setup call`: 0 ok, 1 the task failed/timed out/was rejected, 3 not provisioned,
4 not running, 5 no result yet, 69 broker unreachable.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from endpoint_client import (  # noqa: E402
    BrokerError,
    Client,
    EndpointNotProvisioned,
    EndpointNotRunning,
    NoResultYet,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint-id", required=True)
    parser.add_argument("--broker-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    parser.add_argument("--service", default="example", help="this service's name (its results queue)")
    parser.add_argument("--payload", default="hello from Python")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the result")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.ERROR)  # pika warns of every returned (unroutable) task itself

    try:
        client = Client(args.broker_url, args.service)
    except BrokerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 69
    with client:
        try:
            result = client.call(args.endpoint_id, "echo", args.payload, timeout=args.timeout)
        except EndpointNotProvisioned as e:
            print(f"not provisioned: {e}", file=sys.stderr)
            return 3
        except EndpointNotRunning as e:
            print(f"not running: {e}", file=sys.stderr)
            return 4
        except NoResultYet as e:
            print(f"no result yet: {e}", file=sys.stderr)
            return 5
        except BrokerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 69
        print(f"{result.status} (task {result.task_id}, {result.duration_ms} ms): {result.text()}")
        # Results of earlier calls that gave up (or of submits) arrive on the same queue.
        for late in client.results(timeout=0.5):
            print(f"late result of task {late.task_id} from {late.endpoint_id}: {late.status} {late.text()!r}")
        return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
