"""A reward model folder as one torch module, `RewardScorer`: backbone + scalar head, with pad-aware position ids and
the score read where the model's OWN forward pass reads it. The ONNX graph is traced from it, and the benchmark's
in-process torch baseline runs it.

Where the score is read (`ScorePosition`), by the reference each kind of RM is checked against:
- a `*ForSequenceClassification` (Hugging Face): the last position whose token is not `config.pad_token_id`, or the
  last position when the model has no pad id, as every such class's `forward` pools (transformers 5). Where a template
  ends a conversation with the pad token (pad = EOS, the usual choice when a tokenizer has none, and Llama-3, Mistral,
  Phi-3 and DeepSeek templates end with EOS), that is the token BEFORE the trailing pad run: where the RM was trained
  to put its judgement, and what the model card's `rm(**tok.apply_chat_template(...)).logits` prints.
- an OpenRLHF value-head RM: the last attention-mask position, as OpenRLHF's reward model code reads it.
`--score-position` overrides the choice for RMs trained by code that read elsewhere.

Accepted models: any decoder-only `*ForSequenceClassification` with one label that the installed transformers
provides (or that the folder's own code defines, loaded only with --trust-remote-code), and the value-head RMs OpenRLHF
trains (a base model plus `value_head.weight`, or another prefix given with --value-head-prefix). Weights load as
shipped (bf16, fp16, fp32) and are cast to float32 tensor by tensor.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from templar import contract
from templar.errors import ExportError
from templar.padding import position_ids

log = logging.getLogger("templar.export")

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


# --score-position: "auto" = where the model's own forward reads (see the module docstring)
SCORE_POSITIONS = ("auto", "last-non-pad", "last-token")


@dataclass(frozen=True)
class ScorePosition:
    """Where each row's score is read: the last position whose id is not `pad_id` (HF's rule), or, with no pad id,
    the last attention-mask position."""

    rule: str  # "last-non-pad" or "last-token"
    pad_id: int | None  # with "last-non-pad"
    reason: str  # why this rule: recorded in serving.json and the export log

    def __post_init__(self) -> None:
        if (self.rule == "last-non-pad") != (self.pad_id is not None):
            raise ValueError(f"score position {self.rule!r} with pad id {self.pad_id!r}")

    def index(self, ids: list[int]) -> int:
        """The position read in one unpadded row (the same rule as the graph)."""
        if self.pad_id is None:
            return len(ids) - 1
        kept = [i for i, token in enumerate(ids) if token != self.pad_id]
        return kept[-1] if kept else 0

    def as_parameters(self) -> dict[str, str]:
        return {contract.PARAM_SCORE_POSITION: self.rule,
                contract.PARAM_SCORE_PAD_ID: "" if self.pad_id is None else str(self.pad_id)}


def score_indices(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """[B] the position each row's score is read at: the last attention-mask position whose id is not `pad_id` (all
    mask positions when `pad_id` is None). Right or left padding never moves it. A row of nothing but pad tokens
    reads position 0, as HF's `(arange(L) * (ids != pad)).argmax(-1)` does."""
    keep = attention_mask.long() if pad_id is None else attention_mask.long() * (input_ids != pad_id).long()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    return (positions * keep).argmax(-1)


