"""`templar export` as a library: a Hugging Face reward model folder -> ONNX + the Triton entries that apply the RM's
own template (templar.export.repository), checked before anything is written.

The export runs as named phases, each a function below: load the tokenizer and template, load the weights
(templar.export.scorer), save the tokenizer the preprocessing model will load (and check it tokenizes like the
source), trace the ONNX graph, check ONNX Runtime against torch on sample conversations (and, with --format
tensorrt, build and check an engine), then write the entries. Nothing is written unless the checks pass.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import hashlib
import json
import logging
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import templar
from templar import contract
from templar.chat_format import TEMPLATE_FILE, ChatFormat, MissingChatTemplateError
from templar.conversation import Conversation, ConversationError
from templar.errors import ExportError
from templar.fingerprints import TOKENIZER_FILES, fingerprint_tokenizer_dir, sha256_file
from templar.export.packed import choose_packed_runtime, copy_model_files
from templar.export.onnx_files import DATA_SUFFIX, gather_external_data, model_files, weights_sha256
from templar.export.repository import (EntrySettings, RewardModelEntry, StagedModel, check_name, check_version,
                                       read_parameters)
from templar.export.resources import PROTOBUF_LIMIT, check_resources, estimate
from templar.export.scorer import (PICKLE_PATTERNS, SCORE_POSITIONS, LoadedRewardModel, RewardScorer, ScorePosition,
                                   choose_score_position, load_reward_model, parity_error, reads_as_the_model,
                                   reference_objectives, reference_scores, trace_to_onnx)
from templar.samples import sample_conversations, without_system
from templar.serving.settings import padding_id
from templar.padding import right_pad
from templar.serving.cpu_precision import BF16_TOLERANCE, CPU_PRECISION, INT8_TOLERANCE, create_scorer
from templar.serving.cpu_precision import resolve as resolve_cpu_precision
from templar.serving.onnx_runtime import create_session, run_scores
from templar.steps import StepFormat

DEFAULT_MAX_LENGTH_CAP = 4096
FORMATS = ("onnx", "tensorrt")
# auto: fp32 everywhere, except the embedded CPU scorer where a bf16 matrix product measures at least 1.3x fp32's speed
# on the serving CPU (templar.serving.cpu_precision, decided where it is served: AMX, Zen 4; not an AVX-512 BF16 Xeon
# without AMX): the packed torch scorer in bf16, or OpenVINO for the ONNX graph; fp32: fp32 everywhere; bf16: the CPU
# scorer in bf16 and, with --format tensorrt, a BF16 engine; int8, for the CPU: the packed scorer with int8 matrix
# products (templar.serving.int8_linear), and ONNX Runtime's dynamic quantization of the graph where the graph serves
# (docs/benchmarks.md: faster where the CPU has int8 instructions, scores agree less); fp16: the GPU paths (TensorRT
# execution accelerator or engine). The ONNX graph is float32 in every case but int8.
PRECISIONS = ("auto", "fp32", "bf16", "int8", "fp16")
KINDS = ("rm", "prm")
# max |served - reference| / max(1, |reference|) of the ONNX graph the CPU runs (scorer.parity_error); the bf16
# scorer is held to cpu_precision.BF16_TOLERANCE on top; int8's holds the int8 packed scorer too
TOLERANCES = {"auto": 1e-4, "fp32": 1e-4, "int8": INT8_TOLERANCE, "fp16": 1e-4, "bf16": 1e-4}
Log = Callable[[str], None]


@dataclass
class ExportOptions:
    model: Path  # Hugging Face RM folder (config.json, *.safetensors, tokenizer files)
    name: str  # the RM's name in Triton (the entry point clients call)
    repo: Path = Path("model_repository")
    max_length: int | None = None  # default: min(max_position_embeddings, 4096)
    chat_template: Path | None = None  # a Jinja file; overrides the folder's template
    tokenizer: Path | None = None  # a tokenizer folder, when it is not beside the weights
    format: str = "onnx"  # "tensorrt": also build a TensorRT engine for the GPU container (needs TensorRT + a GPU)
    special_tokens: str = "escape"  # control-token strings in content: "escape" (as text) or "reject" (row error)
    template_kwargs: dict = field(default_factory=dict)  # fixed extra template variables, e.g. date_string
    value_head_prefix: str | None = None  # OpenRLHF value-head RMs; auto-detected for "value_head"
    allow_pickle: bool = False  # load *.bin/*.pt weights (pickle can run code) when no safetensors exist
    trust_remote_code: bool = False  # run model code shipped in the folder (config.json auto_map)
    precision: str = "auto"  # what is served: see PRECISIONS
    # where each score is read: "auto" = where the model's own forward reads it (scorer.SCORE_POSITIONS)
    score_position: str = "auto"
    tolerance: float | None = None  # max relative |ONNX Runtime - reference| on the samples; default TOLERANCES
    engine_tolerance: float | None = None  # max |TensorRT - torch|; default 1e-3 (FP32) or 5e-2 (FP16/BF16)
    opset: int = 17
    check_resources: bool = True  # refuse up front when memory or disk will not do
    settings: EntrySettings = field(default_factory=EntrySettings)
    version: int | None = None  # add version N beside the existing ones (hot swap); None: version 1, folders replaced
    force: bool = False  # with `version`: replace that version if it exists
    # "rm": an outcome RM, one score per conversation; "prm": a process RM, a score per step, read in `step_format`
    # (templar.steps; `--prm-preset` and the flags that change it), exported by templar.export.process
    kind: str = "rm"
    step_format: StepFormat | None = None
    # a multi-objective RM (num_labels > 1): SCORE = sum of weight * objective; {label name: weight} (an objective not
    # named weighs 0) or one weight per label in order. Required for such an RM: its labels have no order of merit
    objective_weights: dict[str, float] | list[float] | None = None
    # an RM whose own code combines its objectives (ArmoRM): their names, in its order (else config.id2label, where it
    # names each, else objective_<i>)
    objective_names: list[str] | None = None


@dataclass
class ExportReport:
    name: str
    folders: list[Path]
    max_abs_diff: float
    samples: int
    parameters: dict[str, str]
    seconds: float


def sample_token_rows(chat_format: ChatFormat, max_length: int) -> list[list[int]]:
    """Tokenized sample conversations (multi-turn, system, unicode, whitespace, one at max_length)."""
    rows = []
    for messages in sample_conversations(long_words=max_length).values():
        for candidate in (messages, without_system(messages)):
            try:
                rows.append(chat_format.tokenize(Conversation(candidate)).input_ids)
                break
            except ConversationError:
                continue
    return rows


def source_sha256(opts: ExportOptions) -> str:
    """What an export depends on: the RM folder's config, weights and tokenizer files, the template file, and the
    options that shape what is served. Recorded in the entry's config (`source_sha256`), so a caller can tell
    whether a repository still serves exactly this source (`is_exported`)."""
    model_dir, tokenizer_dir = Path(opts.model), Path(opts.tokenizer or opts.model)
    files = [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors")),
             *sorted(p for pattern in PICKLE_PATTERNS for p in model_dir.glob(pattern)),
             *sorted(model_dir.glob("*.py")),  # model code shipped with the weights (--trust-remote-code)
             *(tokenizer_dir / name for name in (*TOKENIZER_FILES, TEMPLATE_FILE))]
    if opts.chat_template:
        files.append(Path(opts.chat_template))
    digest = hashlib.sha256()
    for file in files:
        if file.is_file():
            digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    shaping = {"max_length": opts.max_length, "special_tokens": opts.special_tokens, "format": opts.format,
               "precision": opts.precision, "score_position": opts.score_position,
               "template_kwargs": opts.template_kwargs, "value_head_prefix": opts.value_head_prefix,
               "opset": opts.opset, "settings": dataclasses.asdict(opts.settings), "kind": opts.kind,
               "step_format": opts.step_format.to_json() if opts.step_format else None,
               "objective_weights": opts.objective_weights, "objective_names": opts.objective_names}
    digest.update(json.dumps(shaping, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def is_exported(opts: ExportOptions) -> bool:
    """True when `opts.repo` already serves `opts.name` exported from this very source with these options."""
    repo = Path(opts.repo)
    folders = (opts.name, contract.preprocess_model_name(opts.name), contract.scoring_model_name(opts.name))
    if not all((repo / folder / "config.pbtxt").is_file() for folder in folders):
        return False
    recorded = read_parameters(repo / opts.name / "config.pbtxt").get(contract.PARAM_SOURCE_SHA256)
    return recorded == source_sha256(opts)


class Progress:
    """Numbered progress lines with the time each step took."""

    def __init__(self, total: int, log: Log):
        self.total, self.done, self.log, self.started = total, 0, log, None

    def __call__(self, what: str) -> None:
        self.finish()
        self.done += 1
        self.started = time.perf_counter()
        self.log(f"[{self.done}/{self.total}] {what} ...")

    def finish(self) -> None:
        if self.started is not None:
            self.log(f"      done in {time.perf_counter() - self.started:.1f}s")
            self.started = None


# -- the phases ------------------------------------------------------------------------------------------------------
def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc keeps it otherwise: freed float32 weights
    would stay resident while ONNX Runtime loads the graph)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def check_options(opts: ExportOptions) -> None:
    """Everything that can be refused before minutes of work."""
    if opts.format not in FORMATS:
        raise ExportError(f"unknown --format {opts.format!r}; choose from {', '.join(FORMATS)}")
    if opts.precision not in PRECISIONS:
        raise ExportError(f"unknown --precision {opts.precision!r}; choose from {', '.join(PRECISIONS)}")
    if opts.score_position not in SCORE_POSITIONS:
        raise ExportError(f"unknown --score-position {opts.score_position!r}; choose from {', '.join(SCORE_POSITIONS)}")
    if opts.precision == "int8" and opts.format == "tensorrt":
        raise ExportError("--precision int8 is ONNX Runtime's dynamic quantization for the embedded CPU server; use it "
                          "with --format onnx")
    if opts.format == "tensorrt":
        from templar.export.tensorrt import require_tensorrt

        require_tensorrt()
    check_name(opts.name)
    if opts.version is not None:
        check_version(opts.repo, opts.name, opts.version, opts.force)
    elif opts.force:
        raise ExportError("--force goes with --version N (without --version the export replaces version 1 anyway)")
    if not Path(opts.model).is_dir():
        raise ExportError(f"model folder {opts.model} does not exist")
    if opts.check_resources:
        check_resources(opts)


def _load_chat_format(opts: ExportOptions) -> ChatFormat:
    source = Path(opts.tokenizer or opts.model)
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise ExportError(f"no tokenizer in {source} (none of {', '.join(TOKENIZER_FILES)}); pass the RM's tokenizer "
                          "folder with --tokenizer DIR")
    try:
        return ChatFormat.from_dir(source, chat_template_file=opts.chat_template, special_tokens=opts.special_tokens,
                                   template_kwargs=opts.template_kwargs)
    except MissingChatTemplateError:
        raise ExportError(f"{source} has no chat template (no chat_template in tokenizer_config.json, no "
                          "chat_template.jinja); pass the RM's template with --chat-template FILE") from None
    except OSError as exc:
        raise ExportError(f"could not load a tokenizer from {source}: {exc}") from None


def resolve_max_length(opts: ExportOptions, config) -> int:
    limit = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH_CAP
    max_length = opts.max_length or min(limit, DEFAULT_MAX_LENGTH_CAP)
    if max_length > limit:
        raise ExportError(f"--max-length {max_length} exceeds the model's max_position_embeddings {limit}")
    return max_length


def _load_checked(opts: ExportOptions, chat_format: ChatFormat, step: Progress) -> tuple[LoadedRewardModel, int]:
    """The RM's weights, checked against its tokenizer and the options, and its max_length."""
    step(f"loading weights from {opts.model}{estimate(opts, 'loading')}")
    loaded = load_reward_model(opts.model, allow_pickle=opts.allow_pickle, value_head_prefix=opts.value_head_prefix,
                               trust_remote_code=opts.trust_remote_code, objective_weights=opts.objective_weights)
    _check_loaded(opts, chat_format, loaded)
    return loaded, resolve_max_length(opts, loaded.config)


