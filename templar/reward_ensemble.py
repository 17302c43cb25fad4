"""Several served reward models asked at once about the same conversations, their scores combined as
sum(weight * score), the one place that combination is computed (the integrations and the trainer call `combine`;
the trainer passes a per-model `transform`, its running normalisation). A row is valid only when every RM scored it;
an invalid row's combined score is NaN and its status says which RM failed and why."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from templar import contract
from templar.errors import ConfigError
from templar.reward_client import RewardClient, RewardClientConfig, RewardResult

# (model name, its scores as float64, which rows every RM scored) -> the scores to weight; e.g. the trainer's
# running normalisation, which must see only the valid rows
Transform = Callable[[str, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class WeightedModel:
    name: str  # the RM's name in Triton
    weight: float = 1.0  # its share of the combined score: sum(weight * score)

    @classmethod
    def parse(cls, text: str) -> WeightedModel:
        """`NAME` or `NAME:WEIGHT`."""
        name, _, weight = text.strip().partition(":")
        if not name:
            raise ConfigError(f"a reward model is NAME or NAME:WEIGHT, got {text!r}")
        try:
            return cls(name, float(weight) if weight else 1.0)
        except ValueError:
            raise ConfigError(f"the weight of {name!r} must be a number, got {weight!r}") from None

    @classmethod
    def parse_list(cls, text: str | Sequence[str]) -> list[WeightedModel]:
        """`"rm_a:1, rm_b:0.5"` (or a list of such texts) -> the models, in order."""
        items = [text] if isinstance(text, str) else list(text)
        return [cls.parse(part) for item in items for part in str(item).split(",") if part.strip()]


@dataclass
class EnsembleResult:
    combined: np.ndarray  # [N] float64, sum(weight * score); NaN where a row is invalid
    valid: np.ndarray  # [N] bool: every RM scored the row
    per_rm: dict[str, RewardResult]
    errors: list[str | None] = field(default_factory=list)  # per row: "rm_x: error: ..." or None

    @property
    def latency_s(self) -> float:
        return max((r.latency_s for r in self.per_rm.values()), default=0.0)

    def rows(self, part: slice) -> EnsembleResult:
        """The result of a run of rows (a request's share of a batch scored together), the RM versions included."""
        per_rm = {name: r.rows(part) for name, r in self.per_rm.items()}
        return EnsembleResult(self.combined[part], self.valid[part], per_rm, self.errors[part])


class RewardEnsemble:
    """One RewardClient per model, each with `options` (a RewardClientConfig: endpoints, TLS, deadlines, retries)
    under its own name; `submit` starts them all (from any thread), `score` waits."""

    def __init__(self, models: Sequence[WeightedModel], options: RewardClientConfig | None = None) -> None:
        if not models:
            raise ConfigError("no reward model given: name at least one")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward models need distinct names, got {names}")
        options = options or RewardClientConfig()
        if options.model:
            raise ConfigError(f"the ensemble names its models ({', '.join(names)}): leave the options' model empty, "
                              f"got {options.model!r}")
        self.models = list(models)
        self.options = options
        self.clients = {m.name: RewardClient(dataclasses.replace(options, model=m.name)) for m in models}

    def connect(self) -> dict[str, dict[str, str]]:
        """Each RM's fingerprints (raises when an RM is not served). The RMs are waited for together: a server still
        starting (or down) costs one connect_timeout_s, not one per RM."""
        with concurrent.futures.ThreadPoolExecutor(len(self.clients)) as pool:
            waits = {name: pool.submit(client.connect) for name, client in self.clients.items()}
            return {name: wait.result() for name, wait in waits.items()}

    def submit(self, conversations: Sequence[Any]) -> dict[str, concurrent.futures.Future]:
        return {name: client.submit(conversations) for name, client in self.clients.items()}

    def combine(self, results: dict[str, RewardResult], transform: Transform | None = None) -> EnsembleResult:
        """sum(weight * score) over the RMs, each RM's scores first passed through `transform` when given; NaN
        where a row is invalid (some RM did not score it)."""
        n = len(next(iter(results.values())).status)
        valid = np.ones(n, dtype=bool)
        for result in results.values():
            valid &= result.ok
        combined = np.zeros(n, dtype=np.float64)
        for model in self.models:
            scores = results[model.name].scores.astype(np.float64)
            if transform is not None:
                scores = transform(model.name, scores, valid)
            combined += model.weight * scores
        combined[~valid] = np.nan
        errors = [None if valid[i] else "; ".join(f"{name}: {r.status[i]}" for name, r in results.items()
                                                  if not contract.is_ok(r.status[i])) for i in range(n)]
        return EnsembleResult(combined, valid, results, errors)

    def score(self, conversations: Sequence[Any], aggregate: str | None = None) -> EnsembleResult:
        """Every RM's scores and their combination; `aggregate` ("min", "last", "mean") recomputes a process RM's
        score from its steps (None: the aggregate it was exported with)."""
        pending = self.submit(conversations)
        return self.combine({name: future.result().with_aggregate(aggregate) for name, future in pending.items()})

    async def score_async(self, conversations: Sequence[Any], aggregate: str | None = None) -> EnsembleResult:
        """From another event loop (a web server's): the clients run in their own loop thread."""
        pending = self.submit(conversations)
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in pending.values()))
        return self.combine({name: r.with_aggregate(aggregate) for name, r in zip(pending, results)})

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
