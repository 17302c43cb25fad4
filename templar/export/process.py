"""`templar export --kind prm`: a process reward model (templar.steps) -> ONNX + the same three Triton entries as an
outcome RM, the preprocessing model reading each conversation in the PRM's own step format.

The phases are the outcome export's (templar.export.exporter), with the PRM's own pieces: its step format resolved
against its tokenizer (the tag must be ONE token after a step), sample conversations of several steps, a graph that
answers the step score at every position (templar.export.step_scorer), and the check of ONNX Runtime against the
model's own forward at every step tag of the samples, in one right-padded batch. Nothing is written unless it holds.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from templar import contract
from templar.chat_format import ChatFormat
from templar.conversation import Conversation, ConversationError
from templar.errors import ExportError
from templar.export.onnx_files import weights_sha256
from templar.export.repository import RewardModelEntry, StagedModel
from templar.export.scorer import parity_error, trace_to_onnx
from templar.export.step_scorer import LoadedStepModel, load_step_model
from templar.padding import right_pad
from templar.samples import sample_conversations, without_system
from templar.serving.onnx_runtime import create_session, run_scores
from templar.serving.settings import padding_id
from templar.steps import StepFormat, StepReader

# What a sample response is cut into (the separator of the PRM's format between them)
SAMPLE_STEPS = ("First, read what is asked.", "Then work it out: 2 + 3 = 5.", "So the answer is 5.")


def sample_step_rows(chat_format: ChatFormat, reader: StepReader, max_length: int) -> tuple[list[list[int]],
                                                                                             list[list[int]]]:
    """(token rows, step-tag positions) of the sample conversations, each response cut into steps by the PRM's
    separator (one to three steps)."""
    rows, positions = [], []
    samples = list(sample_conversations(long_words=max_length // 2).values())
    for n, messages in enumerate(samples):
        steps = [messages[-1]["content"], *SAMPLE_STEPS[: n % 3]]
        content = reader.fmt.step_separator.join(s for s in steps if s.strip()) or SAMPLE_STEPS[0]
        for candidate in (messages, without_system(messages)):
            conversation = Conversation([*candidate[:-1], {"role": "assistant", "content": content}])
            try:
                reading = reader.read(chat_format, conversation)
            except ConversationError:
                continue
            rows.append(reading.tokenized.input_ids)
            positions.append(reading.positions)
            break
    if not rows:
        raise ExportError("the PRM's template and step format rejected every sample conversation")
    return rows, positions


def _served_chat_format(opts, fmt: StepFormat, max_length: int | None = None) -> ChatFormat:
    """The PRM's tokenizer with its template: --chat-template, else the step format's own (Math-Shepherd's), else
    the tokenizer's; its step tag escaped in client text where it is an added token."""
    source = Path(opts.tokenizer or opts.model)
    template = Path(opts.chat_template).read_text(encoding="utf-8") if opts.chat_template else fmt.chat_template
    try:
        base = ChatFormat.from_dir(source, template_kwargs=opts.template_kwargs, special_tokens=opts.special_tokens,
                                   extra_control_tokens=[fmt.step_tag])
    except OSError as exc:
        raise ExportError(f"could not load a tokenizer from {source}: {exc}") from None
    if template is None:
        return ChatFormat(base.tokenizer, max_length=max_length, template_kwargs=opts.template_kwargs,
                          special_tokens=opts.special_tokens, extra_control_tokens=[fmt.step_tag])
    return ChatFormat(base.tokenizer, chat_template=template, max_length=max_length,
                      template_kwargs=opts.template_kwargs, special_tokens=opts.special_tokens,
                      extra_control_tokens=[fmt.step_tag])


def _check_onnx(path: Path, loaded_reference: np.ndarray, name: str, rows: list[list[int]],
                positions: list[list[int]], pad_id: int, tolerance: float, log) -> float:
    """Largest relative difference between ONNX Runtime's step scores (one right-padded batch of the samples, read at
    their tags) and the reference's; refuses a graph past the tolerance."""
    ids, mask = right_pad(rows, pad_id)
    session = create_session(path, prepacking=False)
    token_scores = run_scores(session, ids, mask, contract.TOKEN_SCORES)
    del session
    served = np.concatenate([token_scores[i, at] for i, at in enumerate(positions)]).astype(np.float64)
    max_diff = float(parity_error(served, loaded_reference).max())
    log(f"      max |onnxruntime - {name}| / max(1, |score|) = {max_diff:.2e} over {len(served)} "
        f"steps of {len(rows)} conversations (one padded batch)")
    if not np.isfinite(max_diff) or max_diff > tolerance:
        raise ExportError(f"ONNX Runtime's step scores differ from the reference by {max_diff:.3e} (relative) > "
                          f"tolerance {tolerance}; nothing was written")
    return max_diff


def _save_tokenizer(opts, fmt: StepFormat, chat_format: ChatFormat, tokenizer_dir: Path, max_length: int):
    """Save the tokenizer and template the preprocessing model will load; check the saved folder reads the samples
    exactly as the source does. Returns (the served ChatFormat, its StepReader, the sample rows, their tags)."""
    chat_format.tokenizer.save_pretrained(str(tokenizer_dir))
    served = _served_chat_format(dataclasses.replace(opts, tokenizer=tokenizer_dir, chat_template=None),
                                 dataclasses.replace(fmt, chat_template=None), max_length)
    reader = StepReader.for_chat_format(served, fmt)
    rows, positions = sample_step_rows(served, reader, max_length)
    source = _served_chat_format(opts, fmt, max_length)
    if sample_step_rows(source, StepReader.for_chat_format(source, fmt), max_length)[0] != rows:
        raise ExportError("the saved tokenizer tokenizes the samples differently from the source folder")
    return served, reader, rows, positions


def export_process_reward_model(opts, log=print):
    """Export the PRM `opts.model` (with `opts.step_format`) into `opts.repo` as `opts.name`."""
    from templar.export.exporter import (TOLERANCES, ExportReport, Progress, check_options, export_parameters,
                                         release_memory, resolve_max_length)

    started = time.perf_counter()
    fmt: StepFormat = opts.step_format
    check_options(opts)
    if opts.format != "onnx" or opts.precision not in ("auto", "fp32"):
        raise ExportError("a process RM is served in fp32 from ONNX for now: pass --format onnx and --precision fp32 "
                          f"(got --format {opts.format}, --precision {opts.precision})")
    step = Progress(6, log)
    step(f"loading tokenizer and the PRM's step format ({fmt.preset}: tag {fmt.step_tag!r}, {fmt.reading})")
    chat_format = _served_chat_format(opts, fmt)
    StepReader.for_chat_format(chat_format, fmt)  # a tag that is not one token is refused before the weights load
    step(f"loading weights from {opts.model}")
    loaded: LoadedStepModel = load_step_model(opts.model, fmt, chat_format.tokenizer, allow_pickle=opts.allow_pickle,
                                              value_head_prefix=opts.value_head_prefix,
                                              trust_remote_code=opts.trust_remote_code)
    max_length = resolve_max_length(opts, loaded.config)
    count = loaded.parameters
    log(f"      {loaded.kind}, model_type {loaded.config.model_type}, {count / 1e6:.1f}M parameters, max_length "
        f"{max_length}")
    with StagedModel(opts.repo, opts.name, opts.version) as staged:
        step("saving tokenizer and template for the preprocessing model")
        served, reader, rows, positions = _save_tokenizer(opts, fmt, chat_format, staged.tokenizer_dir, max_length)
        log(f"      step tag {fmt.step_tag!r} = token {reader.tag_id}; {sum(map(len, positions))} steps in "
            f"{len(rows)} sample conversations")
        step("exporting ONNX (the step score at every position)")
        ids, mask = right_pad(rows[:2])
        trace_to_onnx(loaded.scorer, torch.from_numpy(ids), torch.from_numpy(mask), staged.onnx_path, opts.opset,
                      output=contract.TOKEN_SCORES)
        step(f"reference step scores: {loaded.reference_name}, one unpadded conversation at a time")
        reference, reference_name = loaded.reference(rows, positions), loaded.reference_name
        loaded.release()
        release_memory()
        position = _NoPosition()
        parameters = {**export_parameters(opts, served, staged.tokenizer_dir, max_length, loaded, count, position),
                      contract.PARAM_RM_KIND: "process", contract.PARAM_STEP_FORMAT: fmt.to_json(),
                      contract.PARAM_STEP_TAG_ID: str(reader.tag_id),
                      contract.PARAM_WEIGHTS_SHA256: weights_sha256(staged.onnx_path)}
        settings = dataclasses.replace(opts.settings, cpu_precision="fp32", cpu_runtime="onnxruntime")
        entry = RewardModelEntry(opts.name, staged.onnx_path, staged.tokenizer_dir, parameters, settings)
        step(f"writing Triton entries for {opts.name!r} and checking ONNX Runtime on the served files")
        staged.write(entry)
        folders = staged.commit(lambda m: log("      " + m))
        tolerance = opts.tolerance if opts.tolerance is not None else TOLERANCES["fp32"]
        max_diff = _check_onnx(staged.final(staged.onnx_path), reference, reference_name, rows, positions,
                               padding_id(served.tokenizer), tolerance, log)
        staged.finish_checked(entry, max_diff)
        step.finish()
    report = ExportReport(opts.name, folders, max_diff, len(rows), entry.parameters, time.perf_counter() - started)
    log(f"exported process RM {opts.name!r} in {report.seconds:.1f}s: {fmt.preset} steps, tag {fmt.step_tag!r}, "
        f"SCORE = {fmt.aggregate} of the step scores")
    return report


class _NoPosition:
    """A PRM reads no single position: its scores are read at the step tags."""

    def as_parameters(self) -> dict[str, str]:
        return {contract.PARAM_SCORE_POSITION: "step-tags", contract.PARAM_SCORE_PAD_ID: ""}

    reason = "a process RM: each step's score is read at its step tag"