def _check_loaded(opts: ExportOptions, chat_format: ChatFormat, loaded: LoadedRewardModel) -> None:
    """The loaded RM against its tokenizer and the options."""
    _check_vocabulary(chat_format, loaded)
    if loaded.weights is not None and (opts.format != "onnx" or opts.precision not in ("auto", "fp32")):
        raise ExportError("a multi-objective RM is served in fp32 from ONNX for now: pass --format onnx and "
                          f"--precision fp32 (got --format {opts.format}, --precision {opts.precision})")


def objective_parameters(loaded: LoadedRewardModel) -> dict[str, str]:
    """A multi-objective RM's kind, objective names and SCORE's weights (nothing for a one-label RM)."""
    if loaded.weights is None:
        return {}
    return {contract.PARAM_RM_KIND: "multi-objective", contract.PARAM_OBJECTIVES: json.dumps(loaded.objectives),
            contract.PARAM_OBJECTIVE_WEIGHTS: json.dumps(loaded.weights)}


def _check_vocabulary(chat_format: ChatFormat, loaded: LoadedRewardModel) -> None:
    """Every id the tokenizer can produce must have a row in the model's embedding."""
    vocab = getattr(loaded.config, "vocab_size", None) or getattr(getattr(loaded.config, "text_config", None),
                                                                   "vocab_size", None)
    ids = len(chat_format.tokenizer)
    if vocab is not None and ids > vocab:
        raise ExportError(f"the tokenizer has {ids} tokens but the model's vocabulary {vocab}: this is not the RM's "
                          "own tokenizer (pass it with --tokenizer DIR)")


