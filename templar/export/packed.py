"""The export phase of the packed CPU scorer (templar.serving.packed_scorer): can it serve this RM? It is loaded from
the RM's folder as Triton will load it, scores the sample conversations in one packed call (their shared template
preamble computed once) and must match the reference as the ONNX graph must. An RM it cannot run (its code does not
go through transformers' attention interface, a process RM) or that misses the reference is served by ONNX
Runtime on the CPU instead, and the export says why; it never fails an export that ONNX Runtime can serve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from templar.errors import PackedScorerUnsupported
from templar.padding import right_pad
from templar.serving.cpu_precision import BF16_TOLERANCE, bf16_speedup, resolve

Log = Callable[[str], None]


@dataclass
class PackedChoice:
    """What the CPU scorer of this export runs: the packed scorer ("torch") or the ONNX graph, and why."""

    runtime: str  # "torch" | "onnxruntime"
    reason: str
    load: str = ""  # packed_scorer.LoadOptions as JSON (how Triton loads the folder)
    parameters: dict[str, str] = field(default_factory=dict)  # what the checks measured


def _parity(served, reference, parity_error) -> float:
    if isinstance(served, tuple):  # a multi-objective RM: SCORE and every objective
        score, objectives = served
        errors = np.concatenate([parity_error(score.reshape(-1), reference.scores),
                                 parity_error(objectives, reference.objectives).reshape(-1)])
    else:
        errors = parity_error(np.asarray(served).reshape(-1), reference.scores)
    return float(errors.max())


def _score(folder: Path, load, pad_id_read: int | None, precision: str, rows: list[list[int]], pad_id: int,
           compile: bool, log: Log):
    from templar.serving.packed_scorer import PackedScorer

    scorer = PackedScorer(folder, pad_id=pad_id_read, precision=precision, load=load, compile=compile,
                          log=lambda m: log("      " + m))
    try:
        return scorer(*right_pad(rows, pad_id))
    finally:
        del scorer


def choose_packed_runtime(opts, *, cpu_precision: str, read_pad_id: int | None, reference, rows: list[list[int]],
                          pad_id: int, tolerance: float, int8_tolerance: float, log: Log) -> PackedChoice:
    """The packed scorer checked against `reference` on `rows` (right-padded with `pad_id`, one packed call), in
    fp32 (within `tolerance`), in bf16 where this machine's scorer would run bf16, in int8 (within `int8_tolerance`)
    where the export asks for it; "onnxruntime" with the reason where it cannot."""
    from templar.export.scorer import parity_error
    from templar.serving.packed_scorer import LoadOptions, hidden_size

    if opts.settings.cpu_runtime != "torch":
        return PackedChoice(opts.settings.cpu_runtime, f"cpu_runtime {opts.settings.cpu_runtime}")
    load = LoadOptions(opts.value_head_prefix, opts.trust_remote_code, opts.allow_pickle, opts.objective_weights)
    compiled = opts.settings.packed_compile  # checked as it will be served
    try:
        served = _score(Path(opts.model), load, read_pad_id, "fp32", rows, pad_id, compiled, log)
    except PackedScorerUnsupported as exc:
        return PackedChoice("onnxruntime", f"the packed scorer cannot run it ({exc})")
    max_diff = _parity(served, reference, parity_error)
    log(f"      max |packed torch scorer - {reference.name}| / max(1, |score|) = {max_diff:.2e} over {len(rows)} "
        "conversations (one packed call, shared prefixes once)")
    if not np.isfinite(max_diff) or max_diff > tolerance:
        return PackedChoice("onnxruntime", f"the packed scorer differs from {reference.name} by {max_diff:.3e} > "
                            f"{tolerance}")
    choice = PackedChoice("torch", "the packed scorer serves it (checked against the reference)", load.to_json(),
                          {"packed_max_abs_diff": f"{max_diff:.3e}"})
    if cpu_precision == "int8":
        try:
            int8 = _parity(_score(Path(opts.model), load, read_pad_id, "int8", rows, pad_id, compiled, log), reference,
                           parity_error)
        except PackedScorerUnsupported as exc:
            return PackedChoice("onnxruntime", f"the packed scorer cannot run int8 here ({exc})")
        log(f"      int8 products: max |int8 - {reference.name}| / max(1, |score|) = {int8:.2e} (tolerance "
            f"{int8_tolerance})")
        if not np.isfinite(int8) or int8 > int8_tolerance:
            return PackedChoice("onnxruntime", f"the int8 packed scorer differs from {reference.name} by {int8:.3e} > "
                                f"{int8_tolerance}: ONNX Runtime's quantized graph is checked instead")
        choice.parameters["int8_max_abs_diff"] = f"{int8:.3e}"
        return choice
    precision = resolve(cpu_precision, runtime="torch",
                        measure=lambda: bf16_speedup(hidden_size(opts.model)))
    log(f"      here: {precision.reason}")
    if precision.precision == "bf16":
        bf16 = _parity(_score(Path(opts.model), load, read_pad_id, "bf16", rows, pad_id, compiled, log), reference,
                       parity_error)
        log(f"      {precision.reason}: max |bf16 - {reference.name}| / max(1, |score|) = {bf16:.2e}")
        if not np.isfinite(bf16) or bf16 > BF16_TOLERANCE:
            raise PackedScorerUnsupported(f"the bf16 packed scorer differs from {reference.name} by {bf16:.3e} "
                                          f"(relative) > {BF16_TOLERANCE}; export with --precision fp32")
        choice.parameters["bf16_max_abs_diff"] = f"{bf16:.3e}"
    return choice


MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.py")
PICKLE_FILES = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt")


def copy_model_files(source: Path, target: Path, allow_pickle: bool = False) -> None:
    """What the packed scorer loads (config, weights, code the RM ships), copied, never linked: rewriting the source
    folder (training into it again) cannot change what is served."""
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    patterns = MODEL_FILES + (PICKLE_FILES if allow_pickle else ())
    for file in sorted({p for pattern in patterns for p in Path(source).glob(pattern) if p.is_file()}):
        shutil.copy2(file, target / file.name)

