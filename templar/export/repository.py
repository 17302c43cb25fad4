"""Writes a reward model's Triton entries into a model repository (one folder per model, as Triton expects).

    <name>/                 entry point (BLS, wire contract)         config.pbtxt, N/model.py
    <name>_preprocess/      this RM's template + tokenizer           config.pbtxt, N/model.py, N/serving.json,
                                                                     N/tokenizer/*
    <name>_model/           the exported ONNX scorer                 config.pbtxt (onnxruntime_onnx, GPU container),
                                                                     configs/embedded.pbtxt (Python + ONNX Runtime,
                                                                     the CPU embedded server), N/model.onnx
                                                                     [+ N/model.onnx.data], N/model.py
                            and, for the packed CPU scorer           configs/embedded.pbtxt (Python + torch), N/hf/*
                            (templar.serving.packed_scorer, the      (the RM's folder), N/model.py; the entry's
                            default CPU runtime)                     configs/embedded.pbtxt: scorer_packing prefix
                            or an RM's own forward in torch          config.pbtxt (Python, KIND_GPU), configs/
                            (templar.export.own_forward)             embedded.pbtxt (Python, CPU), N/hf/*, N/model.py

N is 1 unless `templar export --version N` adds a version beside the existing ones (a hot swap, `templar reload`):
the three models of one export share N, the entry calls its sub-models at its own version, and what differs between
versions lives inside N/ (serving.json), since Triton re-initialises every version of a model whose config changes.

Everything is built in a staging folder beside the repository and moved in at the end (`StagedModel`), so a failed
export never leaves a half-written model behind (and a running server never sees one). A model past protobuf's 2 GB
limit keeps its weights in `model.onnx.data` beside `model.onnx` (templar.export.onnx_files).
"""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from templar import contract
from templar.contract import EMBEDDED_CONFIG_NAME
from templar.errors import ExportError
from templar.serving.settings import SERVING_FILE, SERVING_PARAMS, EntrySettings

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass
class RewardModelEntry:
    name: str
    onnx_path: Path | None  # None: the RM is served by its own forward (torch_model_dir)
    tokenizer_dir: Path  # a folder holding the tokenizer files and chat_template.jinja
    parameters: dict[str, str]  # fingerprints, max_length, special_tokens, template_kwargs, source
    settings: EntrySettings = field(default_factory=EntrySettings)
    tensorrt_plan: Path | None = None  # a TensorRT engine (int32 ids) for the GPU container, beside the ONNX graph
    tensorrt_max_rows: int | None = None  # the engine profile's largest batch
    torch_model_dir: Path | None = None  # the model folder its own forward runs from (templar.serving.torch_scorer)
    # the RM's folder the packed CPU scorer loads (templar.serving.packed_scorer), beside the ONNX graph the GPU
    # container serves; with its load options (packed_scorer.LoadOptions as JSON)
    packed_model_dir: Path | None = None
    packed_load: str = ""

    @property
    def kind(self) -> str:
        """"outcome" or "process" (templar.contract.RM_KINDS)."""
        return self.parameters.get(contract.PARAM_RM_KIND) or "outcome"


def check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise ExportError(f"invalid model name {name!r}: use letters, digits, '_', '-', '.' (max 100 chars)")


def model_names(name: str) -> tuple[str, str, str]:
    """An RM's three Triton models: preprocess, scoring, entry."""
    return contract.preprocess_model_name(name), contract.scoring_model_name(name), name


def existing_versions(repo: str | os.PathLike, name: str) -> set[int]:
    """Version folders of any of the RM's three models."""
    return {int(p.name) for folder in model_names(name) if (Path(repo) / folder).is_dir()
            for p in (Path(repo) / folder).iterdir() if p.is_dir() and p.name.isdigit()}


def check_version(repo: str | os.PathLike, name: str, version: int, force: bool = False) -> None:
    """A new version must be a positive integer, new unless `force`, and the newest: config.pbtxt describes the
    newest version, the one Triton's default policy (latest 1) serves."""
    if version < 1:
        raise ExportError(f"--version must be a positive integer, got {version}")
    versions = existing_versions(repo, name)
    newest = max(versions, default=0)
    if version in versions and not force:
        raise ExportError(f"version {version} of {name!r} already exists in {repo}; export --version {newest + 1}, "
                          "or pass --force to replace it")
    if version < newest:
        raise ExportError(f"{name!r} already has version {newest} in {repo}: a new version must be the newest "
                          f"(config.pbtxt describes it); export --version {newest + 1}")


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


