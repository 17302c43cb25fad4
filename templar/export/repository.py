"""Writes a reward model's Triton entries into a model repository (one folder per model, as Triton expects).

    <name>/                 entry point (BLS, wire contract)         config.pbtxt, 1/model.py
    <name>_preprocess/      this RM's template + tokenizer           config.pbtxt, 1/model.py, 1/tokenizer/*
    <name>_model/           the exported ONNX scorer                 config.pbtxt (onnxruntime_onnx, GPU container),
                                                                     configs/embedded.pbtxt (Python + ONNX Runtime,
                                                                     the CPU embedded server), 1/model.onnx
                                                                     [+ 1/model.onnx.data], 1/model.py

Everything is built in a staging folder beside the repository and moved in at the end (`StagedModel`), so a failed
export never leaves a half-written model behind (and a running server never sees one). A model past protobuf's 2 GB
limit keeps its weights in `model.onnx.data` beside `model.onnx` (templar.export.onnx_files).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from templar import contract
from templar.errors import ExportError

EMBEDDED_CONFIG_NAME = "embedded"  # `templar serve` passes --model-config-name=embedded
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass
class EntrySettings:
    """Serving knobs written into the generated configs (documented defaults; docs/benchmarks.md has the
    measurements behind them)."""

    max_batch_size: int = 256  # rows per request the entry point and the preprocess model accept
    # Micro-batches: rows of similar length scored together. On a 2-core CPU small ones win (a few thousand token
    # slots), and the padding cap matters when dynamic batches are small (the trainer sends a few requests at once).
    micro_batch_rows: int = 32  # at most this many rows per scoring call (also the scoring model's max_batch_size)
    micro_batch_tokens: int = 4096  # at most rows * longest-row tokens per scoring call
    micro_batch_max_padding: float | None = 0.1  # cut a micro-batch before its padding share would exceed this
    queue_delay_us: int = 2000  # dynamic batcher wait for more requests: long enough to merge a burst of requests
    entry_instances: int = 2  # one preprocesses while the other waits on the scoring model
    preprocess_instances: int = 1
    scorer_instances: int = 1
    intra_op_threads: int = 0  # ONNX Runtime threads in the CPU scorer; 0 = one per physical core
    intra_op_spinning: bool = False  # busy-waiting between runs burns CPU a trainer on the same cores could use
    gpu_fp16: bool = False  # GPU container: TensorRT execution accelerator in FP16 instead of CUDA FP32
    # Guards against hostile input (docs/reliability.md). A row past a limit gets a per-row error naming it; a request
    # past max_request_bytes is refused whole; past max_queue_size queued requests, new ones are refused at once
    # (UNAVAILABLE, which the reward client backs off from) instead of queueing without end.
    max_row_bytes: int = 1 << 20  # UTF-8 bytes of one conversation row (tokenizing 1 MiB takes ~0.5-0.75 s)
    max_messages: int = 1024  # messages in one row
    max_json_depth: int = 64  # JSON nesting of one row
    max_request_bytes: int = 32 << 20  # all rows of one request together
    max_queue_size: int = 64  # requests waiting for the entry model; 0 = unbounded


@dataclass
class RewardModelEntry:
    name: str
    onnx_path: Path
    tokenizer_dir: Path  # a folder holding the tokenizer files and chat_template.jinja
    parameters: dict[str, str]  # fingerprints, max_length, special_tokens, template_kwargs, source
    settings: EntrySettings = field(default_factory=EntrySettings)
    tensorrt_plan: Path | None = None  # a TensorRT engine (int32 ids) for the GPU container, beside the ONNX graph
    tensorrt_max_rows: int | None = None  # the engine profile's largest batch


def check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise ExportError(f"invalid model name {name!r}: use letters, digits, '_', '-', '.' (max 100 chars)")


def _params(values: dict[str, str]) -> str:
    return "".join(
        f'parameters {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(str(v))} }} }}\n'
        for k, v in values.items())


def _tensors(kind: str, specs: tuple[contract.TensorSpec, ...]) -> str:
    rows = ",\n".join(f'  {{ name: "{t.name}" data_type: {t.data_type} dims: [ {", ".join(map(str, t.dims))} ] }}'
                      for t in specs)
    return f"{kind} [\n{rows}\n]\n"


def _header(name: str, signature: contract.Signature, max_batch_size: int, runtime: str) -> str:
    """name, backend/platform, max_batch_size and the inputs/outputs, as the contract's table declares them."""
    return (f'name: "{name}"\n{runtime}\nmax_batch_size: {max_batch_size}\n'
            + _tensors("input", signature.inputs) + _tensors("output", signature.outputs))


def _instances(kind: str, count: int) -> str:
    return f"instance_group [ {{ kind: {kind} count: {count} }} ]\n"


