"""`templar export --format tensorrt`: a TensorRT engine for the GPU container, built from the checked ONNX export.

TensorRT wants int32 ids and explicit shape profiles, so the engine is built from a second ONNX graph whose inputs
are int32 (cast to int64 inside), with one optimisation profile (min/opt/max batch and sequence). The engine is
checked against torch on the GPU before anything is written; the scoring model then gets a `tensorrt_plan` config
for the container, while the embedded CPU server keeps running the ONNX graph (an engine only runs on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from templar import contract
from templar.errors import ExportError, TensorRTUnavailable
from templar.export.scorer import trace_to_onnx

INSTALL_HINT = ("install TensorRT's Python package on a machine with an NVIDIA GPU and driver, e.g. "
                "`pip install tensorrt`, or export with --format onnx (the GPU container then runs the ONNX graph "
                "with ONNX Runtime's CUDA or TensorRT execution accelerator)")


@dataclass(frozen=True)
class ShapeProfile:
    """The batch and sequence shapes the engine accepts: (rows, tokens) at min, opt (tuned for) and max."""

    min_shape: tuple[int, int]
    opt_shape: tuple[int, int]
    max_shape: tuple[int, int]

    @classmethod
    def for_serving(cls, max_rows: int, max_length: int) -> ShapeProfile:
        """Tuned for the entry model's length-sorted micro-batches: full batches of typical RLHF lengths."""
        return cls((1, 1), (max(1, max_rows // 2), min(512, max_length)), (max_rows, max_length))

    def as_parameters(self) -> dict[str, str]:
        return {f"tensorrt_{k}": "x".join(map(str, v)) for k, v in
                (("min_shape", self.min_shape), ("opt_shape", self.opt_shape), ("max_shape", self.max_shape))}


def require_tensorrt():
    """The tensorrt module and a CUDA device, or a TensorRTUnavailable that says what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable(f"--format tensorrt needs TensorRT, which is not installed: {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("--format tensorrt builds an engine for the GPU it runs on, and no CUDA GPU is "
                                  "visible to torch here; run the export on the GPU host (or in the trainer "
                                  "container with the GPU reserved), or use --format onnx")
    return tensorrt


class Int32Ids(nn.Module):
    """The scorer with int32 inputs, as TensorRT wants them; the cast happens inside the graph."""

    def __init__(self, scorer: nn.Module):
        super().__init__()
        self.scorer = scorer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.scorer(input_ids.long(), attention_mask.long())


def export_int32_onnx(scorer: nn.Module, path: Path, opset: int, example_rows: int = 2, example_len: int = 8) -> None:
    ids = torch.ones(example_rows, example_len, dtype=torch.int32)
    trace_to_onnx(Int32Ids(scorer), ids, torch.ones_like(ids), path, opset)


def build_engine(onnx_path: Path, plan_path: Path, profile: ShapeProfile, *, precision: str = "fp32",
                 workspace_bytes: int = 4 << 30, log: Callable[[str], None] = print) -> None:
    """Parse the int32 ONNX graph and serialise a TensorRT engine with one optimisation profile."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.clear_flag(trt.BuilderFlag.TF32)  # FP32 means FP32: TF32 matmuls would miss the torch parity check
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    shapes = builder.create_optimization_profile()
    for name in (contract.INPUT_IDS, contract.ATTENTION_MASK):
        shapes.set_shape(name, profile.min_shape, profile.opt_shape, profile.max_shape)
    config.add_optimization_profile(shapes)
    log(f"      building the engine ({precision.upper()}; batch x tokens {profile.min_shape} .. "
        f"opt {profile.opt_shape} .. {profile.max_shape}); this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see its log above)")
    plan_path.write_bytes(bytes(serialized))


def engine_scores(plan_path: Path, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Run a serialised engine on one [B, L] batch on the GPU; returns [B] float32 scores."""
    trt = require_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    context = engine.create_execution_context()
    inputs = {contract.INPUT_IDS: torch.from_numpy(input_ids.astype(np.int32)).cuda(),
              contract.ATTENTION_MASK: torch.from_numpy(attention_mask.astype(np.int32)).cuda()}
    for name, tensor in inputs.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    scores = torch.empty((input_ids.shape[0], 1), dtype=torch.float32, device="cuda")
    context.set_tensor_address(contract.SCORE, scores.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT failed to run the engine")
    stream.synchronize()
    return scores.reshape(-1).cpu().numpy()
