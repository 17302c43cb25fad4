"""Rewards from several RMs at once, each applying its own template inside Triton.

The trainer builds structured conversations (prompt messages + the response as an assistant turn, never text
templated for the actor), asks every RM in parallel, and combines: sum(weight * score) (the ensemble's one
combination, templar.reward_ensemble), with optional per-RM running normalisation as its per-model transform, less
the penalty for responses that never ended. A row that any RM could not score after its retries is marked invalid
(masked out of the update, counted in `failed_rows`, written to OUTPUT_DIR/unscored.rank<r>.jsonl so the rollout is
not lost) — never a silent zero.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from templar import contract
from templar.chat_format import ChatFormat
from templar.conversation import Conversation, Messages
from templar.reward_client import RewardResult
from templar.reward_ensemble import RewardEnsemble, WeightedModel
from templar.steps import step_end_tokens
from templar.trainer.config import RewardConfig

log = logging.getLogger("templar.trainer")


def reward_conversations(prompts: list[Messages], responses: list[str]) -> list[dict]:
    return [{"messages": list(prompt) + [{"role": "assistant", "content": text}]}
            for prompt, text in zip(prompts, responses)]


def step_rewards(tokenizer, response_ids, response_mask, ended, per_rm: dict[str, RewardResult],
                 weights: dict[str, float]) -> np.ndarray:
    """[B, Lr] the process RMs' step scores on the actor's response tokens: weight * each step's score on the token
    whose text ends that step (templar.steps.step_end_tokens, on the very ids the response text was decoded from),
    0 elsewhere and on rows a PRM did not score. The PRM cut the text it was sent; its STEP_ENDS are character
    offsets in that text, so whose tokenizer the PRM uses never matters here."""
    dense = np.zeros(tuple(response_ids.shape), dtype=np.float32)
    for name, weight in weights.items():
        result = per_rm[name]
        for i, (scores, ends) in enumerate(zip(result.step_scores or [], result.step_ends or [])):
            if not contract.is_ok(result.status[i]) or len(scores) == 0:
                continue
            kept = text_ids(response_ids[i], response_mask[i], ended[i])
            for token, score in zip(step_end_tokens(tokenizer, kept, ends), scores):
                dense[i, token] += weight * float(score)
    return dense


def text_ids(response_ids, response_mask, ended) -> list[int]:
    """The ids one response's text was decoded from: its tokens without padding and the stop token
    (templar.trainer.actor.decode_responses)."""
    kept = response_ids[response_mask.bool()].tolist()
    return kept[:-1] if bool(ended) else kept


def actor_text_rows(conversations: list[dict], actor_chat: ChatFormat) -> list[dict]:
    """The single-template way (reward.rm_input: actor_text): each conversation rendered once with the ACTOR's
    template and sent as text, so every RM reads a format it was not trained on. Only to measure what that costs."""
    return [{"text": actor_chat.render(Conversation(c["messages"]))} for c in conversations]


class RunningMoments:
    """Mean and variance over every score seen so far (Chan et al. parallel update), for per-RM normalisation."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, count: float, total: float, total_sq: float) -> None:
        if count == 0:
            return
        batch_mean = total / count
        batch_m2 = total_sq - count * batch_mean**2
        delta = batch_mean - self.mean
        new_count = self.count + count
        self.mean += delta * count / new_count
        self.m2 += batch_m2 + delta**2 * self.count * count / new_count
        self.count = new_count

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.count)) if self.count > 1 else 1.0

    def normalize(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / max(self.std, 1e-6)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


@dataclass
class RewardBatch:
    scores: np.ndarray  # [B] combined (weights, normalisation, unfinished penalty); NaN where invalid
    valid: np.ndarray  # [B] bool: every RM scored the row
    per_rm: dict[str, RewardResult]
    latency_s: float  # slowest RM's wall time


class RewardModels:
    """The configured RMs (a RewardEnsemble); `submit` starts them all, `collect` waits and combines with the
    trainer's extras: per-RM running normalisation and the penalty for unfinished responses."""

    def __init__(self, config: RewardConfig, endpoints: list[str],
                 allreduce_sum: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> None:
        self.config = config
        self.allreduce_sum = allreduce_sum  # sums normaliser statistics over ranks, so every rank agrees
        options = dataclasses.replace(config.client, endpoints=list(endpoints))  # reward.client, at reward.url
        self.ensemble = RewardEnsemble([WeightedModel(rm.name, rm.weight) for rm in config.models], options)
        self.normalizers = {rm.name: RunningMoments() for rm in config.models if rm.normalize}
        self.versions: dict[str, list[dict]] = {rm.name: [] for rm in config.models}  # [{"version", "from_step"}]

    def connect(self) -> dict[str, dict[str, str]]:
        return self.ensemble.connect()

    def submit(self, conversations: list[dict]) -> dict:
        return self.ensemble.submit(conversations)

    def collect(self, pending: dict, ended: np.ndarray) -> RewardBatch:
        results: dict[str, RewardResult] = {name: future.result() for name, future in pending.items()}
        scored = self.ensemble.combine(results, transform=self._normalize)
        combined = scored.combined  # sum(weight * score), NaN where some RM did not score the row
        combined -= self.config.unfinished_penalty * (~ended)
        return RewardBatch(combined, scored.valid, results, scored.latency_s)

    def _normalize(self, name: str, scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The ensemble's per-model transform: an RM with `normalize` set is scaled by its running mean and std,
        which see only the rows every RM scored (summed over ranks)."""
        if name not in self.normalizers:
            return scores
        good = scores[valid]
        stats = self.allreduce_sum(np.array([len(good), good.sum(), (good**2).sum()], dtype=np.float64))
        self.normalizers[name].update(*stats)
        return self.normalizers[name].normalize(scores)

    def note_versions(self, step: int, batch: RewardBatch) -> dict[str, float]:
        """Record at which step each RM's rewards began coming from a new version (a hot swap); returns the
        `rm_version/<name>` metrics (the newest version that scored rows of this step)."""
        metrics = {}
        for name, result in batch.per_rm.items():
            version = result.newest_version
            if version is None:
                continue
            seen = self.versions[name]
            if not seen or seen[-1]["version"] != version:
                seen.append({"version": version, "from_step": step})
                if len(seen) > 1:
                    log.warning("step %d: rewards of %s now come from version %s (was %s)", step, name, version,
                                seen[-2]["version"])
            if version.isdigit():
                metrics[f"rm_version/{name}"] = int(version)
        return metrics

    def state_dict(self) -> dict:
        return {name: moments.state_dict() for name, moments in self.normalizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, moments in state.items():
            self.normalizers[name].load_state_dict(moments)

    def close(self) -> None:
        self.ensemble.close()


def record_unscored(path: Path, step: int, conversations: list[dict], batch: RewardBatch) -> int:
    """Append the rows some RM could not score (with why), so failed rollouts can be re-scored later."""
    rows = np.flatnonzero(~batch.valid)
    if len(rows) == 0:
        return 0
    with open(path, "a", encoding="utf-8") as f:
        for i in rows:
            errors = {name: r.status[i] for name, r in batch.per_rm.items() if not contract.is_ok(r.status[i])}
            f.write(json.dumps({"step": step, "errors": errors, **conversations[i]}, ensure_ascii=False) + "\n")
    return len(rows)