def save_served_tokenizer(opts: ExportOptions, chat_format: ChatFormat, max_length: int,
                    tokenizer_dir: Path) -> tuple[ChatFormat, list[list[int]]]:
    """Save the tokenizer and template the preprocessing model will load; check that the saved folder tokenizes the
    sample conversations exactly as the source does. Returns (the served ChatFormat, the sample token rows)."""
    chat_format.tokenizer.save_pretrained(str(tokenizer_dir))
    served = ChatFormat.from_dir(tokenizer_dir, max_length=max_length, special_tokens=opts.special_tokens,
                                 template_kwargs=opts.template_kwargs)
    rows = sample_token_rows(served, max_length)
    if not rows:
        raise ExportError("the chat template rejected every sample conversation")
    source = ChatFormat(chat_format.tokenizer, chat_template=chat_format.chat_template, max_length=max_length,
                        template_kwargs=opts.template_kwargs)
    if sample_token_rows(source, max_length) != rows:
        raise ExportError("the saved tokenizer tokenizes the samples differently from the source folder")
    return served, rows


def _export_onnx(opts: ExportOptions, loaded: LoadedRewardModel, rows: list[list[int]], path: Path, log: Log) -> None:
    """Trace to ONNX, then gather a large model's weights into one data file beside the graph."""
    ids, mask = right_pad(rows[:2])
    try:
        trace_to_onnx(loaded.scorer, torch.from_numpy(ids), torch.from_numpy(mask), path, opts.opset)
    except Exception as exc:  # noqa: BLE001 - an op ONNX lacks is the usual cause: name it and the model type
        found = re.search(r"operator '([^']+)' to ONNX opset version (\d+)", str(exc))
        what = f"the operator {found.group(1)} has no ONNX form at opset {found.group(2)}" if found else \
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        raise ExportError(f"model_type {loaded.config.model_type!r} ({loaded.kind}) cannot be exported to ONNX: "
                          f"{what}; try a newer --opset, or another architecture") from None
    total = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
    if total > PROTOBUF_LIMIT:
        log(f"      {total / 1e9:.1f} GB of weights: gathering them into {path.name}{DATA_SUFFIX}")
        with tqdm(total=total, unit="B", unit_scale=True, desc="      gathering", leave=False) as bar:
            gather_external_data(path, progress=lambda done, _: bar.update(done - bar.n))


