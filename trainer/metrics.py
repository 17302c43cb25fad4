"""Metrics per step: OUTPUT_DIR/metrics.jsonl (one JSON object per step), TensorBoard (OUTPUT_DIR/tensorboard), and a
PNG of the reward, KL and loss curves at the end (OUTPUT_DIR/curves.png). Only rank 0 writes."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger("templar.trainer")


def _step_of(line: str) -> int | None:
    """The step of a JSONL line; None for a line that is not a whole JSON object with a step (the last line of a run
    killed mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def restart_jsonl(path: Path, resume_after_step: int | None) -> None:
    """A fresh run starts the file anew; a resumed one drops the steps logged after its checkpoint (they are redone)
    and any torn line. The file is replaced by a rename, so a kill meanwhile leaves the old one."""
    if resume_after_step is None:
        path.unlink(missing_ok=True)
    elif path.exists():
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            step = _step_of(line)
            if step is None:
                dropped += 1
            elif step <= resume_after_step:
                kept.append(line)
        if dropped:
            log.warning("%s: dropped %d torn line(s) (a run killed while writing it)", path, dropped)
        partial = path.with_name(f".{path.name}.tmp")
        partial.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(partial, path)


class MetricsLog:
    def __init__(self, output_dir: str | Path, enabled: bool, resume_after_step: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        for name in ("metrics.jsonl", "samples.jsonl"):
            restart_jsonl(Path(output_dir) / name, resume_after_step)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=(resume_after_step or 0) + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in metrics.items()},
               "wall_time": round(time.time(), 3)}  # when the step ended (throughput between lines)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    panels: list[tuple[list[str], str]] = [(["reward_mean"], "reward (RM score)")]
    if any(r.get("rule_satisfied") is not None for r in rows):  # data.rule: the share keeping the preference
        panels.append((["rule_satisfied"], "responses keeping the rule"))
    step_keys = sorted({k for r in rows for k in r if k.startswith(("first_step/", "last_step/"))})
    if step_keys:  # a process RM: its first and last step scores, one line each
        panels.append((step_keys, "process RM step scores"))
    panels += [(["kl_per_token"], "KL(actor || reference), nats/token"), (["policy_loss"], "policy loss"),
               (["entropy"], "policy entropy (per token)")]
    if any(r.get("value_loss") is not None for r in rows):  # a critic estimator
        panels.append((["value_loss"], "value loss"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (keys, title) in zip(axes, panels):
        for key in keys:
            values = [r.get(key) for r in rows]
            ax.plot(steps, [math.nan if v is None else v for v in values], marker=".", linewidth=1,
                    label=key if len(keys) > 1 else None)
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
