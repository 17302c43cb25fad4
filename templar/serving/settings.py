"""The settings table of a served RM: `EntrySettings`, every knob `templar export` writes into the generated configs,
with its documented default, and the one place that turns it into config parameters and back (as the tensors have
theirs in templar.contract). Also what a preprocessing version loads: its `serving.json` and its chat format.

Here, beside the Python models that read them, so that a model never imports the export tool (and its ONNX and
protobuf dependencies, which the GPU image does not install).

Each field says in its metadata which models' configs record it (`entry`, `preprocess` — also in the version's
serving.json — or `scorer`, the embedded CPU scorer), and under which parameter key when that is not the field's name.
Fields without a model shape the config itself (instances, dynamic batching) and are not parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from templar import contract
from templar.conversation import RowLimits

MODELS = ("entry", "preprocess", "scorer")
# A preprocessing version's own settings and fingerprints, in `<version>/serving.json`: Triton re-initialises every
# loaded version when a model's config changes, and config.pbtxt describes only the newest export.
SERVING_FILE = "serving.json"


def _knob(default: Any, model: str | tuple[str, ...] | None = None, key: str | None = None):
    models = (model,) if isinstance(model, str) else tuple(model or ())
    return field(default=default, metadata={"models": models, "key": key})


@dataclass
class EntrySettings:
    """Serving knobs written into the generated configs (documented defaults; docs/benchmarks.md has the
    measurements behind them)."""

    # rows per request the entry point and the preprocess model accept (the entry sends the preprocess model chunks
    # of this many)
    max_batch_size: int = _knob(256, "entry", "preprocess_max_batch_size")
    # Micro-batches: rows of similar length scored together. On a 2-core CPU small ones win (a few thousand token
    # slots), and the padding cap matters when dynamic batches are small (the trainer sends a few requests at once).
    micro_batch_rows: int = _knob(32, "entry")  # rows per scoring call (also the scoring model's max_batch_size)
    micro_batch_tokens: int = _knob(4096, "entry")  # at most rows * longest-row tokens per scoring call
    micro_batch_max_padding: float | None = _knob(0.1, "entry")  # cut a micro-batch before its padding share passes
    queue_delay_us: int = 2000  # dynamic batcher wait for more requests: long enough to merge a burst of requests
    entry_instances: int = 2  # one preprocesses while the other waits on the scoring model
    preprocess_instances: int = 1
    scorer_instances: int = 1
    # What the embedded CPU scorer runs (templar.serving.cpu_precision): "torch", the RM's own modules on packed rows
    # (no padding, shared prefixes once, the last layer only where scores are read; templar.serving.packed_scorer),
    # "onnxruntime" (the exported graph; bit-identical scores whatever the batch), or "openvino". Process RMs, int8
    # and models the packed scorer cannot run use onnxruntime whatever this says (the export logs why).
    cpu_runtime: str = _knob("torch", "scorer")
    # The packed scorer's micro-batches: at most this many tokens computed per scoring call (each shared prefix
    # counted once); 2048 measured fastest on a 2-core CPU (docs/benchmarks.md)
    packed_tokens: int = _knob(2048, "entry")
    # Rows sharing a prefix (the template's preamble, a GRPO group's prompt) compute it once (packed scorer); off:
    # each row computes its own, the baseline the benchmark compares with
    prefix_sharing: bool = _knob(True, ("entry", "scorer"))
    # The packed scorer compiles its decoder layers with torch.compile (fused element-wise work, +30% measured; needs
    # a C++ compiler, falls back to uncompiled layers without one; a few seconds per model shape, cached on disk)
    packed_compile: bool = _knob(True, "scorer")
    intra_op_threads: int = _knob(0, "scorer")  # CPU scorer threads (torch / ONNX Runtime); 0 = one per physical core
    intra_op_spinning: bool = _knob(False, "scorer")  # busy-waiting burns CPU a trainer on the same cores could use
    # What the CPU scorer computes in: "fp32", "bf16" (the packed scorer in bf16; OpenVINO for the ONNX graph), "int8"
    # (the packed scorer's int8 products; ONNX Runtime's quantized graph where the graph serves), or "auto": bf16 where
    # a bf16 product measures at least 1.3x fp32 on the serving CPU, fp32 elsewhere. `templar export --precision` sets
    # it; $TEMPLAR_CPU_PRECISION overrides "auto" on one machine (serving.cpu_precision).
    cpu_precision: str = _knob("auto", "scorer")
    gpu_fp16: bool = False  # GPU container: TensorRT execution accelerator in FP16 instead of CUDA FP32
    # Guards against hostile input (docs/reliability.md). A row past a limit gets a per-row error naming it; a request
    # past max_request_bytes is refused whole; past max_queue_size queued requests, new ones are refused at once
    # (UNAVAILABLE, which the reward client backs off from) instead of queueing without end.
    max_row_bytes: int = _knob(RowLimits.max_row_bytes, "preprocess")  # UTF-8 bytes of one conversation row
    max_messages: int = _knob(RowLimits.max_messages, "preprocess")  # messages in one row
    max_json_depth: int = _knob(RowLimits.max_json_depth, "preprocess")  # JSON nesting of one row
    max_request_bytes: int = _knob(32 << 20, "entry")  # all rows of one request together
    max_queue_size: int = 64  # requests waiting for the entry model; 0 = unbounded

    @classmethod
    def table(cls, model: str) -> dict[str, dataclasses.Field]:
        """parameter key -> field, for the parameters `model`'s config records."""
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        return {f.metadata.get("key") or f.name: f for f in dataclasses.fields(cls)
                if model in f.metadata.get("models", ())}

    def to_parameters(self, model: str) -> dict[str, str]:
        """The parameters of `model`'s config (strings, as Triton stores them)."""
        return {key: _encode(getattr(self, f.name)) for key, f in self.table(model).items()}

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], model: str | None = None) -> EntrySettings:
        """Settings read back from config parameters (of `model`, or of every model); a key a config does not
        record (one written before it existed) keeps its default."""
        values = {}
        for name in ([model] if model else MODELS):
            for key, f in cls.table(name).items():
                if key in params:
                    values[f.name] = _decode(params[key], f)
        return cls(**values)

    @property
    def row_limits(self) -> RowLimits:
        return RowLimits(self.max_row_bytes, self.max_messages, self.max_json_depth)


