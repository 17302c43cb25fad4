"""`<rm>_model` for an RM whose own code combines its objectives (templar.export.own_forward; ArmoRM): its own
forward, in torch, inside a Python model, on the embedded CPU server and in the GPU container alike (KIND_GPU runs
it on the instance's GPU). SCORE is the forward's `score`, SCORES its `rewards`, in float32.
"""

from __future__ import annotations

from pathlib import Path

# No OMP_WAIT_POLICY here: set at import, it leaked into every process that imports this module (an export, the
# trainer) and from there into the Triton server they start, where PASSIVE threads slowed the packed scorer by 12-16%.
# OpenMP's default already sleeps after a short spin, so idle scorers take no CPU between batches.
import numpy as np
import torch

from templar import contract
from templar.errors import ExportError

MODEL_FOLDER = contract.MODEL_FOLDER  # the model folder inside the version folder


def own_outputs(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """([B, 1] score, [B, K] objectives) of the model's own forward; ExportError if it answers no `score` and
    `rewards`."""
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask)
    score, rewards = getattr(output, "score", None), getattr(output, "rewards", None)
    if not isinstance(score, torch.Tensor) or not isinstance(rewards, torch.Tensor):
        fields = ", ".join(k for k, v in output.items() if v is not None) if hasattr(output, "items") else \
            type(output).__name__
        raise ExportError(f"the model's forward answers {fields}; an RM that combines its own objectives answers "
                          "`score` (its combination) and `rewards` (one value per objective), as ArmoRM does")
    return (score.float().cpu().reshape(len(ids), 1).numpy(),  # from the GPU, where it runs there
            rewards.float().cpu().reshape(len(ids), -1).numpy())


class OwnForwardScorer:
    """The served model folder, loaded with its own code (it was trusted at export) in float32."""

    def __init__(self, folder: str | Path, device: str = "cpu", threads: int = 0) -> None:
        from transformers import AutoModelForSequenceClassification

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), trust_remote_code=True, dtype=torch.float32, local_files_only=True).eval().to(self.device)

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, rewards = own_outputs(self.model, torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device),
                                     torch.from_numpy(np.asarray(mask, dtype=np.int64)).to(self.device))
        return score, rewards


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from templar.serving.settings import EntrySettings
        from templar.serving.triton_utils import model_parameters, output_dtypes, scoring_responses

        self.responses = scoring_responses
        settings = EntrySettings.from_parameters(model_parameters(args), "scorer")
        self.dtypes = output_dtypes(args)  # SCORE and SCORES (templar.contract's multi-objective scorer signature)
        folder = Path(args["model_repository"]) / args["model_version"] / MODEL_FOLDER
        gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        device = f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu"
        self.scorer = OwnForwardScorer(folder, device, threads=settings.intra_op_threads)
        pb_utils.Logger.log_info(f"{args['model_name']}: its own forward in torch, float32, on {device}")

    def execute(self, requests):
        # its code may refuse a batch (e.g. ArmoRM's gating pattern missing): that request's error
        return self.responses(requests, self.scorer, self.dtypes, "torch")
