"""`templar export`: a Hugging Face reward model folder -> ONNX + Triton entries that apply the RM's own template.

Accepted models: `*ForSequenceClassification` with one label, and the value-head RMs OpenRLHF trains (a base model
plus `value_head.weight`, or another prefix given with --value-head-prefix). The exported graph reads the score at the
last position where attention_mask is 1 (never by searching for the pad id, which is often the EOS id), with
pad-aware position ids. Nothing is written unless ONNX Runtime matches torch on sample conversations.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import templar
from templar import contract
from templar.chat_format import ChatFormat, MissingChatTemplateError, fingerprint_tokenizer_dir
from templar.conversation import Conversation, ConversationError
from templar.samples import sample_conversations, without_system
from templar.serving.onnx_runtime import create_session, run_scores
from templar.tools.repository import EntrySettings, RewardModelEntry, check_name, write_reward_model

# Backbones whose export is verified by the test suite (ONNX Runtime vs torch, padded batches).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
DEFAULT_MAX_LENGTH_CAP = 4096
FORMATS = ("onnx", "tensorrt")


class ExportError(RuntimeError):
    """The model cannot be exported; the message says why and what to do."""


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
    tolerance: float = 1e-4  # max |ONNX Runtime - torch| on the sample conversations
    engine_tolerance: float | None = None  # max |TensorRT - torch|; default 1e-3 (FP32) or 5e-2 (FP16)
    opset: int = 17
    settings: EntrySettings = field(default_factory=EntrySettings)


@dataclass
class ExportReport:
    name: str
    folders: list[Path]
    max_abs_diff: float
    samples: int
    parameters: dict[str, str]
    seconds: float


class RewardScorer(nn.Module):
    """Backbone + scalar head; the score is read at the last attention-mask position of each row."""

    def __init__(self, backbone: nn.Module, head: nn.Module, mean: float | None = None, std: float | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.normalize = mean is not None and std is not None
        self.register_buffer("mean", torch.tensor([mean or 0.0]), persistent=False)
        self.register_buffer("std", torch.tensor([std or 1.0]), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)  # last index where mask == 1
        index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        score = self.head(hidden.gather(1, index).squeeze(1)).float()
        if self.normalize:
            score = (score - self.mean) / self.std
        return score


def _weights(model_dir: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """(weight files, are they pickle); refuses pickle unless allowed."""
    safetensors = sorted(model_dir.glob("*.safetensors"))
    if safetensors:
        return safetensors, False
    pickles = sorted(p for pattern in PICKLE_PATTERNS for p in model_dir.glob(pattern))
    if not pickles:
        raise ExportError(f"no weights in {model_dir}: expected *.safetensors")
    if not allow_pickle:
        raise ExportError(
            f"{model_dir} holds only pickle weights ({', '.join(p.name for p in pickles)}); loading pickle can run "
            "arbitrary code. Convert them to safetensors, or pass --allow-pickle if you trust the source.")
    return pickles, True


def _state_dict(files: list[Path], pickle: bool) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if pickle:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
        else:
            from safetensors.torch import load_file

            state.update(load_file(str(file)))
    return state


def load_reward_model(model_dir: str | Path, *, allow_pickle: bool = False,
                      value_head_prefix: str | None = None) -> tuple[RewardScorer, object, str]:
    """Load an RM folder as a RewardScorer in float32 (eval mode). Returns (scorer, config, kind)."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise ExportError(f"unsupported architecture {arch} (model_type {config.model_type!r}); supported model "
                          f"types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    files, pickle = _weights(model_dir, allow_pickle)
    state = _state_dict(files, pickle)
    prefix = value_head_prefix or getattr(config, "value_head_prefix", None)
    if prefix is None and "value_head.weight" in state:
        prefix = "value_head"
    config._attn_implementation = "eager"  # traces cleanly; sdpa/flash kernels do not matter for parity

    if prefix is not None:  # OpenRLHF: <base_model_prefix>.* + <prefix>.weight, mean/std in config.json
        if f"{prefix}.weight" not in state:
            raise ExportError(f"value head {prefix}.weight not found in the weights of {model_dir}")
        backbone = AutoModel.from_config(config)
        base = backbone.base_model_prefix
        backbone_state = {k[len(base) + 1:]: v for k, v in state.items() if k.startswith(base + ".")}
        missing, unexpected = backbone.load_state_dict(backbone_state, strict=False)
        missing = [k for k in missing if "rotary_emb" not in k]
        if missing:
            raise ExportError(f"weights of {model_dir} miss backbone tensors, e.g. {missing[:3]}")
        head = nn.Linear(config.hidden_size, 1, bias=f"{prefix}.bias" in state)
        head.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})
        normalize = bool(getattr(config, "normalize_reward", False)) and hasattr(config, "mean")
        scorer = RewardScorer(backbone, head, *(config.mean, config.std) if normalize else (None, None))
        kind = f"value-head RM ({prefix})"
    else:
        archs = getattr(config, "architectures", None) or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ExportError(
                f"{model_dir} is a {', '.join(archs) or config.model_type}, not a reward model: expected "
                "*ForSequenceClassification with num_labels=1, or an OpenRLHF value-head RM (value_head.weight; "
                "other prefixes with --value-head-prefix)")
        if config.num_labels != 1:
            raise ExportError(f"a reward model has one output label; {model_dir} has num_labels={config.num_labels}")
        model = AutoModelForSequenceClassification.from_config(config)
        missing, _ = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "rotary_emb" not in k]
        if missing:
            raise ExportError(f"weights of {model_dir} miss tensors, e.g. {missing[:3]}")
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
        scorer = RewardScorer(getattr(model, model.base_model_prefix), head)
        kind = f"{archs[0]}"
    return scorer.float().eval(), config, kind


