"""A process reward model (templar.steps) as one torch module, `StepScorer`: ids, mask -> [B, L], at each position
the step score the PRM gives there were that position a step tag. The served graph is traced from it; the entry
model reads it at the tags the preprocessing model found.

How each reading is computed, by the reference a served step score is checked against (at the tag positions):
- class-probability (Qwen2.5-Math-PRM, any `*ForTokenClassification`): the model's OWN forward, whole (its own head:
  Qwen's PRM ships a two-layer one in its own code), softmax over the classes, the configured class's probability:
  its model card's `make_step_rewards`;
- token-logits (Math-Shepherd: a `*ForCausalLM`): softmax over the logits of the two reward tokens, P(good), as its
  model card computes it from `model(ids).logits[:, :, [good, bad]]`. The graph computes only those two rows of the
  output layer (the same numbers as the full logits, without a vocabulary-sized product per token);
- value-head (OpenRLHF layout: a base model + `value_head.weight`): the head's raw value on each position's hidden
  state, as OpenRLHF's value-head code reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from templar.errors import ExportError
from templar.padding import position_ids
from templar.steps import StepFormat


class StepScorer(nn.Module):
    def __init__(self, reading: str, *, model: nn.Module | None = None, backbone: nn.Module | None = None,
                 head: nn.Module | None = None, positive_class: int = 1, softcap: float | None = None):
        super().__init__()
        self.reading = reading
        self.model, self.backbone, self.head = model, backbone, head
        self.positive_class = positive_class
        self.softcap = softcap

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = position_ids(attention_mask)
        if self.reading == "class-probability":
            logits = _logits(self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                        use_cache=False))
            return logits.float().softmax(-1)[..., self.positive_class]
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                               use_cache=False).last_hidden_state
        out = self.head(hidden).float()
        if self.reading == "token-logits":
            if self.softcap:
                out = torch.tanh(out / self.softcap) * self.softcap
            return out.softmax(-1)[..., 0]
        return out[..., 0]


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class LoadedStepModel:
    scorer: StepScorer  # float32, eval mode
    config: Any
    kind: str
    source_dtype: str
    reference_name: str
    # the untouched Hugging Face model (None for a value-head PRM, which has no HF class): the reference
    own: nn.Module | None = None
    reward_ids: tuple[int, int] | None = None  # token-logits: (good, bad)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.scorer.parameters())

    def release(self) -> None:
        self.scorer = self.own = None

    @torch.no_grad()
    def reference(self, rows: list[list[int]], positions: list[list[int]]) -> np.ndarray:
        """Step scores of the sample rows (all steps, row after row), one unpadded row at a time, by the model's own
        forward where there is one (see the module docstring)."""
        out = []
        for ids, at in zip(rows, positions):
            x, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
            if self.own is None:
                scores = self.scorer(x, mask)[0]
            elif self.scorer.reading == "class-probability":
                scores = _logits(self.own(input_ids=x, attention_mask=mask)).float().softmax(-1)[
                    0, :, self.scorer.positive_class]
            else:
                logits = _logits(self.own(input_ids=x, attention_mask=mask)).float()
                scores = logits[0][:, list(self.reward_ids)].softmax(-1)[:, 0]
            out.extend(float(scores[i]) for i in at)
        return np.array(out, dtype=np.float64)


def load_step_model(model_dir: str | Path, fmt: StepFormat, tokenizer, *, allow_pickle: bool = False,
                    value_head_prefix: str | None = None, trust_remote_code: bool = False) -> LoadedStepModel:
    """Load a PRM folder for `fmt.reading` in float32 (see the module docstring for what each reading loads)."""
    from templar.export.scorer import find_value_head_prefix, head_tensors, load_pretrained, open_model_folder

    folder = open_model_folder(model_dir, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                               serves="process reward models (a token classifier, a causal LM or a value head)")
    model_dir, config, files, pickle, custom = folder.path, folder.config, folder.files, folder.pickle, folder.custom
    dtype = folder.source_dtype
    archs = getattr(config, "architectures", None) or [config.model_type]
    if fmt.reading == "class-probability":
        from transformers import AutoModel, AutoModelForTokenClassification

        auto = AutoModelForTokenClassification if archs[0].endswith("ForTokenClassification") else AutoModel
        if auto is AutoModel and not custom:
            raise ExportError(f"{model_dir} is a {archs[0]}: a class-probability PRM is a *ForTokenClassification, "
                              "or ships its own model code (Qwen2.5-Math-PRM's Qwen2ForProcessRewardModel)")
        model = load_pretrained(auto, model_dir, pickle, trust_remote_code).float().eval()
        classes = _class_count(model, tokenizer)
        if not 0 <= fmt.positive_class < classes:
            raise ExportError(f"--positive-class {fmt.positive_class} is not one of the model's {classes} classes")
        scorer = StepScorer(fmt.reading, model=model, positive_class=fmt.positive_class)
        return LoadedStepModel(scorer.eval(), config, archs[0], dtype, "the model's own forward", own=model)
    if fmt.reading == "token-logits":
        from transformers import AutoModelForCausalLM

        model = load_pretrained(AutoModelForCausalLM, model_dir, pickle, trust_remote_code).float().eval()
        reward_ids = tuple(_single_token(tokenizer, token) for token in fmt.reward_tokens)
        rows = model.get_output_embeddings().weight[list(reward_ids)].detach().clone()
        head = nn.Linear(rows.shape[1], 2, bias=False)
        head.weight.data.copy_(rows)
        softcap = getattr(config.get_text_config(), "final_logit_softcapping", None)
        scorer = StepScorer(fmt.reading, backbone=getattr(model, model.base_model_prefix), head=head, softcap=softcap)
        return LoadedStepModel(scorer.eval(), config, archs[0], dtype, "the model's own forward", own=model,
                               reward_ids=reward_ids)
    from transformers import AutoModel

    prefix = find_value_head_prefix(model_dir, files, pickle, value_head_prefix, config)
    if prefix is None:
        raise ExportError(f"no value head in {model_dir}: a value-head PRM has value_head.weight (other prefixes with "
                          "--value-head-prefix)")
    state = head_tensors(files, pickle, prefix)
    head = nn.Linear(config.hidden_size, 1, bias="bias" in state)
    head.load_state_dict(state)
    backbone = load_pretrained(AutoModel, model_dir, pickle, trust_remote_code)
    scorer = StepScorer(fmt.reading, backbone=backbone, head=head)
    return LoadedStepModel(scorer.float().eval(), config, f"value-head PRM ({prefix})", dtype,
                           "OpenRLHF's value-head reading")


@torch.no_grad()
def _class_count(model: nn.Module, tokenizer) -> int:
    ids = tokenizer.encode("a b", add_special_tokens=False)[:2] or [0]
    logits = _logits(model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)))
    if logits.dim() != 3:
        raise ExportError(f"{type(model).__name__} returns logits of shape {tuple(logits.shape)}, not one row of "
                          "class logits per token: not a class-probability PRM")
    return int(logits.shape[-1])


def _single_token(tokenizer, token: str) -> int:
    """The id of a reward token ("+", "-"), which must be one token (Math-Shepherd's model card: the ids of
    `encode("+ -")` without BOS)."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        ids = [i for i in tokenizer.encode(f"a {token}", add_special_tokens=False)[1:]]
    if len(ids) != 1:
        raise ExportError(f"the reward token {token!r} is not one token of this tokenizer "
                          f"({tokenizer.convert_ids_to_tokens(ids)}); pass others with --reward-tokens")
    return int(ids[0])
