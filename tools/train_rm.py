"""`templar train-rm`: pairwise (Bradley-Terry) training of a reward model on its own chat template
(templar.trainer.reward_training); the result is a Hugging Face folder `templar export` takes as it is."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from templar.trainer.config import load_dataclass
from templar.trainer.reward_training import RewardTrainConfig, train_reward_model
from templar.trainer.sources import resolve_source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file with RewardTrainConfig fields "
                        "(trainer/reward_training.py); without one, the defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. epochs=2")


def main(args: argparse.Namespace) -> int:
    config = load_dataclass(RewardTrainConfig, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    base = resolve_source(config.base, "base", "reward", Path(config.output_dir), seed=config.seed)
    summary = train_reward_model(config, base)
    last = summary["history"][-1]
    print(json.dumps({"model": summary["model"], "held_out_accuracy": last["held_out_accuracy"],
                      "held_out_mean_margin": last["held_out_mean_margin"], "seconds": round(summary["seconds"], 1)}))
    return 0