def export_onnx(scorer: RewardScorer, input_ids: torch.Tensor, attention_mask: torch.Tensor, path: Path,
                opset: int = 17) -> None:
    """Trace the scorer to ONNX with dynamic batch and sequence axes."""
    axes = {contract.INPUT_IDS: {0: "batch", 1: "sequence"}, contract.ATTENTION_MASK: {0: "batch", 1: "sequence"},
            contract.SCORE: {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about shape-dependent Python branches in HF's masking code; the parity check on
        # padded batches of other shapes is what proves the graph general, so the warnings are noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(scorer, (input_ids, attention_mask), str(path), input_names=[contract.INPUT_IDS,
                          contract.ATTENTION_MASK], output_names=[contract.SCORE], dynamic_axes=axes,
                          opset_version=opset, dynamo=False)


def pad_batch(rows: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def torch_scores(scorer: RewardScorer, rows: list[list[int]]) -> np.ndarray:
    """Reference scores: one unpadded forward per row."""
    with torch.no_grad():
        return np.array([scorer(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)).item() for r in rows],
                        dtype=np.float64)


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


class _Steps:
    def __init__(self, total: int, log: Callable[[str], None]):
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


def _build_checked_engine(opts: ExportOptions, scorer: RewardScorer, rows: list[list[int]], reference: np.ndarray,
                          max_length: int, tmp: Path, step: _Steps, log: Callable[[str], None]) -> dict[str, str]:
    """Build `tmp/model.plan` and check it against torch; returns the parameters to record."""
    from templar.tools.export_tensorrt import ShapeProfile, build_engine, engine_scores, export_int32_onnx

    fp16 = opts.settings.gpu_fp16
    profile = ShapeProfile.for_serving(opts.settings.micro_batch_rows, max_length)
    step("building the TensorRT engine (int32 ids)")
    export_int32_onnx(scorer, tmp / "model_int32.onnx", opts.opset)
    try:
        build_engine(tmp / "model_int32.onnx", tmp / "model.plan", profile, fp16=fp16, log=log)
    except RuntimeError as exc:
        raise ExportError(str(exc)) from None
    step(f"checking TensorRT against torch on {len(rows)} sample conversations")
    tolerance = opts.engine_tolerance if opts.engine_tolerance is not None else (5e-2 if fp16 else 1e-3)
    diffs = []
    for start in range(0, len(rows), profile.max_shape[0]):
        ids, mask = pad_batch(rows[start : start + profile.max_shape[0]])
        served = engine_scores(tmp / "model.plan", ids, mask).astype(np.float64)
        diffs.append(np.abs(served - reference[start : start + len(ids)]).max())
    engine_diff = float(max(diffs))
    log(f"      max |tensorrt - torch| = {engine_diff:.2e} ({'FP16' if fp16 else 'FP32'})")
    if not np.isfinite(engine_diff) or engine_diff > tolerance:
        raise ExportError(f"the TensorRT engine differs from torch by {engine_diff:.3e} > tolerance {tolerance} "
                          "(--engine-tolerance); nothing was written")
    return {**profile.as_parameters(), "tensorrt_precision": "fp16" if fp16 else "fp32",
            "tensorrt_parity_max_abs_diff": f"{engine_diff:.3e}"}


