"""Step-labelled training of a process RM on its OWN step format: how the process-RM demo's `tiny-prm:<family>` is
made (templar.trainer.sources).

Each example is a conversation whose answer is cut into steps, with a label per step (templar.trainer.preferences:
the built-in rule, sentence by sentence). It is rendered as the served PRM reads it, through the same
`templar.steps.StepReader` the preprocessing model uses (the PRM's template and system prompt, its tag after every
step), so the model learns exactly the tokens Triton will show it. The loss is Qwen2.5-Math-PRM's objective: the
cross-entropy of the PRM's two classes at every step tag (class 1: the step is good), through the model's own
forward; the step score served is P(class 1) at the tag.

OUTPUT_DIR/model/         the trained PRM (its config, code, safetensors, tokenizer with the tag)
OUTPUT_DIR/metrics.json   per epoch: training loss, held-out step accuracy and mean step score of good / bad steps
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from templar.chat_format import ChatFormat
from templar.conversation import Conversation
from templar.errors import ConfigError
from templar.padding import right_pad
from templar.steps import StepFormat, StepReader, step_format
from templar.trainer.preferences import SENTENCE_STEPS, StepExample, step_examples

log = logging.getLogger("templar.trainer")


@dataclass
class StepTrainConfig:
    output_dir: str = "runs/prm"  # the trained PRM goes to OUTPUT_DIR/model
    train_examples: int = 1600  # answers of the built-in set (templar.trainer.preferences.step_examples)
    eval_examples: int = 200  # held out, drawn with another seed
    epochs: int = 2
    batch_size: int = 16  # answers per optimizer step
    lr: float = 2e-3
    max_length: int = 256  # tokens per conversation
    preset: str = "qwen-prm"  # the step format it learns (a class-probability one: templar.steps.PRESETS)
    step_separator: str = SENTENCE_STEPS  # the built-in answers' steps are their sentences
    seed: int = 0

    def to_step_format(self) -> StepFormat:
        fmt = step_format(self.preset, step_separator=self.step_separator)
        if fmt.reading != "class-probability":
            raise ConfigError(f"a PRM trained here reads class probabilities; preset {self.preset!r} reads "
                              f"{fmt.reading}")
        return fmt


class StepLogits:
    """The PRM through its own forward (`model(input_ids, attention_mask).logits`, [B, L, 2]), read at the tags the
    serving side finds."""

    def __init__(self, model_dir: Path, fmt: StepFormat, max_length: int) -> None:
        from transformers import AutoModel

        self.chat = ChatFormat.from_dir(model_dir, max_length=max_length)
        self.reader = StepReader.for_chat_format(self.chat, fmt)
        tokenizer = self.chat.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True, dtype=torch.float32,
                                               local_files_only=True)
        self.positive = fmt.positive_class

    def encode(self, example: StepExample) -> tuple[list[int], list[int], list[int]]:
        """(token ids, tag positions, labels), checked: one tag per labelled step."""
        reading = self.reader.read(self.chat, Conversation(example.messages))
        if len(reading.positions) != len(example.labels):
            raise ValueError(f"{len(example.labels)} labels for {len(reading.positions)} steps: "
                             f"{example.messages[-1]['content']!r}")
        return reading.tokenized.input_ids, reading.positions, [int(label) for label in example.labels]

    def logits(self, rows: list[tuple[list[int], list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the two class logits at every tag of the batch [N, 2], their labels [N])."""
        ids, mask = right_pad([row for row, _, _ in rows], self.pad_id)
        logits = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        at = [(i, p) for i, (_, positions, _) in enumerate(rows) for p in positions]
        rows_at, positions_at = (torch.tensor(v) for v in zip(*at))
        return logits[rows_at, positions_at], torch.tensor([label for _, _, labels in rows for label in labels])


def evaluate(scorer: StepLogits, rows: list, batch: int = 64) -> dict[str, float]:
    """Step accuracy (P(good) on the right side of 0.5) and the mean step score of good and of bad steps."""
    probs, labels = [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            logits, chunk_labels = scorer.logits(rows[start:start + batch])
            probs.append(logits.softmax(-1)[:, scorer.positive])
            labels.append(chunk_labels)
    p, y = torch.cat(probs), torch.cat(labels).bool()
    return {"step_accuracy": float(((p > 0.5) == y).float().mean()), "steps": len(y),
            "good_step_score": float(p[y].mean()), "bad_step_score": float(p[~y].mean())}


def train_process_reward_model(config: StepTrainConfig, base: Path) -> dict:
    """Train the PRM folder `base` (a two-class model with its tag in the tokenizer, e.g. `tiny_models`'
    process-reward kind) as configured; returns the run summary (also OUTPUT_DIR/metrics.json)."""
    from tqdm import tqdm

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    scorer = StepLogits(base, config.to_step_format(), config.max_length)
    train = [scorer.encode(e) for e in step_examples(config.train_examples, config.seed)]
    held = [scorer.encode(e) for e in step_examples(config.eval_examples, config.seed + 10_007)]
    optimizer = torch.optim.AdamW(scorer.model.parameters(), lr=config.lr)
    order = random.Random(config.seed)
    history = [{"epoch": 0, **{f"held_out_{k}": v for k, v in evaluate(scorer, held).items()}}]
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        order.shuffle(train)
        scorer.model.train()
        losses = []
        batches = range(0, len(train), config.batch_size)
        for start in tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", unit="batch", dynamic_ncols=True):
            logits, labels = scorer.logits(train[start:start + config.batch_size])
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        scorer.model.eval()
        row = {"epoch": epoch, "train_loss": sum(losses) / len(losses),
               **{f"held_out_{k}": v for k, v in evaluate(scorer, held).items()}}
        history.append(row)
        log.info("epoch %d: %s", epoch, json.dumps(row))
    model_dir = out / "model"
    scorer.model.save_pretrained(model_dir, safe_serialization=True)
    scorer.chat.tokenizer.save_pretrained(str(model_dir))
    for code in base.glob("*.py"):  # the model's own code (its config's auto_map names it)
        shutil.copy(code, model_dir / code.name)
    summary = {"model": str(model_dir), "base": str(base), "train_examples": len(train), "held_out_examples": len(held),
               "seconds": time.perf_counter() - started, "history": history, "config": asdict(config)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary
