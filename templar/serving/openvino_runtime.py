"""OpenVINO for exported reward models: the same `model.onnx` ONNX Runtime serves, compiled for the CPU at a chosen
inference precision (bf16 where the CPU computes it in hardware: AMX, AVX-512 BF16). One place that sets precision
and threads, used by the served CPU scorer and the export's agreement check alike."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from templar import contract

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def compile_model(path: str | os.PathLike, *, precision: str = "fp32", threads: int = 0):
    """A compiled OpenVINO model of the ONNX file at `path`; `threads` 0 lets OpenVINO use one per core."""
    import openvino as ov

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    core = ov.Core()
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        precision = "fp32"  # no bf16 in this CPU's hardware: OpenVINO runs the graph in fp32 (cpu_precision says so)
    config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return core.compile_model(core.read_model(str(Path(path))), "CPU", config)


def run_scores(compiled, input_ids: np.ndarray, attention_mask: np.ndarray,
               output: str | tuple[str, ...] = contract.SCORE):
    """[B, L] int64 ids and mask -> [B, 1] float32 scores (a process RM's graph: [B, L] TOKEN_SCORES); a tuple of
    output names answers a tuple of arrays."""
    request = compiled.create_infer_request()
    outputs = request.infer({contract.INPUT_IDS: input_ids.astype(np.int64, copy=False),
                             contract.ATTENTION_MASK: attention_mask.astype(np.int64, copy=False)})
    if isinstance(output, str):
        return np.asarray(outputs[compiled.output(output)], dtype=np.float32)
    return tuple(np.asarray(outputs[compiled.output(name)], dtype=np.float32) for name in output)