def export_reward_model(opts: ExportOptions, log: Callable[[str], None] = print) -> ExportReport:
    started = time.perf_counter()
    if opts.format not in FORMATS:
        raise ExportError(f"unknown --format {opts.format!r}; choose from {', '.join(FORMATS)}")
    tensorrt = opts.format == "tensorrt"
    if tensorrt:  # fail before minutes of work, not after
        from templar.tools.export_tensorrt import TensorRTUnavailable, require_tensorrt

        try:
            require_tensorrt()
        except TensorRTUnavailable as exc:
            raise ExportError(str(exc)) from None
    try:
        check_name(opts.name)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    model_dir = Path(opts.model)
    if not model_dir.is_dir():
        raise ExportError(f"model folder {model_dir} does not exist")
    step = _Steps(8 if tensorrt else 6, log)

    step(f"loading tokenizer and chat template from {opts.tokenizer or model_dir}")
    try:
        chat_format = ChatFormat.from_dir(opts.tokenizer or model_dir, chat_template_file=opts.chat_template,
                                          special_tokens=opts.special_tokens, template_kwargs=opts.template_kwargs)
    except MissingChatTemplateError:
        raise ExportError(f"{opts.tokenizer or model_dir} has no chat template (no chat_template in "
                          "tokenizer_config.json, no chat_template.jinja); pass the RM's template with "
                          "--chat-template FILE") from None
    except OSError as exc:
        raise ExportError(f"could not load a tokenizer from {opts.tokenizer or model_dir}: {exc}") from None

    step(f"loading weights from {model_dir}")
    scorer, config, kind = load_reward_model(model_dir, allow_pickle=opts.allow_pickle,
                                             value_head_prefix=opts.value_head_prefix)
    limit = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH_CAP
    max_length = opts.max_length or min(limit, DEFAULT_MAX_LENGTH_CAP)
    if max_length > limit:
        raise ExportError(f"--max-length {max_length} exceeds the model's max_position_embeddings {limit}")
    log(f"      {kind}, model_type {config.model_type}, {sum(p.numel() for p in scorer.parameters()) / 1e6:.1f}M "
        f"parameters, max_length {max_length}")

    with tempfile.TemporaryDirectory(prefix="templar-export-") as tmp:
        tmp = Path(tmp)
        step("saving tokenizer and template for the preprocessing model")
        tokenizer_dir = tmp / "tokenizer"
        chat_format.tokenizer.save_pretrained(str(tokenizer_dir))
        served_format = ChatFormat.from_dir(tokenizer_dir, max_length=max_length, special_tokens=opts.special_tokens,
                                            template_kwargs=opts.template_kwargs)
        rows = sample_token_rows(served_format, max_length)
        if not rows:
            raise ExportError("the chat template rejected every sample conversation")
        source_rows = sample_token_rows(
            ChatFormat(chat_format.tokenizer, chat_template=chat_format.chat_template, max_length=max_length,
                       template_kwargs=opts.template_kwargs), max_length)
        if source_rows != rows:
            raise ExportError("the saved tokenizer tokenizes the samples differently from the source folder")

        step(f"exporting ONNX (opset {opts.opset})")
        onnx_path = tmp / "model.onnx"
        ids, mask = pad_batch(rows[:2])
        export_onnx(scorer, torch.from_numpy(ids), torch.from_numpy(mask), onnx_path, opts.opset)

        step(f"checking ONNX Runtime against torch on {len(rows)} sample conversations")
        reference = torch_scores(scorer, rows)
        ids, mask = pad_batch(rows)
        served = run_scores(create_session(onnx_path), ids, mask).reshape(-1).astype(np.float64)
        max_diff = float(np.abs(served - reference).max())
        log(f"      max |onnxruntime - torch| = {max_diff:.2e} over {len(rows)} conversations "
            f"({min(map(len, rows))}..{max(map(len, rows))} tokens, one padded batch)")
        if not np.isfinite(max_diff) or max_diff > opts.tolerance:
            raise ExportError(f"ONNX Runtime differs from torch by {max_diff:.3e} > tolerance {opts.tolerance}; "
                              "nothing was written")
        engine = _build_checked_engine(opts, scorer, rows, reference, max_length, tmp, step, log) if tensorrt else None

        step(f"writing Triton entries for {opts.name!r} into {opts.repo}")
        parameters = {
            contract.PARAM_TEMPLATE_SHA256: served_format.template_sha256,
            contract.PARAM_TOKENIZER_SHA256: fingerprint_tokenizer_dir(tokenizer_dir),
            contract.PARAM_MAX_LENGTH: str(max_length),
            contract.PARAM_SPECIAL_TOKENS: opts.special_tokens,
            contract.PARAM_TEMPLATE_KWARGS: json.dumps(opts.template_kwargs, sort_keys=True),
            contract.PARAM_SOURCE_MODEL: str(model_dir.resolve()),
            contract.PARAM_TEMPLAR_VERSION: templar.__version__,
            "model_type": config.model_type,
            "parity_max_abs_diff": f"{max_diff:.3e}",
        }
        if engine is not None:
            parameters.update(engine)
        entry = RewardModelEntry(opts.name, onnx_path, tokenizer_dir, parameters, opts.settings,
                                 tensorrt_plan=tmp / "model.plan" if tensorrt else None,
                                 tensorrt_max_rows=opts.settings.micro_batch_rows if tensorrt else None)
        folders = write_reward_model(opts.repo, entry, log=lambda m: log("      " + m))
        step.finish()
    report = ExportReport(opts.name, folders, max_diff, len(rows), parameters, time.perf_counter() - started)
    log(f"exported {opts.name!r} in {report.seconds:.1f}s: chat_template sha256 "
        f"{parameters[contract.PARAM_TEMPLATE_SHA256][:16]}…, tokenizer sha256 "
        f"{parameters[contract.PARAM_TOKENIZER_SHA256][:16]}…")
    return report


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="Hugging Face reward model folder")
    parser.add_argument("--name", required=True, help="the RM's model name in Triton")
    parser.add_argument("--repo", type=Path, default=Path("model_repository"), help="model repository to write into")
    parser.add_argument("--max-length", type=int, help="token limit; longer conversations are cut from the start "
                        f"(default: min(max_position_embeddings, {DEFAULT_MAX_LENGTH_CAP}))")
    parser.add_argument("--chat-template", type=Path, help="Jinja chat template file (overrides the folder's)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder, when not beside the weights")
    parser.add_argument("--format", default="onnx", choices=FORMATS,
                        help="onnx (default; CPU and GPU) or tensorrt (also a TensorRT engine for the GPU container; "
                        "needs TensorRT and a GPU where the export runs)")
    parser.add_argument("--special-tokens", default="escape", choices=["escape", "reject"],
                        help="control-token strings inside content: tokenize as text (escape) or fail the row")
    parser.add_argument("--template-kwargs", type=json.loads, default={},
                        help='fixed extra template variables as JSON, e.g. \'{"date_string": "26 Jul 2024"}\'')
    parser.add_argument("--value-head-prefix", help="OpenRLHF value-head RMs: the head's name (default: value_head)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow *.bin/*.pt weights (pickle runs code)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |onnxruntime - torch| allowed")
    parser.add_argument("--engine-tolerance", type=float,
                        help="max |tensorrt - torch| allowed (default 1e-3, or 5e-2 with --gpu-fp16)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--gpu-fp16", action="store_true",
                        help="GPU container: FP16 (TensorRT execution accelerator for onnx; an FP16 engine for "
                        "tensorrt)")


def main(args) -> int:
    settings = EntrySettings(gpu_fp16=args.gpu_fp16)
    opts = ExportOptions(model=args.model, name=args.name, repo=args.repo, max_length=args.max_length,
                         chat_template=args.chat_template, tokenizer=args.tokenizer, format=args.format,
                         special_tokens=args.special_tokens, template_kwargs=args.template_kwargs,
                         value_head_prefix=args.value_head_prefix, allow_pickle=args.allow_pickle,
                         tolerance=args.tolerance, engine_tolerance=args.engine_tolerance, opset=args.opset,
                         settings=settings)
    try:
        export_reward_model(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    except ExportError as exc:
        print(f"templar export: error: {exc}", file=sys.stderr)
        return 2
    return 0
