"""The direction of a PPO update, through the real trainer: rewarded responses become more likely, penalised ones
less, and the clipped objective improves on the minibatch it was computed on. (A check that weights merely changed
would pass for an update of the wrong sign.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # DeepSpeed engines (in a process of their own)


def test_an_update_raises_the_probability_of_rewarded_responses(tiny_actor, tmp_path):
    script = Path(__file__).with_name("ppo_update_check.py")
    result = subprocess.run([sys.executable, str(script), str(tiny_actor), str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(text for text in result.stdout.splitlines() if text.startswith("RESULT "))
    report = json.loads(line[len("RESULT "):])
    assert report["advantage_sign_agrees"]
    change, rewarded = report["logprob_change"], report["rewarded"]
    up = [c for c, r in zip(change, rewarded) if r]
    down = [c for c, r in zip(change, rewarded) if not r]
    assert min(up) > 0 > max(down), change  # every rewarded response more likely, every penalised one less
    assert report["policy_loss_after"] < report["policy_loss_before"]