def _dynamic_batching(delay_us: int, max_queue_size: int = 0) -> str:
    policy = ""
    if max_queue_size:  # a full queue refuses new requests at once rather than letting them wait without end
        policy = f" default_queue_policy {{ max_queue_size: {max_queue_size} }}"
    return f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us}{policy} }}\n"


def row_limit_parameters(settings: EntrySettings) -> dict[str, str]:
    """The preprocessing model's row limits (templar.conversation.RowLimits), as config parameters."""
    return {"max_row_bytes": str(settings.max_row_bytes), "max_messages": str(settings.max_messages),
            "max_json_depth": str(settings.max_json_depth)}


def scorer_signature(entry: RewardModelEntry) -> contract.Signature:
    """A TensorRT engine takes int32 ids; an ONNX graph int64."""
    return contract.scorer_signature("TYPE_INT32" if entry.tensorrt_plan else "TYPE_INT64")


def entry_config(entry: RewardModelEntry) -> str:
    s = entry.settings
    ids_type = scorer_signature(entry).inputs[0].dtype.numpy
    return (
        _header(entry.name, contract.ENTRY, s.max_batch_size, 'backend: "python"')
        + _instances("KIND_CPU", s.entry_instances) + _dynamic_batching(s.queue_delay_us, s.max_queue_size)
        + _params({
            **entry.parameters,
            "preprocess_model": contract.preprocess_model_name(entry.name),
            "scoring_model": contract.scoring_model_name(entry.name),
            "preprocess_max_batch_size": str(s.max_batch_size),
            "micro_batch_rows": str(s.micro_batch_rows),
            "micro_batch_tokens": str(s.micro_batch_tokens),
            "micro_batch_max_padding": "" if s.micro_batch_max_padding is None else str(s.micro_batch_max_padding),
            "scoring_ids_dtype": np.dtype(ids_type).name,  # what `<rm>_model` takes (its config says the same)
            "max_request_bytes": str(s.max_request_bytes),
        })
    )


def preprocess_config(entry: RewardModelEntry) -> str:
    s = entry.settings
    return (_header(contract.preprocess_model_name(entry.name), contract.PREPROCESS, s.max_batch_size,
                    'backend: "python"')
            + _instances("KIND_CPU", s.preprocess_instances)
            + _params({**entry.parameters, **row_limit_parameters(s)}))


def scorer_config_gpu(entry: RewardModelEntry) -> str:
    """For the official Triton container: ONNX Runtime backend on the GPU (CUDA, or TensorRT FP16)."""
    s = entry.settings
    accelerator = ""
    if s.gpu_fp16:
        accelerator = (
            "optimization { execution_accelerators { gpu_execution_accelerator: [ { name: \"tensorrt\" "
            "parameters { key: \"precision_mode\" value: \"FP16\" } "
            "parameters { key: \"max_workspace_size_bytes\" value: \"4294967296\" } } ] } }\n")
    return (_header(contract.scoring_model_name(entry.name), contract.scorer_signature(), s.micro_batch_rows,
                    'platform: "onnxruntime_onnx"')
            + _instances("KIND_GPU", s.scorer_instances) + _dynamic_batching(s.queue_delay_us) + accelerator)


def scorer_config_tensorrt(entry: RewardModelEntry) -> str:
    """For the official Triton container: the TensorRT engine (`model.plan`, int32 ids, one shape profile)."""
    s = entry.settings
    return (_header(contract.scoring_model_name(entry.name), scorer_signature(entry),
                    entry.tensorrt_max_rows or s.micro_batch_rows, 'platform: "tensorrt_plan"')
            + _instances("KIND_GPU", s.scorer_instances) + _dynamic_batching(s.queue_delay_us))


def scorer_config_embedded(entry: RewardModelEntry) -> str:
    """For the embedded CPU server (Python backend only): ONNX Runtime inside a Python model. Beside a TensorRT
    engine it takes the engine's int32 ids too (the entry model sends one dtype; ONNX Runtime casts them back)."""
    s = entry.settings
    return (_header(contract.scoring_model_name(entry.name), scorer_signature(entry), s.micro_batch_rows,
                    'backend: "python"')
            + _instances("KIND_CPU", s.scorer_instances)
            + _params({"intra_op_threads": str(s.intra_op_threads),
                       "intra_op_spinning": "1" if s.intra_op_spinning else "0"}))


