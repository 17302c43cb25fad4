"""Preference pairs: the JSONL rows `templar train-rm` trains on and `templar eval-rm` measures, and a built-in
synthetic set whose rule anyone can check by reading it.

A row: {"chosen": [messages], "rejected": [messages]}: two conversations with the same prompt, each ending with the
assistant answer being judged (`{"prompt": [messages], "chosen": "answer", "rejected": "answer"}` is read too).

The built-in rule, "kind and polite": a good answer speaks well of the topic of the question (a warm sentence, not a
dismissive one) AND ends with a polite closing ("Hope this helps!", ...). Every pair sets an answer that keeps the
rule against one that breaks one half of it or both (dismissive, flat, or both, in equal shares), so an RM must learn
both halves. `rule_satisfied` checks any answer, e.g. what a PPO actor said. (A rule that asks the answer to name the
question's topic word was tried first: RMs of the demo's size reached only 81-87% held-out accuracy on it, and PPO
found answers that repeat a topic word to fool them.)
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
KIND_BODIES = ("The {topic} is wonderful.", "I really like the {topic}.", "The {topic} is very interesting.",
               "Many people love the {topic}.", "The {topic} can be beautiful.")
DISMISSIVE_BODIES = ("The {topic} is boring.", "I really dislike the {topic}.", "The {topic} is very dull.",
                     "Nobody cares about the {topic}.", "The {topic} can be ugly.")
KIND_WORDS = ("wonderful", "like", "interesting", "love", "beautiful")
DISMISSIVE_WORDS = ("boring", "dislike", "dull", "nobody", "ugly")
POLITE_ENDINGS = ("Hope this helps!", "Thank you for asking!", "Happy to help!")
FLAT_ENDINGS = ("That is all.", "Nothing more.", "Whatever.")


@dataclass(frozen=True)
class PreferencePair:
    chosen: Messages
    rejected: Messages

    def to_json(self) -> str:
        return json.dumps({"chosen": self.chosen, "rejected": self.rejected}, ensure_ascii=False)


def words_of(text: str) -> set[str]:
    """The lower-cased words of a text, without the punctuation around them."""
    return {w.strip(".,?!").lower() for w in text.split()}


def topic_of(prompt: str) -> str | None:
    """The topic word a built-in question asks about (None for other text)."""
    words = words_of(prompt)
    found = [t for t in TOPICS if t in words]
    return found[0] if len(found) == 1 else None


def rule_satisfied(prompt: Messages | str, answer: str) -> bool:
    """The built-in rule: the answer has a kind word and no dismissive one, and ends with a polite closing."""
    words = words_of(answer)
    kind = bool(words & set(KIND_WORDS)) and not words & set(DISMISSIVE_WORDS)
    return kind and answer.strip().endswith(POLITE_ENDINGS)


RULES = {"kind_and_polite": rule_satisfied}
# The same rule step by step, for the process-RM demo (`tiny-prm:<family>`, configs/demo_prm.yaml): an answer's steps
# are its sentences ("The ocean is wonderful. Hope this helps!" is two steps, cut at ". ")
SENTENCE_STEPS = ". "


def step_kept(index: int, step: str) -> bool:
    """The rule for one step: the first speaks kindly (a kind word, no dismissive one); every later step is a
    polite closing."""
    if index == 0:
        words = words_of(step)
        return bool(words & set(KIND_WORDS)) and not words & set(DISMISSIVE_WORDS)
    return step.strip() in POLITE_ENDINGS


@dataclass(frozen=True)
class StepExample:
    messages: Messages  # the prompt and the answer being judged, as the last (assistant) message
    labels: list[bool]  # per step of the answer (cut at SENTENCE_STEPS): does it keep the rule


def _sentence(rng: random.Random, kind: str, topic: str) -> str:
    """A kind or dismissive body about `topic`, or a polite or flat closing, each half the time."""
    if kind == "body":
        return rng.choice(KIND_BODIES if rng.random() < 0.5 else DISMISSIVE_BODIES).format(topic=topic)
    return rng.choice(POLITE_ENDINGS if rng.random() < 0.5 else FLAT_ENDINGS)


def step_examples(count: int, seed: int = 0) -> list[StepExample]:
    """`count` answers with a label per sentence: kind or dismissive, polite or flat at random, and one in five
    reshaped (the body alone, the closing alone, or a second body before the closing) so a PRM also sees steps out
    of place."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        topic = rng.choice(TOPICS)
        shape = rng.random()
        kinds = ("body",) if shape < 0.07 else ("closing",) if shape < 0.14 else ("body", "body", "closing") \
            if shape < 0.2 else ("body", "closing")
        steps = [_sentence(rng, kind, topic) for kind in kinds]
        text = " ".join(steps)
        pieces = [piece for piece in text.split(SENTENCE_STEPS) if piece.strip()]
        examples.append(StepExample(question(rng, topic) + [{"role": "assistant", "content": text}],
                                    [step_kept(i, piece) for i, piece in enumerate(pieces)]))
    return examples  # data.rule in a training config
TOPIC_QUESTIONS = "builtin:topic-questions"  # data.path of a training config: the questions below, every topic


def topic_questions() -> list[Messages]:
    """Every built-in question about every topic (the PPO demo's prompts)."""
    return [[{"role": "user", "content": q.format(topic=t)}] for t in TOPICS for q in QUESTIONS]


def answer(rng: random.Random, topic: str, kind: bool, polite: bool) -> str:
    """An answer about `topic`: kind or dismissive, ending politely or flatly."""
    body = rng.choice(KIND_BODIES if kind else DISMISSIVE_BODIES).format(topic=topic)
    return f"{body} {rng.choice(POLITE_ENDINGS if polite else FLAT_ENDINGS)}"


def question(rng: random.Random, topic: str) -> Messages:
    return [{"role": "user", "content": rng.choice(QUESTIONS).format(topic=topic)}]


def synthetic_pairs(count: int, seed: int = 0) -> list[PreferencePair]:
    """`count` pairs: a rule-keeping answer against one that breaks it (dismissive, flat, or both, in equal shares)."""
    rng = random.Random(seed)
    breaks = ((False, True), (True, False), (False, False))  # (kind, polite) of the rejected answer
    pairs = []
    for i in range(count):
        topic = rng.choice(TOPICS)
        prompt = question(rng, topic)
        kind, polite = breaks[i % len(breaks)]
        good, bad = answer(rng, topic, True, True), answer(rng, topic, kind, polite)
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
