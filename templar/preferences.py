"""Preference pairs: the JSONL rows `templar train-rm` trains on and `templar eval-rm` measures, and a built-in
synthetic set whose rule anyone can check by reading it.

A row: {"chosen": [messages], "rejected": [messages]}: two conversations with the same prompt, each ending with the
assistant answer being judged (`{"prompt": [messages], "chosen": "answer", "rejected": "answer"}` is read too).

The built-in rule, "on topic and polite": a good answer names the topic of the question (its topic word) AND ends
with a polite closing ("Hope this helps!", ...). Every pair sets an answer that keeps the rule against one that
breaks one half of it or both (it names another topic, ends flatly, or both), so an RM must learn both halves.
`rule_satisfied` checks an answer, e.g. what a PPO actor said.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from templar.conversation import ConversationError, Messages, validate_messages
from templar.errors import DataError

TOPICS = ("ocean", "bread", "music", "rain", "garden", "chess", "coffee", "winter", "river", "bicycle", "forest",
          "honey", "mountain", "library", "volcano", "desert", "piano", "tiger", "orange", "castle", "cloud",
          "island", "rocket", "candle", "pepper", "violin", "glacier", "lantern", "meadow", "planet")
QUESTIONS = ("Tell me about the {topic}.", "What do you know about the {topic}?", "Say something about the {topic}.",
             "Can you describe the {topic}?", "Write a sentence about the {topic}.")
BODIES = ("The {topic} is wonderful.", "I really like the {topic}.", "The {topic} is very interesting.",
          "Many people love the {topic}.", "The {topic} can be beautiful.")
POLITE_ENDINGS = ("Hope this helps!", "Thank you for asking!", "Happy to help!")
FLAT_ENDINGS = ("That is all.", "Nothing more.", "Whatever.")


@dataclass(frozen=True)
class PreferencePair:
    chosen: Messages
    rejected: Messages

    def to_json(self) -> str:
        return json.dumps({"chosen": self.chosen, "rejected": self.rejected}, ensure_ascii=False)


def topic_of(prompt: str) -> str | None:
    """The topic word a built-in question asks about (None for other text)."""
    words = {w.strip(".,?!").lower() for w in prompt.split()}
    found = [t for t in TOPICS if t in words]
    return found[0] if len(found) == 1 else None


def rule_satisfied(prompt: Messages | str, answer: str) -> bool:
    """The built-in rule: the answer names the question's topic word and ends with a polite closing."""
    text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt if m["role"] == "user")
    topic = topic_of(text)
    words = {w.strip(".,?!").lower() for w in answer.split()}
    return topic is not None and topic in words and answer.strip().endswith(POLITE_ENDINGS)


RULES = {"on_topic_polite": rule_satisfied}  # data.rule in a training config
TOPIC_QUESTIONS = "builtin:topic-questions"  # data.path of a training config: the questions below, every topic


def topic_questions() -> list[Messages]:
    """Every built-in question about every topic (the PPO demo's prompts)."""
    return [[{"role": "user", "content": q.format(topic=t)}] for t in TOPICS for q in QUESTIONS]


def answer(rng: random.Random, topic: str, on_topic: bool, polite: bool) -> str:
    """An answer that names `topic` or another topic, ending politely or flatly."""
    named = topic if on_topic else rng.choice([t for t in TOPICS if t != topic])
    ending = rng.choice(POLITE_ENDINGS if polite else FLAT_ENDINGS)
    return f"{rng.choice(BODIES).format(topic=named)} {ending}"


def question(rng: random.Random, topic: str) -> Messages:
    return [{"role": "user", "content": rng.choice(QUESTIONS).format(topic=topic)}]


def synthetic_pairs(count: int, seed: int = 0) -> list[PreferencePair]:
    """`count` pairs: a rule-keeping answer against one that breaks it (off topic, flat, or both, in equal shares)."""
    rng = random.Random(seed)
    breaks = ((False, True), (True, False), (False, False))  # (on_topic, polite) of the rejected answer
    pairs = []
    for i in range(count):
        topic = rng.choice(TOPICS)
        prompt = question(rng, topic)
        on_topic, polite = breaks[i % len(breaks)]
        good, bad = answer(rng, topic, True, True), answer(rng, topic, on_topic, polite)
        pairs.append(PreferencePair(prompt + [{"role": "assistant", "content": good}],
                                    prompt + [{"role": "assistant", "content": bad}]))
    return pairs


def synthetic_split(train: int = 2400, held_out: int = 300, seed: int = 0) -> tuple[list[PreferencePair],
                                                                                      list[PreferencePair]]:
    """A training set and a held-out set drawn apart (different seeds; a pair seen in training is dropped from
    the held-out set)."""
    train_pairs = synthetic_pairs(train, seed)
    seen = {p.to_json() for p in train_pairs}
    held = [p for p in synthetic_pairs(held_out * 2, seed + 10_007) if p.to_json() not in seen][:held_out]
    return train_pairs, held


def parse_pair(row: dict, where: str) -> PreferencePair:
    try:
        if "prompt" in row:
            prompt = validate_messages(row["prompt"], final_role=None)
            for key in ("chosen", "rejected"):
                if not isinstance(row[key], str):
                    raise ConversationError(f"'{key}' must be the answer text when 'prompt' is given")
            sides = [prompt + [{"role": "assistant", "content": row[k]}] for k in ("chosen", "rejected")]
        else:
            sides = []
            for key in ("chosen", "rejected"):
                try:
                    sides.append(validate_messages(row[key]))
                except ConversationError as exc:
                    raise ConversationError(f"'{key}': {exc}") from None
    except KeyError as exc:
        raise DataError(f"{where}: a pair needs 'chosen' and 'rejected' (missing {exc})") from None
    except ConversationError as exc:
        raise DataError(f"{where}: {exc}") from None
    return PreferencePair(*sides)


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Pairs from a JSONL file; a bad row is an error naming its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"preference data {path} does not exist")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: a pair must be a JSON object")
        pairs.append(parse_pair(row, f"{path} line {number}"))
    if not pairs:
        raise DataError(f"{path} holds no preference pairs")
    return pairs


def write_pairs(path: str | Path, pairs: Iterable[PreferencePair]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p.to_json() + "\n" for p in pairs), encoding="utf-8")
    return path