class RewardScorer(nn.Module):
    """Backbone + scalar head; each row's score is read at `score_indices(ids, mask, pad_id)`."""

    def __init__(self, backbone: nn.Module, head: nn.Module, mean: float | None = None, std: float | None = None,
                 pad_id: int | None = None, weights: list[float] | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pad_id = pad_id
        # a multi-objective RM: forward answers (SCORE = objectives @ weights, [B, 1]; the objectives, [B, K])
        self.combine = weights is not None
        self.register_buffer("weights", torch.tensor(weights or [1.0]), persistent=False)
        self.normalize = mean is not None and std is not None
        self.register_buffer("mean", torch.tensor([mean or 0.0]), persistent=False)
        self.register_buffer("std", torch.tensor([std or 1.0]), persistent=False)

    @property
    def head_dtype(self) -> torch.dtype:
        return next(self.head.parameters()).dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        last = score_indices(input_ids, attention_mask, self.pad_id)
        index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return self.read(hidden.gather(1, index).squeeze(1))

    def read(self, hidden: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[B, hidden] the backbone's last hidden state at each row's score position -> [B, 1] scores (a
        multi-objective RM: the pair (SCORE, [B, K] objectives)); the packed scorer reads through this too."""
        score = self.head(hidden.to(self.head_dtype)).float()
        if self.combine:
            return (score @ self.weights).unsqueeze(-1), score
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


@dataclass
class LoadedRewardModel:
    scorer: RewardScorer | None  # float32, eval mode; None for an RM served by its own forward (own_forward.py)
    config: Any
    kind: str  # e.g. "Qwen3ForSequenceClassification", or "value-head RM (value_head)"
    source_dtype: str  # the dtype the weights were shipped in, e.g. "bfloat16"
    # The Hugging Face *ForSequenceClassification itself (sharing the scorer's modules): its own forward is the
    # reference a served score is checked against. None for value-head RMs (no HF class: OpenRLHF's code reads them).
    classifier: nn.Module | None = None
    # a multi-objective RM (num_labels > 1): its objectives' names (config.id2label) and SCORE's weights over them
    objectives: list[str] | None = None
    weights: list[float] | None = None

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in (self.scorer or self.classifier).parameters())

    @property
    def pad_token_id(self) -> int | None:
        """The pad id the model's own forward pools by (its text config's, as transformers reads it)."""
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        pad = getattr(text, "pad_token_id", None)
        return None if pad is None else int(pad)

    def release(self) -> None:
        """Drop the torch weights (before ONNX Runtime loads its copy: never two models in memory at once)."""
        self.scorer = self.classifier = None


def decoder_only(model_type: str) -> bool:
    """A model type whose sequence classifier scores the LAST token (a decoder): it has a causal-LM class and no
    masked-LM one (BERT-like encoders pool the first token, which a last-token scorer would misread)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def check_model_code(model_dir: Path, trust_remote_code: bool) -> None:
    """Models that ship their own Python code (config.json `auto_map`) run it only when the user says so."""
    auto_map = json.loads((model_dir / "config.json").read_text()).get("auto_map")
    if not auto_map:
        return
    code = sorted(p.name for p in model_dir.glob("*.py"))
    if not trust_remote_code:
        raise ExportError(f"{model_dir} ships its own model code ({', '.join(code) or auto_map}); loading it runs that "
                          "code. Read it, then pass --trust-remote-code if you trust it.")
    log.warning("running the model code shipped in %s (%s): --trust-remote-code was given", model_dir,
                ", ".join(code))


def find_value_head_prefix(model_dir: Path, files: list[Path], pickle: bool, given: str | None, config) -> str | None:
    prefix = given or getattr(config, "value_head_prefix", None)
    if prefix is not None or pickle:
        return prefix
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if "value_head.weight" in f.keys():
                return "value_head"
    return None


def head_tensors(files: list[Path], pickle: bool, prefix: str) -> dict[str, torch.Tensor]:
    """`<prefix>.*` tensors of an OpenRLHF value-head RM, read without loading the rest."""
    found: dict[str, torch.Tensor] = {}
    for file in files:
        if pickle:
            state = torch.load(file, map_location="cpu", weights_only=True)
            found.update({k: v for k, v in state.items() if k.startswith(prefix + ".")})
            continue
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")})
    return {k[len(prefix) + 1:]: v.float() for k, v in found.items()}


def _missing(info: dict, model_dir: Path) -> None:
    missing = [k for k in info.get("missing_keys", ()) if "rotary_emb" not in k]  # computed buffers, never saved
    if missing:
        raise ExportError(f"weights of {model_dir} miss tensors, e.g. {sorted(missing)[:3]}")


def load_pretrained(auto_class, model_dir: Path, pickle: bool, trust_remote_code: bool):
    """Hugging Face's own loading, cast to float32 tensor by tensor (bf16 / fp16 weights load as shipped)."""
    model, info = auto_class.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True,
                                             trust_remote_code=trust_remote_code, use_safetensors=not pickle,
                                             attn_implementation="eager", output_loading_info=True)
    _missing(info, model_dir)
    return model


def _value_head_scorer(config, model_dir: Path, files: list[Path], pickle: bool, prefix: str,
                       trust_remote_code: bool) -> RewardScorer:
    """OpenRLHF: <base_model_prefix>.* + <prefix>.weight, mean/std in config.json."""
    from transformers import AutoModel

    head_state = head_tensors(files, pickle, prefix)
    if "weight" not in head_state:
        raise ExportError(f"value head {prefix}.weight not found in the weights of {model_dir}")
    backbone = load_pretrained(AutoModel, model_dir, pickle, trust_remote_code)
    head = nn.Linear(config.hidden_size, 1, bias="bias" in head_state)
    head.load_state_dict(head_state)
    normalize = bool(getattr(config, "normalize_reward", False)) and hasattr(config, "mean")
    return RewardScorer(backbone, head, *(config.mean, config.std) if normalize else (None, None))


