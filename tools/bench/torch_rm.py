"""A reward model run the way today's RLHF frameworks run it in-process: Hugging Face torch modules, one padded
forward per batch of texts (left padding, as OpenRLHF's reward server pads).

It is the benchmark's baseline for (c) in-process torch and (d) the OpenRLHF-style HTTP server. A Hugging Face
`*ForSequenceClassification` runs its own forward (`model(**batch).logits`, the score where that class reads it: the
last token that is not its pad id; the reference every served score is checked against); a value-head RM, which has
no class of its own, runs the export tool's `RewardScorer` (OpenRLHF's reading). Float32 with PyTorch's
scaled-dot-product attention (Hugging Face's default), so scores are comparable with the served ones to 1e-4.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from templar.chat_format import ChatFormat
from templar.conversation import parse_conversation
from templar.export.scorer import load_reward_model
from templar.padding import position_ids


class TorchRewardModel:
    def __init__(self, model_dir: str | Path, *, max_length: int = 4096, template_kwargs: dict | None = None,
                 dtype: str = "float32") -> None:
        loaded = load_reward_model(model_dir)
        if dtype != "float32":  # e.g. bfloat16, OpenRLHF serve_rm's default: every weight in it, as it loads them
            loaded.scorer.to(getattr(torch, dtype))
        self.scorer, self.config, self.kind = loaded.scorer, loaded.config, loaded.kind
        self.classifier = loaded.classifier  # None for a value-head RM
        self.scorer.backbone.set_attn_implementation("sdpa")  # the export traces "eager"; frameworks run sdpa
        self.chat_format = ChatFormat.from_dir(model_dir, template_kwargs=template_kwargs)
        self.tokenizer = self.chat_format.tokenizer
        if self.tokenizer.pad_token is None:  # as OpenRLHF's get_tokenizer does
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # as OpenRLHF's reward server pads
        self.max_length = max_length

    def render(self, conversations: Sequence[Any]) -> list[str]:
        """The RM's own chat template applied to wire rows / dicts (what a client of serve_rm sends as text)."""
        return [self.chat_format.render(parse_conversation(c)) for c in conversations]

    @torch.inference_mode()
    def score_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """One padded forward per `batch_size` texts, in the order given (None: all texts in one batch)."""
        size = batch_size or len(texts)
        scores: list[np.ndarray] = []
        for start in range(0, len(texts), size):
            # The text already carries the template's special tokens: add none (a second BOS would change scores).
            batch = self.tokenizer(list(texts[start : start + size]), padding=True, truncation=True,
                                   max_length=self.max_length, add_special_tokens=False, return_tensors="pt")
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if self.classifier is not None:  # left padding: the class's last-non-pad reading finds each row's end
                logits = self.classifier(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
                scores.append(logits[:, 0].float().numpy())
            else:
                scores.append(self.scorer(ids, mask).reshape(-1).numpy())
        return np.concatenate(scores) if scores else np.zeros(0, np.float32)

    def score(self, conversations: Sequence[Any], batch_size: int | None = None) -> np.ndarray:
        return self.score_texts(self.render(conversations), batch_size)