def scorer_signature(entry: RewardModelEntry) -> contract.Signature:
    """A TensorRT engine takes int32 ids; an ONNX graph int64."""
    return contract.scorer_signature("TYPE_INT32" if entry.tensorrt_plan else "TYPE_INT64", entry.kind)


def entry_config(entry: RewardModelEntry, embedded: bool = False) -> str:
    """The entry's config; `embedded`: the embedded CPU server's, which says when its scorer takes packed rows."""
    s = entry.settings
    ids_type = scorer_signature(entry).inputs[0].dtype.numpy
    packing = "prefix" if embedded and entry.packed_model_dir is not None else "padded"
    return (
        _header(entry.name, contract.entry_signature(entry.kind), s.max_batch_size, 'backend: "python"')
        + _instances("KIND_CPU", s.entry_instances) + _dynamic_batching(s.queue_delay_us, s.max_queue_size)
        + _params({
            **entry.parameters,
            **s.to_parameters("entry"),
            contract.PARAM_SCORING_IDS_DTYPE: np.dtype(ids_type).name,  # what `<rm>_model` takes (its config too)
            contract.PARAM_SCORER_PACKING: packing,
        })
    )


def preprocess_config(entry: RewardModelEntry) -> str:
    s = entry.settings
    return (_header(contract.preprocess_model_name(entry.name), contract.preprocess_signature(entry.kind),
                    s.max_batch_size,
                    'backend: "python"')
            + _instances("KIND_CPU", s.preprocess_instances)
            + _params({**entry.parameters, **s.to_parameters("preprocess")}))


def scorer_config_gpu(entry: RewardModelEntry) -> str:
    """For the official Triton container: ONNX Runtime backend on the GPU (CUDA, or TensorRT FP16)."""
    s = entry.settings
    accelerator = ""
    if s.gpu_fp16:
        accelerator = (
            "optimization { execution_accelerators { gpu_execution_accelerator: [ { name: \"tensorrt\" "
            "parameters { key: \"precision_mode\" value: \"FP16\" } "
            "parameters { key: \"max_workspace_size_bytes\" value: \"4294967296\" } } ] } }\n")
    return (_header(contract.scoring_model_name(entry.name), contract.scorer_signature(kind=entry.kind),
                    s.micro_batch_rows, 'platform: "onnxruntime_onnx"')
            + _instances("KIND_GPU", s.scorer_instances) + _dynamic_batching(s.queue_delay_us) + accelerator)


def scorer_config_tensorrt(entry: RewardModelEntry) -> str:
    """For the official Triton container: the TensorRT engine (`model.plan`, int32 ids, one shape profile)."""
    s = entry.settings
    return (_header(contract.scoring_model_name(entry.name), scorer_signature(entry),
                    entry.tensorrt_max_rows or s.micro_batch_rows, 'platform: "tensorrt_plan"')
            + _instances("KIND_GPU", s.scorer_instances) + _dynamic_batching(s.queue_delay_us))


def scorer_config_torch(entry: RewardModelEntry, instance_kind: str) -> str:
    """An RM served by its own forward: a Python model running torch, on the GPU (container) or the CPU."""
    s = entry.settings
    return (_header(contract.scoring_model_name(entry.name), scorer_signature(entry), s.micro_batch_rows,
                    'backend: "python"')
            + _instances(instance_kind, s.scorer_instances) + _params(s.to_parameters("scorer")))


def scorer_config_embedded(entry: RewardModelEntry) -> str:
    """For the embedded CPU server (Python backend only): the packed scorer (torch) or ONNX Runtime inside a Python
    model. Beside a TensorRT engine it takes the engine's int32 ids too (the entry model sends one dtype; the CPU
    scorer casts them back). The packed scorer also reads where scores are read and how to load the RM's folder."""
    s = entry.settings
    packed = {}
    if entry.packed_model_dir is not None:
        packed = {key: entry.parameters[key] for key in (contract.PARAM_SCORE_POSITION, contract.PARAM_SCORE_PAD_ID)
                  if key in entry.parameters}
        packed[contract.PARAM_PACKED_LOAD] = entry.packed_load
    return (_header(contract.scoring_model_name(entry.name), scorer_signature(entry), s.micro_batch_rows,
                    'backend: "python"')
            + _instances("KIND_CPU", s.scorer_instances)
            + _params({**s.to_parameters("scorer"), **packed}))


