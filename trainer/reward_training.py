"""Pairwise (Bradley-Terry) reward-model training, `templar train-rm --config FILE.yaml`.

Each pair is rendered with THE RM'S OWN chat template and tokenizer, through the same `ChatFormat` the serving side
uses (guards and truncation included), so the model learns exactly the token sequences Triton will show it. The score
is read at the last attention-mask position, as the exported scorer reads it. Loss: -log sigmoid(r_chosen - r_rejected)
(Bradley & Terry 1952; Ouyang et al. 2022). The result is a Hugging Face folder that `templar export` takes as it is.

OUTPUT_DIR/model/             the trained RM (config, safetensors, tokenizer, chat template)
OUTPUT_DIR/eval_pairs.jsonl   the held-out pairs (for `templar eval-rm`)
OUTPUT_DIR/metrics.json       per epoch: training loss and accuracy, held-out accuracy and mean margin
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from templar.chat_format import ChatFormat
from templar.conversation import Conversation
from templar.errors import ConfigError
from templar.trainer.preferences import PreferencePair, read_pairs, synthetic_split, write_pairs
from templar.padding import right_pad

log = logging.getLogger("templar.trainer")


@dataclass
class RewardTrainConfig:
    output_dir: str = "runs/rm"  # the trained RM goes to OUTPUT_DIR/model
    base: str = "tiny:llama3_1"  # a *ForSequenceClassification folder (one label), or tiny:<family> (random, built)
    data: str | None = None  # JSONL preference pairs; None = the built-in "kind and polite" set
    eval_data: str | None = None  # held-out pairs; None = the built-in held-out split, or eval_fraction of `data`
    eval_fraction: float = 0.1
    train_pairs: int = 2400  # sizes of the built-in set
    eval_pairs: int = 300
    epochs: int = 3
    batch_size: int = 16  # pairs per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_length: int = 512  # tokens per conversation (cut from the start, as served)
    seed: int = 0

    def validate(self) -> RewardTrainConfig:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        return self


def load_pairs(config: RewardTrainConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training pairs, held-out pairs) as configured."""
    if config.data is None:
        train, held = synthetic_split(config.train_pairs, config.eval_pairs, config.seed)
    else:
        train = read_pairs(config.data)
        held = []
        if config.eval_data is None:
            random.Random(config.seed).shuffle(train)
            cut = max(1, int(len(train) * config.eval_fraction))
            train, held = train[cut:], train[:cut]
    if config.eval_data is not None:
        held = read_pairs(config.eval_data)
    if not train:
        raise ConfigError("no training pairs left after the held-out split")
    return train, held


class PairScorer:
    """The RM scored through its OWN forward pass (`model(input_ids, attention_mask).logits`), on its own rendering:
    trained this way, the saved RM gives the trained score wherever its Hugging Face class is used (its model card's
    snippet, `templar export`'s default score position), including where its template ends with the pad token."""

    def __init__(self, model_dir: Path, max_length: int) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        self.chat = ChatFormat.from_dir(model_dir, max_length=max_length)
        tokenizer = self.chat.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        if config.num_labels != 1:
            raise ConfigError(f"base {model_dir}: a reward model has one label, this one has {config.num_labels}")
        if config.pad_token_id is None:  # HF's classifiers pool a padded batch by the pad id (TRL sets pad = EOS too)
            config.pad_token_id = self.pad_id
        for key in [k for k in vars(config) if "dropout" in k and isinstance(getattr(config, k), float)]:
            setattr(config, key, 0.0)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, config=config,
                                                                        dtype=torch.float32, local_files_only=True)

    def ids(self, messages: list[dict]) -> list[int]:
        return self.chat.tokenize(Conversation(messages)).input_ids

    def scores(self, rows: list[list[int]]) -> torch.Tensor:
        ids, mask = right_pad(rows, self.pad_id)  # right padding: HF's positions and pooling hold for real tokens
        return self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits[:, 0]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged over pairs."""
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()


def evaluate(scorer: PairScorer, pairs: list[tuple[list[int], list[int]]], batch: int = 64) -> dict[str, float]:
    """Pairwise accuracy (chosen scored higher) and mean margin r_chosen - r_rejected."""
    margins = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            scores = scorer.scores([c for c, _ in chunk] + [r for _, r in chunk])
            margins.append(scores[:len(chunk)] - scores[len(chunk):])
    margin = torch.cat(margins) if margins else torch.zeros(0)
    return {"accuracy": float((margin > 0).float().mean()) if len(margin) else math.nan,
            "mean_margin": float(margin.mean()) if len(margin) else math.nan, "pairs": len(margin)}


def train_reward_model(config: RewardTrainConfig, base: Path) -> dict:
    """Train as configured, starting from the model folder `base` (`config.base` resolved by the caller:
    templar.trainer.sources); returns the run summary (also OUTPUT_DIR/metrics.json)."""
    from tqdm import tqdm

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    train_pairs, held_pairs = load_pairs(config)  # bad data fails before minutes of work
    write_pairs(out / "eval_pairs.jsonl", held_pairs)
    scorer = PairScorer(base, config.max_length)
    tokenized = [(scorer.ids(p.chosen), scorer.ids(p.rejected)) for p in train_pairs]
    held = [(scorer.ids(p.chosen), scorer.ids(p.rejected)) for p in held_pairs]
    optimizer = torch.optim.AdamW(scorer.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order = random.Random(config.seed)
    history = [{"epoch": 0, **{f"held_out_{k}": v for k, v in evaluate(scorer, held).items()}}]
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        order.shuffle(tokenized)
        scorer.model.train()
        losses, correct = [], 0
        batches = range(0, len(tokenized), config.batch_size)
        for start in tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", unit="batch", dynamic_ncols=True):
            chunk = tokenized[start:start + config.batch_size]
            scores = scorer.scores([c for c, _ in chunk] + [r for _, r in chunk])
            loss = bradley_terry_loss(scores[:len(chunk)], scores[len(chunk):])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            correct += int((scores[:len(chunk)] > scores[len(chunk):]).sum())
        scorer.model.eval()
        row = {"epoch": epoch, "train_loss": sum(losses) / len(losses), "train_accuracy": correct / len(tokenized),
               **{f"held_out_{k}": v for k, v in evaluate(scorer, held).items()}}
        history.append(row)
        log.info("epoch %d: %s", epoch, json.dumps(row))
    model_dir = out / "model"
    scorer.model.save_pretrained(model_dir, safe_serialization=True)
    scorer.chat.tokenizer.save_pretrained(str(model_dir))
    summary = {"model": str(model_dir), "base": str(base), "train_pairs": len(tokenized), "held_out_pairs": len(held),
               "seconds": time.perf_counter() - started, "history": history, "config": asdict(config)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary
