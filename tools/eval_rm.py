"""`templar eval-rm`: pairwise accuracy and mean margin of a SERVED reward model on preference pairs, the Templar
way and, with `--as-template FAMILY`, the way a framework that templates once feeds it.

    own template   each conversation sent as messages; the RM applies its own chat template inside Triton
    as template    each conversation rendered with another model's template (the actor's, e.g. qwen2_5, as OpenRLHF
                   renders its prompts and decodes prompt + response), sent as {"text": ...} and read by the RM's
                   tokenizer as it is: the RM never sees its own format (OpenRLHF's serve_rm also appends the RM's
                   EOS string; here the text ends as the actor's template ends the turn)

Accuracy: the share of pairs whose chosen conversation scores higher; margin: mean r_chosen - r_rejected;
agreement: how the same conversations score the two ways (Spearman rank correlation, mean shift, margin ratio).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from templar.assets import chat_format_from_source
from templar.client_options import ClientFlags
from templar.conversation import Conversation
from templar.errors import ServingError
from templar.trainer.preferences import PreferencePair, read_pairs
from templar.reward_client import RewardClient, RewardClientConfig
from templar.tools.stats import spearman

CLIENT_FLAGS = ClientFlags()  # every option of the reward client: --url, --tls ..., --max-attempts, ...


def pair_metrics(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, Any]:
    ok = np.isfinite(chosen) & np.isfinite(rejected)
    margin = (chosen - rejected)[ok]
    return {"pairs": int(ok.sum()), "failed_pairs": int((~ok).sum()),
            "accuracy": float((margin > 0).mean()) if len(margin) else float("nan"),
            "mean_margin": float(margin.mean()) if len(margin) else float("nan")}


def score_agreement(own: np.ndarray, other: np.ndarray, own_pairs: dict, other_pairs: dict) -> dict[str, float]:
    """How the same conversations score the two ways: rank agreement (Spearman, every conversation), the mean
    shift of a score (other - own) and how many times smaller the mean margin gets."""
    ok = np.isfinite(own) & np.isfinite(other)
    return {"spearman": spearman(own[ok], other[ok]), "mean_score_shift": float((other - own)[ok].mean()),
            "margin_shrinks_x": float(own_pairs["mean_margin"] / other_pairs["mean_margin"])
            if other_pairs["mean_margin"] else float("inf")}


def score_rows(client: RewardClient, rows: list[dict]) -> np.ndarray:
    result = client.score(rows)
    bad = [s for s in result.status if s != "ok"]
    if len(bad) == len(rows):
        raise ServingError(f"the RM scored none of the {len(rows)} conversations: {bad[0]}")
    return result.scores.astype(np.float64)


def evaluate_served(client_config: RewardClientConfig, pairs: list[PreferencePair], as_template: str | None = None,
                    ) -> dict[str, Any]:
    """The report of the served RM `client_config.model` (reached as the options say) on `pairs`."""
    conversations = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    report: dict[str, Any] = {"model": client_config.model, "pairs": len(pairs)}
    with RewardClient(client_config) as client:
        scores = score_rows(client, [{"messages": m} for m in conversations])
        report["own_template"] = pair_metrics(scores[:len(pairs)], scores[len(pairs):])
        if as_template is not None:
            actor = chat_format_from_source(as_template)
            texts = [actor.render(Conversation(m)) for m in conversations]
            other = score_rows(client, [{"text": t} for t in texts])
            report["as_template"] = {"template": str(as_template),
                                     **pair_metrics(other[:len(pairs)], other[len(pairs):])}
            report["agreement"] = score_agreement(scores, other, report["own_template"], report["as_template"])
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the served RM's name")
    parser.add_argument("--data", required=True, type=Path, help="preference pairs, JSONL (chosen / rejected)")
    parser.add_argument("--as-template", metavar="FAMILY|DIR",
                        help="also score the pairs rendered with this template (e.g. qwen2_5) as text")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    CLIENT_FLAGS.add(parser)


def main(args: argparse.Namespace) -> int:
    report = evaluate_served(CLIENT_FLAGS.config(args, model=args.model), read_pairs(args.data), args.as_template)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0
