"""Atomic checkpoints: everything a resumed run needs, or nothing.

OUTPUT_DIR/checkpoints/step-000040/actor/ [critic/]  DeepSpeed engine states (weights, optimizer, ZeRO partitions);
                                                       critic-free estimators (grpo, rloo, ...) have no critic
                                     rank<r>.pt        trainer state per rank: step, KL controller, data position,
                                                       reward normalisers, RNG states
                                     COMPLETE          the manifest, written last: the size of every file above
OUTPUT_DIR/checkpoints/latest                          the name of the newest complete checkpoint

Writing (`save_checkpoint`): all ranks write into a hidden staging folder; once every rank is done, rank 0 flushes
every file to the disk (fsync), writes the manifest, renames the folder into place and then replaces `latest` (a
rename too), flushing the folder after each rename. A kill at any moment leaves the previous checkpoint intact; the
hidden folders a kill leaves behind (`.staging-*`, `.trash-*`) are never loaded and are removed by the next save or
resume. A write that fails (a full disk) removes its staging folder, leaves `latest` and the previous checkpoint as
they were, and raises CheckpointError on every rank.

Reading (`latest_checkpoint`): the folder `latest` names if its files match its manifest; if they do not (a folder
without COMPLETE, a file missing or of another size: e.g. a power loss that kept a rename but not the data), a
warning, and the newest checkpoint that is complete. `load_checkpoint` refuses an incomplete folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from templar.errors import CheckpointError
from templar.trainer.distributed import World, barrier, broadcast_object, gather_objects
from templar.trainer.faults import maybe_die

log = logging.getLogger("templar.trainer")
ENGINES = ("actor", "critic")  # the engines a checkpoint may hold (a critic only with a critic estimator)
MANIFEST = "COMPLETE"
NAME = re.compile(r"step-(\d+)")
DISK_FULL_BYTES = 16 << 20  # torch.save reports a full disk as a RuntimeError with no errno: this little left is full


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_problem(path: Path) -> str | None:
    """None if `path` holds a complete checkpoint (every file of its manifest, at its size), else what is wrong."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        expected = {str(name): int(size) for name, size in files.items()}
    except FileNotFoundError:
        if not path.is_dir():
            return "the folder is missing"
        if (path / "rank0.pt").is_file() and (path / "actor").is_dir():
            log.warning("checkpoint %s has no %s manifest (written before manifests existed): trusting it", path,
                        MANIFEST)
            return None
        return f"no {MANIFEST} manifest: its writing was cut short"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable {MANIFEST} manifest ({exc})"
    for name, size in expected.items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size}"
    return None


def _step_folders(root: Path) -> list[Path]:
    """The checkpoint folders, newest first."""
    found = [p for p in root.glob("step-*") if NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)), reverse=True)


