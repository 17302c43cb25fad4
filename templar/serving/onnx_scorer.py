"""`<rm>_model` on the embedded CPU server when it runs the exported ONNX graph (process RMs, int8, `cpu_runtime
onnxruntime` or `openvino`, RMs the packed scorer cannot run): inside a Python model, by ONNX Runtime in fp32 or by
OpenVINO in bf16, as the `cpu_precision` / `cpu_runtime` parameters and this CPU decide
(templar.serving.cpu_precision; the choice is logged).

The GPU container serves the same `model.onnx` with Triton's `onnxruntime_onnx` platform instead (config.pbtxt);
this file is used through `configs/embedded.pbtxt` because the nvidia-pytriton wheel ships only the Python backend.
"""

from __future__ import annotations

from pathlib import Path

import triton_python_backend_utils as pb_utils

from templar.serving.cpu_precision import create_scorer, resolve
from templar.serving.settings import EntrySettings
from templar.serving.triton_utils import model_parameters, output_dtypes, scoring_responses


class TritonPythonModel:
    def initialize(self, args):
        settings = EntrySettings.from_parameters(model_parameters(args), "scorer")
        # SCORE; a process RM's TOKEN_SCORES; a multi-objective RM's SCORE and SCORES (templar.contract's
        # scorer_signature): the outputs of the config
        self.dtypes = output_dtypes(args)
        self.outputs = tuple(self.dtypes)
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        # the ONNX graph runs on ONNX Runtime or OpenVINO ("torch" is the packed scorer's, a model.py of its own)
        runtime = settings.cpu_runtime if settings.cpu_runtime != "torch" else "onnxruntime"
        self.choice = resolve(settings.cpu_precision, runtime=runtime)
        self.score = create_scorer(path, self.choice, threads=settings.intra_op_threads,
                                   spinning=settings.intra_op_spinning, output=self.outputs)
        pb_utils.Logger.log_info(f"{args['model_name']}: scoring in {self.choice.precision} on {self.choice.runtime} "
                                 f"({self.choice.reason})")

    def execute(self, requests):
        return scoring_responses(requests, self.score, self.dtypes, self.choice.runtime)
