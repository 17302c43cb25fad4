"""`templar bench`: one reward model, one set of conversations, four ways of scoring them, side by side in one run.

    templar      Templar over gRPC: the embedded Triton server, `concurrency` requests of `batch` conversations in
                 flight (the reward client's pattern), each conversation sent once
    onnxruntime  ONNX Runtime in-process on the same exported model, the same session settings and the same
                 length-sorted micro-batches (`templar.serving.batching`, chunks of the entry's max_batch_size);
                 "bare" is the time spent inside ONNX Runtime alone
    torch        Hugging Face torch in-process, the local RM of today's RLHF frameworks: the RM's template, one padded
                 forward per `torch_batch` conversations in arrival order, float32, sdpa attention
    http         an OpenRLHF `serve_rm`-style server (FastAPI + uvicorn, torch forward per request) in its own
                 process, `concurrency` clients posting `batch` RM-templated texts each
    torch-sorted (on request) torch on Templar's micro-batches: splits the gain into batching and runtime
    vllm         (on request) vLLM's CPU build (`/classify`, chat messages rendered server-side with the RM's own
                 template, one conversation per request, as many in flight as Templar has conversations in flight),
                 in its own environment (`make vllm-env`; skipped, saying why, when it is absent); --vllm-dtype

Every backend scores the same conversations (after a short warm-up); the report gives conversations/s, ratios, the
served path's preprocessing share and padding waste, and the largest score difference to torch. Other processes'
CPU use during each timed phase is recorded too: on a shared machine, figures with much of it are disturbed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from templar import contract
from templar.conversation import conversation_rows
from templar.errors import BenchError
from templar.export.repository import EntrySettings
from templar.reward_client import RewardClientConfig
from templar.serving.batching import PreprocessedBatch, padding_fraction, preprocess_rows, score_in_micro_batches
from templar.serving.cpu_precision import CPU_PRECISION
from templar.serving.cpu_precision import resolve as resolve_cpu_precision
from templar.serving.settings import load_chat_format
from templar.serving.onnx_runtime import create_session, run_scores
from templar.tools.stats import spearman
from templar.tiny_models import FAMILY_BACKBONE, TinySize, build_tiny_model
from templar.tools.loadtest import drive, grpc_client, machine_info, make_payloads, server_figures, snapshot
from templar.tools.workload import conversations_from, grpo_mix

BACKENDS = ("templar", "onnxruntime", "torch", "http")
# on request: torch on Templar's micro-batches (where does the gain come from?); the int8-quantized graph in-process
EXTRA_BACKENDS = ("torch-sorted", "onnxruntime-int8", "vllm", "openvino", "openvino-bf16", "packed",
                  "packed-fp32", "templar-unshared")
RM_NAME = "rm_bench"
RM_UNSHARED = "rm_bench_unshared"  # the same RM with prefix sharing off (backend templar-unshared)
# "base": a CPU-sized RM (31M non-embedding parameters on a Llama backbone); "tiny": the test suite's size.
SIZES = {
    "base": TinySize(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                     intermediate_size=2048),
    "tiny": TinySize(),
}
TARGETS = {  # name -> (ratio or share key, threshold, "min" | "max")
    "served >= 1.5x in-process HF torch": ("templar_vs_torch", 1.5, "min"),
    "served >= 3x OpenRLHF-style HTTP server": ("templar_vs_http", 3.0, "min"),
    "served >= 0.9x bare in-process ONNX Runtime": ("templar_vs_bare_onnxruntime", 0.9, "min"),
    "preprocessing <= 5% of served time": ("preprocess_share", 0.05, "max"),  # issue 22: at the packed speed
    "padding waste <= 15% of tokens": ("padding_waste", 0.15, "max"),
    "scores within 1e-4 of torch": ("max_abs_diff_vs_torch", 1e-4, "max"),
    "served >= 1.25x vLLM CPU": ("templar_vs_vllm", 1.25, "min"),
    "prefix sharing on >= 1.3x off (GRPO-shaped)": ("templar_vs_templar-unshared", 1.3, "min"),
}
# backends whose scores may differ from the float32 reference by more than rounding (not in the 1e-4 target)
LOW_PRECISION = ("onnxruntime-int8", "vllm", "openvino-bf16")
# the order of the report's tables and plot
ORDER = ("templar", "templar-unshared", "packed", "packed-fp32", "onnxruntime_bare", "onnxruntime", "openvino",
         "openvino-bf16", "onnxruntime-int8",
         "vllm", "torch-sorted", "torch", "http")


@dataclass
class BenchOptions:
    out: Path = Path("bench-results")  # bench.json, bench.png
    work: Path | None = None  # model, model repository and server logs (default: OUT/work)
    model: Path | None = None  # a Hugging Face RM folder; default: a random RM of `size` on `family`'s tokenizer
    family: str = "llama3_1"
    size: str = "base"
    conversations: int = 256
    data: Path | None = None  # JSONL conversations instead of the built-in mix
    seed: int = 0
    batch: int = 32  # conversations per gRPC / HTTP request (the reward client's rows_per_request)
    concurrency: int = 8  # requests in flight (the reward client's max_in_flight)
    torch_batch: int = 8  # in-process torch micro-batch (OpenRLHF's micro_rollout_batch_size default)
    max_length: int = 2048
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    warmup: int = 8  # conversations each backend scores before it is timed
    settings: EntrySettings = field(default_factory=EntrySettings)
    fusions: bool = False  # rewrite the exported graph with onnxruntime.transformers' fusions (parity-checked)
    timeout_s: float = 900.0  # per request
    precision: str = "auto"  # `templar export --precision` of the served RM (auto: bf16 where it measures faster here)
    vllm_python: Path | None = None  # the vLLM environment's python; default $TEMPLAR_VLLM_PYTHON or the cache's
    vllm_dtype: str = "float32"  # what vLLM computes in: float32 (Templar's precision) or bfloat16
    http_dtype: str = "float32"  # what the OpenRLHF-style server computes in (serve_rm's default: bfloat16)
    # Timed passes per backend, interleaved (round 1: every backend, round 2: every backend, ...), each round on a
    # conversation set of its own (seed, seed + 1, ...): a shared machine's speed drifts by tens of percent over
    # minutes, so figures are the median over rounds and ratios the median of each round's ratio
    rounds: int = 3
    # before each timed pass, wait up to this long for the machine to be quiet (CpuMonitor.wait_until_quiet); 0: no wait
    quiet_wait_s: float = 20.0
    workload: str = "mix"  # "mix": the built-in mix; "grpo": GRPO-shaped, `group` answers to each ~300-token prompt
    group: int = 8


@dataclass
class BackendResult:
    name: str
    description: str
    seconds: float
    conversations: int
    scores: np.ndarray
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def conversations_per_s(self) -> float:
        return self.conversations / self.seconds if self.seconds > 0 else 0.0


class CpuMonitor:
    """CPU seconds used by processes outside this benchmark (and its children) while a phase runs."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil

    def _ours(self) -> float:
        me = self.psutil.Process()
        total = 0.0
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except self.psutil.Error:
                pass
        return total

    def _all(self) -> float:
        t = self.psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)

    def __enter__(self) -> CpuMonitor:
        self.started, self.all0, self.ours0 = time.perf_counter(), self._all(), self._ours()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.started
        self.foreign_s = max(0.0, (self._all() - self.all0) - (self._ours() - self.ours0))
        self.foreign_share = self.foreign_s / max(1e-9, wall * (self.psutil.cpu_count() or 1))

    def wait_until_quiet(self, log: Callable[[str], None], busy_share: float = 0.05, timeout_s: float = 20.0) -> None:
        """Before a timed pass: wait (at most timeout_s) until the whole machine's CPU, this benchmark's servers
        included, is busy less than `busy_share` over a second. A backend started just before (loading, compiling,
        a server's background warm-up) or a neighbour's burst otherwise lands in the next backend's figures: Templar's
        first round once ran with 22% of the CPU taken by others."""
        deadline, share = time.monotonic() + timeout_s, 1.0
        while time.monotonic() < deadline:
            before, started = self._all(), time.perf_counter()
            time.sleep(1.0)
            share = (self._all() - before) / ((time.perf_counter() - started) * (self.psutil.cpu_count() or 1))
            if share < busy_share:
                return
        log(f"  the machine stayed busy ({share:.0%} of its CPU) for {timeout_s:.0f}s before this pass; timing anyway")