def read_parameters(config_path: str | os.PathLike) -> dict[str, str]:
    """The `parameters` of a config.pbtxt (parsed with Triton's own model-config schema)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(Path(config_path).read_text(), model_config_pb2.ModelConfig())
    return {key: value.string_value for key, value in config.parameters.items()}


def _thin_model_py(module: str) -> str:
    return (f"# Generated by `templar export`. The logic lives in {module} (shared with the trainer).\n"
            f"from {module} import TritonPythonModel  # noqa: F401\n")


def write_model_py(path: Path, module: str, final: Path) -> None:
    """The thin model.py and its bytecode: without it the stub writes __pycache__/ into the version folder after
    Triton took its timestamps, and the next load (`templar reload`) re-initialises that live version for nothing."""
    path.write_text(_thin_model_py(module))
    py_compile.compile(str(path), cfile=importlib.util.cache_from_source(str(path)), dfile=str(final), doraise=True)


def serving_settings(entry: RewardModelEntry) -> dict[str, str]:
    """What the preprocessing model of this version reads from `<version>/serving.json` (templar.serving.batching)."""
    values = {**entry.parameters, **entry.settings.to_parameters("preprocess")}
    return {key: values[key] for key in SERVING_PARAMS if key in values}


def write_if_changed(path: Path, text: str) -> None:
    """An unchanged file keeps its timestamp: Triton reloads every version of a model when a file beside the
    version folders changes (e.g. the scorer's GPU config.pbtxt on the embedded server)."""
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def same_content(a: Path, b: Path) -> bool:
    if a.is_file() and b.is_file():
        return a.read_bytes() == b.read_bytes()
    if a.is_dir() and b.is_dir():
        names = sorted(p.name for p in a.iterdir())
        return names == sorted(p.name for p in b.iterdir()) and all(same_content(a / n, b / n) for n in names)
    return False


class StagedModel:
    """An RM's three folders built beside the repository (same file system) and moved in at once.

    The export writes its files straight into `tokenizer_dir` and `onnx_path` (no copy of multi-GB weights), then
    `write(entry)` adds the configs and model.py files, `commit()` moves the folders into the repository (the
    previous ones kept aside), and after the checks on the files at their final place `finish()` drops the previous
    ones, or `rollback()` puts them back. Leaving the `with` block without finish() rolls back what was committed and
    removes the staging folder: a failed export never leaves a half-written model (and a running server never sees
    one).

    Without `version` the export is version 1 and replaces whole folders; with it, version N goes in beside the
    existing versions and only the configs that changed are replaced."""

    def __init__(self, repo: str | os.PathLike, name: str, version: int | None = None) -> None:
        check_name(name)
        self.repo, self.name = Path(repo), name
        self.keep_versions = version is not None
        self.version = str(version or 1)
        self.repo.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.repo.name}-staging-", dir=self.repo.parent))
        self.names = model_names(name)
        self.committed: list[Path] = []
        self.moved: list[Path] = []  # what commit() put into the repository; what it replaced waits in `previous`
        self.previous = self.staging / ".previous"
        self.finished = False

    @property
    def tokenizer_dir(self) -> Path:
        return self.staging / self.names[0] / self.version / "tokenizer"

    @property
    def torch_model_dir(self) -> Path:
        return self.staging / self.names[1] / self.version / contract.MODEL_FOLDER

    @property
    def onnx_path(self) -> Path:
        path = self.staging / self.names[1] / self.version / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def final(self, path: Path) -> Path:
        """Where a staged file is once committed."""
        return self.repo / path.relative_to(self.staging)

    def write(self, entry: RewardModelEntry) -> None:
        """Configs and thin model.py files (and what the export did not write in place: tokenizer, ONNX, plan)."""
        pre, scorer, main = (self.staging / n / self.version for n in self.names)
        pre.mkdir(parents=True, exist_ok=True)
        (pre / SERVING_FILE).write_text(json.dumps(serving_settings(entry), indent=1, sort_keys=True) + "\n")
        if Path(entry.tokenizer_dir).resolve() != self.tokenizer_dir.resolve():
            shutil.copytree(entry.tokenizer_dir, self.tokenizer_dir)
        if entry.onnx_path is not None and Path(entry.onnx_path).resolve() != self.onnx_path.resolve():
            from templar.export.onnx_files import model_files

            for file in model_files(entry.onnx_path):  # the graph and its external data, if any
                shutil.copyfile(file, self.onnx_path.parent / file.name.replace(Path(entry.onnx_path).name,
                                                                                 "model.onnx"))
        if entry.tensorrt_plan:
            shutil.copyfile(entry.tensorrt_plan, scorer / "model.plan")
        main.mkdir(parents=True, exist_ok=True)
        for folder in (entry.torch_model_dir, entry.packed_model_dir):
            if folder is not None and Path(folder).resolve() != self.torch_model_dir.resolve():
                shutil.copytree(folder, self.torch_model_dir)
        scorer.mkdir(parents=True, exist_ok=True)
        scoring = "torch_scorer" if entry.torch_model_dir is not None else \
            "packed_scorer" if entry.packed_model_dir is not None else "onnx_scorer"
        for folder, module in ((pre, "preprocess"), (scorer, scoring), (main, "reward_entry")):
            write_model_py(folder / "model.py", f"templar.serving.{module}", self.final(folder / "model.py"))
        self.write_configs(entry, self.staging)

    def write_configs(self, entry: RewardModelEntry, root: Path) -> None:
        pre, scorer, main = (root / n for n in self.names)
        (scorer / "configs").mkdir(parents=True, exist_ok=True)
        gpu_config = scorer_config_tensorrt(entry) if entry.tensorrt_plan else scorer_config_gpu(entry)
        embedded = scorer_config_embedded(entry)
        if entry.torch_model_dir is not None:  # its own forward, in torch, wherever it is served
            gpu_config, embedded = scorer_config_torch(entry, "KIND_GPU"), scorer_config_torch(entry, "KIND_CPU")
        (main / "configs").mkdir(parents=True, exist_ok=True)
        for path, text in ((pre / "config.pbtxt", preprocess_config(entry)), (scorer / "config.pbtxt", gpu_config),
                           (scorer / "configs" / f"{EMBEDDED_CONFIG_NAME}.pbtxt", embedded),
                           (main / "config.pbtxt", entry_config(entry)),
                           (main / "configs" / f"{EMBEDDED_CONFIG_NAME}.pbtxt", entry_config(entry, embedded=True))):
            write_if_changed(path, text)

    def finish_checked(self, entry: RewardModelEntry, max_diff: float) -> None:
        """The served files held against the reference: record by how much, and keep them."""
        entry.parameters["parity_max_abs_diff"] = f"{max_diff:.3e}"
        self.rewrite_configs(entry)
        self.finish()

    def rewrite_configs(self, entry: RewardModelEntry) -> None:
        """The configs again, in place (after the checks measured what the parameters record)."""
        self.write_configs(entry, self.repo if self.committed else self.staging)

    def commit(self, log: Callable[[str], None] = lambda _: None) -> list[Path]:
        """Move the folders into the repository; the ones they replace wait in the staging folder."""
        self.previous.mkdir()
        for name in self.names:
            target = self.repo / name
            if self.keep_versions and target.is_dir():
                for item in sorted((self.staging / name).iterdir()):
                    # an unchanged config keeps its timestamp (see write_if_changed)
                    if not item.name.isdigit() and same_content(item, target / item.name):
                        continue
                    self.move_in(item, target / item.name, log)
            else:
                self.move_in(self.staging / name, target, log)
            self.committed.append(target)
        return list(self.committed)

    def move_in(self, staged: Path, target: Path, log: Callable[[str], None]) -> None:
        if target.exists():
            log(f"replacing {target}")
            aside = self.previous / target.relative_to(self.repo)
            aside.parent.mkdir(parents=True, exist_ok=True)
            target.rename(aside)
        staged.rename(target)
        self.moved.append(target)

    def rollback(self) -> None:
        for target in reversed(self.moved):
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            aside = self.previous / target.relative_to(self.repo)
            if aside.exists():
                aside.rename(target)
        self.moved, self.committed = [], []

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