def quantize_int8(path: Path, log: Log = lambda _: None) -> None:
    """ONNX Runtime's dynamic quantization (int8 weights, activations quantized per batch), in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_name("model.int8.onnx")
    large = len(model_files(path)) > 1
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # the quantizer reports every tensor on the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, use_external_data_format=large)
    finally:
        root.level = level
    for file in model_files(path):
        file.unlink()
    for file in model_files(quantized):
        file.replace(path.parent / file.name.replace("model.int8.onnx", "model.onnx"))
    if large:  # the data file was renamed: point the graph at its new name
        gather_external_data(path)
    log(f"      int8 weights: {sum(f.stat().st_size for f in model_files(path)) / 1e6:.0f} MB")


def _tolerance(opts: ExportOptions) -> float:
    return opts.tolerance if opts.tolerance is not None else TOLERANCES[opts.precision]


def _float_tolerance(opts: ExportOptions) -> float:
    """The tolerance of what stays float32 in the export: with --precision int8, --tolerance is int8's, and the
    float32 graph and packed scorer are held to fp32's."""
    return TOLERANCES["fp32"] if opts.precision == "int8" else _tolerance(opts)


def _check_onnx(opts: ExportOptions, onnx_path: Path, reference: Reference, rows: list[list[int]], pad_id: int,
                log: Log, quantized: bool = False) -> float:
    """Largest relative difference between ONNX Runtime and the reference over the sample rows in one right-padded
    batch (padded with the pad id, so padding must not move where a score is read), on the files where they are
    served; refuses a graph past the tolerance (int8's only where the graph was `quantized`)."""
    tolerance = _tolerance(opts) if quantized else _float_tolerance(opts)
    ids, mask = right_pad(rows, pad_id)
    session = create_session(onnx_path, prepacking=False)  # no packed copy of the weights: one copy in memory
    if reference.objectives is None:
        served = run_scores(session, ids, mask).reshape(-1).astype(np.float64)
        errors = parity_error(served, reference.scores)
    else:  # a multi-objective RM: SCORE and every objective
        served, objectives = run_scores(session, ids, mask, (contract.SCORE, contract.SCORES))
        errors = np.concatenate([parity_error(served.reshape(-1), reference.scores),
                                 parity_error(objectives, reference.objectives).reshape(-1)])
    del session
    max_diff = float(errors.max())
    log(f"      max |onnxruntime - {reference.name}| / max(1, |score|) = {max_diff:.2e} over {len(rows)} "
        f"conversations ({min(map(len, rows))}..{max(map(len, rows))} tokens, one padded batch)")
    if not np.isfinite(max_diff) or max_diff > tolerance:
        raise ExportError(f"ONNX Runtime differs from {reference.name} by {max_diff:.3e} (relative) > tolerance "
                          f"{tolerance}; nothing was written")
    return max_diff