# -- the model ------------------------------------------------------------------------------------------------------
def non_embedding_parameters(model_dir: Path) -> tuple[int, int]:
    """(all parameters, parameters outside the token embedding) from the safetensors headers."""
    from safetensors import safe_open

    total = embedding = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as f:
            for key in f.keys():
                count = int(np.prod(f.get_slice(key).get_shape()))
                total += count
                embedding += count if "embed_tokens" in key else 0
    return total, total - embedding


def prepare_model(opts: BenchOptions, work: Path, log: Callable[[str], None]) -> Path:
    if opts.model is not None:
        if not (opts.model / "config.json").is_file():
            raise BenchError(f"--model {opts.model} is not a Hugging Face model folder (no config.json)")
        return opts.model
    if opts.size not in SIZES:
        raise BenchError(f"--size must be one of {', '.join(SIZES)}, got {opts.size!r}")
    if opts.family not in FAMILY_BACKBONE:
        raise BenchError(f"--family must be one of {', '.join(FAMILY_BACKBONE)}, got {opts.family!r}")
    folder = work / f"rm_{opts.family}_{opts.size}"
    if not (folder / "config.json").is_file():  # deterministic (seeded), so a kept folder is the same model
        log(f"building a random {opts.size} RM on the {opts.family} tokenizer in {folder}")
        build_tiny_model(opts.family, folder, kind="reward", seed=opts.seed, size=SIZES[opts.size])
    return folder


def export(model_dir: Path, repo: Path, opts: BenchOptions, log: Callable[[str], None], name: str = RM_NAME):
    from templar.export.exporter import ExportOptions, export_reward_model

    return export_reward_model(ExportOptions(model=model_dir, name=name, repo=repo, max_length=opts.max_length,
                                             settings=opts.settings, precision=opts.precision),
                               log=lambda m: log("  " + m))


def apply_transformer_fusions(onnx_path: Path, model_dir: Path, check_rows: Sequence[bytes],
                              chat_format_and_pad, tolerance: float = 1e-4) -> dict[str, Any]:
    """Replace `onnx_path` by the graph onnxruntime.transformers' optimizer fuses (residual add + RMSNorm into
    SkipSimplifiedLayerNormalization, ...), after checking on padded batches of `check_rows` that the scores stay
    within `tolerance`. Returns the fused-operator counts and the largest difference."""
    from onnxruntime.transformers import optimizer

    config = json.loads((model_dir / "config.json").read_text())
    fused = optimizer.optimize_model(str(onnx_path), model_type="gpt2", num_heads=config["num_attention_heads"],
                                     hidden_size=config["hidden_size"], opt_level=0)
    candidate = onnx_path.with_name("fused.onnx")
    fused.save_model_to_file(str(candidate))
    chat_format, pad_id = chat_format_and_pad
    batch = preprocess_rows(chat_format, list(check_rows), pad_id=pad_id)
    before = run_scores(create_session(onnx_path), batch.input_ids, batch.attention_mask).reshape(-1)
    after = run_scores(create_session(candidate), batch.input_ids, batch.attention_mask).reshape(-1)
    diff = float(np.max(np.abs(before.astype(np.float64) - after)))
    if not diff <= tolerance:
        candidate.unlink()
        raise BenchError(f"the fused graph differs from the exported one by {diff:.2e} > {tolerance}")
    candidate.replace(onnx_path)
    return {"fused_operators": {k: v for k, v in fused.get_fused_operator_statistics().items() if v},
            "max_abs_diff_vs_unfused": diff}


