"""`templar train`: PPO training against Triton-served reward models (templar.trainer.train), embedded Triton by
default. Runs as `templar train --config FILE.yaml [key=value ...]`, `templar train --num-ranks N ...` (which starts
the deepspeed launcher on the same command line), or under the launcher by hand:
`deepspeed --num_gpus N --module templar.cli train --config FILE.yaml`."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import yaml

from templar.field_docs import field_docs, type_name

from templar.server.ports import free_port
from templar.trainer.config import load_config
from templar.trainer.reward_server import ensure_exported
from templar.trainer.train import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Every config key, with its type, default and meaning: templar train --help-config"
    parser.add_argument("--help-config", action=HelpConfig, help="print every config key (as the YAML file nests "
                        "them) with its type, default and meaning, then exit")
    parser.add_argument("--config", type=Path, help="YAML file with TrainConfig fields (see --help-config)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. steps=10")
    parser.add_argument("--num-ranks", type=int, default=1, help="data-parallel ranks (starts the deepspeed launcher)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/latest")
    parser.add_argument("--export-only", action="store_true",
                        help="export the configured RMs into reward.repo (those missing or changed), then exit; "
                        "for a separately run Triton, e.g. the docker compose `export` service")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher


def config_reference(cls: type, depth: int = 0) -> list[str]:
    """The keys of a config dataclass as its YAML file nests them: `key: default  # type: what it is`."""
    hints, docs, defaults = typing.get_type_hints(cls), field_docs(cls), cls()
    lines = []
    for f in dataclasses.fields(cls):
        pad, hint, doc = "  " * depth, hints[f.name], docs[f.name]
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint):
            lines += [_commented(f"{pad}{f.name}:", doc), *config_reference(hint, depth + 1)]
        elif item is not None and dataclasses.is_dataclass(item):
            lines += [_commented(f"{pad}{f.name}:", f"a list; each item: {doc}".strip(": ")),
                      *(f"{pad}  - {line.strip()}" if i == 0 else f"  {line}"
                        for i, line in enumerate(config_reference(item, depth + 1)))]
        else:
            value = yaml.safe_dump(getattr(defaults, f.name), default_flow_style=True).removesuffix("...\n").strip()
            lines.append(_commented(f"{pad}{f.name}: {value}", f"{type_name(f.type)}" + (f": {doc}" if doc else "")))
    return lines


def _commented(text: str, comment: str) -> str:
    return f"{text:<44} # {comment}" if comment else text


class HelpConfig(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from templar.trainer.config import TrainConfig

        print("# templar train --config FILE.yaml: every key, its default, type and meaning (trainer/config.py).\n"
              "# Override any of them on the command line: templar train --config FILE.yaml ppo.actor_lr=3e-4")
        print("\n".join(config_reference(TrainConfig)))
        parser.exit()


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