def _check_bf16(onnx_path: Path, settings: EntrySettings, reference: Reference, rows: list[list[int]], pad_id: int,
                parameters: dict[str, str], log: Log) -> None:
    """Where this machine's CPU scorer will run bf16 (cpu_precision bf16, or auto on a CPU with bf16 in hardware):
    the same check on the bf16 scorer, against its own, looser tolerance, recorded as `bf16_max_abs_diff`."""
    choice = resolve_cpu_precision(settings.cpu_precision, runtime=settings.cpu_runtime)
    if choice.precision != "bf16":
        return
    ids, mask = right_pad(rows, pad_id)
    served = create_scorer(onnx_path, choice)(ids, mask).reshape(-1).astype(np.float64)
    max_diff = float(parity_error(served, reference.scores).max())
    log(f"      {choice.reason}: max |bf16 - {reference.name}| / max(1, |score|) = {max_diff:.2e}")
    if not np.isfinite(max_diff) or max_diff > BF16_TOLERANCE:
        raise ExportError(f"the bf16 scorer differs from {reference.name} by {max_diff:.3e} (relative) > "
                          f"{BF16_TOLERANCE}; export with --precision fp32")
    parameters["bf16_max_abs_diff"] = f"{max_diff:.3e}"


@dataclass
class Reference:
    """The scores the served graph must reproduce on the sample rows, and what computed them."""

    scores: np.ndarray
    name: str  # e.g. "the model's own forward"
    objectives: np.ndarray | None = None  # a multi-objective RM's [N, K], its own logits


