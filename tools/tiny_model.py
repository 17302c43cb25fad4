"""`templar tiny-model`: a small random model on a real tokenizer and template (templar.tiny_models)."""

from __future__ import annotations

from pathlib import Path

from templar.tiny_models import FAMILY_BACKBONE, KINDS, TinySize, build_tiny_model


def add_arguments(parser) -> None:
    parser.add_argument("--family", required=True, choices=sorted(FAMILY_BACKBONE), help="tokenizer + template")
    parser.add_argument("--kind", default="reward", choices=KINDS, help="(default: %(default)s)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=TinySize.hidden_size, help="(default: %(default)s)")
    parser.add_argument("--layers", type=int, default=TinySize.num_hidden_layers, help="(default: %(default)s)")


def main(args) -> int:
    size = TinySize(hidden_size=args.hidden_size, num_hidden_layers=args.layers)
    out = build_tiny_model(args.family, args.out, kind=args.kind, seed=args.seed, size=size)
    print(f"wrote a {args.kind} on the {args.family} tokenizer to {out}")
    return 0
