"""OpenRLHF's remote-reward protocol on Templar, shared by `templar gateway` (HTTP) and the in-process reward
function file (`openrlhf_reward_func.py`).

A request holds rows of `query` (prompt + response rendered with the ACTOR's chat template, decoded with special
tokens kept), `prompts` (the rendered prompt) and `labels` (a dataset column). Each row becomes structured messages:
from the label when it carries them (the exact path: a JSON object with "messages", or a message list), otherwise by
parsing the prompt with the actor's template (templar.template_parser); the response is what follows the prompt, its
end-of-turn and padding tokens removed. Every configured RM then scores the conversation with ITS OWN template.

The answer is OpenRLHF's: `rewards` (sum of weight * score; a process RM's score is the aggregate of its steps),
`scores` (the same values) and `extra_logs` (lists OpenRLHF logs: each RM's score, a process RM's steps as
`templar/<rm>/num_steps`, `min_step`, `last_step`, and `templar/failed`, 1 for a row that could not be parsed or
scored). A failed row
is never a silent 0: with `failed_reward` set it gets that value and the flag; without, the whole request fails with
the reason of every failed row (HTTP 422 for rows that cannot be parsed, 503 when the reward server cannot score).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from templar.conversation import ConversationError, Messages, validate_messages
from templar.errors import DataError, RowsFailed
from templar.reward_client import unreached
from templar.reward_ensemble import EnsembleResult
from templar.template_parser import TemplateParser, parse_label_messages

log = logging.getLogger("templar.integrations")
FAILED_KEY = "templar/failed"


@dataclass
class Rows:
    conversations: list[Messages | None]  # None where the row could not be turned into messages
    errors: list[str | None]


def request_rows(body: Any) -> tuple[list[str], list[str | None], list[Any]]:
    """(queries, prompts, labels) of an OpenRLHF request body; a DataError says what is malformed."""
    if not isinstance(body, dict):
        raise DataError('the body must be a JSON object {"query": [...], "prompts": [...], "labels": [...]}')
    queries = body.get("query")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise DataError('"query" must be a list of strings')
    prompts = body.get("prompts") or [None] * len(queries)
    labels = body.get("labels") or [None] * len(queries)
    if not isinstance(prompts, list) or len(prompts) != len(queries) or \
            not all(p is None or isinstance(p, str) for p in prompts):
        raise DataError(f'"prompts" must be a list of {len(queries)} strings, one per query')
    if not isinstance(labels, list) or len(labels) != len(queries):
        raise DataError(f'"labels" must be a list of {len(queries)} values, one per query')
    return queries, prompts, labels


def _step_logs(name: str, scored, index: list[int], n: int) -> dict[str, list[float]]:
    """A process RM's steps as per-row numbers OpenRLHF logs (one value per row under each key, as every extra_logs
    entry is): how many steps, the weakest and the last step's score (NaN, then failed_reward, where not scored)."""
    if scored.step_scores is None:
        return {}
    logs = {f"templar/{name}/{key}": [math.nan] * n for key in ("num_steps", "min_step", "last_step")}
    for position, i in enumerate(index):
        steps = scored.step_scores[position]
        if len(steps):
            logs[f"templar/{name}/num_steps"][i] = float(len(steps))
            logs[f"templar/{name}/min_step"][i] = float(min(steps))
            logs[f"templar/{name}/last_step"][i] = float(steps[-1])
    return logs


class OpenRLHFRewards:
    def __init__(self, parser: TemplateParser, failed_reward: float | None = None) -> None:
        self.parser = parser
        self.failed_reward = failed_reward

    def rows(self, queries: Sequence[str], prompts: Sequence[str | None], labels: Sequence[Any]) -> Rows:
        conversations: list[Messages | None] = []
        errors: list[str | None] = []
        for query, prompt, label in zip(queries, prompts, labels):
            try:
                conversations.append(self.conversation(query, prompt, label))
                errors.append(None)
            except DataError as exc:
                conversations.append(None)
                errors.append(f"cannot read the row: {exc}")
        return Rows(conversations, errors)

    def conversation(self, query: str, prompt: str | None, label: Any) -> Messages:
        """Prompt messages (the label's, or parsed from the prompt) + the response as the assistant turn."""
        parsed = self.parser.parse_query(query, prompt)
        exact = parse_label_messages(label)
        if exact is None:
            return parsed.messages
        try:
            messages = validate_messages(exact, final_role=None)
        except ConversationError as exc:
            raise DataError(f"the label's messages are not a conversation: {exc}") from None
        return [*messages, {"role": "assistant", "content": parsed.response}]

    def answer(self, rows: Rows, result: EnsembleResult | None) -> dict:
        """OpenRLHF's response for rows scored as `result` (None when no row could be read)."""
        n = len(rows.conversations)
        errors = list(rows.errors)
        unreached_rows: set[int] = set()
        rewards = [math.nan] * n
        per_rm: dict[str, list[float]] = {}
        if result is not None:
            index = [i for i, c in enumerate(rows.conversations) if c is not None]
            for position, i in enumerate(index):
                if result.valid[position]:
                    rewards[i] = float(result.combined[position])
                    continue
                errors[i] = f"not scored: {result.errors[position]}"
                if any(unreached(r.status[position]) for r in result.per_rm.values()):
                    unreached_rows.add(i)
            for name, scored in result.per_rm.items():
                values = [math.nan] * n
                for position, i in enumerate(index):
                    values[i] = float(scored.scores[position])
                per_rm[f"templar/{name}"] = values
                per_rm.update(_step_logs(name, scored, index, n))
        failed = [i for i, e in enumerate(errors) if e is not None]
        if failed:
            self._handle_failures(failed, errors, retryable=set(failed) <= unreached_rows)
        fill = lambda values: [self.failed_reward if math.isnan(v) else v for v in values]  # noqa: E731
        extra = {name: fill(values) for name, values in per_rm.items()}
        extra[FAILED_KEY] = [float(e is not None) for e in errors]
        return {"rewards": fill(rewards), "scores": fill(rewards), "extra_logs": extra}

    def _handle_failures(self, failed: list[int], errors: list[str | None], *, retryable: bool) -> None:
        shown = "; ".join(f"row {i}: {errors[i]}" for i in failed[:5]) + (" ..." if len(failed) > 5 else "")
        if self.failed_reward is None:
            raise RowsFailed(f"{len(failed)} of {len(errors)} rows failed (no failed_reward is set): {shown}",
                             retryable=retryable)
        log.warning("%d of %d rows get failed_reward %s: %s", len(failed), len(errors), self.failed_reward, shown)