def _reference(loaded: LoadedRewardModel, position: ScorePosition, rows: list[list[int]]) -> Reference:
    name = "the model's own forward" if reads_as_the_model(loaded, position) else \
        ("OpenRLHF's value-head reading" if loaded.classifier is None else f"torch read at {position.rule}")
    objectives = reference_objectives(loaded, rows) if loaded.weights is not None else None
    return Reference(reference_scores(loaded, position, rows), name, objectives)


def _score_position(opts: ExportOptions, loaded: LoadedRewardModel, served: ChatFormat, rows: list[list[int]],
                    log: Log) -> ScorePosition:
    """Choose where the graph reads each score (the scorer reads there from now on) and say why."""
    position = choose_score_position(loaded, opts.score_position, rows,
                                     token_name=served.tokenizer.convert_ids_to_tokens)
    loaded.scorer.pad_id = position.pad_id
    log(f"      score position: {position.rule}: {position.reason}")
    if not reads_as_the_model(loaded, position) and loaded.classifier is not None:
        moved = sum(position.index(r) != choose_score_position(loaded, "auto", rows).index(r) for r in rows)
        if moved:
            log(f"      note: {loaded.kind}'s own forward reads elsewhere on {moved} of {len(rows)} sample "
                "conversations; the served scores follow --score-position, not the model's own forward")
    return position


def _packed_scorer(opts: ExportOptions, cpu_precision: str, position: ScorePosition, reference: Reference,
                   rows: list[list[int]], pad_id: int, staged: StagedModel, step: Progress, log: Log):
    """Does the packed CPU scorer serve this RM (checked against the reference)? Its files are staged if so."""
    step(f"checking the packed CPU scorer against {reference.name} (templar.serving.packed_scorer)")
    packed = choose_packed_runtime(opts, cpu_precision=cpu_precision, read_pad_id=position.pad_id,
                                   reference=reference, rows=rows, pad_id=pad_id, tolerance=_float_tolerance(opts),
                                   int8_tolerance=_tolerance(opts), log=log)
    log(f"      CPU runtime {packed.runtime}: {packed.reason}")
    if packed.runtime == "torch":
        copy_model_files(Path(opts.model), staged.torch_model_dir, opts.allow_pickle)
    return packed


def _int8_graph(opts: ExportOptions, packed_int8: bool, onnx_path: Path, step: Progress, log: Log) -> bool:
    """--precision int8 where the ONNX graph serves the CPU: ONNX Runtime's quantization of the graph (returns True);
    where the packed scorer serves its own int8 products (`packed_int8`, checked already), the graph stays float32
    for the GPU paths."""
    if opts.precision != "int8":
        return False
    if packed_int8:
        step("int8: the packed scorer's int8 products serve the CPU; the ONNX graph stays float32")
        return False
    step("quantizing to int8 (ONNX Runtime dynamic quantization)")
    quantize_int8(onnx_path, log)
    return True