# -- the four backends ----------------------------------------------------------------------------------------------
@dataclass
class Context:
    opts: BenchOptions
    model_dir: Path
    repo: Path
    rows: list[dict[str, Any]]  # the first round's conversations
    parameters: dict[str, str]  # the export's model-config parameters (max_length, template_kwargs, ...)
    log: Callable[[str], None]
    warmup_rows: list[dict[str, Any]] = field(default_factory=list)  # scored before each timed pass, never timed
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def template_kwargs(self) -> dict[str, Any]:
        return json.loads(self.parameters.get(contract.PARAM_TEMPLATE_KWARGS) or "{}")

    def chat_format(self):
        """(ChatFormat, pad id) exactly as the served preprocessing model loads them."""
        folder = self.repo / contract.preprocess_model_name(RM_NAME) / "1" / "tokenizer"
        return load_chat_format(folder, self.parameters)

    @property
    def scoring_onnx(self) -> Path:
        return self.repo / contract.scoring_model_name(RM_NAME) / "1" / "model.onnx"

    def torch_model(self):
        if "torch" not in self.cache:
            from templar.tools.bench.torch_rm import TorchRewardModel

            self.cache["torch"] = TorchRewardModel(self.model_dir, max_length=self.opts.max_length,
                                                   template_kwargs=self.template_kwargs)
        return self.cache["torch"]

    def texts(self, rows: list[dict[str, Any]]) -> list[str]:
        """The RM-templated text of every conversation (what a client of the HTTP server sends)."""
        key = ("texts", id(rows))
        if key not in self.cache:
            self.cache[key] = self.torch_model().render(rows)
        return self.cache[key]


def served_runtime(ctx: Context) -> str:
    """The CPU runtime the export chose for the served scorer (its embedded config)."""
    from templar.export.repository import read_parameters

    config = ctx.repo / contract.scoring_model_name(RM_NAME) / "configs" / f"{contract.EMBEDDED_CONFIG_NAME}.pbtxt"
    return read_parameters(config).get("cpu_runtime", "onnxruntime")


def run_templar(ctx: Context, name: str = RM_NAME, label: str = "templar"):
    """Templar over gRPC (a generator: started by next(), then each send(rows) answers one timed pass)."""
    from templar.server.embedded import EmbeddedTriton
    from templar.server.ports import free_server_ports

    opts = ctx.opts
    choice = resolve_cpu_precision(CPU_PRECISION[opts.precision], runtime=served_runtime(ctx))
    server = EmbeddedTriton(ctx.repo, **free_server_ports(), log_file=ctx.repo.parent / "tritonserver.log")
    ctx.log(f"  starting the embedded Triton server (scoring in {choice.precision} on {choice.runtime}: "
            f"{choice.reason})")
    with server:
        rows = yield
        while True:
            outcomes, wall, cpu, figures = asyncio.run(_drive_templar(ctx, server, name, rows))
            failed = [o for o in outcomes if o.code != "OK"]
            if failed:
                raise BenchError(f"{len(failed)} gRPC requests failed, e.g. {failed[0].code}: {failed[0].message}")
            scores = np.concatenate([o.scores for o in outcomes])
            latencies = np.array([o.latency_s for o in outcomes])
            rows = yield BackendResult(
                label, f"Templar over gRPC, {choice.precision} on {choice.runtime} ({opts.concurrency} x {opts.batch}"
                "-conversation requests in flight)" + ("" if name == RM_NAME else ", prefix sharing off"), wall,
                len(scores), scores, {"server": figures, "foreign_cpu_share": cpu.foreign_share,
                                      "precision": choice.precision, "runtime": choice.runtime,
                                      "request_latency_s": {"p50": float(np.percentile(latencies, 50)),
                                                            "p99": float(np.percentile(latencies, 99))}})


async def _drive_templar(ctx: Context, server, name: str, rows):
    opts = ctx.opts
    target = RewardClientConfig(name, [server.grpc_url], request_timeout_s=opts.timeout_s)
    client = grpc_client(target)
    try:
        await drive(client, target, make_payloads(ctx.warmup_rows, opts.batch), 1, cycle=False)
        before = await snapshot(client, target, server.metrics_url)
        with CpuMonitor() as cpu:
            outcomes, wall = await drive(client, target, make_payloads(rows, opts.batch), opts.concurrency,
                                         cycle=False)
        after = await snapshot(client, target, server.metrics_url)
    finally:
        await client.close()
    return outcomes, wall, cpu, server_figures(name, before, after, wall)


