"""`templar serve`: the embedded Triton server (templar.server.embedded) on a model repository, until Ctrl-C;
supervised (templar.server.supervisor): restarted on the same ports when tritonserver or a model's stub dies."""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
from pathlib import Path

from templar.server.embedded import ADMIN_KEY_ENV, STARTUP_TIMEOUT_S, EmbeddedTriton, ServerTls
from templar.server.ports import DEFAULT_HOST, DEFAULT_PORTS
from templar.errors import ConfigError
from templar.server.supervisor import SupervisedTriton


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
    parser.add_argument("--model-control", action="store_true",
                        help=f"allow loading and unloading models while serving (`templar reload`), for clients "
                             f"that send the admin key from ${ADMIN_KEY_ENV} (default: off, the models load at start "
                             "and nobody can unload them)")
    parser.add_argument("--no-restart", action="store_true",
                        help="exit (code 1) when tritonserver or a model's stub dies, instead of restarting it")
    parser.add_argument("--tls-cert", type=Path, help="gRPC over TLS: the server's certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="gRPC over TLS: the server's private key (PEM)")
    parser.add_argument("--tls-client-ca", type=Path,
                        help="mutual TLS: only clients with a certificate signed by this CA (PEM) are served")


def server_tls(args) -> ServerTls | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    return ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca)


def admin_key(args) -> str | None:
    key = os.environ.get(ADMIN_KEY_ENV) or None
    if args.model_control and key is None:
        raise ConfigError(f"--model-control needs an admin key: set {ADMIN_KEY_ENV} (16+ characters, e.g. "
                          f"`export {ADMIN_KEY_ENV}=$(openssl rand -hex 24)`); clients send it to load or unload")
    return key


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def banner(server: EmbeddedTriton, args, say) -> None:
    models = sorted(m["name"] for m in server.repository_index())
    say(f"Triton is ready: {len(models)} models ({', '.join(models)})")
    say(f"  gRPC     {server.grpc_url}")
    say(f"  HTTP     {server.http_url}")
    say(f"  metrics  {server.metrics_url}")
    say(f"  log      {server.log_path}")
    say(f"  TLS      {'mutual (client certificates required)' if args.tls_client_ca else 'on' if server.tls else 'off'}"
        f"; model control {'on (admin key: $' + ADMIN_KEY_ENV + ')' if args.model_control else 'off'}"
        f"; {'no restarts' if args.no_restart else 'restarted if it or a model stub dies'}")
    if not is_loopback(args.host):
        say(f"  warning: listening on {args.host}, reachable from the network" +
            ("" if server.tls else "; gRPC is plaintext (use --tls-cert/--tls-key)") +
            "; HTTP and metrics have no TLS in Triton")
    say("Ctrl-C stops it.")


def main(args) -> int:
    server = EmbeddedTriton(args.repo, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                            metrics_port=args.metrics_port, log_file=args.log_file,
                            startup_timeout_s=args.startup_timeout, model_control=args.model_control,
                            admin_key=admin_key(args), tls=server_tls(args))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    say = lambda m: print(m, flush=True)  # noqa: E731
    # a ServerError at start ends here as `templar serve: error: ...` (templar.cli)
    supervisor = None if args.no_restart else SupervisedTriton(server, on_event=lambda e: say(f"{e.kind}: {e.detail}"))
    (supervisor or server).start(progress=say)
    banner(server, args, say)
    while not stop.is_set() and (server.alive() if supervisor is None else not supervisor.gave_up):
        stop.wait(0.5)
    died = not stop.is_set()
    tail = server.log_tail() if died else ""
    (supervisor or server).stop()
    if died:
        reason = "gave up restarting it" if supervisor else "stopped unexpectedly"
        print(f"templar serve: error: tritonserver {reason}:\n{tail}", file=sys.stderr)
        return 1
    say("stopped")
    return 0
