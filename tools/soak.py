"""`templar soak`: a long load test at one concurrency, reported per window (a benchmark, not a unit test).

It starts the embedded server on `--repo` (or uses `--url`, reached as the client flags say, TLS included, with
`--server-pid` for the memory figures), then
`concurrency` workers send requests back to back (templar.tools.loadtest.drive) in windows of `--window` seconds,
back to back, for `--duration` seconds. Per window: requests, errors by gRPC code, p50/p99 latency, conversations/s,
and the server's resident memory and open file descriptors (tritonserver and its Python-backend stubs). At the end:
the slopes of memory and descriptors per minute (least squares over the windows after the first, which holds the
warm-up) and the p99 drift (last window / first). JSON report and a PNG plot.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from templar.client_options import CONNECTION, ClientFlags
from templar.errors import ConfigError
from templar.reward_client import RewardClientConfig
from templar.server.embedded import EmbeddedTriton
from templar.server.ports import free_server_ports
from templar.tools.loadtest import drive, grpc_client, machine_info, make_payloads, summarise
from templar.tools.workload import conversation_mix

# no endpoint by default: the embedded server soak starts; otherwise as `templar loadtest` reaches a server
CLIENT_DEFAULTS = RewardClientConfig(endpoints=[], request_timeout_s=60.0)
CLIENT_FLAGS = ClientFlags(fields=(*CONNECTION, "rows_per_request"), defaults=CLIENT_DEFAULTS,
                           aliases={"rows_per_request": ("--batch",), "request_timeout_s": ("--timeout",)},
                           helps={"endpoints": "soak a running server instead (default: start the embedded one on "
                                  "--repo)"})


@dataclass
class SoakOptions:
    # the RM (`model`), and the running server to soak (one endpoint, TLS, headers, ...; `rows_per_request`
    # conversations per request, `request_timeout_s` each one's deadline); no endpoint: start the embedded one
    client: RewardClientConfig = field(default_factory=lambda: dataclasses.replace(CLIENT_DEFAULTS))
    repo: Path | None = None  # start the embedded server on this repository (default when no endpoint is given)
    server_pid: int | None = None  # its tritonserver pid (memory and descriptor figures)
    duration_s: float = 600.0  # seconds in all
    window_s: float = 60.0  # seconds per window
    concurrency: int = 32  # requests in flight
    out: Path = Path("soak.json")  # the JSON report; the plot beside it


def process_tree(pid: int) -> tuple[float, int]:
    """(resident MiB, open file descriptors) of a process and its descendants."""
    import psutil

    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    rss = fds = 0
    for process in processes:
        try:
            rss += process.memory_info().rss
            fds += process.num_fds()
        except psutil.NoSuchProcess:  # a stub that just ended
            continue
    return rss / 2**20, fds


def slope_per_minute(minutes: list[float], values: list[float]) -> float | None:
    """Least-squares slope of `values` over `minutes`; None with fewer than two points."""
    if len(minutes) < 2:
        return None
    return float(np.polyfit(np.asarray(minutes), np.asarray(values, dtype=float), 1)[0])


async def soak_windows(options: RewardClientConfig, opts: SoakOptions, pid: int | None,
                       log: Callable[[str], None]) -> list[dict]:
    client = grpc_client(options)
    payloads = make_payloads(conversation_mix(512, seed=0), options.rows_per_request)
    windows: list[dict[str, Any]] = []
    elapsed = 0.0
    try:
        await drive(client, options, payloads, opts.concurrency, max_requests=4)
        while elapsed < opts.duration_s - 1e-6:
            span = min(opts.window_s, opts.duration_s - elapsed)
            outcomes, wall = await drive(client, options, payloads, opts.concurrency, duration_s=span)
            elapsed += wall
            level = summarise(opts.concurrency, outcomes, wall)
            rss, fds = process_tree(pid) if pid else (None, None)
            windows.append({"minute": round(elapsed / 60, 3), "requests": level.requests, "errors": level.errors,
                            "row_errors": level.row_errors, "conversations_per_s": level.conversations_per_s,
                            "p50_ms": level.latency_ms["p50"], "p99_ms": level.latency_ms["p99"],
                            "rss_mib": None if rss is None else round(rss, 1), "open_fds": fds})
            log(json.dumps(windows[-1]))
    finally:
        await client.close()
    return windows


def summarise_soak(windows: list[dict]) -> dict[str, Any]:
    steady = windows[1:] if len(windows) > 2 else windows  # the first window holds the warm-up
    minutes = [w["minute"] for w in steady]
    known = [w for w in steady if w["rss_mib"] is not None]
    return {
        "requests": sum(w["requests"] for w in windows),
        "errors": sum(sum(w["errors"].values()) for w in windows),
        "row_errors": sum(w["row_errors"] for w in windows),
        "p99_drift": (windows[-1]["p99_ms"] / windows[0]["p99_ms"]) if windows and windows[0]["p99_ms"] else None,
        "rss_mib_per_minute": slope_per_minute([w["minute"] for w in known], [w["rss_mib"] for w in known]),
        "open_fds_per_minute": slope_per_minute([w["minute"] for w in known], [w["open_fds"] for w in known]),
        "steady_windows": len(minutes),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = report["windows"]
    minutes = [w["minute"] for w in windows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(minutes, [w["p50_ms"] for w in windows], "o-", label="p50")
    axes[0].plot(minutes, [w["p99_ms"] for w in windows], "o-", label="p99")
    axes[0].set(xlabel="minute", ylabel="latency (ms)", title="latency per window")
    axes[0].legend()
    axes[1].plot(minutes, [w["rss_mib"] for w in windows], "o-")
    axes[1].set(xlabel="minute", ylabel="MiB", title="server resident memory")
    axes[2].plot(minutes, [w["open_fds"] for w in windows], "o-")
    axes[2].set(xlabel="minute", ylabel="descriptors", title="server open file descriptors")
    s = report["summary"]
    fig.suptitle(f"soak: {report['options']['client']['model']}, concurrency {report['options']['concurrency']}, "
                 f"{s['requests']} requests, {s['errors']} errors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(opts: SoakOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    if opts.window_s <= 0 or opts.duration_s <= 0:
        raise ConfigError("--duration and --window must be positive")
    if not opts.client.endpoints and opts.client.tls:
        raise ConfigError("--tls needs --url: the embedded server soak starts speaks plaintext on loopback")
    server = None
    if not opts.client.endpoints:
        server = EmbeddedTriton(opts.repo or Path("model_repository"), **free_server_ports()).start(progress=log)
    try:
        options = opts.client if server is None else dataclasses.replace(opts.client, endpoints=[server.grpc_url])
        pid = opts.server_pid or (server.process.pid if server else None)
        windows = asyncio.run(soak_windows(options, opts, pid, log))
    finally:
        if server is not None:
            server.stop()
    shown = asdict(opts)
    shown["client"]["headers"] = sorted(opts.client.headers)  # their names: a header may carry a secret
    report = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in shown.items()},
              "machine": machine_info(), "windows": windows, "summary": summarise_soak(windows)}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, opts.out.with_suffix(".png"))
    log(json.dumps(report["summary"]))
    return report


def add_arguments(parser) -> None:
    d = SoakOptions()
    parser.add_argument("--model", required=True, help="reward model name")
    parser.add_argument("--repo", type=Path, help="start the embedded server on this repository "
                        "(default: model_repository, when no --url is given)")
    parser.add_argument("--server-pid", type=int, help="with --url: tritonserver's pid, for memory and descriptors")
    parser.add_argument("--duration", type=float, default=d.duration_s, help="seconds in all (default: %(default)s)")
    parser.add_argument("--window", type=float, default=d.window_s, help="seconds per window (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=d.concurrency,
                        help="requests in flight (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=d.out, help="JSON report, plot beside it (default: %(default)s)")
    CLIENT_FLAGS.add(parser)


def main(args) -> int:
    opts = SoakOptions(client=CLIENT_FLAGS.config(args, model=args.model), repo=args.repo,
                       server_pid=args.server_pid, duration_s=args.duration, window_s=args.window,
                       concurrency=args.concurrency, out=args.out)
    report = run(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0 if report["summary"]["errors"] == 0 else 1
