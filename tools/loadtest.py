"""`templar loadtest`: an asyncio gRPC load generator for a served reward model.

For each concurrency level, `concurrency` workers send requests of `batch` conversations back to back (each waits
for its answer before sending the next, like the trainer's reward client with `max_in_flight` requests), from a
realistic mix of lengths (tools/workload.py) or a JSONL file. A level stops by itself after `--duration` seconds or
`--requests` requests; requests still in flight then get at most their deadline (`--timeout`) to finish, so a level
never runs longer than duration + timeout. The server is reached as the reward client's options say (one endpoint,
TLS, headers, compression, the request deadline: templar.client_options), with no retries: a failure is what is
measured. Reported per level: conversations/s and requests/s, latency p50/p95/p99,
request errors by gRPC code, rows the server answered with an error status, and (for Templar RMs) the server's
preprocessing share and padding waste. Results: a JSON report and a PNG plot (throughput and p99 vs concurrency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from templar import contract, wire
from templar.client_options import CONNECTION, ClientFlags
from templar.conversation import conversation_rows
from templar.errors import LoadTestError
from templar.reward_client import RewardClientConfig
from templar.serving.batching import METRIC_SHARED, METRIC_SLOTS, METRIC_TOKENS
from templar.serving.cpu_precision import cpu_flags
from templar.tools.workload import conversation_mix, invalid_rows, read_rows

DEFAULT_CONCURRENCY = (1, 4, 16, 64)
# a level waits at most duration + the request deadline: a shorter deadline than the reward client's
CLIENT_DEFAULTS = RewardClientConfig(request_timeout_s=60.0)
# the options that say how to reach the server, and the request size; --batch and --timeout are their older names
CLIENT_FLAGS = ClientFlags(fields=(*CONNECTION, "rows_per_request"), defaults=CLIENT_DEFAULTS,
                           aliases={"rows_per_request": ("--batch",), "request_timeout_s": ("--timeout",)},
                           helps={"endpoints": "the server's gRPC endpoint, host:port (one: a load test measures one "
                                  "server)"})


@dataclass
class LoadTestOptions:
    # the RM (`model`) and how to reach its server: one endpoint, `rows_per_request` conversations per request,
    # `request_timeout_s` the deadline of one request, TLS, headers, compression (retries and balancing: not used)
    client: RewardClientConfig = field(default_factory=lambda: dataclasses.replace(CLIENT_DEFAULTS))
    concurrency: list[int] = field(default_factory=lambda: list(DEFAULT_CONCURRENCY))
    duration_s: float | None = 10.0  # per level; None with `requests` set: stop by count only
    requests: int | None = None  # per level: stop after this many requests
    data: Path | None = None  # JSONL conversations; default: the built-in mix
    conversations: int = 512  # size of the built-in mix (distinct conversations cycled through)
    warmup_requests: int = 2  # per level, not measured (first-call costs, connection set-up)
    out: Path = Path("loadtest.json")
    plot: Path | None = None  # default: `out` with .png
    metrics_url: str | None = None  # Triton metrics endpoint (http://host:8002/metrics) for padding waste
    seed: int = 0
    quiet: bool = False

    @property
    def url(self) -> str:
        return self.client.endpoints[0]

    @property
    def model(self) -> str:
        return self.client.model

    @property
    def batch(self) -> int:
        return self.client.rows_per_request


@dataclass
class RequestOutcome:
    index: int  # which payload was sent
    latency_s: float
    code: str  # "OK" or the gRPC status code name
    message: str = ""
    scores: np.ndarray | None = None
    status: list[str] | None = None
    num_tokens: np.ndarray | None = None


@dataclass
class LevelResult:
    concurrency: int
    requests: int  # answered or failed within the level (warm-up excluded)
    ok_requests: int
    conversations: int  # rows of OK requests
    ok_rows: int  # rows the server scored ("ok" status)
    row_errors: int  # rows with an "error: ..." status inside OK requests
    wall_s: float
    conversations_per_s: float
    requests_per_s: float
    tokens_per_s: float
    latency_ms: dict[str, float | None]
    errors: dict[str, int]  # gRPC code -> failed requests
    error_examples: dict[str, str]  # gRPC code / row error -> one message
    server: dict[str, Any] = field(default_factory=dict)
    # how fast failed requests failed: an overloaded server that sheds load (a full queue) answers at once
    error_latency_ms: dict[str, float | None] = field(default_factory=dict)


# -- building requests ----------------------------------------------------------------------------------------------
def make_payloads(rows: Sequence[Any], batch: int) -> list[np.ndarray]:
    """Wire rows cut into [batch, 1] BYTES tensors (the last one may be shorter). Rows may be dicts or raw bytes."""
    if batch < 1:
        raise LoadTestError(f"--batch must be at least 1, got {batch}")
    encoded = [r if isinstance(r, bytes) else conversation_rows([r])[0] for r in rows]
    return [contract.encode_strings(encoded[i : i + batch]) for i in range(0, len(encoded), batch)]


def grpc_client(options: RewardClientConfig) -> wire.GrpcTransport:
    """The one endpoint of `options`, over TLS when they say so. No fast reconnect: a load test reports a dead
    server, it does not wait for it."""
    if len(options.endpoints) != 1:
        raise LoadTestError(f"a load test measures one server: give one --url, got {', '.join(options.endpoints)}")
    return wire.GrpcTransport(options.endpoints[0], tls=options.tls_settings(), fast_reconnect=False)


async def send(client: wire.GrpcTransport, options: RewardClientConfig, payload: np.ndarray,
               index: int) -> RequestOutcome:
    """One request (deadline, headers and compression from `options`); never raises for a server or transport
    error (it becomes the outcome's code)."""
    started = time.perf_counter()
    try:
        answer = await client.infer(options.model, payload, outputs=contract.ENTRY_OUTPUTS,
                                    timeout_s=options.request_timeout_s, headers=options.headers,
                                    compression=options.compression)
    except Exception as exc:  # noqa: BLE001 - classified by gRPC code
        return RequestOutcome(index, time.perf_counter() - started, wire.status_code(exc), wire.error_message(exc))
    latency = time.perf_counter() - started
    decoded = wire.decode_entry(answer)
    return RequestOutcome(index, latency, "OK", scores=decoded.scores, status=decoded.status,
                          num_tokens=decoded.num_tokens)


async def drive(client: wire.GrpcTransport, options: RewardClientConfig, payloads: Sequence[np.ndarray],
                concurrency: int, *, duration_s: float | None = None, max_requests: int | None = None,
                cycle: bool = True, progress: Callable[[int, float], None] | None = None,
                ) -> tuple[list[RequestOutcome], float]:
    """`concurrency` workers send payloads to `options.model` (in order, cycling when `cycle`) until `duration_s`
    has passed or `max_requests` were sent (without `cycle`: each payload once). Returns the outcomes and the wall
    time."""
    if not payloads:
        raise LoadTestError("no requests to send")
    limit = max_requests if max_requests is not None else (None if cycle else len(payloads))
    if limit is None and duration_s is None:
        raise LoadTestError("a load level needs a duration or a request count")
    outcomes: list[RequestOutcome] = []
    next_index = 0
    started = time.perf_counter()
    stop_at = started + duration_s if duration_s is not None else float("inf")

    async def worker() -> None:
        nonlocal next_index
        while time.perf_counter() < stop_at and (limit is None or next_index < limit):
            index = next_index
            next_index += 1
            outcomes.append(await send(client, options, payloads[index % len(payloads)], index))

    async def report() -> None:
        while True:
            await asyncio.sleep(2.0)
            progress(len(outcomes), time.perf_counter() - started)

    reporter = asyncio.ensure_future(report()) if progress else None
    try:
        # every request carries its own deadline, so the gather ends by stop_at + request_timeout_s at the latest
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        if reporter:
            reporter.cancel()
    return sorted(outcomes, key=lambda o: o.index), time.perf_counter() - started


# -- server-side figures ------------------------------------------------------------------------------------------
async def model_stats(client: wire.GrpcTransport, names: Sequence[str],
                      headers: dict[str, str] | None = None) -> dict[str, dict[str, int]]:
    """Cumulative Triton statistics per model (execution/inference counts and time in ns); {} for unknown models."""
    out = {}
    for name in names:
        try:
            stats = (await client.statistics(name, headers=headers))["model_stats"]
        except Exception:  # noqa: BLE001 - not a Templar RM, or no such model: no server-side figures
            continue
        if not stats:
            continue
        s = stats[0]
        infer = s.get("inference_stats", {})
        out[name] = {
            "executions": int(s.get("execution_count", 0)),
            "inferences": int(s.get("inference_count", 0)),
            **{f"{k}_ns": int(infer.get(k, {}).get("ns", 0)) for k in ("compute_input", "compute_infer",
                                                                       "compute_output", "queue")},
        }
    return out


def read_counters(metrics_url: str | None, names: Sequence[str], model: str) -> dict[str, float]:
    """Prometheus counters of `model` from Triton's metrics endpoint; {} when no URL was given or unreachable."""
    if not metrics_url:
        return {}
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        for name in names:
            if line.startswith(name + "{") and f'model="{model}"' in line:
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


@dataclass
class ServerSnapshot:
    stats: dict[str, dict[str, int]]  # Triton statistics of the entry, preprocess and scoring models
    counters: dict[str, float]  # the entry model's token counters (padding waste)


async def snapshot(client: wire.GrpcTransport, options: RewardClientConfig, metrics_url: str | None,
                   settle_s: float = 2.0) -> ServerSnapshot:
    """Triton's statistics and the token counters. A model's statistics are recorded when its execute() returns,
    which can be just after the client got its answer: wait (up to `settle_s`) until two reads agree."""
    model = options.model
    names = (model, contract.preprocess_model_name(model), contract.scoring_model_name(model))
    stats = await model_stats(client, names, options.headers)
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        again = await model_stats(client, names, options.headers)
        if again == stats:
            break
        stats = again
    return ServerSnapshot(stats, read_counters(metrics_url, (METRIC_TOKENS, METRIC_SLOTS, METRIC_SHARED), model))


def server_figures(model: str, before: ServerSnapshot, after: ServerSnapshot, wall_s: float) -> dict[str, Any]:
    """Preprocessing share and padding waste of what happened between two snapshots."""
    delta = {name: {k: after.stats[name][k] - before.stats.get(name, {}).get(k, 0) for k in after.stats[name]}
             for name in after.stats}
    figures: dict[str, Any] = {}
    pre, scorer = delta.get(contract.preprocess_model_name(model)), delta.get(contract.scoring_model_name(model))
    entry = delta.get(model)  # its compute times count once per request of a batch: only counts are used
    busy = lambda d: (d["compute_input_ns"] + d["compute_infer_ns"] + d["compute_output_ns"]) / 1e9  # noqa: E731
    if pre is not None and wall_s > 0:
        figures["preprocess_s"] = busy(pre)
        figures["preprocess_share_of_wall"] = busy(pre) / wall_s  # one preprocess instance: share of the time
    if scorer is not None and wall_s > 0:
        figures["scoring_s"] = busy(scorer)
        figures["scorer_busy_share"] = busy(scorer) / wall_s
        figures["scoring_calls"] = scorer["executions"]
        figures["rows_per_scoring_call"] = scorer["inferences"] / max(1, scorer["executions"])
    if entry is not None:
        figures["entry_executions"] = entry["executions"]
        figures["rows_per_entry_execution"] = entry["inferences"] / max(1, entry["executions"])
    tokens = after.counters.get(METRIC_TOKENS, 0) - before.counters.get(METRIC_TOKENS, 0)
    slots = after.counters.get(METRIC_SLOTS, 0) - before.counters.get(METRIC_SLOTS, 0)
    shared = after.counters.get(METRIC_SHARED, 0) - before.counters.get(METRIC_SHARED, 0)
    if slots > 0:  # the packed scorer computes each shared prefix once: those tokens were not slots at all
        figures["padding_waste"] = 1.0 - (tokens - shared) / slots
        figures["computed_token_slots"] = int(slots)
        figures["prefix_shared_tokens"] = int(shared)
        figures["prefix_shared_share"] = shared / tokens if tokens else 0.0
    return figures


# -- one level, the whole run -------------------------------------------------------------------------------------
def summarise(concurrency: int, outcomes: Sequence[RequestOutcome], wall_s: float) -> LevelResult:
    ok = [o for o in outcomes if o.code == "OK"]
    errors = Counter(o.code for o in outcomes if o.code != "OK")
    examples = {o.code: o.message for o in outcomes if o.code != "OK"}
    row_status = [s for o in ok for s in o.status]
    bad_rows = [s for s in row_status if not contract.is_ok(s)]
    for s in bad_rows[:20]:
        examples.setdefault("row: " + s[len(contract.ERROR_PREFIX):][:40], s)
    rows = len(row_status)
    tokens = int(sum(int(o.num_tokens.sum()) for o in ok))
    latencies = np.array([o.latency_s for o in ok]) * 1e3
    pct = (lambda q: round(float(np.percentile(latencies, q)), 2)) if len(latencies) else (lambda q: None)
    failed = np.array([o.latency_s for o in outcomes if o.code != "OK"]) * 1e3
    error_latency = {}
    if len(failed):
        error_latency = {"p50": round(float(np.percentile(failed, 50)), 2),
                         "p99": round(float(np.percentile(failed, 99)), 2), "max": round(float(failed.max()), 2)}
    return LevelResult(
        concurrency=concurrency, requests=len(outcomes), ok_requests=len(ok), conversations=rows,
        ok_rows=rows - len(bad_rows), row_errors=len(bad_rows), wall_s=wall_s,
        conversations_per_s=rows / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0, tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        latency_ms={"p50": pct(50), "p95": pct(95), "p99": pct(99),
                    "mean": round(float(latencies.mean()), 2) if len(latencies) else None,
                    "max": round(float(latencies.max()), 2) if len(latencies) else None},
        errors=dict(errors), error_examples=examples, error_latency_ms=error_latency)


async def run_level(client, opts: LoadTestOptions, payloads: Sequence[np.ndarray], concurrency: int,
                    log: Callable[[str], None]) -> LevelResult:
    if opts.warmup_requests:
        await drive(client, opts.client, payloads, min(concurrency, opts.warmup_requests),
                    max_requests=opts.warmup_requests)
    before = await snapshot(client, opts.client, opts.metrics_url)

    def progress(done: int, elapsed: float) -> None:
        log(f"  concurrency {concurrency:>3}: {elapsed:5.1f}s  {done} requests")

    outcomes, wall = await drive(client, opts.client, payloads, concurrency, duration_s=opts.duration_s,
                                 max_requests=opts.requests, progress=progress)
    after = await snapshot(client, opts.client, opts.metrics_url)
    result = summarise(concurrency, outcomes, wall)
    result.server = server_figures(opts.model, before, after, wall)
    return result


# the CPU features that decide which precisions run fast here (bf16 in hardware: AMX or AVX-512 BF16)
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    import onnxruntime

    return {"cpus": os.cpu_count(), "cpu_model": model or platform.processor(),
            "cpu_features": [name for name in CPU_FEATURES if name in flags], "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "load_average_1m": os.getloadavg()[0]}


async def check_server(client: wire.GrpcTransport, options: RewardClientConfig, log: Callable[[str], None]) -> None:
    """The server is live (a LoadTestError otherwise, within connect_timeout_s); a model that is not ready is only
    warned about (its requests fail, and are counted by code)."""
    url, wait = client.url, options.connect_timeout_s
    try:
        live = await client.server_live(timeout_s=wait, headers=options.headers)
    except Exception as exc:  # noqa: BLE001
        raise LoadTestError(f"no Triton server answers at {url}: {wire.status_code(exc)}: "
                            f"{wire.error_message(exc)[:200]}") from None
    if not live:
        raise LoadTestError(f"the server at {url} is not live")
    try:
        ready = await client.model_ready(options.model, timeout_s=wait, headers=options.headers)
    except Exception:  # noqa: BLE001
        ready = False
    if not ready:
        log(f"warning: model {options.model!r} is not ready on {url}; its requests will fail (counted by code)")


async def run_async(opts: LoadTestOptions, log: Callable[[str], None]) -> dict[str, Any]:
    if not opts.model:
        raise LoadTestError("--model is required")
    if not opts.concurrency or min(opts.concurrency) < 1:
        raise LoadTestError(f"concurrency levels must be positive integers, got {opts.concurrency}")
    if opts.duration_s is None and opts.requests is None:
        raise LoadTestError("give --duration or --requests")
    if (opts.duration_s is not None and opts.duration_s <= 0) or (opts.requests is not None and opts.requests < 1):
        raise LoadTestError("--duration and --requests must be positive")
    rows = read_rows(opts.data) if opts.data else conversation_mix(opts.conversations, seed=opts.seed)
    if opts.data:
        problems = invalid_rows(rows)
        if problems:  # sent anyway: how the server answers bad rows is part of what a load test shows
            index, problem = next(iter(problems.items()))
            log(f"warning: {len(problems)} of {len(rows)} rows in {opts.data} are not valid conversations (e.g. row "
                f"{index}: {problem}); the server will answer them with error statuses")
    payloads = make_payloads(rows, opts.batch)
    client = grpc_client(opts.client)
    try:
        await check_server(client, opts.client, log)
        levels = []
        for concurrency in opts.concurrency:
            level = await run_level(client, opts, payloads, concurrency, log)
            levels.append(level)
            latency = level.latency_ms
            log(f"concurrency {concurrency:>3}: {level.conversations_per_s:8.2f} conv/s  {level.requests_per_s:7.2f} "
                f"req/s  p50 {latency['p50']} ms  p99 {latency['p99']} ms  errors {level.errors or 0}"
                + (f" (failed in p99 {level.error_latency_ms['p99']} ms)" if level.errors else "") + "  "
                f"row errors {level.row_errors}")
    finally:
        await client.close()
    return {
        "tool": "templar loadtest", "url": opts.url, "model": opts.model, "batch": opts.batch, "tls": opts.client.tls,
        "duration_s": opts.duration_s, "requests_per_level": opts.requests, "timeout_s": opts.client.request_timeout_s,
        "workload": {"source": str(opts.data) if opts.data else "built-in mix (tools/workload.py)",
                     "distinct_conversations": len(rows), "seed": opts.seed},
        "machine": machine_info(), "levels": [asdict(level) for level in levels],
    }


def plot_levels(levels: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Throughput (conversations/s) and p99 latency against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [level["concurrency"] for level in levels]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(x, [level["conversations_per_s"] for level in levels], "o-", color="tab:blue", label="conversations/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("conversations / s", color="tab:blue")
    ax.set_ylim(bottom=0)
    right = ax.twinx()
    p99 = np.array([level["latency_ms"]["p99"] or np.nan for level in levels], dtype=float)
    seconds = np.nanmax(p99, initial=0.0) > 5000  # long queues read better in seconds
    right.plot(x, p99 / 1e3 if seconds else p99, "s--", color="tab:red", label="p99 latency")
    right.set_ylabel(f"p99 latency ({'s' if seconds else 'ms'})", color="tab:red")
    right.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(opts: LoadTestOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    say = (lambda _: None) if opts.quiet else log
    report = asyncio.run(run_async(opts, say))
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    plot = opts.plot or opts.out.with_suffix(".png")
    plot_levels(report["levels"], plot, f"{opts.model} on {opts.url}, {opts.batch} conversations/request")
    report["files"] = {"json": str(opts.out), "plot": str(plot)}
    say(f"wrote {opts.out} and {plot}")
    return report


def parse_levels(text: str) -> list[int]:
    """argparse type of --concurrency: comma-separated positive integers."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers, e.g. 1,4,16,64; got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"levels must be positive, got {text!r}")
    return levels


def add_arguments(parser) -> None:
    d = LoadTestOptions
    parser.add_argument("--model", required=True, help="reward model name")
    parser.add_argument("--concurrency", type=parse_levels, default=list(DEFAULT_CONCURRENCY),
                        help="comma-separated concurrency levels, requests in flight (default: "
                        f"{','.join(map(str, DEFAULT_CONCURRENCY))})")
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=float, help=f"seconds per level ({d.duration_s:g} when neither this nor "
                      "--requests)")
    stop.add_argument("--requests", type=int, help="requests per level")
    parser.add_argument("--data", type=Path, help='JSONL conversations {"messages": [...]} (default: built-in mix)')
    parser.add_argument("--conversations", type=int, default=d.conversations,
                        help="size of the built-in mix (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=d.warmup_requests,
                        help="unmeasured requests before each level (default: %(default)s)")
    parser.add_argument("--metrics-url", help="Triton metrics endpoint, e.g. http://127.0.0.1:8002/metrics "
                        "(adds the server's padding waste)")
    parser.add_argument("--out", type=Path, default=d.out, help="JSON report, plot beside it (default: %(default)s)")
    parser.add_argument("--plot", type=Path, help="PNG plot (default: the report's name with .png)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the built-in mix (default: %(default)s)")
    CLIENT_FLAGS.add(parser)


def main(args) -> int:
    opts = LoadTestOptions(
        client=CLIENT_FLAGS.config(args, model=args.model), concurrency=args.concurrency,
        duration_s=args.duration if args.duration is not None else (None if args.requests else
                                                                     LoadTestOptions.duration_s),
        requests=args.requests, data=args.data, conversations=args.conversations, warmup_requests=args.warmup,
        out=args.out, plot=args.plot, metrics_url=args.metrics_url, seed=args.seed)
    report = run(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({level["concurrency"]: {k: level[k] for k in ("conversations_per_s", "requests_per_s",
                                                                    "errors", "row_errors")}
                      for level in report["levels"]}, indent=None))
    return 0 if all(level["ok_requests"] for level in report["levels"]) else 1
