"""Run the InfluxDB 3 test server until SIGTERM or SIGINT.

python -m tests.influxdb3_server --port 8181 --token secret
"""

from __future__ import annotations

import argparse
import signal
import threading

from tests.influxdb3_server import InfluxDB3TestServer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.influxdb3_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8181, help="0 picks a free port")
    parser.add_argument("--token", help="required token; without it no request is checked")
    parser.add_argument(
        "--read-token",
        action="append",
        default=[],
        help="a token that may query but not write (repeatable)",
    )
    args = parser.parse_args(argv)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    server = InfluxDB3TestServer(
        args.host, args.port, args.token, read_tokens=frozenset(args.read_token)
    ).start()
    # Scripts wait for this line to know the port is open.
    print(f"InfluxDB 3 test server listening on {server.url}", flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