def objective_names(config) -> list[str]:
    """A classifier's label names, in order (config.id2label)."""
    labels = getattr(config, "id2label", None) or {}
    return [str(labels.get(i, labels.get(str(i), f"LABEL_{i}"))) for i in range(config.num_labels)]


def resolve_weights(names: list[str], weights: dict[str, float] | list[float] | None) -> list[float]:
    """SCORE's weight per objective: a list in label order, or {name: weight} (an objective not named weighs 0)."""
    if weights is None:
        raise ExportError(f"a multi-objective RM ({len(names)} labels: {', '.join(names)}) needs the weights SCORE "
                          'combines them with: --objective-weights \'{"' + names[0] + '": 1.0, ...}\' (or a list)')
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ExportError(f"--objective-weights names {', '.join(unknown)}, which are not objectives of this RM "
                              f"({', '.join(names)})")
        return [float(weights.get(name, 0.0)) for name in names]
    if len(weights) != len(names):
        raise ExportError(f"--objective-weights has {len(weights)} weights for {len(names)} objectives "
                          f"({', '.join(names)})")
    return [float(w) for w in weights]


def _classifier_scorer(config, model_dir: Path, pickle: bool, trust_remote_code: bool,
                       objective_weights=None) -> tuple[RewardScorer, nn.Module]:
    from transformers import AutoModelForSequenceClassification

    archs = getattr(config, "architectures", None) or []
    auto_map = getattr(config, "auto_map", None) or {}
    own_code = trust_remote_code and "AutoModelForSequenceClassification" in auto_map  # e.g. ArmoRM's
    if not own_code and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ExportError(
            f"{model_dir} is a {', '.join(archs) or config.model_type}, not a reward model: expected "
            "*ForSequenceClassification with num_labels=1, or an OpenRLHF value-head RM (value_head.weight; "
            "other prefixes with --value-head-prefix)")
    if not own_code:  # refused before the weights load
        _objective_weights(config, model_dir, objective_weights)
    model = load_pretrained(AutoModelForSequenceClassification, model_dir, pickle, trust_remote_code)
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if own_code and not isinstance(head, nn.Module):  # no head to trace: its own forward is served (own_forward.py)
        return None, model.float().eval()
    weights = _objective_weights(config, model_dir, objective_weights)
    if head is None:
        raise ExportError(f"{type(model).__name__} has no `score` or `classifier` head to read the reward from")
    return RewardScorer(getattr(model, model.base_model_prefix), head, weights=weights), model.float().eval()


def _objective_weights(config, model_dir: Path, objective_weights) -> list[float] | None:
    """SCORE's weights for a multi-label classifier (None for one label, which takes none)."""
    if config.num_labels != 1:
        return resolve_weights(objective_names(config), objective_weights)
    if objective_weights is not None:
        raise ExportError(f"--objective-weights goes with a multi-objective RM; {model_dir} has one label")
    return None


@dataclass
class ModelFolder:
    """A Hugging Face model folder, checked: its config, its weight files and whether they are pickle."""

    path: Path
    config: Any
    files: list[Path]
    pickle: bool
    custom: bool  # it ships its own model code (config.json auto_map), allowed to run
    source_dtype: str  # the dtype the weights were shipped in, e.g. "bfloat16"


