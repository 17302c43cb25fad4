"""The three models PPO needs, built from Hugging Face folders: actor (causal LM), frozen reference (a copy of the
actor's initial weights) and critic (the actor's backbone with a per-token value head, on the ACTOR's tokenizer)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from templar.fingerprints import fingerprint_tokenizer_dir
from templar.errors import ConfigError

log = logging.getLogger("templar.trainer")


def _without_dropout(config) -> None:
    """Dropout off everywhere (PPO's ratio must compare the same function twice)."""
    for key in list(vars(config)):
        if "dropout" in key and isinstance(getattr(config, key), float):
            setattr(config, key, 0.0)


def disable_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def load_actor(path: str | Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    _without_dropout(config)
    model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=torch.float32,
                                                 local_files_only=True)
    model.config.use_cache = True
    return disable_dropout(model)


def load_reference(path: str | Path) -> nn.Module:
    model = load_actor(path).eval()
    model.requires_grad_(False)
    return model


def check_critic_tokenizer(critic_path: str | Path, actor_path: str | Path) -> None:
    """A separate critic must read the actor's tokens: the same tokenizer files (by fingerprint)."""
    try:
        same = fingerprint_tokenizer_dir(critic_path) == fingerprint_tokenizer_dir(actor_path)
    except FileNotFoundError:
        same = False
    if not same:
        raise ConfigError(f"models.critic {critic_path} does not use the actor's tokenizer; the critic must score the "
                          "actor's tokens (initialise it from the actor with models.critic=actor)")


def load_critic(source: str, actor_path: str | Path) -> nn.Module:
    """`source` "actor": the actor's backbone + a zero-initialised value head; else a folder with a critic that uses
    the actor's tokenizer (a foreign-vocabulary model, such as an RM on another family, is refused)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    path = Path(actor_path) if source == "actor" else Path(source)
    if source != "actor":
        check_critic_tokenizer(path, actor_path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, num_labels=1)
    _without_dropout(config)
    critic = AutoModelForTokenClassification.from_pretrained(str(path), config=config, dtype=torch.float32,
                                                             local_files_only=True)
    if source == "actor":
        head = critic.score if hasattr(critic, "score") else critic.classifier
        nn.init.zeros_(head.weight)  # V = 0 at the start: no random value estimates steering the first updates
        if getattr(head, "bias", None) is not None:
            nn.init.zeros_(head.bias)
    return disable_dropout(critic)
