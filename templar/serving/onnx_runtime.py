"""ONNX Runtime sessions for exported reward models: one place that sets threads and graph optimisations, used by
the export tool's parity check and by the served CPU scoring model, so what is checked is what is served."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from templar import contract


def create_session(path: str | os.PathLike, *, intra_op_threads: int = 0, spinning: bool = False,
                   providers: list[str] | None = None, prepacking: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # 0 lets ONNX Runtime pick one thread per physical core; one session per process keeps cores from being
    # oversubscribed.
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # Without spinning, idle pool threads sleep instead of busy-waiting for the next run: between micro-batches
    # the cores go to the tokenizer, the other Triton stubs and the trainer that shares the machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # Pre-packing keeps a second, kernel-friendly copy of the weights: faster serving, twice the memory. A one-off
    # check on a large model (the export's) does without it.
    options.add_session_config_entry("session.disable_prepacking", "0" if prepacking else "1")
    return ort.InferenceSession(str(Path(path)), sess_options=options,
                                providers=providers or ["CPUExecutionProvider"])


def run_scores(session, input_ids: np.ndarray, attention_mask: np.ndarray,
               output: str | tuple[str, ...] = contract.SCORE):
    """[B, L] int64 ids and mask -> [B, 1] float32 scores (a process RM's graph: [B, L] TOKEN_SCORES); a tuple of
    output names answers a tuple of arrays (a multi-objective RM's SCORE and SCORES)."""
    names = [output] if isinstance(output, str) else list(output)
    values = session.run(names, {contract.INPUT_IDS: input_ids.astype(np.int64, copy=False),
                                 contract.ATTENTION_MASK: attention_mask.astype(np.int64, copy=False)})
    return values[0] if isinstance(output, str) else tuple(values)
