"""Which precision and runtime the CPU scorer uses: bf16 (OpenVINO) where the CPU computes bf16 in hardware, fp32
(ONNX Runtime) elsewhere. One place, used by the served scoring model, the export's agreement check and the
benchmark, so that what is checked is what is served.

Why two runtimes: ONNX Runtime's CPU provider has no bf16 matmuls; OpenVINO (the runtime of Triton's own CPU
`openvino` backend) reads the same `model.onnx` and runs it in bf16 on AMX / AVX-512 BF16 (measured 2.0x ONNX Runtime
fp32 on an AVX-512 BF16 EPYC, docs/benchmarks.md). fp32 stays on ONNX Runtime: its scores are bit-identical whatever
batch a row arrives in; OpenVINO's are not (even in fp32), so the bf16 path states and tests its bound instead
(BF16_BATCH_BOUND).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from templar import contract

CPU_PRECISIONS = ("auto", "fp32", "bf16")
# what the CPU scorer is told to compute in (EntrySettings.cpu_precision) per `templar export --precision`: int8 is
# ONNX Runtime's quantized graph, fp16 a GPU precision (the CPU stays fp32)
CPU_PRECISION = {"auto": "auto", "fp32": "fp32", "bf16": "bf16", "int8": "fp32", "fp16": "fp32"}
ENV_OVERRIDE = "TEMPLAR_CPU_PRECISION"  # fp32 | bf16: replaces "auto" on this machine (e.g. exact fp32 scores)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of bf16 arithmetic in hardware
# |score - fp32 score| / max(1, |fp32 score|) the bf16 path may show, and how far one row's bf16 score may move with
# the batch it is scored in (measured: 3.7e-2 and 9e-3 on the benchmark RM; the tests hold the tiny RMs to these)
BF16_TOLERANCE = 0.1
BF16_BATCH_BOUND = 0.05


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


@dataclass(frozen=True)
class CpuPrecision:
    precision: str  # "fp32" | "bf16"
    runtime: str  # "onnxruntime" | "openvino"
    reason: str  # one line for the server log


def resolve(setting: str, *, flags: set[str] | None = None, environ: dict[str, str] | None = None) -> CpuPrecision:
    """What a scorer configured with `setting` ("auto", "fp32", "bf16") runs here, and why."""
    environ = os.environ if environ is None else environ
    if setting not in CPU_PRECISIONS:
        raise ValueError(f"cpu_precision must be one of {', '.join(CPU_PRECISIONS)}, got {setting!r}")
    override = environ.get(ENV_OVERRIDE, "").strip().lower()
    if setting == "auto" and override:
        if override not in ("fp32", "bf16"):
            raise ValueError(f"${ENV_OVERRIDE} must be fp32 or bf16, got {override!r}")
        setting, why = override, f"${ENV_OVERRIDE}={override}"
    else:
        why = f"cpu_precision {setting}"
    hardware = bf16_in_hardware(flags)
    if setting == "auto":
        if not hardware:
            return CpuPrecision("fp32", "onnxruntime", "auto: this CPU has no bf16 in hardware (no AMX, no AVX-512 "
                                "BF16), so fp32 on ONNX Runtime")
        if not openvino_available():
            return CpuPrecision("fp32", "onnxruntime", f"auto: the CPU has {hardware} but OpenVINO is not installed, "
                                "so fp32 on ONNX Runtime")
        return CpuPrecision("bf16", "openvino", f"auto: the CPU has {hardware}, so bf16 on OpenVINO")
    if setting == "fp32":
        return CpuPrecision("fp32", "onnxruntime", f"{why}: fp32 on ONNX Runtime")
    if not openvino_available():
        raise ValueError(f"{why} needs OpenVINO (pip install openvino), which is not installed")
    note = f"the CPU has {hardware}" if hardware else "this CPU has no bf16 in hardware: OpenVINO computes in fp32 here"
    return CpuPrecision("bf16", "openvino", f"{why}: bf16 on OpenVINO ({note})")


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
