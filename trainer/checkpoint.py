"""Atomic checkpoints: everything a resumed run needs, or nothing.

OUTPUT_DIR/checkpoints/step-000040/{actor,critic}/   DeepSpeed engine states (weights, optimizer, ZeRO partitions)
                                     rank<r>.pt        trainer state per rank: step, KL controller, data position,
                                                       reward normalisers, RNG states
OUTPUT_DIR/checkpoints/latest                          the name of the newest complete checkpoint

All ranks write into a hidden staging folder; only after every rank is done does rank 0 rename it into place and
then replace `latest` (a rename too), so a crash at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from templar.trainer.distributed import World, barrier

log = logging.getLogger("templar.trainer")
ENGINES = ("actor", "critic")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    pointer = checkpoint_root(output_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_root(output_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_checkpoint(output_dir: str | Path, step: int, engines: dict, state: dict, world: World,
                    keep: int = 2) -> Path:
    root = checkpoint_root(output_dir)
    name = f"step-{step:06d}"
    staging = root / f".staging-{name}"
    if world.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    for key in ENGINES:
        engines[key].save_checkpoint(str(staging / key), tag="state")
    torch.save(state, staging / f"rank{world.rank}.pt")
    barrier()
    final = root / name
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        pointer = root / ".latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, root / "latest")
        older = sorted(p for p in root.glob("step-*") if p.name != name)
        for old in older[: max(len(older) - (keep - 1), 0)]:  # keep the newest `keep`, this one included
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    barrier()
    return final


def load_checkpoint(path: Path, engines: dict, world: World) -> dict:
    """Restore engine states and return this rank's trainer state."""
    state_file = path / f"rank{world.rank}.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} has no state for rank {world.rank}; resume with the same number of ranks")
    for key in ENGINES:
        engines[key].load_checkpoint(str(path / key), tag="state")
    return torch.load(state_file, weights_only=False)
