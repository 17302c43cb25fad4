"""Training configuration: typed dataclasses with documented defaults, loaded from YAML plus `key=value` overrides.

`templar train --config FILE.yaml ppo.actor_lr=3e-4 reward.models.0.weight=0.5` — every key of the YAML file is a
field below (nested with dots, list items by index); unknown keys and wrong types are errors that say which key.
Model sources are folders, or `tiny:<family>`: a small randomly initialised model on that family's REAL tokenizer and
chat template (built into OUTPUT_DIR/models/ on first use), since no model hub is reachable.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from templar import wire
from templar.errors import ConfigError
from templar.reward_client import RewardClientConfig

__all__ = ["ConfigError", "TrainConfig", "load_config", "load_dataclass", "to_dict"]  # ConfigError: re-exported
T = TypeVar("T")


@dataclass
class ModelsConfig:
    actor: str = "tiny:qwen2_5"  # causal-LM folder (with tokenizer + chat template) or tiny:<family>
    critic: str = "actor"  # "actor" = initialise from the actor's weights; or a folder on the ACTOR's tokenizer
    actor_chat_template: str | None = None  # Jinja file overriding the actor folder's template
    max_prompt_tokens: int = 256  # longer prompts are cut from the start (a leading BOS is kept)


@dataclass
class DataConfig:
    # JSONL, Parquet, or a Hugging Face datasets folder; None = the built-in prompts; "builtin:topic-questions" =
    # the questions of the built-in preference set (trainer/preferences.py)
    path: str | None = None
    split: str = "train"  # for dataset folders that hold several splits
    shuffle: bool = True  # reshuffled every epoch, from the run's seed
    rule: str | None = None  # "kind_and_polite": log the share of responses keeping that rule (`rule_satisfied`)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32  # response tokens at most; a response that reaches it unfinished is penalised
    temperature: float = 1.0  # sampling temperature; log-probs for PPO use logits / temperature as well
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens whose probability reaches top_p
    samples_per_prompt: int = 1  # n responses per prompt (a group, for grpo / dr_grpo / rloo); rows = prompts x n


@dataclass
class RewardModelConfig:
    name: str = ""  # the RM's model name in Triton
    path: str | None = None  # RM folder or tiny:<family>; exported into reward.repo when missing there
    weight: float = 1.0  # combined score = sum(weight * score)
    normalize: bool = False  # normalise this RM's scores with running mean/std before weighting
    max_length: int = 1024  # export: token limit of this RM
    # "rm": one score per conversation. "prm": a process RM (docs/process-rms.md): with a per-token estimator (gae,
    # reinforce_pp) weight * each step's score lands on the actor token that ends the step; the group estimators
    # (grpo, dr_grpo, rloo) take its aggregate (SCORE) like any RM's score
    kind: str = "rm"
    prm_preset: str = "qwen-prm"  # kind prm with a `path`: the step format it is exported with (templar.steps)
    # kind prm: where a response is cut into steps (None: the preset's; tiny-prm:<family> is trained on sentences,
    # ". ", and gets that)
    step_separator: str | None = None
    trust_remote_code: bool = False  # export: run the model code shipped in `path` (Qwen2.5-Math-PRM ships its own)


@dataclass
class TrainerClientConfig(RewardClientConfig):
    """The reward client's options (templar.reward_client.RewardClientConfig: the same keys, meanings and checks as
    every command's client flags) with the trainer's own defaults below. Each RM's name comes from reward.models and
    the endpoints from reward.url, so `model`, `endpoints` and `expected_fingerprints` are not set here."""

    model: str = ""  # not set here: each RM's name is reward.models.N.name
    endpoints: list[str] = field(default_factory=list)  # not set here: the trainer's endpoints are reward.url
    rows_per_request: int = 16  # conversations per gRPC request: a rollout batch goes out as several requests
    max_in_flight: int = 4  # concurrent requests per RM over all endpoints
    # attempts per request, with backoff (~20 s in all at 10): enough to wait out a restart of the embedded server
    # (7-9 s measured); a row that still fails is masked out of the update and counted in failed_rows
    max_attempts: int = 10
    expected_fingerprints: dict[str, str] = field(default_factory=dict)  # not set here: each RM has its own


@dataclass
class RewardConfig:
    # "host:port[,host:port...]" of running Tritons, or "dns:///name:port" for every replica behind a name (looked up
    # again every reward.client.dns_refresh_s); None = embedded server, started here
    url: str | None = None
    repo: str = "model_repository"  # embedded: the repository to export into and serve
    models: list[RewardModelConfig] = field(default_factory=list)
    unfinished_penalty: float = 1.0  # subtracted from the score of a response that never produced EOS
    # what the RMs receive: "messages" (each RM applies its own template: Templar's way) or "actor_text" (prompt and
    # response rendered once with the ACTOR's template and sent as text, as single-template frameworks do; only to
    # measure what that costs)
    rm_input: str = "messages"
    # how the trainer asks the RMs: TLS, deadlines, retries, request sizes (the reward client's options)
    client: TrainerClientConfig = field(default_factory=TrainerClientConfig)

    def validate(self) -> None:
        """reward.url parses; reward.client holds only what the trainer takes, and usable values."""
        if self.url is not None:
            wire.parse_endpoints(self.url, "reward.url")
        set_elsewhere = {"model": "each RM's name is reward.models.N.name",
                         "endpoints": "the trainer's endpoints are reward.url",
                         "expected_fingerprints": "each RM has its own (the run logs them in reward_models.json)"}
        for key, why in set_elsewhere.items():
            if getattr(self.client, key):
                raise ConfigError(f"reward.client.{key} is not set in the trainer's config: {why}")
        if self.client.tls and not self.url:
            raise ConfigError("reward.client.tls needs reward.url: the embedded server the trainer starts when "
                              "reward.url is unset speaks plaintext on loopback")
        self.client.check("reward.client", target=False)


RM_INPUTS = ("messages", "actor_text")


@dataclass
class PPOConfig:
    # gae (with a critic) | grpo | dr_grpo | rloo | reinforce_pp (critic-free): see trainer/estimators.py
    advantage_estimator: str = "gae"
    rollout_batch_size: int = 16  # prompts per rank per step (each answered generation.samples_per_prompt times)
    mini_batch_size: int = 8  # rows (responses) per optimizer step
    micro_batch_size: int = 4  # rows per forward/backward; gradient accumulation = mini / micro
    ppo_epochs: int = 4  # passes over each rollout batch
    actor_lr: float = 1e-5  # AdamW learning rate of the actor
    critic_lr: float = 1e-5  # ... and of the critic (gae only)
    clip_range: float = 0.2  # policy ratio clip
    clip_range_value: float = 0.2  # value clip around the rollout's values
    gamma: float = 1.0  # discount per token (1: the score counts fully at every token)
    lam: float = 0.95  # GAE's lambda: bias (0) vs variance (1) of the advantage
    kl_coef: float = 0.05  # weight of the KL to the reference model
    kl_estimator: str = "k1"  # k1 | k2 | k3 (Schulman's estimators of KL(pi || pi_ref) per token)
    kl_in: str = "reward"  # reward: -kl_coef * KL per token in the reward | loss: + kl_coef * KL in the policy loss
    adaptive_kl: bool = False  # Ziegler et al. controller: move kl_coef towards target_kl
    target_kl: float = 6.0  # adaptive_kl: the KL per response it steers towards
    kl_horizon: int = 10000  # adaptive_kl: rows over which kl_coef moves by at most ~x1.2
    whiten_rewards: bool = False  # normalise per-token rewards (std over the batch's tokens) before GAE
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 over the batch's response tokens
    max_grad_norm: float = 1.0  # gradient clipping


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # 0-3 (a single rank without offload runs 0: there is nothing to partition over)
    offload: bool = False  # ZeRO-Offload: optimizer states (and parameters at stage 3) in CPU memory
    bf16: bool = False  # bfloat16 training (DeepSpeed's bf16 mode; CPUs without bf16 in hardware run it slowly)


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"  # metrics.jsonl, samples.jsonl, train.log, checkpoints/, final/
    steps: int = 100  # PPO steps (each: generate, score, update)
    save_every: int = 20  # checkpoint every N steps (and at the end)
    seed: int = 0  # everything random (data order, sampling, tiny models) follows from it
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self) -> TrainConfig:
        p = self.ppo
        self._validate_estimator()
        rows = p.rollout_batch_size * self.generation.samples_per_prompt
        if p.mini_batch_size % p.micro_batch_size or rows % p.mini_batch_size:
            raise ConfigError("ppo: rollout_batch_size x generation.samples_per_prompt must be a multiple of "
                              "mini_batch_size, and mini_batch_size of micro_batch_size (got "
                              f"{p.rollout_batch_size} x {self.generation.samples_per_prompt}, {p.mini_batch_size}, "
                              f"{p.micro_batch_size})")
        if not self.reward.models:
            raise ConfigError("reward.models is empty: name at least one reward model")
        names = [m.name for m in self.reward.models]
        if "" in names or len(set(names)) != len(names):
            raise ConfigError(f"reward.models need distinct, non-empty names (got {names})")
        for i, rm in enumerate(self.reward.models):
            if rm.kind not in ("rm", "prm"):
                raise ConfigError(f"reward.models.{i}.kind must be rm or prm, got {rm.kind!r}")
            if rm.kind == "prm" and rm.normalize:
                raise ConfigError(f"reward.models.{i}: a process RM's step scores are not normalised (normalize: "
                                  "false)")
            if (rm.path or "").startswith("tiny-prm:") and rm.prm_preset != "qwen-prm":
                raise ConfigError(f"reward.models.{i}: {rm.path} is trained in the qwen-prm step format, not "
                                  f"{rm.prm_preset!r} (prm_preset: qwen-prm)")
        if self.deepspeed.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0-3, got {self.deepspeed.zero_stage}")
        from templar.trainer.preferences import RULES

        if self.data.rule is not None and self.data.rule not in RULES:
            raise ConfigError(f"data.rule must be one of {', '.join(RULES)}; got {self.data.rule!r}")
        if self.generation.temperature <= 0:
            raise ConfigError("generation.temperature must be > 0")
        if self.reward.rm_input not in RM_INPUTS:
            raise ConfigError(f"reward.rm_input must be one of {', '.join(RM_INPUTS)}; got {self.reward.rm_input!r}")
        self.reward.validate()
        return self

    def _validate_estimator(self) -> None:
        from templar.trainer.estimators import ESTIMATORS
        from templar.trainer.ppo import KL_ESTIMATORS

        p, n = self.ppo, self.generation.samples_per_prompt
        choices = {"ppo.advantage_estimator": (p.advantage_estimator, ESTIMATORS),
                   "ppo.kl_estimator": (p.kl_estimator, KL_ESTIMATORS), "ppo.kl_in": (p.kl_in, ("reward", "loss"))}
        for key, (value, known) in choices.items():
            if value not in known:
                raise ConfigError(f"{key} must be one of {', '.join(known)}; got {value!r}")
        estimator = ESTIMATORS[p.advantage_estimator]
        if n < 1:
            raise ConfigError(f"generation.samples_per_prompt must be >= 1, got {n}")
        if n < estimator.min_group_size:
            raise ConfigError(f"ppo.advantage_estimator {estimator.name} compares responses to the same prompt: set "
                              f"generation.samples_per_prompt to {estimator.min_group_size} or more (got {n})")
        if not estimator.needs_critic and self.models.critic != "actor":
            raise ConfigError(f"models.critic is set, but ppo.advantage_estimator {estimator.name} trains no critic")


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass `cls` from plain data, checking keys and types."""
    if dataclasses.is_dataclass(cls):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in data.items():
            if key not in names:
                raise ConfigError(_unknown_key(cls, hints, key, where))
            kwargs[key] = _build(hints[key], value, f"{where}.{key}" if where else key)
        return cls(**kwargs)
    origin = typing.get_origin(cls)
    if origin is dict:
        _, value_type = typing.get_args(cls)
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise ConfigError(f"{where} must be a mapping of names to values, got {data!r}")
        return {k: _build(value_type, v, f"{where}.{k}") for k, v in data.items()}
    if origin is list:
        (item,) = typing.get_args(cls)
        if not isinstance(data, list):
            raise ConfigError(f"{where} must be a list, got {type(data).__name__}")
        return [_build(item, v, f"{where}.{i}") for i, v in enumerate(data)]
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(cls)
        if data is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                return _build(option, data, where)
    if cls is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if cls is float and isinstance(data, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
        try:
            return float(data)
        except ValueError:
            pass
    if cls in (int, float, str, bool) and not (isinstance(data, cls) and not (cls is int and isinstance(data, bool))):
        raise ConfigError(f"{where} must be {cls.__name__}, got {data!r}")
    return data


def _unknown_key(cls: type, hints: dict[str, Any], key: str, where: str) -> str:
    """The error of a key `cls` does not have: where it went when a section below holds it (the reward client's
    options moved from reward.* to reward.client.*), else the closest name, else every name."""
    prefix = f"{where}." if where else ""
    names = [f.name for f in dataclasses.fields(cls)]
    holders = [name for name in names if dataclasses.is_dataclass(hints[name])
               and key in {f.name for f in dataclasses.fields(hints[name])}]
    if holders:
        return f"unknown key {prefix}{key}: it sits under {prefix}{holders[0]} now; set {prefix}{holders[0]}.{key}"
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(names)}"
    return f"unknown key {prefix}{key}{hint}"


def _set(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists, creating what is missing (list items by index)."""
    keys = dotted.split(".")
    node: Any = tree
    for key, following in zip(keys, keys[1:] + [None]):
        fresh = None if following is None else ([] if following.isdigit() else {})
        if isinstance(node, list):
            if not key.isdigit():
                raise ConfigError(f"cannot set {dotted}: {key!r} is not a list index")
            index = int(key)
            node.extend([None] * (index + 1 - len(node)))
            if following is None:
                node[index] = value
            elif node[index] is None:
                node[index] = fresh
            node = node[index]
        elif isinstance(node, dict):
            if following is None:
                node[key] = value
            elif node.get(key) is None:
                node[key] = fresh
            node = node[key]
        else:
            raise ConfigError(f"cannot set {dotted}: the part before {key!r} is a value, not a mapping or list")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (optional) + `key.sub=value` overrides (values parsed as YAML) -> a validated TrainConfig."""
    return load_dataclass(TrainConfig, path, overrides)


def load_dataclass(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """The same for any config dataclass with a validate() method (e.g. `templar train-rm`'s)."""
    tree: dict = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw  # not YAML: the text itself (the type check below says if it does not fit)
        _set(tree, key.strip(), value)
    return _build(cls, tree, "").validate()


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
