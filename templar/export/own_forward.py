"""`templar export` of an RM whose own code combines its objectives (ArmoRM-Llama3-8B: 19 objectives regressed from
the last token, weighed by a gating network that reads the prompt's end, which its code finds in Python): served
by its own forward, in torch inside Triton's Python backend (templar.serving.torch_scorer).

A trace to ONNX would freeze what such code decides per input in Python (ArmoRM's gating position) into constants of
the traced sample, so these RMs are not traced: the model folder is served as it is, `SCORE` is its forward's
`score` (its own combination) and `SCORES` its `rewards` (one value per objective). The objectives are named by
`--objective-names`, else by the config's `id2label` where it has one name per objective, else `objective_<i>`.

The phases are the outcome export's (templar.export.exporter): the tokenizer and template saved for the
preprocessing model, the reference (the model's own forward, one unpadded sample conversation at a time), the
served files written, then the scorer Triton will run, loaded from the served files, checked against the reference
on one right-padded batch of the samples. Nothing is served unless it holds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from templar import contract
from templar.chat_format import ChatFormat
from templar.errors import ExportError
from templar.export.repository import RewardModelEntry, StagedModel
from templar.export.resources import estimate
from templar.export.scorer import LoadedRewardModel, objective_names, parity_error
from templar.padding import right_pad
from templar.serving.settings import padding_id
from templar.serving.torch_scorer import OwnForwardScorer, own_outputs

SCORE_POSITION = "own-forward"  # PARAM_SCORE_POSITION: the model's own code decides where it reads


def name_objectives(loaded: LoadedRewardModel, count: int, given: list[str] | None) -> list[str]:
    """--objective-names, else the config's id2label where it names every objective, else objective_<i>."""
    if given is not None:
        if len(given) != count or len(set(given)) != count:
            raise ExportError(f"--objective-names gives {len(given)} names ({', '.join(given)}) for the {count} "
                              "objectives this RM's forward returns (distinct names, in its order)")
        return list(given)
    labels = objective_names(loaded.config)
    return labels if len(labels) == count and not all(n == f"LABEL_{i}" for i, n in enumerate(labels)) else \
        [f"objective_{i}" for i in range(count)]


def _reference(loaded: LoadedRewardModel, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """([N] scores, [N, K] objectives): the model's own forward, one unpadded conversation at a time."""
    scores, objectives = [], []
    for row in rows:
        score, rewards = own_outputs(loaded.classifier, torch.tensor([row]), torch.ones(1, len(row),
                                                                                        dtype=torch.long))
        scores.append(score[0, 0])
        objectives.append(rewards[0])
    return np.array(scores, dtype=np.float64), np.array(objectives, dtype=np.float64)


def _copy_model_folder(source: Path, target: Path) -> None:
    """The model's files beside the scorer: copied, never linked, so that rewriting the source folder (training into
    it again) cannot change what is served."""
    target.mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in source.iterdir() if p.is_file()):
        shutil.copy2(file, target / file.name)


def _check(folder: Path, reference: tuple[np.ndarray, np.ndarray], rows: list[list[int]], pad_id: int,
           tolerance: float, log) -> float:
    """The served scorer (loaded from the served files, as Triton will) on one right-padded batch of the samples
    against the reference: SCORE and every objective."""
    scorer = OwnForwardScorer(folder)
    score, objectives = scorer(*right_pad(rows, pad_id))
    del scorer
    max_diff = float(np.concatenate([parity_error(score[:, 0].astype(np.float64), reference[0]),
                                     parity_error(objectives.astype(np.float64), reference[1]).reshape(-1)]).max())
    log(f"      max |served - the model's own forward| / max(1, |score|) = {max_diff:.2e} over {len(rows)} "
        f"conversations x (SCORE + {objectives.shape[1]} objectives), one padded batch")
    if not np.isfinite(max_diff) or max_diff > tolerance:
        raise ExportError(f"the served scorer differs from the model's own forward by {max_diff:.3e} (relative) > "
                          f"tolerance {tolerance} on a padded batch: its code may not read padded rows as it reads "
                          f"one row alone (the pad id it pools by, {pad_id}, is the tokenizer's); nothing was served")
    return max_diff