def open_model_folder(model_dir: str | Path, *, allow_pickle: bool, trust_remote_code: bool,
                      serves: str) -> ModelFolder:
    """The checks every export of a folder starts with: a config.json, model code run only when trusted, a decoder
    (`serves` says what Templar serves, in the refusal), safetensors unless pickle is allowed."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    check_model_code(model_dir, trust_remote_code)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    custom = bool(getattr(config, "auto_map", None))
    if not custom and not decoder_only(config.model_type):
        arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise ExportError(f"unsupported architecture {arch} (model_type {config.model_type!r}): Templar serves "
                          f"decoder-only {serves}")
    files, pickle = weight_files(model_dir, allow_pickle)
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return ModelFolder(model_dir, config, files, pickle, custom, dtype.replace("torch.", ""))


def load_reward_model(model_dir: str | Path, *, allow_pickle: bool = False, value_head_prefix: str | None = None,
                      trust_remote_code: bool = False, objective_weights=None) -> LoadedRewardModel:
    """Load an RM folder as a RewardScorer in float32 (eval mode): any decoder-only `*ForSequenceClassification`
    transformers provides (or the folder's own code, with trust_remote_code), or an OpenRLHF value-head RM."""
    folder = open_model_folder(model_dir, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                               serves="reward models, which score the last token (an encoder such as BERT pools the "
                               "first one); any decoder with a *ForSequenceClassification class in transformers works")
    model_dir, config, files, pickle = folder.path, folder.config, folder.files, folder.pickle
    prefix = find_value_head_prefix(model_dir, files, pickle, value_head_prefix, config)
    classifier = None
    if prefix is not None:
        scorer = _value_head_scorer(config, model_dir, files, pickle, prefix, trust_remote_code)
        kind = f"value-head RM ({prefix})"
    else:
        (scorer, classifier), kind = _classifier_scorer(config, model_dir, pickle, trust_remote_code,
                                                        objective_weights), config.architectures[0]
    if scorer is None:  # a custom-code RM with no head of its own to trace (templar.export.own_forward)
        return LoadedRewardModel(None, config, f"{kind} (its own code, served by its own forward)",
                                 folder.source_dtype, classifier)
    loaded = LoadedRewardModel(scorer.float().eval(), config, kind, folder.source_dtype, classifier)
    if scorer.combine:
        loaded.objectives, loaded.weights = objective_names(config), scorer.weights.tolist()
    return loaded


def choose_score_position(loaded: LoadedRewardModel, choice: str, rows: list[list[int]],
                          token_name=str) -> ScorePosition:
    """Where the served graph reads each score (see the module docstring), and why. `rows` are sample conversations
    as the RM's template tokenizes them: the reason says whether the template ends with the pad token, the case
    where reading the last token and reading the model's own way differ."""
    if choice not in SCORE_POSITIONS:
        raise ExportError(f"unknown --score-position {choice!r}; choose from {', '.join(SCORE_POSITIONS)}")
    pad = loaded.pad_token_id
    if choice == "last-token":
        return ScorePosition("last-token", None, "--score-position last-token: the last token of the rendered "
                             "conversation, as the code that trained this RM read it")
    if choice == "auto" and loaded.classifier is None:
        return ScorePosition("last-token", None, "an OpenRLHF value-head RM: OpenRLHF's reward model reads the "
                             "last attention-mask position")
    if choice == "auto" and not type(loaded.classifier).__module__.startswith("transformers."):
        shipped = _shipped_code_position(loaded, rows)
        if shipped is not None:
            return shipped
    if pad is None:
        if choice == "last-non-pad":
            raise ExportError("--score-position last-non-pad needs a pad_token_id in the model's config.json")
        return ScorePosition("last-token", None, f"{loaded.kind} has no pad_token_id: its forward reads the last "
                             "token")
    ending = sum(1 for r in rows if r and r[-1] == pad)
    who = f"{loaded.kind}.forward" if choice == "auto" else "--score-position last-non-pad"
    if ending:
        why = (f"; this chat template ends a conversation with that token ({ending} of {len(rows)} samples), so the "
               f"score is read on the token before the trailing {token_name(pad)!r}, where the RM's own forward "
               "pass (and its model card's snippet) reads it")
    else:
        why = "; this chat template does not end a conversation with it, so that is the last token"
    return ScorePosition("last-non-pad", pad, f"{who} reads the last token that is not pad_token_id {pad} "
                         f"({token_name(pad)!r}){why}")


def _shipped_code_position(loaded: LoadedRewardModel, rows: list[list[int]]) -> ScorePosition | None:
    """Model code shipped with the RM (--trust-remote-code) may read its score anywhere: ask its forward. One score
    per token: it reads none itself, so the last token (OpenRLHF's reading); one per sequence: the position whose
    reading equals it on every sample (None: the Hugging Face rule, as for the library's own classes)."""
    kind = f"{loaded.kind} (model code shipped with the RM)"
    own = _own_scores(loaded, rows)
    if None in own:
        return ScorePosition("last-token", None, f"{kind} returns a score per token, not per conversation: the "
                             "last token is read, as OpenRLHF's reward models read it")
    saved = loaded.scorer.pad_id
    try:
        loaded.scorer.pad_id = None  # the scorer's reading at the last token
        last = _scorer_scores(loaded, rows)
    finally:
        loaded.scorer.pad_id = saved
    differ = loaded.pad_token_id is not None and any(r and r[-1] == loaded.pad_token_id for r in rows)
    if differ and np.allclose(own, last, rtol=1e-4, atol=1e-4):
        return ScorePosition("last-token", None, f"{kind}: its own forward reads the last token, not the last one "
                             f"that is not pad_token_id (checked on {len(rows)} samples)")
    return None  # the Hugging Face rule, as for the library's own classes (the parity check holds it to that)


def reads_as_the_model(loaded: LoadedRewardModel, position: ScorePosition) -> bool:
    """True when `position` is where the Hugging Face classifier's own forward reads its score."""
    return loaded.classifier is not None and position.pad_id == loaded.pad_token_id


def reference_scores(loaded: LoadedRewardModel, position: ScorePosition, rows: list[list[int]]) -> np.ndarray:
    """The scores a served graph must reproduce, one unpadded row at a time. For a Hugging Face classifier read its
    own way, the model's own forward, `model(input_ids, attention_mask).logits[0, 0]` (no code of Templar's between
    the ids and the number); otherwise the scorer, read at `position`: OpenRLHF's value-head reading, or an
    override."""
    if loaded.weights is not None:  # a multi-objective RM: SCORE is its own logits, combined by the weights
        return reference_objectives(loaded, rows) @ np.array(loaded.weights, dtype=np.float64)
    if reads_as_the_model(loaded, position):
        own = _own_scores(loaded, rows)
        if None not in own:
            return np.array(own, dtype=np.float64)
    return _scorer_scores(loaded, rows)


@torch.no_grad()
def reference_objectives(loaded: LoadedRewardModel, rows: list[list[int]]) -> np.ndarray:
    """[N, K] a multi-objective RM's own forward on each unpadded row: `model(ids).logits[0]`, one per objective."""
    return np.array([loaded.classifier(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r),
                                                                                               dtype=torch.long)
                                       ).logits[0].double().numpy() for r in rows])


