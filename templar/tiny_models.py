"""Small randomly initialised models on REAL tokenizers and chat templates (`templar tiny-model`, `tiny:<family>`).

No model hub is reachable here, so the demo and the tests build their models: the tokenizer, vocabulary and chat
template are the real ones of the family (fetched by `templar assets`); the weights are random. Each family gets its
own backbone type so the export path is exercised on several architectures. Scores of such RMs are meaningless as
judgements of quality, but they are deterministic functions of the exact tokens, which is what serving must preserve.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from templar.assets import tokenizer_dir
from templar.errors import ConfigError

# family -> backbone model_type (DeepSeek-V3's own MoE architecture is out of scope: a Llama backbone on its tokenizer)
FAMILY_BACKBONE = {
    "qwen2_5": "qwen2",
    "qwen3": "qwen3",
    "llama3_1": "llama",
    "llama3_2": "llama",
    "gemma3": "gemma3_text",
    "mistral_nemo": "mistral",
    "deepseek_v3": "llama",
}
KINDS = ("reward", "value-head-reward", "causal-lm", "process-reward")
# `kind="process-reward"`: a PRM of Qwen2.5-Math-PRM's own class (its shipped model code, `Qwen2ForProcessRewardModel`:
# a Qwen2 backbone and a two-layer, two-class head at every token), saved with code of the same shape; on another
# family's backbone (`backbone=` or the family's own) the same class over that backbone (`LlamaForProcessRewardModel`)
PRM_CODE_FILE = "modeling_prm.py"
PRM_CODE = '''"""A process RM of the shape Qwen2.5-Math-PRM ships (its modeling_qwen2_rm.py): two classes per token."""
import torch
from torch import nn
from transformers import {backbone}, {pretrained}
from transformers.modeling_outputs import CausalLMOutputWithPast


class {name}({pretrained}):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = 2
        self.model = {backbone}(config)
        self.score = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.ReLU(),
                                   nn.Linear(config.hidden_size, self.num_labels))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        outputs = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        logits = self.score(outputs[0])
        return CausalLMOutputWithPast(loss=None, logits=logits, past_key_values=outputs.past_key_values)
'''
PRM_BACKBONES = {"qwen2": "Qwen2", "llama": "Llama"}  # model_type -> the transformers class prefix


def prm_code(model_type: str) -> tuple[str, str]:
    """(the class name, the model code) of a tiny PRM over a backbone of `model_type`."""
    if model_type not in PRM_BACKBONES:
        raise ConfigError(f"a tiny process-reward model is built over {' or '.join(PRM_BACKBONES)}, not {model_type}")
    prefix = PRM_BACKBONES[model_type]
    name = f"{prefix}ForProcessRewardModel"
    return name, PRM_CODE.format(backbone=f"{prefix}Model", pretrained=f"{prefix}PreTrainedModel", name=name)


@dataclass
class TinySize:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 4096
    sliding_window: int = 64  # small on purpose: the export must handle inputs longer than the window
    # causal LMs: a wide output layer makes the random actor opinionated (low entropy, as real LMs are); with the
    # default init it samples almost uniformly from the whole vocabulary and PPO has nothing to sharpen
    lm_head_std: float = 0.5


def tiny_config(family: str, vocab_size: int, pad_token_id: int | None, size: TinySize, num_labels: int = 1,
                backbone: str | None = None):
    """A small config of the family's backbone model type (or of `backbone`, any decoder model type)."""
    from transformers import AutoConfig

    model_type = backbone or FAMILY_BACKBONE[family]
    extra = {}
    if model_type in ("mistral", "gemma2", "gemma3_text"):
        extra["sliding_window"] = size.sliding_window
    if model_type in ("gemma2", "gemma3_text"):
        extra["layer_types"] = ["sliding_attention", "full_attention"][: size.num_hidden_layers] + [
            "full_attention"] * max(0, size.num_hidden_layers - 2)
    return AutoConfig.for_model(
        model_type, vocab_size=vocab_size, hidden_size=size.hidden_size, num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads, num_key_value_heads=size.num_key_value_heads,
        head_dim=size.hidden_size // size.num_attention_heads, intermediate_size=size.intermediate_size,
        max_position_embeddings=size.max_position_embeddings, pad_token_id=pad_token_id, num_labels=num_labels,
        tie_word_embeddings=False, **extra)


