"""What an export will need, known before it starts: the weights' size from the safetensors headers (nothing is
loaded), the memory and disk that size needs, and how long the long steps take. Figures measured with
`tests/test_export_large.py` on a 0.6B-parameter Qwen3 RM (docs/benchmarks.md, "Real-size reward models")."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import psutil

from templar.errors import ExportError

PROTOBUF_LIMIT = 2**31 - 1  # past it, an ONNX graph keeps its weights in a data file beside it
# Peak resident memory of `templar export` over the float32 size of the model: measured 1.82x (4.04 GiB for a
# 2.22 GiB model, the interpreter included); the estimate allows 2x plus 1 GB for the interpreter, torch, ONNX Runtime
# and the tokenizer.
PEAK_MEMORY_FACTOR = 2.0
BASE_MEMORY_BYTES = 1.0e9
# Seconds per billion parameters of the long steps, measured on the 2-core machine (faster on larger ones).
SECONDS_PER_BILLION = {"loading": 10.0, "exporting": 50.0, "checking": 65.0}


def parameter_count(model_dir: str | os.PathLike) -> int:
    """Parameters of a folder's weights, from the safetensors headers (pickle files: estimated from their size as
    16-bit weights)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return sum(p.stat().st_size for p in model_dir.glob("*.bin")) // 2
    count = 0
    for file in files:
        with safe_open(str(file), framework="np") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for dim in shape:
                    n *= dim
                count += n
    return count


def _free_disk(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def needs(opts: Any) -> dict[str, float]:
    """Bytes of memory, of disk beside the repository and of disk in the temporary folder the export will use."""
    fp32 = 4 * parameter_count(opts.model)
    repo_disk = fp32 * (1.25 if opts.precision == "int8" else 1.0) + 50e6  # the graph (+ its int8 copy), tokenizer
    tmp_disk = fp32 + 2 * fp32 if opts.format == "tensorrt" else 0.0  # int32 graph, engine
    return {"fp32_bytes": fp32, "memory": PEAK_MEMORY_FACTOR * fp32 + BASE_MEMORY_BYTES, "repo_disk": repo_disk,
            "tmp_disk": tmp_disk}


def check_resources(opts: Any) -> None:
    """An ExportError now, rather than a crash after minutes, when the machine lacks the memory or disk."""
    need = needs(opts)
    memory = psutil.virtual_memory().available + psutil.swap_memory().free
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    size = f"{need['fp32_bytes'] / 4 / 1e9:.2f}B parameters, {gib(need['fp32_bytes'])} in float32"
    if need["memory"] > memory:
        raise ExportError(f"exporting {opts.model} ({size}) needs about {gib(need['memory'])} of memory and "
                          f"{gib(memory)} is available; free memory, or export on a larger machine")
    repo_parent = Path(opts.repo).resolve().parent
    if need["repo_disk"] > _free_disk(repo_parent):
        raise ExportError(f"exporting {opts.model} ({size}) writes about {gib(need['repo_disk'])} beside {opts.repo} "
                          f"and {gib(_free_disk(repo_parent))} is free there")
    if need["tmp_disk"] > _free_disk(Path(tempfile.gettempdir())):
        raise ExportError(f"the TensorRT build needs about {gib(need['tmp_disk'])} in {tempfile.gettempdir()} "
                          f"and {gib(_free_disk(Path(tempfile.gettempdir())))} is free (set TMPDIR elsewhere)")


def estimate(opts: Any, step: str) -> str:
    """' (about 2 min)' for a long step of a large model; '' when it takes seconds."""
    seconds = SECONDS_PER_BILLION[step] * parameter_count(opts.model) / 1e9
    if seconds < 20:
        return ""
    return f" (about {seconds / 60:.0f} min)" if seconds >= 90 else f" (about {seconds:.0f} s)"
