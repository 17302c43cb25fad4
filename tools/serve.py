"""`templar serve`: the embedded Triton server (templar.embedded_server) on a model repository, until Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from templar.embedded_server import DEFAULT_HOST, DEFAULT_PORTS, STARTUP_TIMEOUT_S, EmbeddedTriton


def add_arguments(parser) -> None:
    parser.add_argument("--repo", type=Path, default=Path("model_repository"), help="model repository "
                        "(default: %(default)s)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s, loopback only)")
    for kind, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{kind}-port", type=int, default=port, help="(default: %(default)s)")
    parser.add_argument("--log-file", type=Path,
                        help="tritonserver log (default: a temporary file, kept only if the server fails)")
    parser.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT_S,
                        help="seconds to wait for the models (default: %(default)s)")


def main(args) -> int:
    server = EmbeddedTriton(args.repo, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                            metrics_port=args.metrics_port, log_file=args.log_file,
                            startup_timeout_s=args.startup_timeout)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    say = lambda m: print(m, flush=True)  # noqa: E731
    server.start(progress=say)  # a ServerError ends here as `templar serve: error: ...` (templar.cli)
    models = sorted(m["name"] for m in server.repository_index())
    say(f"Triton is ready: {len(models)} models ({', '.join(models)})")
    say(f"  gRPC     {server.grpc_url}")
    say(f"  HTTP     {server.http_url}")
    say(f"  metrics  {server.metrics_url}")
    say(f"  log      {server.log_path}")
    say("Ctrl-C stops it.")
    while not stop.is_set() and server.alive():
        stop.wait(0.5)
    died = not stop.is_set()
    tail = server.log_tail() if died else ""
    server.stop()
    if died:
        print(f"templar serve: error: tritonserver stopped unexpectedly:\n{tail}", file=sys.stderr)
        return 1
    say("stopped")
    return 0