def _pointer(root: Path) -> str | None:
    """The checkpoint `latest` names, if it names one."""
    try:
        name = (root / "latest").read_text().strip()
    except OSError:
        return None
    return name if NAME.fullmatch(name) else None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if it is complete, else (with a warning for each
    folder passed over) the newest complete one; None if there is none."""
    root = checkpoint_root(output_dir)
    named = _pointer(root)
    candidates = [root / named] if named else []
    candidates += [p for p in _step_folders(root) if p.name != named]
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is incomplete (%s): not loading it", path, problem)
    return None


def remove_leftovers(output_dir: str | Path) -> None:
    """Remove what a killed save leaves behind: staging folders, folders being deleted, a half-written pointer."""
    root = checkpoint_root(output_dir)
    for path in [*root.glob(".staging-*"), *root.glob(".trash-*")]:
        log.warning("removing %s, left by an interrupted checkpoint save", path)
        shutil.rmtree(path, ignore_errors=True)
    (root / ".latest.tmp").unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_files(folder: Path) -> dict[str, int]:
    """fsync every file and folder under `folder`; returns each file's size (the manifest)."""
    sizes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            _fsync_dir(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            sizes[path.relative_to(folder).as_posix()] = path.stat().st_size
    return sizes


def _write_staging(staging: Path, engines: dict, state: dict, world: World, step: int) -> None:
    """Every rank: its part of the checkpoint, into the staging folder."""
    staging.mkdir(parents=True, exist_ok=True)
    for key, engine in engines.items():
        engine.save_checkpoint(str(staging / key), tag="state")
    maybe_die("checkpoint", step)  # a testing hook (templar.trainer.faults)
    torch.save(state, staging / f"rank{world.rank}.pt")


def _publish(root: Path, staging: Path, name: str) -> None:
    """Rank 0, once every rank wrote its part: manifest, then the renames. Everything that needs disk space (and so
    can fail on a full disk) comes before the first rename."""
    sizes = _sync_files(staging)
    _write_durably(staging / MANIFEST, json.dumps({"name": name, "files": sizes}, indent=1))
    _fsync_dir(staging)
    pointer = root / ".latest.tmp"
    _write_durably(pointer, name)
    final = root / name
    if final.exists():  # renamed aside, not deleted in place: never a half-deleted folder under a checkpoint's name
        final.rename(root / f".trash-{name}")
    staging.rename(final)
    _fsync_dir(root)
    os.replace(pointer, root / "latest")
    _fsync_dir(root)


def _prune(root: Path, name: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints up to this one; remove the rest (older ones, incomplete ones,
    and any after this step: a run that got here again abandoned them)."""
    step = int(NAME.fullmatch(name).group(1))
    kept = 1
    for path in _step_folders(root):
        if path.name == name:
            continue
        if kept < keep and int(NAME.fullmatch(path.name).group(1)) < step and checkpoint_problem(path) is None:
            kept += 1
            continue
        trash = root / f".trash-{path.name}"
        path.rename(trash)  # first out of sight, then deleted: a kill meanwhile leaves no torn step-* folder
        shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(root / f".trash-{name}", ignore_errors=True)


def _capture(work: Callable[[], None]) -> BaseException | None:
    try:
        work()
    except Exception as exc:  # every rank must reach the exchange below, whatever happened
        return exc
    return None


def _disk_full(root: Path) -> bool:
    try:
        return shutil.disk_usage(root).free < DISK_FULL_BYTES
    except OSError:
        return False


def _failure(error: BaseException | None, root: Path) -> tuple[str, bool] | None:
    """(what went wrong, whether it is an I/O error to report in one line) for an error, None for none."""
    if error is None:
        return None
    code = getattr(error, "errno", None)
    if not code and _disk_full(root):
        code = errno.ENOSPC
    if code:
        return f"{os.strerror(code)} [{errno.errorcode.get(code, code)}]", True
    if isinstance(error, OSError):
        return str(error), True
    return f"{type(error).__name__}: {error}", False


def _fail(root: Path, name: str, failures: list, error: BaseException | None, world: World) -> None:
    if world.is_main:
        shutil.rmtree(root / f".staging-{name}", ignore_errors=True)
        (root / ".latest.tmp").unlink(missing_ok=True)
    barrier()
    rank, (text, reportable) = next((r, f) for r, f in enumerate(failures) if f)
    if not reportable:
        if error is not None:
            raise error
        raise RuntimeError(f"checkpoint {name}: rank {rank} failed: {text}")
    previous = _pointer(root)
    kept = (f"the previous checkpoint {root / previous} is intact and `latest` still names it" if previous
            else "there is no earlier checkpoint")
    where = f" on rank {rank}" if world.size > 1 else ""
    advice = "free some space" if "[ENOSPC]" in text or "[EDQUOT]" in text else "fix that"
    raise CheckpointError(f"checkpoint {root / name} could not be written ({text}{where}); its partial files were "
                          f"removed and {kept}: {advice}, then continue with --resume")


def save_checkpoint(output_dir: str | Path, step: int, engines: dict, state: dict, world: World,
                    keep: int = 2) -> Path:
    """Every rank calls this. Returns the new checkpoint's folder, or raises CheckpointError on every rank (e.g. a
    full disk), having removed the staging folder and left `latest` and the previous checkpoint as they were."""
    root = checkpoint_root(output_dir)
    name = f"step-{step:06d}"
    staging = root / f".staging-{name}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(output_dir)
    barrier()
    error = _capture(lambda: _write_staging(staging, engines, state, world, step))
    failures = gather_objects(_failure(error, root))
    if world.is_main and not any(failures):
        error = _capture(lambda: _publish(root, staging, name))
        failures[0] = _failure(error, root)
    failures = broadcast_object(failures)
    if any(failures):
        _fail(root, name, failures, error, world)
    if world.is_main:
        _prune(root, name, keep)
        log.info("checkpoint saved: %s", root / name)
    barrier()
    return root / name


def load_checkpoint(path: Path, engines: dict, world: World) -> dict:
    """Restore engine states and return this rank's trainer state."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} is not a complete checkpoint ({problem}); resume from the newest complete one "
                              "(--resume picks it)")
    state_file = path / f"rank{world.rank}.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} has no state for rank {world.rank}; resume with the same number of ranks")
    saved = {key for key in ENGINES if (path / key).is_dir()}
    if saved != set(engines):
        raise CheckpointError(f"{path} holds the engines {', '.join(sorted(saved))}, this run has "
                              f"{', '.join(sorted(engines))}: resume with the ppo.advantage_estimator it was written "
                              "with (a critic estimator such as gae, or a critic-free one)")
    for key, engine in engines.items():
        engine.load_checkpoint(str(path / key), tag="state")
    return torch.load(state_file, weights_only=False)