def _in_process(ctx: Context, name: str, description: str,
                run: Callable[[np.ndarray, np.ndarray], np.ndarray], packing: str = "padded", precision: str = "fp32"):
    """The served path's steps in this process: chunks of the entry's batch size, the RM's template and tokenizer
    (`preprocess_rows`), micro-batches (`score_in_micro_batches`: length-sorted, or `packing="prefix"`, the packed
    scorer's) scored by `run`."""
    s = ctx.opts.settings
    packed = packing == "prefix"
    chat_format, pad_id = ctx.chat_format()
    inside = {"run_s": 0.0}

    def score(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        result = run(ids, mask)
        inside["run_s"] += time.perf_counter() - started
        return result

    def score_all(rows: Sequence[bytes]) -> tuple[np.ndarray, int, int, float]:
        scores, tokens, slots, preprocess_s = [], 0, 0, 0.0
        for start in range(0, len(rows), s.max_batch_size):
            began = time.perf_counter()
            batch: PreprocessedBatch = preprocess_rows(chat_format, rows[start : start + s.max_batch_size],
                                                       pad_id=pad_id)
            preprocess_s += time.perf_counter() - began
            if not all(contract.is_ok(status) for status in batch.status):
                bad = next(status for status in batch.status if not contract.is_ok(status))
                raise BenchError(f"a conversation failed preprocessing: {bad}")
            scored = score_in_micro_batches(batch, score, max_rows=s.micro_batch_rows,
                                            max_tokens=s.packed_tokens if packed else s.micro_batch_tokens,
                                            max_padding=s.micro_batch_max_padding, packing=packing,
                                            share_prefixes=s.prefix_sharing)
            scores.append(scored.scores)
            tokens, slots = tokens + scored.tokens, slots + scored.slots
        return np.concatenate(scores), tokens, slots, preprocess_s

    rows = yield
    while True:
        score_all(conversation_rows(ctx.warmup_rows))
        inside["run_s"] = 0.0
        with CpuMonitor() as cpu:
            started = time.perf_counter()
            scores, tokens, slots, preprocess_s = score_all(conversation_rows(rows))
            wall = time.perf_counter() - started
        rows = yield BackendResult(name, description, wall, len(scores), scores,
                                   {"model_run_s": inside["run_s"], "preprocess_s": preprocess_s,
                                    "padding_waste": 1.0 - tokens / slots if slots else 0.0,
                                    "foreign_cpu_share": cpu.foreign_share, "precision": precision})


def run_onnxruntime(ctx: Context):
    s = ctx.opts.settings
    session = create_session(ctx.scoring_onnx, intra_op_threads=s.intra_op_threads, spinning=s.intra_op_spinning)
    yield from _in_process(ctx, "onnxruntime", "ONNX Runtime in-process, same micro-batches",
                           lambda ids, mask: run_scores(session, ids, mask))


def run_packed(ctx: Context, precision: str | None = None):
    """The packed CPU scorer (templar.serving.packed_scorer) in this process, on the micro-batches the entry plans for
    it, in the precision it resolves to here, or in `precision` (packed-fp32: the comparator for a served bf16 or int8
    scorer, in the same run)."""
    from templar.serving.packed_scorer import create_packed_scorer

    from templar.export.repository import read_parameters

    folder = ctx.repo / contract.scoring_model_name(RM_NAME)
    if not (folder / "1" / "hf").is_dir():
        ctx.log("  skipping packed: the export serves this RM with ONNX Runtime (see its log)")
        return
    params = read_parameters(folder / "configs" / f"{contract.EMBEDDED_CONFIG_NAME}.pbtxt")  # as Triton loads it
    settings = EntrySettings.from_parameters(params, "scorer")
    if precision:
        settings = dataclasses.replace(settings, cpu_precision=precision)
    scorer = create_packed_scorer(folder / "1", params, settings, log=lambda m: ctx.log("  " + m))
    name = f"packed-{precision}" if precision else "packed"
    yield from _in_process(ctx, name, f"the packed torch scorer in-process, {scorer.precision}, same "
                           "micro-batches", scorer, packing="prefix", precision=scorer.precision)


def run_onnxruntime_int8(ctx: Context):
    """The exported graph after ONNX Runtime's dynamic quantization (`templar export --precision int8`)."""
    from templar.export.exporter import quantize_int8
    from templar.export.onnx_files import model_files

    folder = ctx.repo.parent / "int8"
    folder.mkdir(exist_ok=True)
    for file in model_files(ctx.scoring_onnx):
        shutil.copyfile(file, folder / file.name)
    quantize_int8(folder / "model.onnx")
    s = ctx.opts.settings
    session = create_session(folder / "model.onnx", intra_op_threads=s.intra_op_threads, spinning=s.intra_op_spinning)
    yield from _in_process(ctx, "onnxruntime-int8", "ONNX Runtime in-process, int8 dynamic quantization, same "
                           "micro-batches", lambda ids, mask: run_scores(session, ids, mask))


def run_openvino(ctx: Context, precision: str):
    """The exported graph in OpenVINO (the runtime of Triton's CPU `openvino` backend) in-process, on the same
    micro-batches; `precision` is its inference precision hint (bf16 runs on AMX / AVX-512 BF16 in hardware)."""
    from templar.serving.cpu_precision import CpuPrecision, create_scorer

    score = create_scorer(ctx.scoring_onnx, CpuPrecision(precision, "openvino", "templar bench"),
                          threads=ctx.opts.settings.intra_op_threads)
    name = "openvino" if precision == "fp32" else f"openvino-{precision}"
    yield from _in_process(ctx, name, f"OpenVINO in-process, {precision}, same micro-batches", score)


def agreement(fp32: BackendResult, int8: BackendResult) -> dict[str, float]:
    """How far a lower precision's scores are from float32's: speed, largest and mean |d|, rank agreement."""
    a, b = fp32.scores.astype(np.float64), int8.scores.astype(np.float64)
    return {"speedup_vs_fp32": int8.conversations_per_s / fp32.conversations_per_s,
            "max_abs_diff_vs_fp32": float(np.abs(a - b).max()), "mean_abs_diff_vs_fp32": float(np.abs(a - b).mean()),
            "spearman_vs_fp32": spearman(a, b), "fp32_score_std": float(a.std())}


def run_torch_sorted(ctx: Context):
    """Not one of the four: torch on Templar's micro-batches, to split the gain into batching and runtime."""
    import torch

    scorer = ctx.torch_model().scorer

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return scorer(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    yield from _in_process(ctx, "torch-sorted", "HF torch in-process on Templar's length-sorted micro-batches", run)


def run_torch(ctx: Context):
    model = ctx.torch_model()
    size = ctx.opts.torch_batch
    rows = yield
    while True:
        model.score(ctx.warmup_rows, size)
        with CpuMonitor() as cpu:
            started = time.perf_counter()
            scores = model.score(rows, size)  # template + tokenize + forward, as an in-process RM does
            wall = time.perf_counter() - started
        lengths = [len(ids) for ids in model.tokenizer(ctx.texts(rows), add_special_tokens=False)["input_ids"]]
        batches = [np.arange(i, min(i + size, len(lengths))) for i in range(0, len(lengths), size)]
        rows = yield BackendResult("torch", f"HF torch in-process ({size} conversations per padded forward, arrival "
                                   "order)", wall, len(scores), scores,
                                   {"padding_waste": padding_fraction(lengths, batches),
                                    "foreign_cpu_share": cpu.foreign_share})


def run_http(ctx: Context):
    from templar.tools.bench.http_rm_server import HttpRewardServer

    opts = ctx.opts
    ctx.log("  starting the OpenRLHF-style HTTP server")
    with HttpRewardServer(ctx.model_dir, max_length=opts.max_length, template_kwargs=ctx.template_kwargs,
                          log_file=ctx.repo.parent / "http_server.log", dtype=opts.http_dtype) as server:
        rows = yield
        while True:
            texts = ctx.texts(rows)  # templated before timing: the trainer of such a setup already holds the text
            chunks = [texts[i : i + opts.batch] for i in range(0, len(texts), opts.batch)]
            asyncio.run(_post_texts(opts, [ctx.texts(ctx.warmup_rows)], 1, server.url))
            with CpuMonitor() as cpu:
                started = time.perf_counter()
                rewards = asyncio.run(_post_texts(opts, chunks, opts.concurrency, server.url))
                wall = time.perf_counter() - started
            scores = np.array([r for part in rewards for r in part], dtype=np.float32)
            lengths = [len(ids) for ids in ctx.torch_model().tokenizer(texts, add_special_tokens=False)["input_ids"]]
            batches = [np.arange(i, min(i + opts.batch, len(lengths))) for i in range(0, len(lengths), opts.batch)]
            rows = yield BackendResult("http", f"OpenRLHF-style HTTP server ({opts.concurrency} x {opts.batch}-text "
                                       f"requests, torch forward per request, {opts.http_dtype})", wall, len(scores),
                                       scores, {"padding_waste": padding_fraction(lengths, batches),
                                                "foreign_cpu_share": cpu.foreign_share, "dtype": opts.http_dtype})


async def _post_texts(opts: BenchOptions, parts: list[list[str]], concurrency: int, url: str) -> list[list[float]]:
    import aiohttp

    results: list[list[float] | None] = [None] * len(parts)
    next_index = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=opts.timeout_s)) as session:
        async def worker() -> None:
            nonlocal next_index
            while next_index < len(parts):
                index = next_index
                next_index += 1
                async with session.post(url + "/get_reward", json={"query": parts[index]}) as response:
                    body = await response.json()
                    if response.status != 200:
                        raise BenchError(f"the HTTP server answered {response.status}: {body}")
                    results[index] = body["rewards"]
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def run_vllm(ctx: Context):
    """vLLM's CPU build on the same RM folder and conversations, as its users run it (prefix caching on, its default:
    the warm-up and every round score conversations of their own, so the cache never holds a timed one). Nothing is
    timed (after saying why) when it is not installed."""
    from templar.tools.bench.vllm_server import (VllmRewardServer, default_vllm_python, model_unsupported,
                                                 vllm_missing)

    opts = ctx.opts
    python = opts.vllm_python or default_vllm_python()
    missing = vllm_missing(python) or model_unsupported(ctx.model_dir)
    if missing:
        ctx.log(f"  skipping vllm: {missing}")
        return
    in_flight = min(len(ctx.rows), opts.concurrency * opts.batch)  # the conversations Templar has in flight
    ctx.log(f"  starting vLLM ({python}, {opts.vllm_dtype}; about a minute)")
    with VllmRewardServer(python, ctx.model_dir, name=RM_NAME, dtype=opts.vllm_dtype, max_length=opts.max_length,
                          log_file=ctx.repo.parent / "vllm_server.log") as server:
        rows = yield
        while True:
            asyncio.run(_classify_all(ctx, ctx.warmup_rows, server.url, in_flight))
            with CpuMonitor() as cpu:
                started = time.perf_counter()
                scores = asyncio.run(_classify_all(ctx, rows, server.url, in_flight))
                wall = time.perf_counter() - started
            rows = yield BackendResult(
                "vllm", f"vLLM CPU /classify, {opts.vllm_dtype} (messages, {in_flight} one-conversation requests in "
                "flight, prefix caching on)", wall, len(scores), np.array(scores, dtype=np.float32),
                {"dtype": opts.vllm_dtype, "in_flight": in_flight, "foreign_cpu_share": cpu.foreign_share})


