"""Prompt data kept as messages. Templating is the actor's job at generation time, so the dataset stores raw messages.

Sources: JSONL, Parquet, or a Hugging Face datasets folder (`save_to_disk`), each row with a `messages` column (OpenAI
chat format, ending with a user turn) or a `prompt` string (turned into one user message). With no path, a small
built-in prompt set is used (the demo's).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from templar.conversation import ConversationError, Messages, validate_messages
from templar.errors import PromptDataError
from templar.trainer.preferences import TOPIC_QUESTIONS, topic_questions


def prompt_messages(record: Any) -> Messages:
    """One dataset row -> the prompt's messages (validated; the last one is the user turn to answer)."""
    if not isinstance(record, dict):
        raise ConversationError(f"expected an object with 'messages' or 'prompt', got {type(record).__name__}")
    if record.get("messages") is not None:
        messages = validate_messages(record["messages"], final_role=None)
        if messages[-1]["role"] != "user":
            raise ConversationError(f"a prompt must end with a user turn, got {messages[-1]['role']!r}")
        return messages
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    raise ConversationError("row has neither a 'messages' list nor a 'prompt' string")


def _records(path: Path, split: str) -> list[Any]:
    if path.suffix in (".jsonl", ".json"):
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PromptDataError(f"{path} line {number}: not JSON ({exc.msg})") from None
        return records
    if not path.is_dir() and path.suffix != ".parquet":
        raise PromptDataError(f"{path}: unsupported prompt data (use .jsonl, .parquet or a datasets folder)")
    try:
        return _table_records(path, split)
    except PromptDataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: say which, and what the reader said
        raise PromptDataError(f"{path}: cannot read it as {'a datasets folder' if path.is_dir() else 'Parquet'} "
                              f"({type(exc).__name__}: {exc})") from None


def _table_records(path: Path, split: str) -> list[Any]:
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise PromptDataError(f"{path} has no split {split!r} (has {', '.join(loaded)})")
            loaded = loaded[split]
        return list(loaded)
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def load_prompts(path: str | Path | None = None, split: str = "train") -> list[Messages]:
    if path == TOPIC_QUESTIONS:
        return topic_questions()
    if path is None:
        text = resources.files("templar").joinpath("data/demo_prompts.jsonl").read_text(encoding="utf-8")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        where = "built-in prompts"
    else:
        path = Path(path)
        if not path.exists():
            raise PromptDataError(f"prompt data {path} does not exist")
        records = _records(path, split)
        where = str(path)
    prompts = []
    for index, record in enumerate(records):
        try:
            prompts.append(prompt_messages(record))
        except ConversationError as exc:
            raise PromptDataError(f"{where} row {index}: {exc}") from None
    if not prompts:
        raise PromptDataError(f"{where} holds no prompts")
    return prompts


class PromptStream:
    """Endless epochs over the prompts, reshuffled each epoch from the seed. Every rank walks the same global order;
    rank r takes its slice of each global batch. The position is checkpointed, so a resumed run sees the same data."""

    def __init__(self, prompts: list[Messages], *, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.prompts))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))

    def next_batch(self, batch_size: int) -> list[Messages]:
        """This rank's `batch_size` prompts of the next global batch of world_size * batch_size."""
        picked = []
        for _ in range(batch_size * self.world_size):
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            picked.append(self.prompts[self._order[self.cursor]])
            self.cursor += 1
        return picked[self.rank * batch_size:(self.rank + 1) * batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation()
