"""A served reward model as a TRL reward function (GRPOTrainer, RLOOTrainer), applying its own chat template.

    from templar.integrations.trl import TemplarReward
    trainer = GRPOTrainer(model=..., reward_funcs=[TemplarReward("rm_llama3", url="127.0.0.1:8001")], ...)
    TemplarReward("rm_llama3", url="rm.example:8001", tls=True, tls_ca="ca.pem", request_timeout_s=30)  # over TLS

`aggregate` ("min", "last", "mean") is how a process RM's step scores become the reward (unset: the aggregate it was
exported with, its SCORE). Keyword arguments beyond `on_failure` and `aggregate` are the reward client's options,
named as templar.reward_client's RewardClientConfig fields (`url` is its endpoints: "host:port[,host:port...]" or a
list).

TRL calls `reward(prompts=..., completions=..., **columns)`. Conversational data gives each prompt as a list of
messages and each completion as `[{"role": "assistant", "content": ...}]`; standard data gives strings (a prompt
string becomes one user message, a completion string the assistant turn). Nothing is templated here: the messages
go to Triton as they are, and the RM's preprocessing model applies the RM's template. A row the RM cannot score is
returned as None, which TRL reads as "no reward" (NaN, left out of the group's baseline), and counted in the metric
`templar/<model>/failed_rows`; with `on_failure="raise"` the call raises instead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from templar import client_options
from templar.conversation import Messages
from templar.errors import ConfigError, DataError, ServingError
from templar.reward_client import RewardClient
from templar.steps import check_aggregate
from templar.wire import DEFAULT_URL

log = logging.getLogger("templar.integrations")


def trl_conversation(prompt: Any, completion: Any) -> Messages:
    """One TRL row as messages: prompt messages (or a string as one user turn) + the completion as assistant."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if isinstance(completion, str):
        return [*messages, {"role": "assistant", "content": completion}]
    turns = [dict(m) for m in completion]
    if not turns or turns[-1].get("role") != "assistant":
        raise DataError(f"a completion must end with an assistant message, got {completion!r:.120}")
    return [*messages, *turns]


class TemplarReward:
    """A TRL reward function scoring with the served RM `model` (see the module docstring)."""

    def __init__(self, model: str, url: str | Sequence[str] = DEFAULT_URL, *, on_failure: str = "none",
                 aggregate: str | None = None, **options: Any) -> None:
        if on_failure not in ("none", "raise"):
            raise ConfigError(f"on_failure must be 'none' (TRL's no-reward) or 'raise', got {on_failure!r}")
        self.aggregate = check_aggregate(aggregate, f"TemplarReward({model!r}): aggregate")
        given = options if "endpoints" in options else {"url": url, **options}
        config = client_options.from_keywords(given, f"TemplarReward({model!r})")
        self.client = RewardClient(dataclasses.replace(config, model=model))
        self.model, self.on_failure = model, on_failure
        self.__name__ = f"templar_{model}"  # TRL names each reward function's metrics after it

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        conversations = [trl_conversation(p, c) for p, c in zip(prompts, completions)]
        result = self.client.score(conversations).with_aggregate(self.aggregate)
        failed = [i for i, ok in enumerate(result.ok) if not ok]
        if failed:
            shown = "; ".join(f"row {i}: {result.status[i]}" for i in failed[:3])
            if self.on_failure == "raise":
                raise ServingError(f"{self.model}: {len(failed)} of {len(conversations)} rows not scored: {shown}")
            log.warning("%s: %d of %d rows not scored (no reward for them): %s", self.model, len(failed),
                        len(conversations), shown)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric(f"templar/{self.model}/failed_rows", float(len(failed)))
        return [float(s) if ok else None for s, ok in zip(result.scores, result.ok)]

    def close(self) -> None:
        self.client.close()