def _build_checked_engine(opts: ExportOptions, scorer: RewardScorer, rows: list[list[int]], reference: Reference,
                          max_length: int, pad_id: int, tmp: Path, step: Progress, log: Log) -> dict[str, str]:
    """Build `tmp/model.plan` and check it against the reference; returns the parameters to record."""
    from templar.export.tensorrt import ShapeProfile, build_engine, engine_scores, export_int32_onnx

    precision = opts.precision if opts.precision in ("fp16", "bf16") else "fp32"
    profile = ShapeProfile.for_serving(opts.settings.micro_batch_rows, max_length)
    step("building the TensorRT engine (int32 ids)")
    export_int32_onnx(scorer, tmp / "model_int32.onnx", opts.opset)
    build_engine(tmp / "model_int32.onnx", tmp / "model.plan", profile, precision=precision, log=log)
    step(f"checking TensorRT against {reference.name} on {len(rows)} sample conversations")
    tolerance = opts.engine_tolerance if opts.engine_tolerance is not None else \
        (5e-2 if precision != "fp32" else 1e-3)
    diffs = []
    for start in range(0, len(rows), profile.max_shape[0]):
        ids, mask = right_pad(rows[start : start + profile.max_shape[0]], pad_id)
        served = engine_scores(tmp / "model.plan", ids, mask).astype(np.float64)
        diffs.append(parity_error(served, reference.scores[start : start + len(ids)]).max())
    engine_diff = float(max(diffs))
    log(f"      max |tensorrt - {reference.name}| / max(1, |score|) = {engine_diff:.2e} ({precision.upper()})")
    if not np.isfinite(engine_diff) or engine_diff > tolerance:
        raise ExportError(f"the TensorRT engine differs from {reference.name} by {engine_diff:.3e} (relative) > "
                          f"tolerance {tolerance} (--engine-tolerance); nothing was written")
    return {**profile.as_parameters(), "tensorrt_precision": precision,
            "tensorrt_parity_max_abs_diff": f"{engine_diff:.3e}"}


def export_parameters(opts: ExportOptions, served: ChatFormat, tokenizer_dir: Path, max_length: int,
                loaded: LoadedRewardModel, parameters: int, position: ScorePosition) -> dict[str, str]:
    """What the configs record: fingerprints, serving options, where the model came from."""
    return {
        contract.PARAM_TEMPLATE_SHA256: served.template_sha256,
        contract.PARAM_TOKENIZER_SHA256: fingerprint_tokenizer_dir(tokenizer_dir),
        contract.PARAM_MAX_LENGTH: str(max_length),
        contract.PARAM_SPECIAL_TOKENS: opts.special_tokens,
        contract.PARAM_TEMPLATE_KWARGS: json.dumps(opts.template_kwargs, sort_keys=True),
        contract.PARAM_SOURCE_MODEL: str(Path(opts.model).resolve()),
        contract.PARAM_SOURCE_SHA256: source_sha256(opts),
        contract.PARAM_TEMPLAR_VERSION: templar.__version__,
        "model_type": loaded.config.model_type,
        "source_dtype": loaded.source_dtype,
        contract.PARAM_PRECISION: opts.precision,
        "parameters": str(parameters),
        **position.as_parameters(),
        contract.PARAM_SCORE_POSITION_REASON: position.reason,
    }


def _export_process_rm(opts: ExportOptions, log: Log) -> ExportReport:
    from templar.export.process import export_process_reward_model

    if opts.kind not in KINDS:
        raise ExportError(f"unknown --kind {opts.kind!r}; choose from {', '.join(KINDS)}")
    if opts.step_format is None:
        raise ExportError("--kind prm needs the PRM's step format: --prm-preset NAME (templar.steps.PRESETS)")
    return export_process_reward_model(opts, log)


def export_reward_model(opts: ExportOptions, log: Log = print) -> ExportReport:
    """Export `opts.model` into `opts.repo` as `opts.name` (see the module docstring for the phases); a process RM
    (`kind="prm"`) goes to templar.export.process."""
    return _export_outcome_rm(opts, log) if opts.kind == "rm" else _export_process_rm(opts, log)


