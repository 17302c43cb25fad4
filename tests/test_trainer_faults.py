"""Crashes and a full disk: a trainer killed with a real SIGKILL at each point of a step (TEMPLAR_FAULT, see
trainer/faults.py) resumes from its last complete checkpoint and ends with every step logged once and the result an
uninterrupted run has; a torn checkpoint is never loaded; a checkpoint that does not fit on the disk leaves the
previous one intact and ends the run in one line. Real DeepSpeed (CPU), real Triton over gRPC, a real tmpfs."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from templar.errors import CheckpointError
from templar.trainer.checkpoint import (MANIFEST, checkpoint_problem, latest_checkpoint, load_checkpoint,
                                        remove_leftovers, save_checkpoint)
from templar.trainer.distributed import World
from templar.trainer.faults import PHASES
from templar.trainer.metrics import read_metrics, restart_jsonl

from test_trainer import metric_steps, small_run, without_timings

pytestmark = pytest.mark.integration  # runs the trainer against Triton

STEPS = 4  # save_every=2 (small_run): checkpoints at steps 2 and 4
# phase -> (the step it is killed at, the steps metrics.jsonl and samples.jsonl hold then). Every case resumes from
# the step-2 checkpoint, so the lines of any later step must be dropped and the steps redone.
KILLED_AT = {
    "rollout": (4, [1, 2, 3], [1, 2, 3]),
    "scoring": (3, [1, 2], [1, 2, 3]),  # step 3's sample is written, its metrics are not
    "update": (3, [1, 2], [1, 2, 3]),  # step 3 trained in memory only
    "checkpoint": (4, [1, 2, 3, 4], [1, 2, 3, 4]),  # the step-4 checkpoint half written in its staging folder
}
ONE_RANK = World(rank=0, size=1, local_rank=0)


def train(*args: str, fault: str | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TEMPLAR_FAULT"}
    if fault:
        env["TEMPLAR_FAULT"] = fault
    return subprocess.run([*prefix, sys.executable, "-m", "templar.cli", "train", *args], capture_output=True,
                          text=True, timeout=900, env=env)


def steps_in(path: Path) -> list[int]:
    return [row["step"] for row in read_metrics(path)] if path.exists() else []


def contents(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.fixture(scope="module")
def straight(triton, tiny_actor, tmp_path_factory) -> Path:
    """The same run, never interrupted: what every resumed run must end up equal to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = train(*small_run(out, tiny_actor, triton.grpc_url, steps=STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("phase", PHASES)
def test_a_run_killed_at_any_point_of_a_step_resumes_exactly(triton, tiny_actor, straight, tmp_path, phase):
    out, (step, logged, sampled) = tmp_path / "run", KILLED_AT[phase]
    root = out / "checkpoints"
    args = small_run(out, tiny_actor, triton.grpc_url, steps=STEPS)
    killed = train(*args, fault=f"{phase}:{step}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (root / "latest").read_text() == "step-000002"
    assert metric_steps(out) == logged and steps_in(out / "samples.jsonl") == sampled
    if phase == "checkpoint":
        staging = root / ".staging-step-000004"
        assert (staging / "actor").is_dir() and not (staging / MANIFEST).exists()
        # what a power loss after the rename could leave: a torn folder under the checkpoint's name, `latest` on it
        shutil.copytree(staging, root / "step-000004")
        (root / "latest").write_text("step-000004")
    for name in ("metrics.jsonl", "samples.jsonl"):  # a line cut short (a kill or power loss mid-write)
        with open(out / name, "a", encoding="utf-8") as f:
            f.write('{"step": 3, "reward_me')

    resumed = train(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "continuing at step 3" in log  # from the step-2 checkpoint: nothing torn was loaded
    assert "dropped 1 torn line" in log
    if phase == "checkpoint":
        assert "step-000004 is incomplete (no COMPLETE manifest" in log
        assert "removing " + str(root / ".staging-step-000004") in log
    assert metric_steps(out) == [1, 2, 3, 4] and steps_in(out / "samples.jsonl") == [1, 2, 3, 4]
    assert (root / "latest").read_text() == "step-000004"
    assert contents(root) == ["latest", "step-000002", "step-000004"]  # no staging, trash or torn folder left
    assert checkpoint_problem(root / "step-000004") is None
    assert json.loads((out / "summary.json").read_text())["completed"]
    # the same run as one never interrupted: every metric (as written) and the final weights
    assert without_timings(read_metrics(out / "metrics.jsonl")) == without_timings(
        read_metrics(straight / "metrics.jsonl"))
    a = load_file(str(straight / "final" / "actor" / "model.safetensors"))
    b = load_file(str(out / "final" / "actor" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# A small disk for one command: a tmpfs mounted over MOUNT in a private mount namespace (so it goes away with the
# command, whatever happens to the test), filled from KEEP first and copied back into KEEP after.
SMALL_DISK = """
size=$1 mount_point=$2 keep=$3; shift 3
mount -t tmpfs -o "size=$size" tmpfs "$mount_point" || exit 97
cp -a "$keep"/. "$mount_point"/ || exit 98
"$@"; rc=$?
rm -rf "$keep" && mkdir "$keep" && cp -a "$mount_point"/. "$keep"/ || exit 98
exit $rc
"""


def on_small_disk(size: int, mount_point: Path, keep: Path) -> tuple[str, ...]:
    if shutil.which("unshare") is None:
        pytest.fail("this test needs `unshare` (util-linux) to mount a small tmpfs")
    user = () if os.geteuid() == 0 else ("--user", "--map-root-user")  # not root: a user namespace
    return ("unshare", *user, "--mount", "--propagation", "private", "sh", "-c", SMALL_DISK, "sh", str(size),
            str(mount_point), str(keep))


def test_a_full_disk_keeps_the_previous_checkpoint_and_ends_in_one_line(triton, tiny_actor, tmp_path):
    out, disk = tmp_path / "run", tmp_path / "disk"
    root = out / "checkpoints"
    first = train(*small_run(out, tiny_actor, triton.grpc_url, steps=2))
    assert first.returncode == 0, first.stderr[-3000:]
    size = sum(p.stat().st_size for p in (root / "step-000002").rglob("*") if p.is_file())
    root.rename(disk)
    root.mkdir()
    # room for the step-2 checkpoint and half of another: the step-4 one cannot be written
    args = small_run(out, tiny_actor, triton.grpc_url, steps=STEPS)
    full = train(*args, "--resume", prefix=on_small_disk(size * 3 // 2, root, disk))
    if full.returncode in (97, 98):
        pytest.fail(f"could not mount a tmpfs for the full disk (needs root or user namespaces): {full.stderr}")
    assert full.returncode == 2, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("templar train: error: ")]
    assert len(errors) == 1, full.stderr[-3000:]
    last = errors[0]
    assert last.startswith(f"templar train: error: checkpoint {root / 'step-000004'} could not be written "
                           "(No space left on device [ENOSPC])"), full.stderr[-3000:]
    assert f"the previous checkpoint {root / 'step-000002'} is intact" in last and "Traceback" not in full.stderr
    assert contents(disk) == ["latest", "step-000002"]  # the staging folder removed, `latest` untouched
    assert (disk / "latest").read_text() == "step-000002" and checkpoint_problem(disk / "step-000002") is None
    assert metric_steps(out) == [1, 2, 3, 4]  # step 4 ran; its checkpoint did not fit

    root.rmdir()
    disk.rename(root)  # space freed: the previous checkpoint is what the run goes on from
    resumed = train(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing at step 3" in (out / "train.log").read_text()
    assert metric_steps(out) == [1, 2, 3, 4] and (root / "latest").read_text() == "step-000004"


# -- the same rules without a trainer: fake engines that write a file -------------------------------------------------
class FakeEngine:
    def __init__(self, fail: Exception | None = None):
        self.fail, self.loaded = fail, None

    def save_checkpoint(self, path: str, tag: str) -> None:
        (Path(path) / tag).mkdir(parents=True)
        (Path(path) / tag / "weights.bin").write_bytes(b"w" * 1000)
        if self.fail is not None:
            raise self.fail

    def load_checkpoint(self, path: str, tag: str) -> None:
        self.loaded = Path(path) / tag


def save(out: Path, step: int, fail: Exception | None = None) -> Path:
    return save_checkpoint(out, step, {"actor": FakeEngine(), "critic": FakeEngine(fail)}, {"step": step}, ONE_RANK)


def test_latest_checkpoint_passes_over_torn_folders(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        save(tmp_path, step)
    assert contents(root) == ["latest", "step-000004", "step-000006"]  # keep=2
    assert latest_checkpoint(tmp_path) == root / "step-000006"
    caplog.set_level(logging.WARNING, "templar.trainer")
    (root / "step-000006" / "actor" / "state" / "weights.bin").write_bytes(b"w" * 10)  # a file cut short
    assert latest_checkpoint(tmp_path) == root / "step-000004"
    assert "step-000006 is incomplete (actor/state/weights.bin has 10 bytes, the manifest says 1000)" in caplog.text
    with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
        load_checkpoint(root / "step-000006", {"actor": FakeEngine(), "critic": FakeEngine()}, ONE_RANK)
    (root / "step-000004" / MANIFEST).unlink()  # written before manifests existed: trusted, with a warning
    assert latest_checkpoint(tmp_path) == root / "step-000004"
    assert "step-000004 has no COMPLETE manifest (written before manifests existed)" in caplog.text
    (root / "step-000004" / "rank0.pt").unlink()  # a folder whose writing never finished
    assert latest_checkpoint(tmp_path) is None
    save(tmp_path, 8)  # torn folders are removed by the next save
    assert contents(root) == ["latest", "step-000008"]
    (root / "latest").write_text("step-000010")  # a pointer to nothing
    assert latest_checkpoint(tmp_path) == root / "step-000008"
    engines = {"actor": FakeEngine(), "critic": FakeEngine()}
    assert load_checkpoint(root / "step-000008", engines, ONE_RANK) == {"step": 8}
    assert engines["critic"].loaded == root / "step-000008" / "critic" / "state"


def test_critic_free_checkpoints_hold_the_actor_only_and_do_not_mix(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, 2, {"actor": FakeEngine()}, {"step": 2}, ONE_RANK)  # grpo, rloo, ...
    assert sorted(p.name for p in (root / "step-000002").iterdir()) == ["COMPLETE", "actor", "rank0.pt"]
    assert latest_checkpoint(tmp_path) == root / "step-000002"
    actor_only = {"actor": FakeEngine()}
    assert load_checkpoint(root / "step-000002", actor_only, ONE_RANK) == {"step": 2}
    with pytest.raises(CheckpointError, match="holds the engines actor, this run has actor, critic: resume with "
                                              "the ppo.advantage_estimator it was written with"):
        load_checkpoint(root / "step-000002", {"actor": FakeEngine(), "critic": FakeEngine()}, ONE_RANK)
    save(tmp_path, 4)  # with a critic (gae)
    with pytest.raises(CheckpointError, match="holds the engines actor, critic, this run has actor:"):
        load_checkpoint(root / "step-000004", {"actor": FakeEngine()}, ONE_RANK)


def test_leftovers_of_a_killed_save_are_removed(tmp_path):
    save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    for leftover in (".staging-step-000004", ".trash-step-000000"):
        (root / leftover / "actor").mkdir(parents=True)
    (root / ".latest.tmp").write_text("step-000004")
    assert latest_checkpoint(tmp_path) == root / "step-000002"  # hidden folders are never candidates
    remove_leftovers(tmp_path)
    assert contents(root) == ["latest", "step-000002"]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError) as caught:
        save(tmp_path, 4, fail=OSError(errno.ENOSPC, "No space left on device"))
    message = str(caught.value)
    assert f"checkpoint {root / 'step-000004'} could not be written (No space left on device [ENOSPC])" in message
    assert f"the previous checkpoint {root / 'step-000002'} is intact" in message and "\n" not in message
    assert contents(root) == ["latest", "step-000002"] and latest_checkpoint(tmp_path) == root / "step-000002"
    with pytest.raises(ValueError, match="a bug"):  # not an I/O error (and the disk is not full): raised as it is
        save(tmp_path, 4, fail=ValueError("a bug"))
    assert contents(root) == ["latest", "step-000002"]


def test_a_resumed_log_drops_later_steps_and_a_torn_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": s, "x": "é"}, ensure_ascii=False) + "\n" for s in (1, 2, 3))
    path.write_bytes(whole.encode() + b'{"step": 4, "x": "\xc3')  # cut inside a UTF-8 character
    caplog.set_level(logging.WARNING, "templar.trainer")
    restart_jsonl(path, 2)
    assert steps_in(path) == [1, 2] and path.read_text().endswith("\n")
    assert "dropped 1 torn line" in caplog.text
    restart_jsonl(path, None)
    assert not path.exists()
