"""`templar train`: PPO training against Triton-served reward models (templar.trainer.train), embedded Triton by
default. Runs as `templar train --config FILE.yaml [key=value ...]`, `templar train --num-ranks N ...` (which starts
the deepspeed launcher on the same command line), or under the launcher by hand:
`deepspeed --num_gpus N --module templar.cli train --config FILE.yaml`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from templar.server.ports import free_port
from templar.trainer.config import load_config
from templar.trainer.reward_server import ensure_exported
from templar.trainer.train import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file with TrainConfig fields (see trainer/config.py)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. steps=10")
    parser.add_argument("--num-ranks", type=int, default=1, help="data-parallel ranks (starts the deepspeed launcher)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/latest")
    parser.add_argument("--export-only", action="store_true",
                        help="export the configured RMs into reward.repo (those missing or changed), then exit; "
                        "for a separately run Triton, e.g. the docker compose `export` service")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher


def launch_ranks(args: argparse.Namespace) -> int:
    """`--num-ranks N`: this module under DeepSpeed's launcher, N ranks on this machine."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.num_ranks),
               "--master_port", str(free_port()), "--no_local_rank", "--module", "templar.cli", "train"]
    command += (["--config", str(args.config)] if args.config else []) + list(args.overrides)
    command += ["--resume"] if args.resume else []
    return subprocess.call(command)


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)  # a ConfigError ends as `templar train: error: ...`
    if args.export_only:
        ensure_exported(config, Path(config.output_dir))
        print(f"reward models ready in {config.reward.repo}: {', '.join(m.name for m in config.reward.models)}")
        return 0
    if args.num_ranks > 1:
        return launch_ranks(args)
    summary = train(config, resume=args.resume)
    return 0 if summary["completed"] else 3