def read_parameters(config_path: str | os.PathLike) -> dict[str, str]:
    """The `parameters` of a config.pbtxt (parsed with Triton's own model-config schema)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(Path(config_path).read_text(), model_config_pb2.ModelConfig())
    return {key: value.string_value for key, value in config.parameters.items()}


def _thin_model_py(module: str) -> str:
    return (f"# Generated by `templar export`. The logic lives in {module} (shared with the trainer).\n"
            f"from {module} import TritonPythonModel  # noqa: F401\n")


class StagedModel:
    """An RM's three folders built beside the repository (same file system) and moved in at once.

    The export writes its files straight into `tokenizer_dir` and `onnx_path` (no copy of multi-GB weights), then
    `write(entry)` adds the configs and model.py files, `commit()` moves the folders into the repository (the
    previous ones kept aside), and after the checks on the files at their final place `finish()` drops the previous
    ones, or `rollback()` puts them back. Leaving the `with` block without finish() rolls back what was committed and
    removes the staging folder: a failed export never leaves a half-written model (and a running server never sees
    one)."""

    def __init__(self, repo: str | os.PathLike, name: str) -> None:
        check_name(name)
        self.repo, self.name = Path(repo), name
        self.repo.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.repo.name}-staging-", dir=self.repo.parent))
        self.names = (contract.preprocess_model_name(name), contract.scoring_model_name(name), name)
        self.committed: list[Path] = []
        self.finished = False

    @property
    def tokenizer_dir(self) -> Path:
        return self.staging / self.names[0] / "1" / "tokenizer"

    @property
    def onnx_path(self) -> Path:
        path = self.staging / self.names[1] / "1" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def final(self, path: Path) -> Path:
        """Where a staged file is once committed."""
        return self.repo / path.relative_to(self.staging)

    def write(self, entry: RewardModelEntry) -> None:
        """Configs and thin model.py files (and what the export did not write in place: tokenizer, ONNX, plan)."""
        pre, scorer, main = (self.staging / n for n in self.names)
        (pre / "1").mkdir(parents=True, exist_ok=True)
        (pre / "config.pbtxt").write_text(preprocess_config(entry))
        (pre / "1" / "model.py").write_text(_thin_model_py("templar.serving.preprocess"))
        if Path(entry.tokenizer_dir).resolve() != self.tokenizer_dir.resolve():
            shutil.copytree(entry.tokenizer_dir, self.tokenizer_dir)
        (scorer / "configs").mkdir(parents=True, exist_ok=True)
        gpu_config = scorer_config_tensorrt(entry) if entry.tensorrt_plan else scorer_config_gpu(entry)
        (scorer / "config.pbtxt").write_text(gpu_config)
        (scorer / "configs" / f"{EMBEDDED_CONFIG_NAME}.pbtxt").write_text(scorer_config_embedded(entry))
        if Path(entry.onnx_path).resolve() != self.onnx_path.resolve():
            from templar.export.onnx_files import model_files

            for file in model_files(entry.onnx_path):  # the graph and its external data, if any
                shutil.copyfile(file, self.onnx_path.parent / file.name.replace(Path(entry.onnx_path).name,
                                                                                 "model.onnx"))
        if entry.tensorrt_plan:
            shutil.copyfile(entry.tensorrt_plan, scorer / "1" / "model.plan")
        (scorer / "1" / "model.py").write_text(_thin_model_py("templar.serving.onnx_scorer"))
        (main / "1").mkdir(parents=True, exist_ok=True)
        (main / "config.pbtxt").write_text(entry_config(entry))
        (main / "1" / "model.py").write_text(_thin_model_py("templar.serving.reward_entry"))

    def rewrite_configs(self, entry: RewardModelEntry) -> None:
        """The configs again, in place (after the checks measured what the parameters record)."""
        root = self.repo if self.committed else self.staging
        pre, scorer, main = (root / n for n in self.names)
        (pre / "config.pbtxt").write_text(preprocess_config(entry))
        gpu_config = scorer_config_tensorrt(entry) if entry.tensorrt_plan else scorer_config_gpu(entry)
        (scorer / "config.pbtxt").write_text(gpu_config)
        (scorer / "configs" / f"{EMBEDDED_CONFIG_NAME}.pbtxt").write_text(scorer_config_embedded(entry))
        (main / "config.pbtxt").write_text(entry_config(entry))

    def commit(self, log: Callable[[str], None] = lambda _: None) -> list[Path]:
        """Move the folders into the repository; the ones they replace wait in the staging folder."""
        for name in self.names:
            target = self.repo / name
            if target.exists():
                log(f"replacing {target}")
                target.rename(self.staging / f"{name}.previous")
            (self.staging / name).rename(target)
            self.committed.append(target)
        return list(self.committed)

    def rollback(self) -> None:
        for target in self.committed:
            shutil.rmtree(target, ignore_errors=True)
            previous = self.staging / f"{target.name}.previous"
            if previous.exists():
                previous.rename(target)
        self.committed = []

    def finish(self) -> None:
        self.finished = True

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc) -> None:
        if not self.finished:
            self.rollback()
        shutil.rmtree(self.staging, ignore_errors=True)


def write_reward_model(repo: str | os.PathLike, entry: RewardModelEntry,
                       log: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Write the three Triton entries of `entry` (its files copied) into `repo`, replacing older ones."""
    with StagedModel(repo, entry.name) as staged:
        staged.write(entry)
        folders = staged.commit(log)
        staged.finish()
    return folders
