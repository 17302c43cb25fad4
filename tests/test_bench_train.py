"""`templar bench-train`, short: its machinery on one measured step (Templar's trainer with its embedded Triton, and
TRL's GRPOTrainer with in-process RMs, on the same models). The figures themselves are in docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # runs both trainers

SMALL = ["--steps", "1", "--warmup", "1", "--prompts", "2", "--samples-per-prompt", "2", "--epochs", "1",
         "--mini-batch", "4", "--micro-batch", "2", "--max-new-tokens", "4"]


def test_bench_train_measures_both_trainers_on_the_same_work(tmp_path):
    result = subprocess.run([sys.executable, "-m", "templar.cli", "bench-train", "--out", str(tmp_path), *SMALL,
                             "--frameworks", "templar,trl"], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench_train.json").read_text())
    templar, trl = report["results"]["templar"], report["results"]["trl"]
    for run in (templar, trl):
        assert run["steps"] == 1 and run["samples"] == 4  # 2 prompts x 2 samples, one measured step each
        assert run["seconds"] > 0 and run["samples_per_s"] == pytest.approx(4 / run["seconds"])
    assert trl["optimizer_steps"] == 2  # (warm-up + measured) rollouts x 4 rows / 4 per minibatch x 1 epoch
    assert report["templar_vs_trl"] == pytest.approx(templar["samples_per_s"] / trl["samples_per_s"])
    assert {"rollout", "update", "reference", "rewards_wait"} <= set(templar["phases_s_per_step"])
    assert "Templar / trl: x" in result.stderr


def test_bench_train_refuses_unknown_frameworks(capsys):
    from templar.cli import main as cli

    assert cli(["bench-train", "--frameworks", "templar,openrlhf"]) == 2
    assert "--frameworks: unknown openrlhf (known: templar, trl, trl-default)" in capsys.readouterr().err