def build_tiny_model(family: str, out: str | Path, *, kind: str = "reward", seed: int = 0,
                     size: TinySize | None = None, tokenizer: str | Path | Any | None = None,
                     backbone: str | None = None, save_tokenizer: bool = True,
                     added_tokens: tuple[str, ...] = (), labels: tuple[str, ...] = ()) -> Path:
    """Create `out` with config, safetensors weights, and the family's real tokenizer + chat template. `backbone`
    picks another architecture (model_type) than the family's own, e.g. gemma2 on the Gemma-3 tokenizer;
    `tokenizer` another tokenizer folder, or a tokenizer already loaded (then `save_tokenizer=False` skips writing
    it: many models on one large tokenizer); `added_tokens` are added to the tokenizer as special tokens (a PRM's
    step tag, as Qwen2.5-Math-PRM's `<extra_0>`)."""
    from transformers import AutoTokenizer

    if family not in FAMILY_BACKBONE:
        raise ConfigError(f"unknown family {family!r}; known: {', '.join(FAMILY_BACKBONE)}")
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    size = size or TinySize()
    out = Path(out)
    tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, Path)) else \
        AutoTokenizer.from_pretrained(str(tokenizer or tokenizer_dir(family)), local_files_only=True)
    if kind == "process-reward" and "<extra_0>" not in added_tokens:  # Qwen2.5-Math-PRM's tokenizer has its tag
        added_tokens = (*added_tokens, "<extra_0>")
    if added_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(added_tokens)},
                               replace_extra_special_tokens=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = tiny_config(family, len(tok), pad, size, num_labels=max(1, len(labels)), backbone=backbone)
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():  # a seeded build must not reset the caller's random stream
        torch.manual_seed(seed)
        _build_and_save(kind, config, tok, out, size)
    if save_tokenizer:
        tok.save_pretrained(str(out))
    return out


def _build_and_save(kind: str, config, tok, out: Path, size: TinySize) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "reward":
        model = AutoModelForSequenceClassification.from_config(config)
        _spread_head(model.score.weight)
        model.save_pretrained(out, safe_serialization=True)
    elif kind == "causal-lm":
        config.eos_token_id = tok.eos_token_id
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, size.lm_head_std)
        model.save_pretrained(out, safe_serialization=True)
    elif kind == "process-reward":
        name, code = prm_code(config.model_type)
        namespace: dict[str, Any] = {}
        exec(compile(code, PRM_CODE_FILE, "exec"), namespace)  # the code saved beside the weights, run here
        model = namespace[name](config)
        for layer in (model.score[0], model.score[2]):
            _spread_head(layer.weight)
        model.save_pretrained(out, safe_serialization=True)
        (out / PRM_CODE_FILE).write_text(code)
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(architectures=[name], auto_map={"AutoModel": f"{PRM_CODE_FILE[:-3]}.{name}"})
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    else:  # the layout OpenRLHF's RewardModel saves: <base_model_prefix>.* + value_head.weight, mean/std in config
        backbone = AutoModel.from_config(config)
        head = torch.nn.Linear(config.hidden_size, 1, bias=False)
        _spread_head(head.weight)
        state = {f"{backbone.base_model_prefix}.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
        state["value_head.weight"] = head.weight.detach().contiguous()
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = config.to_dict()
        cfg.update(architectures=["RewardModel"], normalize_reward=True, mean=0.25, std=2.0)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))


def _spread_head(weight: torch.Tensor) -> None:
    """A wider score head than the default init, so different conversations get visibly different scores."""
    with torch.no_grad():
        weight.normal_(0.0, 1.0 / weight.shape[-1] ** 0.5)