class _OwnPosition:
    """The model's own code reads where it reads (no single score position of Templar's)."""

    reason = "the RM's own code reads its scores (it combines its objectives itself); served by its own forward"

    def as_parameters(self) -> dict[str, str]:
        return {contract.PARAM_SCORE_POSITION: SCORE_POSITION, contract.PARAM_SCORE_PAD_ID: ""}


def export_own_forward(opts, loaded: LoadedRewardModel, chat_format: ChatFormat, max_length: int, step, log):
    """Export `opts.model` (loaded, a custom-code RM whose forward returns `score` and `rewards`) into `opts.repo`."""
    from templar.export.exporter import (TOLERANCES, ExportReport, export_parameters, release_memory,
                                         save_served_tokenizer)

    started = time.perf_counter()
    if opts.objective_weights is not None:
        raise ExportError(f"{opts.model} combines its objectives itself (its forward returns `score`): "
                          "--objective-weights does not apply")
    if opts.format != "onnx" or opts.precision not in ("auto", "fp32"):
        raise ExportError("an RM that combines its own objectives is served by its own forward in fp32: pass "
                          f"--precision fp32 (got --format {opts.format}, --precision {opts.precision})")
    count = loaded.parameters
    with StagedModel(opts.repo, opts.name, opts.version) as staged:
        step("saving tokenizer and template for the preprocessing model")
        served, rows = save_served_tokenizer(opts, chat_format, max_length, staged.tokenizer_dir)
        step(f"the model's own forward on {len(rows)} sample conversations (the reference)")
        reference = _reference(loaded, rows)
        names = name_objectives(loaded, reference[1].shape[1], opts.objective_names)
        log(f"      SCORE = its own combination of {len(names)} objectives: {', '.join(names)}")
        loaded.release()
        release_memory()
        step("copying the model folder beside the scorer (served by its own code, in torch)"
             f"{estimate(opts, 'loading')}")
        _copy_model_folder(Path(opts.model), staged.torch_model_dir)
        parameters = {**export_parameters(opts, served, staged.tokenizer_dir, max_length, loaded, count,
                                          _OwnPosition()),
                      contract.PARAM_RM_KIND: "multi-objective", contract.PARAM_OBJECTIVES: json.dumps(names),
                      contract.PARAM_OBJECTIVE_WEIGHTS: "null",  # its own combination
                      contract.PARAM_SCORER_RUNTIME: "torch"}
        parameters[contract.PARAM_WEIGHTS_SHA256] = parameters[contract.PARAM_SOURCE_SHA256]
        settings = dataclasses.replace(opts.settings, cpu_precision="fp32")
        entry = RewardModelEntry(opts.name, None, staged.tokenizer_dir, parameters, settings,
                                 torch_model_dir=staged.torch_model_dir)
        step(f"writing Triton entries for {opts.name!r} into {opts.repo}")
        staged.write(entry)
        folders = staged.commit(lambda m: log("      " + m))
        step("checking the served scorer (loaded from the served files) against the model's own forward")
        tolerance = opts.tolerance if opts.tolerance is not None else TOLERANCES["fp32"]
        max_diff = _check(staged.final(staged.torch_model_dir), reference, rows, padding_id(served.tokenizer),
                          tolerance, log)
        staged.finish_checked(entry, max_diff)
        step.finish()
    report = ExportReport(opts.name, folders, max_diff, len(rows), entry.parameters, time.perf_counter() - started)
    log(f"exported {opts.name!r} in {report.seconds:.1f}s: served by its own forward (torch), SCORE = its own "
        f"combination, SCORES = {len(names)} objectives")
    return report