@torch.no_grad()
def _own_scores(loaded: LoadedRewardModel, rows: list[list[int]]) -> list[float | None]:
    """The classifier's own forward on each unpadded row (None for a row it scores per token)."""
    return [_own_score(loaded.classifier(input_ids=torch.tensor([r]),
                                         attention_mask=torch.ones(1, len(r), dtype=torch.long))) for r in rows]


@torch.no_grad()
def _scorer_scores(loaded: LoadedRewardModel, rows: list[list[int]]) -> np.ndarray:
    """The scorer (read at its pad_id's position) on each unpadded row."""
    return np.array([loaded.scorer(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)).item() for r in rows],
                    dtype=np.float64)


def _own_score(output) -> float | None:
    """The score of one row from what a classifier's forward returns (an output object's `.logits`, or, from model
    code shipped with the RM, a tuple of them or the tensor itself); None when it returns one value per token, not per
    sequence: such a model reads no position of its own, and the scorer's reading is the reference."""
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    return float(logits[0, 0]) if logits.dim() == 2 else None


def parity_error(served: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|served - reference| / max(1, |reference|): relative for scores of magnitude above 1, absolute below (where
    float32 rounding, not the score's size, sets the floor)."""
    reference = np.asarray(reference, dtype=np.float64)
    return np.abs(np.asarray(served, dtype=np.float64) - reference) / np.maximum(1.0, np.abs(reference))


def trace_to_onnx(module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, path: Path,
                  opset: int = 17, output: str = contract.SCORE) -> None:
    """Trace a scorer (ids, mask -> [B, 1] scores; a process RM's: [B, L] TOKEN_SCORES) to ONNX with dynamic batch
    and sequence axes, under the contract's tensor names."""
    outputs = [output, contract.SCORES] if getattr(module, "combine", False) else [output]  # multi-objective
    axes = {contract.INPUT_IDS: {0: "batch", 1: "sequence"}, contract.ATTENTION_MASK: {0: "batch", 1: "sequence"},
            **{name: {0: "batch", 1: "sequence"} if name == contract.TOKEN_SCORES else {0: "batch"}
               for name in outputs}}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about shape-dependent Python branches in HF's masking code; the parity check on
        # padded batches of other shapes is what proves the graph general, so the warnings are noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (input_ids, attention_mask), str(path),
                          input_names=[contract.INPUT_IDS, contract.ATTENTION_MASK], output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
