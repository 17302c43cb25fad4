"""`templar bench-train`: samples per second of whole GRPO training steps, Templar against TRL's `GRPOTrainer`, on the
same models and the same work, side by side in one run.

Both train the same tiny actor (Qwen2.5's tokenizer and template) with GRPO against the same two reward models
(Llama-3.1's and Gemma-3's tokenizers and templates, weights 1 and 1): per step, `prompts` prompts x
`samples_per_prompt` responses of at most `max_new_tokens` tokens, then `epochs` passes over them in minibatches of
`mini_batch` rows (micro-batches of `micro_batch`), the KL to the reference as a k3 loss term with the same beta, the
same learning rate, sampling at temperature 1.

    templar      `templar train` (DeepSpeed on the CPU); the RMs exported to ONNX and served by the embedded Triton
                 over gRPC, each applying its own template, scored while the trainer computes reference log-probs
    trl          `trl.GRPOTrainer` (accelerate on the CPU); the RMs in-process in torch, each re-templating with its
                 own tokenizer (`reward_processing_classes`); gradient checkpointing off, as in Templar
    trl-default  the same with TRL's default gradient checkpointing (on: activations recomputed in the backward)

Each runs `warmup + steps` steps in a process of its own, one after the other; the figure is the samples (responses)
trained per second over the measured steps: wall time from the end of the last warm-up step to the end of the last
step. Set-up (building engines, exporting and serving the RMs, loading models) is not counted on either side.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from templar.errors import ConfigError
from templar.tools.loadtest import machine_info


@dataclass
class TrainBenchOptions:
    out: Path = Path("bench-results")  # bench_train.json
    work: Path | None = None  # models, repository, runs, logs (default: OUT/work-train)
    steps: int = 6  # measured steps
    warmup: int = 2  # steps run before the clock starts
    prompts: int = 8  # prompts per step
    samples_per_prompt: int = 4  # the group size
    max_new_tokens: int = 8
    epochs: int = 4
    mini_batch: int = 16
    micro_batch: int = 8
    lr: float = 2e-4
    beta: float = 0.07  # KL loss coefficient
    seed: int = 1
    frameworks: tuple[str, ...] = ("templar", "trl")  # add "trl-default" for TRL with gradient checkpointing

    @property
    def rows(self) -> int:
        return self.prompts * self.samples_per_prompt


RM_FAMILIES = {"rm_llama3": "llama3_1", "rm_gemma3": "gemma3"}


def build_models(work: Path, seed: int) -> dict[str, Path]:
    """The tiny actor and RMs both frameworks train with (built once, kept in WORK/models)."""
    from templar.assets import fetch_tokenizer
    from templar.tiny_models import build_tiny_model

    models = {"actor": work / "models" / "actor-qwen2_5",
              **{name: work / "models" / f"{name}-{family}" for name, family in RM_FAMILIES.items()}}
    for name, path in models.items():
        family = "qwen2_5" if name == "actor" else RM_FAMILIES[name]
        if not (path / "config.json").is_file():
            fetch_tokenizer(family, progress=False)
            build_tiny_model(family, path, kind="causal-lm" if name == "actor" else "reward", seed=seed)
    return models


def templar_overrides(opts: TrainBenchOptions, models: dict[str, Path], run_dir: Path, repo: Path) -> list[str]:
    rms = ", ".join(f"{{name: {name}, path: '{models[name]}', weight: 1.0, max_length: 512}}" for name in RM_FAMILIES)
    return [f"output_dir={run_dir}", f"models.actor={models['actor']}", f"steps={opts.warmup + opts.steps}",
            f"save_every={10**6}", f"seed={opts.seed}", f"reward.repo={repo}", f"reward.models=[{rms}]",
            "reward.unfinished_penalty=0.0", f"generation.max_new_tokens={opts.max_new_tokens}",
            f"generation.samples_per_prompt={opts.samples_per_prompt}", "ppo.advantage_estimator=grpo",
            "ppo.kl_estimator=k3", "ppo.kl_in=loss", f"ppo.kl_coef={opts.beta}",
            f"ppo.rollout_batch_size={opts.prompts}", f"ppo.mini_batch_size={opts.mini_batch}",
            f"ppo.micro_batch_size={opts.micro_batch}", f"ppo.ppo_epochs={opts.epochs}", f"ppo.actor_lr={opts.lr}",
            "models.max_prompt_tokens=128"]


def run_templar(opts: TrainBenchOptions, models: dict[str, Path], work: Path, log) -> dict[str, Any]:
    from templar.trainer.metrics import read_metrics

    run_dir = work / "templar-run"
    command = [sys.executable, "-m", "templar.cli", "train",
               *templar_overrides(opts, models, run_dir, work / "model_repository")]
    _run(command, work / "templar.log", "templar train", log)
    rows = read_metrics(run_dir / "metrics.jsonl")
    measured = rows[opts.warmup:]
    seconds = measured[-1]["wall_time"] - rows[opts.warmup - 1]["wall_time"] if opts.warmup else \
        sum(r["step_time_s"] for r in measured)
    phases = sorted({k for r in measured for k in r if k.startswith("time/")})
    return {"seconds": seconds, "steps": len(measured), "samples": opts.rows * len(measured),
            "seconds_per_step": seconds / len(measured),
            "phases_s_per_step": {p[5:]: sum(r.get(p, 0.0) for r in measured) / len(measured) for p in phases},
            "reward_mean_first_last": [rows[0]["reward_mean"], rows[-1]["reward_mean"]]}


def run_trl(opts: TrainBenchOptions, models: dict[str, Path], work: Path, log,
            gradient_checkpointing: bool = False) -> dict[str, Any]:
    try:
        import trl  # noqa: F401
    except ImportError:
        raise ConfigError("templar bench-train compares against TRL: pip install trl accelerate (the dev extra)") \
            from None
    name = "trl-default" if gradient_checkpointing else "trl"
    spec = work / f"{name}-spec.json"
    spec.write_text(json.dumps({"options": {k: v for k, v in asdict(opts).items() if k not in ("out", "work")},
                                "models": {k: str(v) for k, v in models.items()}, "out": str(work / f"{name}-run"),
                                "gradient_checkpointing": gradient_checkpointing}))
    _run([sys.executable, "-m", "templar.tools.bench.train_trl", str(spec)], work / f"{name}.log",
         f"TRL GRPOTrainer ({name})", log)
    return json.loads((work / f"{name}-run" / "result.json").read_text())


def _run(command: list[str], log_file: Path, what: str, log) -> None:
    log(f"[{what}] running (log: {log_file}) ...")
    started = time.perf_counter()
    with open(log_file, "w") as f:
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-15:]
        raise ConfigError(f"{what} failed (exit {result.returncode}); the end of {log_file}:\n" + "\n".join(tail))
    log(f"[{what}] done in {time.perf_counter() - started:.0f}s")


def run(opts: TrainBenchOptions, log=print) -> dict[str, Any]:
    if opts.warmup < 1 or opts.steps < 1:
        raise ConfigError("--warmup and --steps must be at least 1")
    work = opts.work or opts.out / "work-train"
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work, opts.seed)
    runners = {"templar": run_templar, "trl": run_trl,
               "trl-default": lambda *a: run_trl(*a, gradient_checkpointing=True)}
    results = {}
    for name in opts.frameworks:
        results[name] = runners[name](opts, models, work, log)
        results[name]["samples_per_s"] = results[name]["samples"] / results[name]["seconds"]
        log(f"[{name}] {results[name]['samples_per_s']:.2f} samples/s "
            f"({results[name]['seconds_per_step']:.2f} s per step of {opts.rows} samples)")
    report = {"tool": "templar bench-train", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine_info(), "options": {k: str(v) for k, v in asdict(opts).items()},
              "results": results}
    for other in ("trl", "trl-default"):
        if "templar" in results and other in results:
            ratio = results["templar"]["samples_per_s"] / results[other]["samples_per_s"]
            report[f"templar_vs_{other}"] = ratio
            log(f"Templar / {other}: x{ratio:.2f} (target >= 1.5)")
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "bench_train.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def add_arguments(parser) -> None:
    d = TrainBenchOptions
    parser.add_argument("--out", type=Path, default=d.out, help="output folder (default: %(default)s)")
    parser.add_argument("--work", type=Path, help="models, runs and logs (default: OUT/work-train)")
    for name, help_text in (("steps", "measured steps"), ("warmup", "steps before the clock starts"),
                            ("prompts", "prompts per step"), ("samples-per-prompt", "responses per prompt (group)"),
                            ("max-new-tokens", "response length limit"), ("epochs", "passes over each rollout"),
                            ("mini-batch", "rows per optimizer step"), ("micro-batch", "rows per forward/backward")):
        parser.add_argument(f"--{name}", type=int, default=getattr(d, name.replace("-", "_")),
                            help=f"{help_text} (default: %(default)s)")
    parser.add_argument("--frameworks", default=",".join(d.frameworks),
                        help="which to run, comma-separated (default: %(default)s)")


def main(args) -> int:
    frameworks = tuple(f.strip() for f in args.frameworks.split(",") if f.strip())
    unknown = set(frameworks) - {"templar", "trl", "trl-default"}
    if unknown:
        raise ConfigError(f"--frameworks: unknown {', '.join(sorted(unknown))} (known: templar, trl, trl-default)")
    opts = TrainBenchOptions(out=args.out, work=args.work, steps=args.steps, warmup=args.warmup, prompts=args.prompts,
                             samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                             epochs=args.epochs, mini_batch=args.mini_batch, micro_batch=args.micro_batch,
                             frameworks=frameworks)
    report = run(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({k: v for k, v in report.items() if k == "results" or k.startswith("templar_vs")}, indent=2))
    return 0