def _encode(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _decode(text: str, f: dataclasses.Field) -> Any:
    default = f.default
    if isinstance(default, str):
        return text
    if text == "" and f.type in ("float | None", "int | None"):
        return None
    if isinstance(default, bool):
        return text.strip().lower() in ("1", "true", "yes")
    if isinstance(default, float) or f.type == "float | None":
        return float(text)
    return int(text)


# The preprocessing version's serving.json: its fingerprints, template variables, score position and row limits.
SERVING_PARAMS = (*contract.FINGERPRINT_PARAMS, contract.PARAM_TEMPLATE_KWARGS, contract.PARAM_SCORE_POSITION_REASON,
                  *EntrySettings.table("preprocess"))


def version_parameters(version_dir: str | os.PathLike, params: Mapping[str, str]) -> dict[str, str]:
    """The config's parameters with the version's serving.json over them (a version exported before that file
    existed has only the config's)."""
    path = Path(version_dir) / SERVING_FILE
    if not path.is_file():
        return dict(params)
    return {**params, **{key: str(value) for key, value in json.loads(path.read_text()).items()}}


def load_chat_format(folder: str | os.PathLike, params: Mapping[str, str]):
    """(ChatFormat, pad id) for a tokenizer folder and the parameters `templar export` wrote."""
    from templar.chat_format import ChatFormat

    step_format = load_step_format(params)
    chat_format = ChatFormat.from_dir(
        folder,
        max_length=int(params[contract.PARAM_MAX_LENGTH]),
        special_tokens=params.get(contract.PARAM_SPECIAL_TOKENS, "escape"),
        template_kwargs=json.loads(params.get(contract.PARAM_TEMPLATE_KWARGS) or "{}"),
        extra_control_tokens=[step_format.step_tag] if step_format else (),
    )
    return chat_format, padding_id(chat_format.tokenizer)


def rm_kind(params: Mapping[str, str]) -> str:
    """"outcome" or "process" (templar.contract.RM_KINDS; an export from before kinds existed is an outcome RM)."""
    return params.get(contract.PARAM_RM_KIND) or "outcome"


def load_step_format(params: Mapping[str, str]):
    """A process RM's templar.steps.StepFormat (None for an outcome RM)."""
    if rm_kind(params) != "process":
        return None
    from templar.steps import StepFormat

    return StepFormat.from_json(params[contract.PARAM_STEP_FORMAT])


def load_step_reader(chat_format, params: Mapping[str, str]):
    """A process RM's templar.steps.StepReader, its tag id as the export resolved it (None for an outcome RM)."""
    step_format = load_step_format(params)
    if step_format is None:
        return None
    from templar.steps import StepReader

    return StepReader(step_format, int(params[contract.PARAM_STEP_TAG_ID]))


def padding_id(tokenizer) -> int:
    """The id rows are right-padded with: the tokenizer's pad id, or 0 (padding sits under a 0 attention mask, and the
    scorer never reads it whatever its id)."""
    return 0 if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