def _export_outcome_rm(opts: ExportOptions, log: Log) -> ExportReport:
    started = time.perf_counter()
    check_options(opts)
    tensorrt = opts.format == "tensorrt"
    step = Progress(8 + (opts.precision == "int8") + 2 * tensorrt, log)
    step(f"loading tokenizer and chat template from {opts.tokenizer or opts.model}")
    chat_format = _load_chat_format(opts)
    loaded, max_length = _load_checked(opts, chat_format, step)
    if loaded.scorer is None:  # a custom-code RM that combines its own objectives: served by its own forward
        from templar.export.own_forward import export_own_forward

        return export_own_forward(opts, loaded, chat_format, max_length, step, log)
    count = loaded.parameters
    log(f"      {loaded.kind}, model_type {loaded.config.model_type}, {count / 1e6:.1f}M parameters "
        f"({loaded.source_dtype} weights, served {opts.precision}), max_length {max_length}")
    with StagedModel(opts.repo, opts.name, opts.version) as staged, \
            tempfile.TemporaryDirectory(prefix="templar-export-") as tmp:
        step("saving tokenizer and template for the preprocessing model")
        served, rows = save_served_tokenizer(opts, chat_format, max_length, staged.tokenizer_dir)
        position = _score_position(opts, loaded, served, rows, log)
        step(f"exporting ONNX (opset {opts.opset}){estimate(opts, 'exporting')}")
        _export_onnx(opts, loaded, rows, staged.onnx_path, log)
        step(f"reference scores on {len(rows)} sample conversations")
        reference = _reference(loaded, position, rows)
        log(f"      {reference.name}, one unpadded conversation at a time")
        pad_id = padding_id(served.tokenizer)  # what the preprocessing model pads with
        engine = _build_checked_engine(opts, loaded.scorer, rows, reference, max_length, pad_id, Path(tmp), step,
                                       log) if tensorrt else {}
        loaded.release()  # before ONNX Runtime loads its copy: never two models in memory at once
        release_memory()
        cpu = CPU_PRECISION[opts.precision] if loaded.weights is None else "fp32"  # multi-objective: fp32 for now
        packed = _packed_scorer(opts, cpu, position, reference, rows, pad_id, staged, step, log)
        quantized = _int8_graph(opts, packed.runtime == "torch" and cpu == "int8", staged.onnx_path, step, log)
        parameters = {**export_parameters(opts, served, staged.tokenizer_dir, max_length, loaded, count, position),
                      **objective_parameters(loaded), **engine, **packed.parameters,
                      contract.PARAM_WEIGHTS_SHA256: weights_sha256(staged.onnx_path)}
        settings = dataclasses.replace(opts.settings, gpu_fp16=opts.settings.gpu_fp16 or opts.precision == "fp16",
                                       cpu_precision=cpu, cpu_runtime=packed.runtime)
        entry = RewardModelEntry(opts.name, staged.onnx_path, staged.tokenizer_dir, parameters, settings,
                                 tensorrt_plan=Path(tmp) / "model.plan" if tensorrt else None,
                                 tensorrt_max_rows=opts.settings.micro_batch_rows if tensorrt else None,
                                 packed_model_dir=staged.torch_model_dir if packed.runtime == "torch" else None,
                                 packed_load=packed.load)
        step(f"writing Triton entries for {opts.name!r} into {opts.repo}")
        staged.write(entry)
        folders = staged.commit(lambda m: log("      " + m))
        step(f"checking ONNX Runtime against {reference.name} on the served files{estimate(opts, 'checking')}")
        max_diff = _check_onnx(opts, staged.final(staged.onnx_path), reference, rows, pad_id, log, quantized)
        if packed.runtime != "torch":
            _check_bf16(staged.final(staged.onnx_path), settings, reference, rows, pad_id, entry.parameters, log)
        staged.finish_checked(entry, max_diff)
        step.finish()
    report = ExportReport(opts.name, folders, max_diff, len(rows), entry.parameters, time.perf_counter() - started)
    _log_exported(opts, report, log)
    return report


def _log_exported(opts: ExportOptions, report: ExportReport, log: Log) -> None:
    version = f" version {opts.version}" if opts.version else ""
    parameters = report.parameters
    log(f"exported {opts.name!r}{version} in {report.seconds:.1f}s: chat_template sha256 "
        f"{parameters[contract.PARAM_TEMPLATE_SHA256][:16]}…, tokenizer sha256 "
        f"{parameters[contract.PARAM_TOKENIZER_SHA256][:16]}…, weights sha256 "
        f"{parameters[contract.PARAM_WEIGHTS_SHA256][:16]}…")
