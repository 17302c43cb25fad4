"""Served reward models as verl's `custom_reward_function`, each applying its own chat template.

verl hands a reward function the response decoded from token ids (`solution_str`), never the prompt; put the prompt's
messages in the dataset's `extra_info` column under "prompt" (verl datasets usually hold them in `prompt` already:
copy that column into `extra_info.prompt` when preparing the Parquet file). Then, in the trainer config:

    custom_reward_function.path=<this file>         # printed by `templar gateway --print-reward-func`
    custom_reward_function.name=compute_score       # or compute_score_batch with reward_model.reward_manager=batch
    custom_reward_function.reward_kwargs.model=rm_llama3         # or models=rm_llama3:1,rm_gemma3:0.5
    custom_reward_function.reward_kwargs.url=127.0.0.1:8001
    custom_reward_function.reward_kwargs.failed_reward=-1.0   # optional; unset: a row that cannot be scored raises
    custom_reward_function.reward_kwargs.aggregate=min        # optional: a process RM's steps -> score (min, last,
                                                              # mean; unset: the aggregate it was exported with)
    custom_reward_function.reward_kwargs.tls=true             # optional: the reward client's options, named as the
    custom_reward_function.reward_kwargs.tls_ca=/path/ca.pem  # fields of templar.reward_client.RewardClientConfig

Each row is scored as extra_info["prompt"] + [assistant: solution_str]. The result is verl's dict form: "score"
(sum of weight * score), each RM's score, and "templar_failed" (1.0 for a row that got failed_reward).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from templar import client_options
from templar.conversation import ConversationError, Messages, validate_messages
from templar.errors import ConfigError, DataError, ServingError
from templar.reward_ensemble import RewardEnsemble, WeightedModel
from templar.steps import check_aggregate
from templar.wire import DEFAULT_URL

_lock = threading.Lock()
_ensembles: dict[str, RewardEnsemble] = {}
log = logging.getLogger("templar.integrations")


def _ensemble(models: str | Sequence[str] | None, options: dict[str, Any]) -> RewardEnsemble:
    """One ensemble per (models, client options) per process, reused across calls. `options`: reward_kwargs named
    as the reward client's options (url, tls, tls_ca, request_timeout_s, ...); any other is left to verl."""
    if not models:
        raise ConfigError("name the served reward model(s) in reward_kwargs: model=NAME or models=NAME[:WEIGHT],...")
    weighted = WeightedModel.parse_list(models)
    ignored = sorted(set(options) - set(client_options.EVERY) - {"url"})
    known = {k: v for k, v in options.items() if k not in ignored}
    key = repr((weighted, sorted(known.items(), key=lambda item: item[0])))
    with _lock:
        if key not in _ensembles:
            if ignored:  # verl may pass keyword arguments of its own; say so once, in case one is a misspelt option
                log.warning("verl reward_kwargs not read by Templar: %s (the reward client's options are url, %s)",
                            ", ".join(ignored), ", ".join(n for n in client_options.EVERY if n != "endpoints"))
            _ensembles[key] = RewardEnsemble(weighted, client_options.from_keywords(known, "reward_kwargs"))
        return _ensembles[key]


def prompt_messages(extra_info: Any) -> Messages:
    """The prompt's messages from verl's extra_info (a list of messages, numpy arrays of them, or a string)."""
    prompt = (extra_info or {}).get("prompt") if hasattr(extra_info, "get") else None
    if prompt is None:
        raise DataError('extra_info has no "prompt": put the prompt messages in the dataset\'s extra_info column')
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    try:
        return validate_messages([dict(m) for m in list(prompt)], final_role=None)
    except (ConversationError, TypeError, ValueError) as exc:
        raise DataError(f'extra_info["prompt"] is not a list of messages: {exc}') from None


def compute_score_batch(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                        extra_infos: Sequence[Any], *, model: str | None = None,
                        models: str | Sequence[str] | None = None, url: str | Sequence[str] = DEFAULT_URL,
                        failed_reward: float | None = None, aggregate: str | None = None,
                        **options: Any) -> list[dict[str, float]]:
    """verl's batch form (reward_model.reward_manager=batch): one dict per row. `model` names one RM, `models`
    several as NAME[:WEIGHT],...; `aggregate` how a process RM's steps become its score; `url` and `options` are the
    reward client's (tls, tls_ca, request_timeout_s, ...)."""
    check_aggregate(aggregate, "reward_kwargs.aggregate")
    conversations: dict[int, Messages] = {}
    errors: dict[int, str] = {}
    for i, (extra, response) in enumerate(zip(extra_infos, solution_strs)):
        try:
            conversations[i] = [*prompt_messages(extra), {"role": "assistant", "content": response}]
        except DataError as exc:
            errors[i] = str(exc)
    ensemble = _ensemble(models or model, {"url": url, **options})
    result = ensemble.score(list(conversations.values()), aggregate) if conversations else None
    scored = {i: position for position, i in enumerate(conversations)}
    rows = []
    for i in range(len(solution_strs)):
        position = scored.get(i)
        if i not in errors and not result.valid[position]:
            errors[i] = result.errors[position]
        if i in errors and failed_reward is None:
            raise ServingError(f"row {i} cannot be scored (set reward_kwargs.failed_reward to go on): {errors[i]}")
        ok = i not in errors
        row = {"score": float(result.combined[position]) if ok else float(failed_reward),
               "templar_failed": float(not ok)}
        for model in ensemble.models:
            row[f"templar/{model.name}"] = float(result.per_rm[model.name].scores[position]) if ok else \
                float(failed_reward)
        rows.append(row)
    return rows


def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None, *,
                  model: str | None = None, models: str | Sequence[str] | None = None,
                  url: str | Sequence[str] = DEFAULT_URL, failed_reward: float | None = None,
                  aggregate: str | None = None, **options: Any) -> dict[str, float]:
    """verl's per-row form (the naive reward manager)."""
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info], model=model,
                               models=models, url=url, failed_reward=failed_reward, aggregate=aggregate,
                               **options)[0]
