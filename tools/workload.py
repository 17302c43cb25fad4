"""Conversations for load tests and benchmarks: a built-in mix that looks like PPO rollouts, or a JSONL file.

The built-in mix takes the demo prompts (the trainer's built-in prompt set, some with a system turn or earlier turns)
and answers each with a response whose length follows a long-tailed distribution, as sampled responses do: most are
a few sentences, some run to several hundred words. Mixed lengths are the point: they are what makes padding
expensive for a server that batches rows in arrival order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from templar.conversation import ConversationError, parse_conversation
from templar.errors import WorkloadError
from templar.samples import sample_conversations
from templar.trainer.data import load_prompts


@dataclass
class MixOptions:
    """Shape of the built-in conversation mix (response lengths in words; ~1.3 tokens per word)."""

    median_response_words: int = 110
    sigma: float = 0.9  # log-normal spread of response lengths: long tail of long answers
    min_response_words: int = 4
    max_response_words: int = 700
    long_prompt_share: float = 0.15  # rows whose prompt carries a pasted document (summarise this ...)
    long_prompt_words: int = 250


def _word_pool() -> list[str]:
    """Words of the project's sample conversations (ASCII and non-ASCII), so the text is not one repeated token."""
    words: list[str] = []
    for messages in sample_conversations(long_words=60).values():
        for message in messages:
            words.extend(message["content"].split())
    return words


def conversation_mix(count: int, *, seed: int = 0, options: MixOptions | None = None) -> list[dict[str, Any]]:
    """`count` wire rows {"messages": [...]} with mixed lengths, deterministic for a seed."""
    if count < 1:
        raise WorkloadError(f"the mix needs at least one conversation, got {count}")
    options = options or MixOptions()
    rng = np.random.default_rng(seed)
    prompts = load_prompts()
    text = _text_maker(rng)
    rows = []
    for _ in range(count):
        messages = [dict(m) for m in prompts[int(rng.integers(len(prompts)))]]
        if rng.random() < options.long_prompt_share:
            messages[-1]["content"] += " Use this text: " + text(int(rng.integers(options.long_prompt_words // 3,
                                                                                   options.long_prompt_words)))
        messages.append({"role": "assistant", "content": text(_response_words(rng, options))})
        rows.append({"messages": messages})
    return rows


def _text_maker(rng: np.random.Generator):
    """text(words) -> that many words of the sample conversations, with sentence ends, drawn from `rng`."""
    pool = _word_pool()

    def text(words: int) -> str:
        picked = rng.integers(0, len(pool), size=words)
        sentence_ends = set(rng.choice(words, size=max(1, words // 14), replace=False).tolist())
        return " ".join(pool[p] + ("." if i in sentence_ends else "") for i, p in enumerate(picked))

    return text


def _response_words(rng: np.random.Generator, options: MixOptions) -> int:
    return int(np.clip(rng.lognormal(np.log(options.median_response_words), options.sigma),
                       options.min_response_words, options.max_response_words))


def grpo_mix(prompts: int, *, group: int = 8, prompt_words: int = 220, seed: int = 0,
             options: MixOptions | None = None) -> list[dict[str, Any]]:
    """GRPO/RLOO-shaped rows: `prompts` prompts of about `prompt_words` words (a question on a pasted document; 220
    words are ~300 tokens), each answered `group` times with responses of mixed length (the mix's log-normal), in the
    order a trainer sends them: group after group."""
    if prompts < 1 or group < 1:
        raise WorkloadError(f"the GRPO mix needs at least one prompt and one answer each, got {prompts} x {group}")
    options = options or MixOptions()
    rng = np.random.default_rng(seed)
    questions = load_prompts()
    text = _text_maker(rng)
    rows = []
    for _ in range(prompts):
        messages = [dict(m) for m in questions[int(rng.integers(len(questions)))]]
        messages[-1]["content"] += " Use this text: " + text(prompt_words)
        rows += [{"messages": [*messages, {"role": "assistant", "content": text(_response_words(rng, options))}]}
                 for _ in range(group)]
    return rows


def read_rows(path: str | Path) -> list[bytes]:
    """The non-empty lines of a JSONL file as raw wire rows (not checked: a load test may send bad rows on purpose)."""
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"conversation file {path} does not exist")
    rows = [line.encode("utf-8") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise WorkloadError(f"{path} holds no conversations")
    return rows


def invalid_rows(rows: list[bytes]) -> dict[int, str]:
    """Row index -> what is wrong, for rows that are not valid conversations."""
    problems = {}
    for index, row in enumerate(rows):
        try:
            parse_conversation(row)
        except ConversationError as exc:
            problems[index] = str(exc)
    return problems


def load_conversations(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, one {"messages": [...]} per line, each checked against the wire schema."""
    rows = read_rows(path)
    problems = invalid_rows(rows)
    if problems:
        index, problem = next(iter(problems.items()))
        line = [n for n, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1) if text.strip()]
        raise WorkloadError(f"{path} line {line[index]}: {problem} ({len(problems)} bad rows in all)")
    return [json.loads(row) for row in rows]


def conversations_from(data: str | Path | None, count: int | None = None, *, seed: int = 0) -> list[dict[str, Any]]:
    """The file's conversations (cycled or cut to `count` when given), or the built-in mix of `count` rows."""
    if data is None:
        return conversation_mix(count or 256, seed=seed)
    rows = load_conversations(data)
    if count is None:
        return rows
    return [rows[i % len(rows)] for i in range(count)]
