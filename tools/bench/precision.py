"""`templar bench-precision`: does a lower CPU precision change which answer of a preference pair wins?

For each RM (default: the two demo RMs, `tiny-rm:llama3_1` and `tiny-rm:gemma3` as `make demo` builds them, each
with the 300 pairs held out of its training), one export per precision into one repository and one embedded Triton
server; each export scores the pairs as Templar serves them (messages, the RM's own template in Triton). Per RM and
precision: pairwise accuracy and mean margin, the pairs whose winner differs from fp32's (`flipped`), and the
scores' largest difference from fp32 and their rank agreement with it (Spearman). A precision keeps the bound when
at most `flip_bound` of the pairs change winner. Saved as JSON (README: "Precision and agreement").
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from templar.errors import ConfigError
from templar.reward_client import RewardClient, RewardClientConfig
from templar.server.embedded import EmbeddedTriton
from templar.server.ports import free_server_ports
from templar.tools.eval_rm import pair_metrics, score_rows
from templar.tools.loadtest import machine_info
from templar.tools.stats import spearman
from templar.trainer.preferences import PreferencePair, read_pairs
from templar.trainer.sources import resolve_source

DEMO_RMS = ("tiny-rm:llama3_1", "tiny-rm:gemma3")  # configs/demo.yaml's rm_llama3 and rm_gemma3
DEMO_SEED = 100  # the demo's RMs are built with seed 100 + their index in reward.models (trainer/reward_server.py)


@dataclass
class PrecisionBenchOptions:
    out: Path = Path("bench-precision.json")
    work: Path | None = None  # the repository and the server's log (default: OUT's folder / bench-precision-work)
    models: list[str] = field(default_factory=lambda: list(DEMO_RMS))  # folders, or tiny-rm:<family>
    pairs: Path | None = None  # preference pairs (JSONL); default: eval_pairs.jsonl in each model's folder
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16", "int8"])  # fp32 is the reference
    flip_bound: float = 0.01  # at most this share of the pairs may change winner against fp32
    max_length: int = 1024


def model_folder(source: str, index: int, work: Path) -> Path:
    """A model folder, the demo's tiny RMs built (once per machine, cached) as `make demo` builds them."""
    return resolve_source(source, f"rm-{index}", "reward", work, seed=DEMO_SEED + index).resolve()


def compare(reference: np.ndarray, scores: np.ndarray, pairs: int) -> dict[str, Any]:
    """One precision's scores (chosen rows, then rejected rows) against fp32's: flipped winners and score agreement."""
    margin = scores[:pairs] - scores[pairs:]
    reference_margin = reference[:pairs] - reference[pairs:]
    flipped = int(np.sum((margin > 0) != (reference_margin > 0)))
    # a pair can only change winner where its margin is within the scores' error: how close the closest pair is
    return {**pair_metrics(scores[:pairs], scores[pairs:]), "smallest_abs_margin": float(np.min(np.abs(margin))),
            "flipped": flipped, "flipped_share": flipped / pairs,
            "max_abs_diff": float(np.max(np.abs(scores - reference))),
            "mean_abs_diff": float(np.mean(np.abs(scores - reference))), "spearman": spearman(scores, reference)}


def run(opts: PrecisionBenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    from templar.export.exporter import ExportOptions, export_reward_model

    if "fp32" not in opts.precisions:
        raise ConfigError("--precisions must include fp32, the reference the others are compared with")
    work = opts.work or opts.out.parent / "bench-precision-work"
    repo = work / "model_repository"
    models: dict[str, tuple[Path, list[PreferencePair]]] = {}
    for index, source in enumerate(opts.models):
        folder = model_folder(source, index, work)
        pairs_file = opts.pairs or folder / "eval_pairs.jsonl"
        models[f"rm{index}"] = (folder, read_pairs(pairs_file))
        for precision in opts.precisions:
            log(f"exporting {source} ({folder.name}) in {precision}")
            export_reward_model(ExportOptions(model=folder, name=f"rm{index}_{precision}", repo=repo,
                                              max_length=opts.max_length, precision=precision),
                                log=lambda m: None)
    report: dict[str, Any] = {"tool": "templar bench-precision", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "machine": machine_info(), "options": {k: str(v) for k, v in asdict(opts).items()},
                              "models": {}}
    with EmbeddedTriton(repo, **free_server_ports(), log_file=work / "tritonserver.log") as server:
        for index, (name, (folder, pairs)) in enumerate(models.items()):
            rows = [{"messages": p.chosen} for p in pairs] + [{"messages": p.rejected} for p in pairs]
            scores = {}
            for precision in opts.precisions:
                config = RewardClientConfig(model=f"{name}_{precision}", endpoints=[server.grpc_url])
                with RewardClient(config) as client:
                    scores[precision] = score_rows(client, rows)
            results = {p: compare(scores["fp32"], s, len(pairs)) for p, s in scores.items()}
            for precision, r in results.items():
                r["within_bound"] = r["flipped_share"] <= opts.flip_bound
                log(f"{opts.models[index]} {precision}: accuracy {r['accuracy']:.3f}, mean margin "
                    f"{r['mean_margin']:.2f} (smallest {r['smallest_abs_margin']:.3f}), {r['flipped']} of "
                    f"{len(pairs)} pairs change winner vs fp32, max |d| "
                    f"{r['max_abs_diff']:.2e}, Spearman {r['spearman']:.4f}")
            report["models"][opts.models[index]] = {"folder": str(folder), "pairs": len(pairs), "precisions": results,
                                                    # chosen rows, then rejected rows, in the pairs' order
                                                    "scores": {p: s.tolist() for p, s in scores.items()}}
        # what each export ran as, in the server's own words ("rm0_bf16_model: scoring in bf16 on torch ...")
        report["served"] = dict(re.findall(r"(\w+_model): scoring in ([^\n]*)", server.log_path.read_text(
            errors="replace")))
    report["all_within_bound"] = all(r["within_bound"] for m in report["models"].values()
                                     for r in m["precisions"].values())
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def add_arguments(parser) -> None:
    d = PrecisionBenchOptions()
    parser.add_argument("--out", type=Path, default=d.out, help="the JSON report (default: %(default)s)")
    parser.add_argument("--work", type=Path, help="repository and server log (default: beside --out)")
    parser.add_argument("--models", nargs="+", default=d.models, metavar="FOLDER|tiny-rm:FAMILY",
                        help="the RMs (default: the demo's two, %(default)s)")
    parser.add_argument("--pairs", type=Path, help="preference pairs, JSONL (default: each model's eval_pairs.jsonl)")
    parser.add_argument("--precisions", nargs="+", default=d.precisions, choices=("fp32", "bf16", "int8"),
                        help="what each RM is exported in; fp32 is the reference (default: %(default)s)")
    parser.add_argument("--flip-bound", type=float, default=d.flip_bound,
                        help="the share of pairs that may change winner against fp32 (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=d.max_length, help="(default: %(default)s)")


def main(args) -> int:
    opts = PrecisionBenchOptions(out=args.out, work=args.work, models=args.models, pairs=args.pairs,
                                 precisions=args.precisions, flip_bound=args.flip_bound, max_length=args.max_length)
    report = run(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({name: {p: {k: r[k] for k in ("accuracy", "flipped", "max_abs_diff", "spearman")}
                             for p, r in m["precisions"].items()} for name, m in report["models"].items()}, indent=2))
    return 0 if report["all_within_bound"] else 1
