"""`templar bench-gateway`: the OpenRLHF gateway against the direct gRPC client, on one RM and one set of
conversations, side by side in one run.

    direct      the reward client (templar.reward_client): structured conversations, 32 per gRPC request, 8 in flight
    gateway     `templar gateway` in its own process, fed as OpenRLHF feeds a remote RM: one row per HTTP request
                (`query` = prompt + response rendered with the actor's template and decoded with special tokens kept),
                `concurrency` requests in flight; the gateway parses each row back into messages, gathers the rows
                of concurrent requests for a few milliseconds and scores them together over gRPC
    gateway-unbatched  the same with the gateway's gathering off (--batch-delay-ms 0): every request alone

Every backend scores the same conversations; the report gives conversations/s, the gateway's request latency, the
ratios, and the largest difference between the gateway's rewards and the direct scores.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from templar.server.embedded import EmbeddedTriton
from templar.server.ports import free_port, free_server_ports
from templar.reward_client import RewardClient, RewardClientConfig
from templar.template_parser import TemplateParser
from templar.tools.bench.serving import RM_NAME, BenchError, BenchOptions, CpuMonitor, export, prepare_model
from templar.tools.loadtest import machine_info
from templar.tools.workload import conversation_mix


@dataclass
class GatewayBenchOptions:
    out: Path = Path("bench-results")  # bench_gateway.json
    work: Path | None = None  # model, repository, logs (default: OUT/work)
    actor: str = "qwen2_5"  # the actor's template family
    family: str = "llama3_1"  # the RM's tokenizer and template
    size: str = "tiny"  # the random RM (templar bench's sizes): small, so the serving path itself shows
    conversations: int = 256
    concurrency: int = 64  # single-row HTTP requests in flight (OpenRLHF: one per finished sample)
    max_length: int = 1024
    seed: int = 0
    backends: list[str] = field(default_factory=lambda: ["direct", "gateway", "gateway-unbatched"])


def openrlhf_rows(conversations: list[dict], parser: TemplateParser) -> list[dict]:
    """OpenRLHF's request per conversation: the prompt rendered with the actor's template and the generation
    prompt, the query decoded from the prompt's and the response's token ids with special tokens kept."""
    tokenizer, rows = parser.tokenizer, []
    for conversation in conversations:
        prompt = tokenizer.apply_chat_template(conversation["messages"][:-1], tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids += tokenizer(conversation["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
        query = tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=False)
        rows.append({"query": [query], "prompts": [prompt], "labels": [""]})
    return rows


def run_direct(url: str, conversations: list[dict]) -> dict[str, Any]:
    with RewardClient(RewardClientConfig(model=RM_NAME, endpoints=[url])) as client:
        client.score(conversations[:8])  # warm-up
        with CpuMonitor() as cpu:
            started = time.perf_counter()
            result = client.score(conversations)
            wall = time.perf_counter() - started
    if result.failed_rows:
        raise BenchError(f"the direct client failed {result.failed_rows} rows, e.g. {result.status[0]}")
    return {"seconds": wall, "scores": result.scores.astype(float).tolist(), "foreign_cpu_share": cpu.foreign_share}


def run_gateway(url: str, rows: list[dict], opts: GatewayBenchOptions, log_file: Path, *extra: str) -> dict:
    import aiohttp

    port = free_port()
    command = [sys.executable, "-m", "templar.cli", "gateway", "--actor-template", opts.actor, "--model", RM_NAME,
               "--url", url, "--port", str(port), *extra]
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    async def post_all(chunk: list[dict], concurrency: int) -> tuple[list[float], list[float]]:
        rewards, latencies = [0.0] * len(chunk), []
        queue = list(enumerate(chunk))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            async def worker() -> None:
                while queue:
                    index, row = queue.pop(0)
                    started = time.perf_counter()
                    async with session.post(f"http://127.0.0.1:{port}/get_reward", json=row) as response:
                        body = await response.json()
                        if response.status != 200:
                            raise BenchError(f"the gateway answered {response.status}: {body}")
                    latencies.append(time.perf_counter() - started)
                    rewards[index] = body["rewards"][0]
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return rewards, latencies

    try:
        _wait_healthy(port, process)
        asyncio.run(post_all(rows[:8], 8))  # warm-up
        with CpuMonitor() as cpu:
            started = time.perf_counter()
            rewards, latencies = asyncio.run(post_all(rows, opts.concurrency))
            wall = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=60)
    latency = np.array(latencies) * 1e3
    return {"seconds": wall, "scores": rewards, "foreign_cpu_share": cpu.foreign_share,
            "request_latency_ms": {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99))}}


def _wait_healthy(port: int, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"the gateway exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise BenchError("the gateway did not become healthy")


def run(opts: GatewayBenchOptions, log=print) -> dict[str, Any]:
    work = opts.work or opts.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    bench = BenchOptions(out=opts.out, work=work, family=opts.family, size=opts.size, max_length=opts.max_length,
                         seed=opts.seed)
    model_dir = prepare_model(bench, work, log)
    export(model_dir, work / "model_repository", bench, log)
    conversations = conversation_mix(opts.conversations, seed=opts.seed)
    rows = openrlhf_rows(conversations, TemplateParser.from_source(opts.actor))
    results: dict[str, dict] = {}
    with EmbeddedTriton(work / "model_repository", **free_server_ports(), log_file=work / "tritonserver.log") as server:
        for name in opts.backends:
            log(f"[{name}] scoring {len(conversations)} conversations ...")
            if name == "direct":
                results[name] = run_direct(server.grpc_url, conversations)
            else:
                extra = ("--batch-delay-ms", "0") if name == "gateway-unbatched" else ()
                results[name] = run_gateway(server.grpc_url, rows, opts, work / f"{name}.log", *extra)
            results[name]["conversations_per_s"] = len(conversations) / results[name]["seconds"]
            log(f"[{name}] {results[name]['conversations_per_s']:.1f} conversations/s")
    return summarise(opts, results, len(conversations))


def summarise(opts: GatewayBenchOptions, results: dict[str, dict], count: int) -> dict[str, Any]:
    direct = np.array(results["direct"]["scores"]) if "direct" in results else None
    summary = {name: {k: v for k, v in r.items() if k != "scores"} for name, r in results.items()}
    for name, r in results.items():
        if direct is not None and name != "direct":
            summary[name]["vs_direct"] = r["conversations_per_s"] / results["direct"]["conversations_per_s"]
            summary[name]["max_abs_diff_vs_direct"] = float(np.max(np.abs(np.array(r["scores"]) - direct)))
    report = {"tool": "templar bench-gateway", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine_info(), "options": {k: str(v) for k, v in asdict(opts).items()},
              "conversations": count, "backends": summary}
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "bench_gateway.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def add_arguments(parser) -> None:
    d = GatewayBenchOptions
    parser.add_argument("--out", type=Path, default=d.out, help="output folder (default: %(default)s)")
    parser.add_argument("--work", type=Path, help="model, repository and logs (default: OUT/work)")
    parser.add_argument("--actor", default=d.actor, help="the actor's template family (default: %(default)s)")
    parser.add_argument("--size", default=d.size, help="the random RM's size, as templar bench (default: %(default)s)")
    parser.add_argument("--conversations", type=int, default=d.conversations, help="(default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=d.concurrency,
                        help="single-row requests in flight (default: %(default)s)")


def main(args) -> int:
    opts = GatewayBenchOptions(out=args.out, work=args.work, actor=args.actor, size=args.size,
                               conversations=args.conversations, concurrency=args.concurrency)
    report = run(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(report["backends"], indent=2))
    return 0
