"""Which runtime and precision the CPU scorer uses. One place, used by the served scoring models, the export's
agreement checks and the benchmark, so that what is checked is what is served.

Runtimes (`cpu_runtime`, chosen at export): `torch`, the default for outcome RMs: the RM's own modules on packed rows
(templar.serving.packed_scorer); `onnxruntime`: the exported ONNX graph (process RMs and RMs the packed
scorer cannot run); `openvino`: the same graph in OpenVINO (Triton's own CPU backend runtime).

int8 (`templar export --precision int8`) is asked for, never chosen by `auto`: the packed scorer with int8 matrix
products (templar.serving.int8_linear), or, where the ONNX graph serves, ONNX Runtime's quantized graph. It moves scores
more than bf16 does (docs/benchmarks.md); the export checks it against the model's own forward with int8's tolerance.

Precision (`cpu_precision`, decided where the model is served): bf16 only where it is faster. A CPU flag says the
instructions exist, not that they pay: on an Intel Xeon with AVX-512 BF16 but no AMX (or AMX hidden by a
hypervisor) bf16 matrix products run at 0.6x fp32, on AMD Zen 4 (AVX-512 BF16) at about 2x, with AMX at several
times fp32 (docs/benchmarks.md). So `auto` measures: a [512, h] x [h, 4h] product in both precisions, bf16 where it
is at least BF16_MIN_SPEEDUP times faster, fp32 otherwise; the figure is in the log line. fp32 on ONNX Runtime keeps
its scores bit-identical whatever batch a row arrives in; the other paths state and test their bounds
(BF16_TOLERANCE, BF16_BATCH_BOUND; the packed scorer's: templar.serving.packed_scorer).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from templar import contract

CPU_PRECISIONS = ("auto", "fp32", "bf16", "int8")
# what the CPU scorer is told to compute in (EntrySettings.cpu_precision) per `templar export --precision`: fp16 is a
# GPU precision (the CPU stays fp32)
CPU_PRECISION = {"auto": "auto", "fp32": "fp32", "bf16": "bf16", "int8": "int8", "fp16": "fp32"}
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # int8 dot products in hardware
# (an int8 product measured 3.9x fp32 with AVX-512 VNNI, 1.7x with AVX2 kernels only: docs/benchmarks.md)
ENV_OVERRIDE = "TEMPLAR_CPU_PRECISION"  # fp32 | bf16: replaces "auto" on this machine (e.g. exact fp32 scores)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of bf16 arithmetic in hardware
# |score - fp32 score| / max(1, |fp32 score|) the bf16 path may show, and how far one row's bf16 score may move with
# the batch it is scored in (measured: 3.7e-2 and 9e-3 on the benchmark RM; the tests hold the tiny RMs to these)
BF16_TOLERANCE = 0.1
BF16_BATCH_BOUND = 0.05
# the same for int8 (the packed scorer's int8 products, or ONNX Runtime's quantized graph): its export tolerance, the
# rank agreement the tests hold the tiny RMs to, and how far one row's score may move with its batch (measured on the
# benchmark RM and the tiny RMs: docs/benchmarks.md)
INT8_TOLERANCE = 0.5
INT8_SPEARMAN = 0.98
INT8_BATCH_BOUND = 1e-4


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_in_hardware(flags: set[str] | None = None) -> str | None:
    """The CPU flag that gives bf16 arithmetic here, or None."""
    flags = cpu_flags() if flags is None else flags
    return next((flag for flag in BF16_FLAGS if flag in flags), None)


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


CPU_RUNTIMES = ("torch", "onnxruntime", "openvino")
BF16_MIN_SPEEDUP = 1.3  # auto picks bf16 where a bf16 matrix product is at least this much faster than fp32


@dataclass(frozen=True)
class CpuPrecision:
    precision: str  # "fp32" | "bf16" | "int8" (int8: the packed scorer's products)
    runtime: str  # "torch" | "onnxruntime" | "openvino"
    reason: str  # one line for the server log


def bf16_speedup(hidden: int = 1024, rows: int = 512, repeats: int = 8) -> float | None:
    """fp32 time / bf16 time of a [rows, hidden] x [hidden, 4 hidden] product in torch on this CPU: the instructions
    the CPU runtimes' bf16 kernels use. The two are timed in alternation (`repeats` each, the fastest of each kept), so
    that another process busy for a moment (the server's other models starting) slows both, not one. None where torch
    is not installed (an image that serves the ONNX graph only)."""
    import time

    try:
        import torch
    except ImportError:
        return None

    operands = {dtype: (torch.randn(rows, hidden).to(dtype), torch.randn(4 * hidden, hidden).to(dtype))
                for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(operands, float("inf"))
    with torch.inference_mode():
        for x, w in operands.values():  # warm-up: kernels chosen, memory touched, threads up
            torch.nn.functional.linear(x, w)
        for _ in range(repeats):
            for dtype, (x, w) in operands.items():
                started = time.perf_counter()
                torch.nn.functional.linear(x, w)
                best[dtype] = min(best[dtype], time.perf_counter() - started)
    return best[torch.float32] / best[torch.bfloat16]


def _setting(setting: str, environ: dict[str, str]) -> tuple[str, str]:
    """(the setting after $TEMPLAR_CPU_PRECISION's override of auto, why)."""
    if setting not in CPU_PRECISIONS:
        raise ValueError(f"cpu_precision must be one of {', '.join(CPU_PRECISIONS)}, got {setting!r}")
    override = environ.get(ENV_OVERRIDE, "").strip().lower()
    if setting == "auto" and override:
        if override not in ("fp32", "bf16"):
            raise ValueError(f"${ENV_OVERRIDE} must be fp32 or bf16, got {override!r}")
        return override, f"${ENV_OVERRIDE}={override}"
    return setting, f"cpu_precision {setting}"


def resolve(setting: str, *, runtime: str = "onnxruntime", flags: set[str] | None = None,
            environ: dict[str, str] | None = None, measure: Callable[[], float | None] | None = None) -> CpuPrecision:
    """What a scorer of `runtime` configured with `setting` ("auto", "fp32", "bf16", "int8") runs here, and why.
    `measure` answers bf16_speedup() (asked only by auto on a CPU with bf16 in hardware)."""
    if runtime not in CPU_RUNTIMES:
        raise ValueError(f"cpu_runtime must be one of {', '.join(CPU_RUNTIMES)}, got {runtime!r}")
    setting, why = _setting(setting, os.environ if environ is None else environ)
    hardware = bf16_in_hardware(flags)
    graph = "onnxruntime" if runtime == "onnxruntime" else runtime  # fp32 of the ONNX graph: ONNX Runtime
    bf16_runtime = "torch" if runtime == "torch" else "openvino"
    if setting == "fp32":
        return CpuPrecision("fp32", graph, f"{why}: fp32 on {graph}")
    if setting == "int8":
        if runtime != "torch":  # the graph itself is int8 (quantized at export): the runtime runs it as it is
            return CpuPrecision("fp32", graph, f"{why}: ONNX Runtime's int8-quantized graph on {graph}")
        int8 = next((flag for flag in INT8_FLAGS if flag in (cpu_flags() if flags is None else flags)), None)
        note = f"the CPU has {int8}" if int8 else "this CPU has no int8 dot products in hardware: slower gains"
        return CpuPrecision("int8", "torch", f"{why}: int8 products on torch, weights per channel, activations per "
                            f"token ({note})")
    if setting == "bf16":
        if bf16_runtime == "openvino" and not openvino_available():
            raise ValueError(f"{why} needs OpenVINO (pip install openvino), which is not installed")
        note = f"the CPU has {hardware}" if hardware else "this CPU has no bf16 in hardware: it is emulated, slowly"
        return CpuPrecision("bf16", bf16_runtime, f"{why}: bf16 on {bf16_runtime} ({note})")
    if not hardware:
        return CpuPrecision("fp32", graph, f"auto: this CPU has no bf16 in hardware (no AMX, no AVX-512 BF16), so "
                            f"fp32 on {graph}")
    if bf16_runtime == "openvino" and not openvino_available():
        return CpuPrecision("fp32", graph, f"auto: the CPU has {hardware} but OpenVINO is not installed, so fp32 on "
                            f"{graph}")
    speedup = (measure or bf16_speedup)()
    if speedup is None:  # only OpenVINO serves without torch: the hardware's word, unmeasured
        return CpuPrecision("bf16", bf16_runtime, f"auto: the CPU has {hardware} (no torch here to measure a bf16 "
                            f"product), so bf16 on {bf16_runtime}")
    if speedup < BF16_MIN_SPEEDUP:
        return CpuPrecision("fp32", graph, f"auto: the CPU has {hardware}, but a bf16 matrix product measured "
                            f"x{speedup:.2f} fp32's speed here (bf16 needs x{BF16_MIN_SPEEDUP}), so fp32 on {graph}")
    return CpuPrecision("bf16", bf16_runtime, f"auto: the CPU has {hardware} and a bf16 matrix product measured "
                        f"x{speedup:.2f} fp32's speed here, so bf16 on {bf16_runtime}")


def create_scorer(path: str | os.PathLike, choice: CpuPrecision, *, threads: int = 0, spinning: bool = False,
                  output: str | tuple[str, ...] = contract.SCORE):
    """A callable (ids, mask) -> [B, 1] float32 scores (the graph's `output`) running `path` as `choice` says."""
    if choice.runtime == "openvino":
        from templar.serving.openvino_runtime import compile_model, run_scores as openvino_scores

        compiled = compile_model(path, precision=choice.precision, threads=threads)
        return lambda ids, mask: openvino_scores(compiled, ids, mask, output)
    from templar.serving.onnx_runtime import create_session, run_scores

    session = create_session(path, intra_op_threads=threads, spinning=spinning)
    return lambda ids, mask: run_scores(session, ids, mask, output)
