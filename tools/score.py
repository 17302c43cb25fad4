"""`templar score`: score conversations from a JSONL file against a served reward model, over gRPC."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from templar.client_options import ClientFlags
from templar.reward_client import RewardClient
from templar.tools.workload import load_conversations

CLIENT_FLAGS = ClientFlags()  # every option of the reward client: --url, --tls ..., --max-attempts, ...


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="reward model name")
    parser.add_argument("--data", required=True, type=Path, help='JSONL, one {"messages": [...]} per line')
    parser.add_argument("--out", type=Path, help="write results as JSONL here")
    parser.add_argument("--show-text", action="store_true", help="also print the text the RM's template rendered")
    CLIENT_FLAGS.add(parser)


def _beyond_the_score(result, i: int, names: list[str]) -> dict:
    """A process RM's steps, a multi-objective RM's named objectives, of row i (nothing for a one-score RM)."""
    extra: dict = {}
    value = lambda v: round(float(v), 6) if np.isfinite(v) else None  # noqa: E731 - NaN is not JSON
    if result.step_scores is not None:
        extra["step_scores"] = [value(v) for v in result.step_scores[i]]
        extra["step_ends"] = list(result.step_ends[i])
    if result.objectives is not None:
        extra["objectives"] = {name: value(v) for name, v in zip(names, result.objectives[i])}
    return extra


def main(args) -> int:
    rows = load_conversations(args.data)  # checked before connecting: a bad file names its line
    with RewardClient(CLIENT_FLAGS.config(args, model=args.model)) as client:
        result = client.score(rows)
        texts = client.rendered_text(rows) if args.show_text else None
        names = client.objectives
    out = open(args.out, "w", encoding="utf-8") if args.out else None
    print(f"{'row':>4} {'score':>10} {'tokens':>6} {'trunc':>5}  status")
    for i, status in enumerate(result.status):
        print(f"{i:4d} {result.scores[i]:10.4f} {result.num_tokens[i]:6d} {str(bool(result.truncated[i])):>5}  "
              f"{status}")
        extra = _beyond_the_score(result, i, names)
        if extra:
            print("     " + ", ".join(f"{k} {v}" for k, v in extra.items()))
        if texts:
            print("     " + repr(texts[i])[:400])
        if out:
            out.write(json.dumps({"score": None if status != "ok" else float(result.scores[i]), "status": status,
                                  "num_tokens": int(result.num_tokens[i]),
                                  "truncated": bool(result.truncated[i]), **extra}) + "\n")
    if out:
        out.close()
    print(f"{len(rows)} rows, {result.failed_rows} failed, {result.latency_s:.2f}s", file=sys.stderr)
    return 0 if result.failed_rows == 0 else 1
