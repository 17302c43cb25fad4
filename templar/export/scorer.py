"""A reward model folder as one torch module, `RewardScorer`: backbone + scalar head, the score read at the last
position where attention_mask is 1 (never by searching for the pad id, which is often the EOS id), with pad-aware
position ids. The ONNX graph is traced from it, and the benchmark's in-process torch baseline runs it.

Accepted models: `*ForSequenceClassification` with one label, and the value-head RMs OpenRLHF trains (a base model
plus `value_head.weight`, or another prefix given with --value-head-prefix).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from templar import contract
from templar.errors import ExportError
from templar.modeling import position_ids

# Backbones whose export is verified by the test suite (ONNX Runtime vs torch, padded batches).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class RewardScorer(nn.Module):
    """Backbone + scalar head; the score is read at the last attention-mask position of each row."""

    def __init__(self, backbone: nn.Module, head: nn.Module, mean: float | None = None, std: float | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.normalize = mean is not None and std is not None
        self.register_buffer("mean", torch.tensor([mean or 0.0]), persistent=False)
        self.register_buffer("std", torch.tensor([std or 1.0]), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)  # last index where mask == 1
        index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        score = self.head(hidden.gather(1, index).squeeze(1)).float()
        if self.normalize:
            score = (score - self.mean) / self.std
        return score


def weight_files(model_dir: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """(weight files, are they pickle); refuses pickle unless allowed."""
    safetensors = sorted(model_dir.glob("*.safetensors"))
    if safetensors:
        return safetensors, False
    pickles = sorted(p for pattern in PICKLE_PATTERNS for p in model_dir.glob(pattern))
    if not pickles:
        raise ExportError(f"no weights in {model_dir}: expected *.safetensors")
    if not allow_pickle:
        raise ExportError(
            f"{model_dir} holds only pickle weights ({', '.join(p.name for p in pickles)}); loading pickle can run "
            "arbitrary code. Convert them to safetensors, or pass --allow-pickle if you trust the source.")
    return pickles, True


def _state_dict(files: list[Path], pickle: bool) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if pickle:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
        else:
            from safetensors.torch import load_file

            state.update(load_file(str(file)))
    return state


def _missing(missing: list[str], model_dir: Path, what: str) -> None:
    missing = [k for k in missing if "rotary_emb" not in k]  # computed buffers, never saved
    if missing:
        raise ExportError(f"weights of {model_dir} miss {what}tensors, e.g. {missing[:3]}")


def _value_head_scorer(config, state: dict, prefix: str, model_dir: Path) -> RewardScorer:
    """OpenRLHF: <base_model_prefix>.* + <prefix>.weight, mean/std in config.json."""
    from transformers import AutoModel

    if f"{prefix}.weight" not in state:
        raise ExportError(f"value head {prefix}.weight not found in the weights of {model_dir}")
    backbone = AutoModel.from_config(config)
    base = backbone.base_model_prefix
    missing, _ = backbone.load_state_dict({k[len(base) + 1:]: v for k, v in state.items()
                                           if k.startswith(base + ".")}, strict=False)
    _missing(missing, model_dir, "backbone ")
    head = nn.Linear(config.hidden_size, 1, bias=f"{prefix}.bias" in state)
    head.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})
    normalize = bool(getattr(config, "normalize_reward", False)) and hasattr(config, "mean")
    return RewardScorer(backbone, head, *(config.mean, config.std) if normalize else (None, None))


def _classifier_scorer(config, state: dict, model_dir: Path) -> RewardScorer:
    from transformers import AutoModelForSequenceClassification

    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ExportError(
            f"{model_dir} is a {', '.join(archs) or config.model_type}, not a reward model: expected "
            "*ForSequenceClassification with num_labels=1, or an OpenRLHF value-head RM (value_head.weight; "
            "other prefixes with --value-head-prefix)")
    if config.num_labels != 1:
        raise ExportError(f"a reward model has one output label; {model_dir} has num_labels={config.num_labels}")
    model = AutoModelForSequenceClassification.from_config(config)
    missing, _ = model.load_state_dict(state, strict=False)
    _missing(missing, model_dir, "")
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    return RewardScorer(getattr(model, model.base_model_prefix), head)


def load_reward_model(model_dir: str | Path, *, allow_pickle: bool = False,
                      value_head_prefix: str | None = None) -> tuple[RewardScorer, object, str]:
    """Load an RM folder as a RewardScorer in float32 (eval mode). Returns (scorer, config, kind)."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise ExportError(f"unsupported architecture {arch} (model_type {config.model_type!r}); supported model "
                          f"types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    state = _state_dict(*weight_files(model_dir, allow_pickle))
    prefix = value_head_prefix or getattr(config, "value_head_prefix", None)
    if prefix is None and "value_head.weight" in state:
        prefix = "value_head"
    config._attn_implementation = "eager"  # traces cleanly; sdpa/flash kernels do not matter for parity
    if prefix is not None:
        scorer, kind = _value_head_scorer(config, state, prefix, model_dir), f"value-head RM ({prefix})"
    else:
        scorer, kind = _classifier_scorer(config, state, model_dir), config.architectures[0]
    return scorer.float().eval(), config, kind


def torch_scores(scorer: RewardScorer, rows: list[list[int]]) -> np.ndarray:
    """Reference scores: one unpadded forward per row."""
    with torch.no_grad():
        return np.array([scorer(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)).item() for r in rows],
                        dtype=np.float64)


def trace_to_onnx(module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, path: Path,
                  opset: int = 17) -> None:
    """Trace a scorer (ids, mask -> [B, 1] scores) to ONNX with dynamic batch and sequence axes, under the
    contract's tensor names."""
    axes = {contract.INPUT_IDS: {0: "batch", 1: "sequence"}, contract.ATTENTION_MASK: {0: "batch", 1: "sequence"},
            contract.SCORE: {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about shape-dependent Python branches in HF's masking code; the parity check on
        # padded batches of other shapes is what proves the graph general, so the warnings are noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (input_ids, attention_mask), str(path),
                          input_names=[contract.INPUT_IDS, contract.ATTENTION_MASK], output_names=[contract.SCORE],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