async def _classify_all(ctx: Context, rows: list[dict], url: str, in_flight: int) -> list[float]:
    import aiohttp

    extra = {"chat_template_kwargs": ctx.template_kwargs} if ctx.template_kwargs else {}
    scores: list[float | None] = [None] * len(rows)
    next_index = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ctx.opts.timeout_s)) as session:
        async def worker() -> None:
            nonlocal next_index
            while next_index < len(rows):
                index = next_index
                next_index += 1
                body = {"model": RM_NAME, "messages": rows[index]["messages"], "use_activation": False, **extra}
                async with session.post(url + "/classify", json=body) as response:
                    answer = await response.json()
                    if response.status != 200:
                        raise BenchError(f"vLLM answered {response.status}: {str(answer)[:300]}")
                    scores[index] = float(answer["data"][0]["probs"][0])
        await asyncio.gather(*(worker() for _ in range(min(in_flight, len(rows)))))
    return scores


# name -> a generator function: next() starts the backend (returns at once where it is not installed here), each
# send(rows) answers a timed pass over those rows (a BackendResult), close() stops it
RUNNERS: dict[str, Callable[[Context], Any]] = {
    "templar": run_templar, "templar-unshared": lambda ctx: run_templar(ctx, RM_UNSHARED, "templar-unshared"),
    "onnxruntime": run_onnxruntime, "torch": run_torch, "http": run_http,
    "torch-sorted": run_torch_sorted, "onnxruntime-int8": run_onnxruntime_int8, "vllm": run_vllm,
    "openvino": lambda ctx: run_openvino(ctx, "fp32"), "openvino-bf16": lambda ctx: run_openvino(ctx, "bf16"),
    "packed": run_packed, "packed-fp32": lambda ctx: run_packed(ctx, "fp32")}


# -- the run --------------------------------------------------------------------------------------------------------
def median_result(rounds: list[BackendResult]) -> BackendResult:
    """The round with the median throughput (the lower middle one of an even count)."""
    ordered = sorted(rounds, key=lambda r: r.conversations_per_s)
    return ordered[(len(ordered) - 1) // 2]


def _round_ratios(rounds: dict[str, list[BackendResult]]) -> dict[str, float]:
    """Templar over each other backend: the median over rounds of the ratio measured within each round."""
    served = rounds.get("templar")
    ratios: dict[str, float] = {}
    if not served:
        return ratios
    for other in ("torch", "http", "onnxruntime", "torch-sorted", "vllm", "packed", "packed-fp32",
                  "templar-unshared"):
        if rounds.get(other):
            ratios[f"templar_vs_{other}"] = float(np.median([a.conversations_per_s / b.conversations_per_s
                                                             for a, b in zip(served, rounds[other])]))
    if rounds.get("onnxruntime"):
        ratios["templar_vs_bare_onnxruntime"] = float(np.median([
            a.conversations_per_s / (b.conversations / b.details["model_run_s"])
            for a, b in zip(served, rounds["onnxruntime"])]))
    return ratios


def summarise(rounds: dict[str, list[BackendResult]]) -> dict[str, Any]:
    """Figures of the median round per backend, ratios as medians of each round's ratio, score differences and
    agreement on the first round's conversations (the same for every backend)."""
    results = {name: median_result(r) for name, r in rounds.items()}
    first = {name: r[0] for name, r in rounds.items()}
    throughput = {name: r.conversations_per_s for name, r in results.items()}
    ratios = _round_ratios(rounds)
    if "onnxruntime" in results:
        throughput["onnxruntime_bare"] = float(np.median([r.conversations / r.details["model_run_s"]
                                                          for r in rounds["onnxruntime"]]))
    throughput = {name: throughput[name] for name in ORDER if name in throughput}
    reference_name = "torch" if "torch" in results else next(iter(results))
    reference = first[reference_name].scores
    diffs = {name: float(np.max(np.abs(r.scores.astype(np.float64) - reference))) for name, r in first.items()}
    figures: dict[str, float] = dict(ratios)
    low = [*LOW_PRECISION, *[name for name in ("templar", "templar-unshared", "packed") if results.get(name) and
                             results[name].details.get("precision", "fp32") != "fp32"],
           *(["http"] if results.get("http") and results["http"].details.get("dtype") == "bfloat16" else [])]
    figures[f"max_abs_diff_vs_{reference_name}"] = max([d for name, d in diffs.items() if name not in low],
                                                       default=0.0)
    server = results["templar"].details.get("server", {}) if "templar" in results else {}
    if "preprocess_share_of_wall" in server:
        figures["preprocess_share"] = server["preprocess_share_of_wall"]
    if "padding_waste" in server:
        figures["padding_waste"] = server["padding_waste"]
    targets = {}
    for name, (key, threshold, kind) in TARGETS.items():
        if key in figures:
            value = figures[key]
            targets[name] = {"value": value, "threshold": threshold,
                             "met": bool(value >= threshold if kind == "min" else value <= threshold)}
    disturbed = {name: max(x.details.get("foreign_cpu_share", 0.0) for x in r) for name, r in rounds.items()}
    summary = {"throughput_conversations_per_s": throughput, "ratios": ratios,
               "rounds_conversations_per_s": {name: [x.conversations_per_s for x in r] for name, r in rounds.items()},
               "max_abs_diff_vs_reference": diffs, "reference": reference_name, "targets": targets,
               "foreign_cpu_share": disturbed}
    fp32 = first.get("onnxruntime") or first.get("packed-fp32") or first.get("torch")
    if fp32 is not None:  # each lower precision against the fp32 graph (or torch): speed, |d|, rank agreement
        summary["agreement_vs_fp32"] = {name: agreement(fp32, first[name]) for name in low if name in first}
    if "onnxruntime-int8" in first and "onnxruntime" in first:
        summary["int8"] = summary["agreement_vs_fp32"]["onnxruntime-int8"]
    return summary


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    throughput = report["summary"]["throughput_conversations_per_s"]
    names = [n for n in ORDER if n in throughput]
    labels = {"templar": "Templar\n(gRPC)", "onnxruntime": "ONNX Runtime\nin-process", "onnxruntime_bare":
              "ONNX Runtime\n(bare run time)", "torch": "HF torch\nin-process", "http": "OpenRLHF-style\nHTTP",
              "torch-sorted": "HF torch on\nsorted batches", "onnxruntime-int8": "ONNX Runtime\nint8",
              "vllm": "vLLM CPU\n/classify", "openvino": "OpenVINO\nfp32", "openvino-bf16": "OpenVINO\nbf16",
              "packed": "packed torch\nin-process", "packed-fp32": "packed torch\nfp32 in-process",
              "templar-unshared": "Templar\nprefix sharing off"}
    values = [throughput[n] for n in names]
    fig, ax = plt.subplots(figsize=(9.0, 4.2))
    bars = ax.bar([labels[n] for n in names], values,
                  color=["tab:green" if n == "templar" else "tab:gray" for n in names])
    served = throughput.get("templar")
    for bar, name, value in zip(bars, names, values, strict=True):
        note = f"{value:.2f}/s" + (f"\nTemplar = x{served / value:.2f}" if served and name != "templar" else "")
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("conversations / s")
    ax.set_ylim(0, max(values) * 1.25)
    model = report["model"]
    ax.set_title(f"{model['non_embedding_parameters'] / 1e6:.0f}M non-embedding parameters, "
                 f"{report['workload']['conversations']} conversations, {report['machine']['cpus']} CPU cores",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_options(opts: BenchOptions) -> None:
    unknown = [b for b in opts.backends if b not in BACKENDS + EXTRA_BACKENDS]
    if unknown or not opts.backends:
        raise BenchError(f"unknown backends {unknown}; choose from {', '.join(BACKENDS + EXTRA_BACKENDS)}")
    for name, value in (("--batch", opts.batch), ("--concurrency", opts.concurrency),
                        ("--torch-batch", opts.torch_batch), ("--conversations", opts.conversations),
                        ("--rounds", opts.rounds), ("--group", opts.group)):
        if value < 1:
            raise BenchError(f"{name} must be at least 1, got {value}")


def run_backends(ctx: Context, round_rows: list[list[dict[str, Any]]]) -> tuple[dict[str, list[BackendResult]],
                                                                               list[str]]:
    """Rounds of timed passes, interleaved: in each round every backend scores that round's conversations, one after
    the other (a backend is started on its first pass and kept until the end). The names of those not installed
    here come back apart."""
    started: dict[str, Any] = {}
    skipped: list[str] = []
    results: dict[str, list[BackendResult]] = {}
    try:
        for number, rows in enumerate(round_rows, 1):
            for name in ctx.opts.backends:
                if name in skipped:
                    continue
                if name not in started:
                    runner = RUNNERS[name](ctx)
                    try:
                        next(runner)  # starts it
                    except StopIteration:  # not installed here (the runner said why)
                        skipped.append(name)
                        continue
                    started[name] = runner
                ctx.log(f"[{name}] round {number}/{len(round_rows)}: scoring {len(rows)} conversations ...")
                if ctx.opts.quiet_wait_s > 0:
                    CpuMonitor().wait_until_quiet(ctx.log, timeout_s=ctx.opts.quiet_wait_s)
                r = started[name].send(rows)
                results.setdefault(name, []).append(r)
                ctx.log(f"[{name}] round {number}: {r.conversations_per_s:.2f} conversations/s ({r.seconds:.1f}s)")
    finally:
        for runner in started.values():
            runner.close()  # servers stop
    if not results:
        raise BenchError(f"no backend ran (skipped: {', '.join(skipped)})")
    return results, skipped


def round_conversations(opts: BenchOptions) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Each round's conversations (seed, seed + 1, ...; a --data file's rows every round) and the warm-up's (a seed
    no round uses)."""
    if opts.data:  # the file's rows in every round (a server with a prefix cache may remember them)
        rows = conversations_from(opts.data)
        return [rows] * opts.rounds, rows[: opts.warmup]

    def rows_of(seed: int, count: int) -> list[dict[str, Any]]:
        if opts.workload == "grpo":
            return grpo_mix(max(1, count // opts.group), group=opts.group, seed=seed)
        return conversations_from(None, count, seed=seed)

    return [rows_of(opts.seed + r, opts.conversations) for r in range(opts.rounds)], \
        rows_of(opts.seed + 10_000, max(opts.warmup, opts.group if opts.workload == "grpo" else 1))


def run_bench(opts: BenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    check_options(opts)
    work = opts.work or opts.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    log(f"machine: {machine['cpu_model']}, {machine['cpus']} cores, features {' '.join(machine['cpu_features'])}")
    round_rows, warmup_rows = round_conversations(opts)
    rows = round_rows[0]
    model_dir = prepare_model(opts, work, log)
    total, non_embedding = non_embedding_parameters(model_dir)
    log(f"exporting {model_dir} ({total / 1e6:.1f}M parameters, {non_embedding / 1e6:.1f}M outside the embedding)")
    report_export = export(model_dir, work / "model_repository", opts, log)
    if "templar-unshared" in opts.backends:  # the same RM beside it, prefix sharing off
        export(model_dir, work / "model_repository", dataclasses.replace(
            opts, settings=dataclasses.replace(opts.settings, prefix_sharing=False)), log, name=RM_UNSHARED)
    ctx = Context(opts, model_dir, work / "model_repository", rows, report_export.parameters, log,
                  warmup_rows=warmup_rows)
    fusions = None
    if opts.fusions:
        fusions = apply_transformer_fusions(ctx.scoring_onnx, model_dir, conversation_rows(rows[:16]),
                                            ctx.chat_format())
        log(f"transformer fusions: {fusions}")
    chat_format, _ = ctx.chat_format()
    lengths = np.array(preprocess_rows(chat_format, conversation_rows(rows)).num_tokens)
    log(f"{len(rows)} conversations, {int(lengths.sum())} tokens (mean {lengths.mean():.0f}, median "
        f"{np.median(lengths):.0f}, max {lengths.max()})")

    rounds, skipped = run_backends(ctx, round_rows)
    summary = summarise(rounds)
    results = {name: median_result(r) for name, r in rounds.items()}
    report = {
        "tool": "templar bench",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine,
        "model": {"source": str(opts.model) if opts.model else f"random {opts.size} RM on {opts.family}",
                  "parameters": total, "non_embedding_parameters": non_embedding,
                  "export_parity_max_abs_diff": report_export.max_abs_diff, "max_length": opts.max_length,
                  "transformer_fusions": fusions},
        "workload": {"source": str(opts.data) if opts.data else
                     (f"GRPO-shaped: {opts.group} answers per prompt (tools/workload.py grpo_mix)"
                      if opts.workload == "grpo" else "built-in mix (tools/workload.py)"),
                     "conversations": len(rows), "tokens": int(lengths.sum()), "mean_tokens": float(lengths.mean()),
                     "median_tokens": float(np.median(lengths)), "max_tokens": int(lengths.max()), "seed": opts.seed,
                     "rounds": opts.rounds, "round_seeds": [opts.seed + r for r in range(opts.rounds)]},
        "options": {"batch": opts.batch, "concurrency": opts.concurrency, "torch_batch": opts.torch_batch,
                    "warmup": opts.warmup, "rounds": opts.rounds, "settings": dataclasses.asdict(opts.settings)},
        "backends": {name: {"description": r.description, "seconds": r.seconds, "conversations": r.conversations,
                            "conversations_per_s": r.conversations_per_s, **r.details}
                     for name, r in results.items()},
        "skipped": skipped,
        "summary": summary,
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, opts.out / "bench.png")
    print_summary(report, log)
    log(f"wrote {opts.out / 'bench.json'} and {opts.out / 'bench.png'}")
    return report


def print_summary(report: dict[str, Any], log: Callable[[str], None]) -> None:
    summary = report["summary"]
    served = summary["throughput_conversations_per_s"].get("templar")
    log("")
    log(f"{'backend':<18}{'conv/s':>10}{'Templar is':>13}{'max |diff|':>13}{'other CPU':>11}")
    for name, value in summary["throughput_conversations_per_s"].items():
        ratio = f"x{served / value:.2f}" if served and name != "templar" else ""
        diff = summary["max_abs_diff_vs_reference"].get(name.replace("_bare", ""), float("nan"))
        foreign = summary["foreign_cpu_share"].get(name.replace("_bare", ""), 0.0)
        log(f"{name:<18}{value:>10.2f}{ratio:>13}{diff:>13.2e}{foreign:>10.0%}")
    for name, target in summary["targets"].items():
        log(f"  {'MET    ' if target['met'] else 'NOT MET'}  {name}: {target['value']:.4g} "
            f"(threshold {target['threshold']})")
    if "int8" in summary:
        int8 = summary["int8"]
        log(f"  int8 vs fp32: x{int8['speedup_vs_fp32']:.2f} conv/s, max |d| {int8['max_abs_diff_vs_fp32']:.3f}, "
            f"mean |d| {int8['mean_abs_diff_vs_fp32']:.3f} (fp32 score std {int8['fp32_score_std']:.3f}), "
            f"Spearman {int8['spearman_vs_fp32']:.4f}")
    for name, figures in summary.get("agreement_vs_fp32", {}).items():
        log(f"  {name} vs fp32: x{figures['speedup_vs_fp32']:.2f} conv/s, max |d| "
            f"{figures['max_abs_diff_vs_fp32']:.3g}, mean |d| {figures['mean_abs_diff_vs_fp32']:.3g} (fp32 score std "
            f"{figures['fp32_score_std']:.3f}), Spearman {figures['spearman_vs_fp32']:.4f}")
    disturbed = [n for n, share in summary["foreign_cpu_share"].items() if share > 0.05]
    if disturbed:
        log(f"warning: other processes used more than 5% of the CPU during {', '.join(disturbed)}; "
            "those figures are disturbed")


def parse_setting(text: str) -> tuple[str, Any]:
    """`name=value` for an EntrySettings field, converted to the field's type (argparse type of --setting)."""
    name, sep, value = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(EntrySettings)}
    if not sep or name not in fields:
        raise argparse.ArgumentTypeError(f"takes NAME=VALUE with NAME one of {', '.join(fields)}; got {text!r}")
    default = getattr(EntrySettings(), name)
    if value.lower() in ("none", "") and "None" in str(fields[name].type):
        return name, None
    if isinstance(default, bool):
        if value.lower() not in ("1", "0", "true", "false"):
            raise argparse.ArgumentTypeError(f"{name} takes true or false, got {value!r}")
        return name, value.lower() in ("1", "true")
    if isinstance(default, str):
        return name, value
    try:
        return name, (float(value) if "float" in str(fields[name].type) else int(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} takes a number, got {value!r}") from None


def add_arguments(parser) -> None:
    d = BenchOptions
    parser.add_argument("--out", type=Path, default=d.out, help="output folder: bench.json, bench.png "
                        "(default: %(default)s)")
    parser.add_argument("--work", type=Path, help="folder for the model, repository and logs (default: OUT/work)")
    parser.add_argument("--model", type=Path, help="Hugging Face RM folder (default: a random RM of --size)")
    parser.add_argument("--family", default=d.family, choices=sorted(FAMILY_BACKBONE),
                        help="tokenizer + template of the random RM (default: %(default)s)")
    parser.add_argument("--size", default=d.size, choices=sorted(SIZES),
                        help="size of the random RM (default: %(default)s)")
    parser.add_argument("--conversations", type=int, default=d.conversations,
                        help="size of the built-in mix (default: %(default)s)")
    parser.add_argument("--data", type=Path,
                        help='JSONL conversations {"messages": [...]} instead of the mix (all its rows)')
    parser.add_argument("--batch", type=int, default=d.batch,
                        help="conversations per gRPC / HTTP request (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=d.concurrency,
                        help="requests in flight (default: %(default)s)")
    parser.add_argument("--torch-batch", type=int, default=d.torch_batch,
                        help="conversations per in-process torch forward (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=d.max_length,
                        help="the RM's token limit (default: %(default)s)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of "
                        + ", ".join(BACKENDS) + f" (default: all four), plus {', '.join(EXTRA_BACKENDS)}")
    parser.add_argument("--warmup", type=int, default=d.warmup,
                        help="conversations scored by each backend before timing (default: %(default)s)")
    parser.add_argument("--setting", type=parse_setting, action="append", default=[], metavar="NAME=VALUE",
                        help="override a serving knob (EntrySettings), e.g. queue_delay_us=0; repeatable")
    parser.add_argument("--fusions", action="store_true", help="apply onnxruntime.transformers' graph fusions "
                        "to the exported model first (checked for score parity)")
    parser.add_argument("--seed", type=int, default=d.seed, help="the first round's conversations; round r uses "
                        "seed + r (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=d.rounds, help="timed passes per backend, interleaved across "
                        "backends; figures are medians (default: %(default)s)")
    parser.add_argument("--quiet-wait-s", type=float, default=d.quiet_wait_s, help="before each timed pass, wait up "
                        "to this long for the machine's CPU to be under 5%% busy; 0: no wait (default: %(default)s)")
    parser.add_argument("--workload", default=d.workload, choices=("mix", "grpo"), help="mix: the built-in mix; "
                        "grpo: GRPO-shaped, --group answers to each ~300-token prompt (default: %(default)s)")
    parser.add_argument("--group", type=int, default=d.group, help="answers per prompt with --workload grpo "
                        "(default: %(default)s)")
    parser.add_argument("--precision", default=d.precision, choices=("auto", "fp32", "bf16", "int8"),
                        help="what Templar's CPU scorer computes in (templar export --precision; default: "
                        "%(default)s: bf16 where a bf16 product measures at least 1.3x faster than fp32 on this CPU; "
                        "int8: the packed scorer's int8 products)")
    parser.add_argument("--vllm-python", type=Path, help="the python of the vLLM environment for the vllm backend "
                        "(default: $TEMPLAR_VLLM_PYTHON, else $TEMPLAR_HOME/vllm-venv, made by `make vllm-env`)")
    parser.add_argument("--http-dtype", default=d.http_dtype, choices=("float32", "bfloat16"),
                        help="what the OpenRLHF-style server computes in (default: %(default)s; serve_rm's own "
                        "default is bfloat16)")
    parser.add_argument("--vllm-dtype", default=d.vllm_dtype, choices=("float32", "bfloat16"),
                        help="what vLLM computes in (default: %(default)s, Templar's precision)")


def main(args) -> int:
    opts = BenchOptions(out=args.out, work=args.work, model=args.model, family=args.family, size=args.size,
                        conversations=args.conversations, data=args.data, seed=args.seed, batch=args.batch,
                        concurrency=args.concurrency, torch_batch=args.torch_batch, max_length=args.max_length,
                        backends=[b.strip() for b in args.backends.split(",") if b.strip()], warmup=args.warmup,
                        settings=EntrySettings(**dict(args.setting)), fusions=args.fusions,
                        vllm_python=args.vllm_python, vllm_dtype=args.vllm_dtype, precision=args.precision,
                        rounds=args.rounds, workload=args.workload, group=args.group, http_dtype=args.http_dtype,
                        quiet_wait_s=args.quiet_wait_s)
    report = run_bench(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({"throughput_conversations_per_s": report["summary"]["throughput_conversations_per_s"],
                      "ratios": report["summary"]["ratios"]}))
    return 0
