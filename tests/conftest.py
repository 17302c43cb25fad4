"""Shared fixtures: real tokenizers (fetched by `templar assets`), small random RMs built on them, real ONNX exports
and a real embedded Triton server reached over real gRPC."""

from __future__ import annotations

from templar.environment import use_offline_defaults

use_offline_defaults()  # before transformers is imported anywhere

import os  # noqa: E402

# The CPU scorer's "auto" precision is bf16 on a CPU with bf16 in hardware: the suite's fidelity checks hold served
# scores bit for bit to fp32 references, so "auto" means fp32 here (servers and CLIs the tests start inherit it);
# tests/test_cpu_precision.py tests the bf16 path and what "auto" picks on which CPU.
os.environ["TEMPLAR_CPU_PRECISION"] = "fp32"
# The packed CPU scorer compiles its layers (torch.compile) when a server loads it: seconds per model at every server
# start, many of which the suite makes. Its layers run uncompiled here; tests/test_packed_scorer.py serves them
# compiled, as deployed.
os.environ["TEMPLAR_NO_COMPILE"] = "1"
# ... and where a test compiles, inductor compiles in the process itself: no pool of compile workers (a torch import
# each) on a machine whose memory the suite's servers already fill
os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
# Two test workers share two cores, each running torch (here and in the trainings, exports and servers they start):
# OpenMP threads that spin-wait after every parallel region take the core from the other worker's. Measured with two
# PPO runs of configs/demo_prm.yaml side by side on 2 cores: 30 s a step each by default, 11 s with threads that
# sleep instead (6 s alone, either way; the same metrics to the last digit). Set before torch is imported anywhere.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib  # noqa: E402
import ctypes  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import pickle  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import TypeVar  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

from templar.assets import fetch_all, template_path, tokenizer_dir  # noqa: E402
from templar.server.embedded import EmbeddedTriton  # noqa: E402
from templar.server.ports import free_server_ports  # noqa: E402
from templar.export.exporter import ExportOptions, export_reward_model  # noqa: E402
from templar.export.repository import EntrySettings  # noqa: E402
from templar.tiny_models import build_tiny_model  # noqa: E402

# Every family `templar assets` fetches; each becomes a served RM named rm_<family>.
FAMILIES = ("qwen2_5", "qwen3", "llama3_1", "llama3_2", "gemma3", "mistral_nemo", "deepseek_v3")
# Llama-3.2's template inserts today's date unless told otherwise: pin it on both sides.
TEMPLATE_KWARGS = {"llama3_2": {"date_string": "26 Jul 2024"}}
MAX_LENGTH = 1024
# Small servers for tests: one instance per model keeps the number of stub processes down. The packed scorer's layers
# run uncompiled (torch.compile traces each scoring model again at every server start, seconds per model on 2
# cores); tests/test_packed_scorer.py serves it compiled, as `templar export` configures it by default.
TEST_SETTINGS = EntrySettings(entry_instances=1, intra_op_threads=1, packed_compile=False)


# Fixtures that export ONNX or start Triton: a test using one is an integration test (left out by `make test-fast`).
INTEGRATION_FIXTURES = {"served_repo", "triton", "small_repo"}


# `make test` runs the suite on two workers (pytest-xdist, --dist loadscope --no-loadscope-reorder): a file is one unit
# of work, so its module fixtures are built once, and each demo run is a unit of its own. The files whose tests use
# the session server (`triton`, 11 RMs, 33 Python-backend processes) are one unit together: one worker starts that
# server instead of both (a minute of a busy 2-core machine and ~3 GB); a test elsewhere that asks for it is refused
# at collection. Units start in this order (the longest first, measured, so that no worker is left alone with a long
# one at the end); a worker takes its next unit as it nears the end of the one before.
# In this order within their unit: test_deploy.py last, since it trains on the demo's models, which the first demo run
# builds on an empty cache meanwhile (on the other worker) instead of one worker waiting for the other's build.
SESSION_SERVER_FILES = ("test_trainer.py", "test_estimators_training.py", "test_trainer_faults.py", "test_serving.py",
                        "test_fidelity.py", "test_reward_client.py", "test_integrations.py", "test_kubernetes.py",
                        "test_gpu.py", "test_deploy.py")
SESSION_SERVER_UNIT = "the session server's files"
START_ORDER = (SESSION_SERVER_UNIT, "test_demo.py::test_demo_config_learns_the_rule_with_a_small_kl[demo.yaml]",
               "test_export_large.py", "test_beyond_one_score.py", "test_hot_swap.py",
               "test_demo.py::test_prm_demo_learns_each_step_and_credits_the_token_that_ends_it",
               "test_demo.py::test_demo_config_learns_the_rule_with_a_small_kl[demo_grpo.yaml]",
               "test_faults_serving.py", "test_bench_train.py", "test_export.py", "test_loadtest_bench.py")
OWN_UNITS = ("tests/test_demo.py::",)


def _unit(nodeid: str) -> str:
    if nodeid.startswith(OWN_UNITS):
        return nodeid
    file = nodeid.split("::", 1)[0]
    return SESSION_SERVER_UNIT if file.removeprefix("tests/") in SESSION_SERVER_FILES else file


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadscope":
        return None  # xdist's own choice
    from xdist.scheduler import LoadScopeScheduling

    class FileUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return FileUnits(config, log)


def _start_rank(item) -> tuple[int, int]:
    unit = _unit(item.nodeid).removeprefix("tests/")
    file = item.nodeid.split("::", 1)[0].removeprefix("tests/")
    return (START_ORDER.index(unit) if unit in START_ORDER else len(START_ORDER),
            SESSION_SERVER_FILES.index(file) if file in SESSION_SERVER_FILES else 0)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_start_rank)  # stable: a file's tests keep their order
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine)")
    for item in items:
        if "triton" in getattr(item, "fixturenames", ()) and _unit(item.nodeid) != SESSION_SERVER_UNIT:
            raise pytest.UsageError(f"{item.nodeid} uses the session server (`triton`): add its file to "
                                    "SESSION_SERVER_FILES in tests/conftest.py, so that one test worker starts it")
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def memory_back_after_each_file():
    """A test worker lives for the whole run and holds what its files loaded (models, sessions, tokenizers): after a
    file, collect it and hand the freed heap back to the system (glibc keeps it otherwise: workers grew to ~2.7 GB),
    since the two workers' servers, trainings and exports share the machine's memory."""
    yield
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@pytest.fixture(scope="session")
def assets() -> dict[str, Path]:
    fetch_all(progress=False)
    return {family: tokenizer_dir(family) for family in FAMILIES}


Built = TypeVar("Built")


def built_once_per_run(tmp_path_factory, name: str, build: Callable[[Path], Built]) -> Built:
    """What `build(folder)` returns, built by whichever test worker asks first and read back by the others (the
    workers of one run share the parent of their base temp folders): the session repository's 12 exports were made
    by both workers, ~130 s of a 2-core machine. What is built this way is read-only to the tests."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    done = root / f"{name}.pickle"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            built = build(root / name)
            done.write_bytes(pickle.dumps(built))
        return pickle.loads(done.read_bytes())


@pytest.fixture(scope="session")
def tiny_rms(assets, tmp_path_factory) -> dict[str, Path]:
    """family -> folder of a small random *ForSequenceClassification RM on that family's real tokenizer."""
    return built_once_per_run(tmp_path_factory, "rms", lambda root: {
        family: build_tiny_model(family, root / family, kind="reward", seed=i) for i, family in enumerate(FAMILIES)})


@pytest.fixture(scope="session")
def tiny_actor(assets, tmp_path_factory) -> Path:
    """A small random causal LM on the real Qwen2.5 tokenizer and template (the trainer tests' actor)."""
    return built_once_per_run(tmp_path_factory, "actor", lambda root: build_tiny_model(
        "qwen2_5", root / "actor", kind="causal-lm", seed=0))


@dataclass
class ServedRepo:
    path: Path
    models: dict[str, Path] = field(default_factory=dict)  # served name -> source model folder
    reports: dict = field(default_factory=dict)


def export(model: Path, name: str, repo: Path, **kwargs) -> object:
    kwargs.setdefault("max_length", MAX_LENGTH)
    kwargs.setdefault("settings", TEST_SETTINGS)
    return export_reward_model(ExportOptions(model=model, name=name, repo=repo, **kwargs), log=lambda _: None)


# The session server of each test worker serves 11 RMs (33 Python-backend processes). On the packed torch scorer a
# scoring process holds ~360 MB (torch), on ONNX Runtime ~75 MB: with both workers' servers, the trainings and the
# real-size export, all-packed repositories ran a 24 GiB machine out of memory. The default runtime serves the three
# architectures the families bring (qwen2, llama, gemma3_text); the other families and variants, whose point is their
# template, run the ONNX graph. The conformance matrix (tests/test_fidelity.py) runs every architecture on both.
PACKED_FAMILIES = ("qwen2_5", "llama3_1", "gemma3")
ORT_SETTINGS = dataclasses.replace(TEST_SETTINGS, cpu_runtime="onnxruntime")


def served_repo_settings(family: str) -> EntrySettings:
    return TEST_SETTINGS if family in PACKED_FAMILIES else ORT_SETTINGS


@pytest.fixture(scope="session")
def served_repo(tiny_rms, tmp_path_factory) -> ServedRepo:
    """One repository with an RM per family, plus variants: special_tokens=reject, and a Gemma-1 template (which
    rejects a system role) supplied with --chat-template. Built once per run, whichever worker asks first."""
    return built_once_per_run(tmp_path_factory, "repo", lambda root: _build_served_repo(tiny_rms, root))


def _build_served_repo(tiny_rms: dict[str, Path], root: Path) -> ServedRepo:
    repo = ServedRepo(root / "model_repository")
    for family, model in tiny_rms.items():
        name = f"rm_{family}"
        repo.reports[name] = export(model, name, repo.path, template_kwargs=TEMPLATE_KWARGS.get(family, {}),
                                    settings=served_repo_settings(family))
        repo.models[name] = model
    repo.reports["rm_llama3_reject"] = export(tiny_rms["llama3_1"], "rm_llama3_reject", repo.path,
                                              special_tokens="reject", settings=ORT_SETTINGS)
    repo.models["rm_llama3_reject"] = tiny_rms["llama3_1"]
    repo.reports["rm_gemma1"] = export(tiny_rms["gemma3"], "rm_gemma1", repo.path,
                                       chat_template=template_path("gemma"), settings=ORT_SETTINGS)
    repo.models["rm_gemma1"] = tiny_rms["gemma3"]
    # the same RM as rm_qwen2_5 on ONNX Runtime: the CPU path whose scores are bit-identical whatever the batch
    repo.reports["rm_qwen2_5_ort"] = export(tiny_rms["qwen2_5"], "rm_qwen2_5_ort", repo.path, settings=ORT_SETTINGS)
    repo.models["rm_qwen2_5_ort"] = tiny_rms["qwen2_5"]
    return repo


def start_server(repo: Path, **kwargs) -> EmbeddedTriton:
    return EmbeddedTriton(repo, **free_server_ports(), **kwargs).start()


@pytest.fixture(scope="session")
def triton(served_repo):
    """The real tritonserver from the nvidia-pytriton wheel, serving every test RM on the CPU."""
    server = start_server(served_repo.path)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def small_repo(tiny_rms, tmp_path_factory) -> Path:
    """A repository with a single RM, for tests that start and stop servers."""
    path = tmp_path_factory.mktemp("small") / "model_repository"
    export(tiny_rms["llama3_1"], "rm_small", path)
    return path


@contextlib.contextmanager
def running(repo: Path, **kwargs):
    server = start_server(repo, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def control_token_ids(tokenizer, template_ids: list[int]) -> set[int]:
    """Structure tokens by the tokenizer's OWN lists (not Templar's): its special tokens, plus the added tokens the
    template wrote into `template_ids` (a rendering of plain content, e.g. Gemma's <start_of_turn>). Other added
    tokens (Gemma's whitespace runs, its non-special '</s>') are what the tokenizer makes of ordinary text."""
    added = tokenizer.added_tokens_decoder
    special = {i for i, token in added.items() if token.special} | set(tokenizer.all_special_ids)
    return special | {i for i in template_ids if i in added and not added[i].content.isspace()}


def inserted_spans(base: list[int], longer: list[int]) -> list[list[int]]:
    """The runs of ids `longer` has where `base` has none or others: where extra content went in."""
    import difflib

    matcher = difflib.SequenceMatcher(a=base, b=longer, autojunk=False)
    return [longer[j1:j2] for tag, _, _, j1, j2 in matcher.get_opcodes() if tag in ("insert", "replace")]


class TorchReference:
    """Scores from the RM's OWN Hugging Face forward pass on its own template, the model card's snippet:
    `rm(**tok.apply_chat_template(messages, return_dict=True, return_tensors="pt")).logits[0][0]`. The untouched
    `*ForSequenceClassification` in float32, no code of Templar's between the ids and the number: the ground truth
    the served path must reproduce (where the template ends with the pad token, the model reads the token before)."""

    def __init__(self, model_dir: Path, template_kwargs: dict | None = None, chat_template: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        self.model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.template_kwargs = template_kwargs or {}

    def inputs(self, messages, **kwargs) -> dict:
        """`apply_chat_template(..., return_dict=True, return_tensors="pt")`: ids and attention mask, as model cards
        build them; kwargs (tools, template variables) as the row gives them."""
        return self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                                  **{**self.template_kwargs, **kwargs})

    def ids(self, messages, **kwargs) -> list[int]:
        return self.inputs(messages, **kwargs)["input_ids"][0].tolist()

    def score_ids(self, ids: list[int]) -> float:
        """The model's own forward on these ids (one unpadded row)."""
        with torch.no_grad():
            return float(self.model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                                            dtype=torch.long)
                                    ).logits[0][0])

    def score(self, messages, **kwargs) -> float:
        with torch.no_grad():
            return float(self.model(**self.inputs(messages, **kwargs)).logits[0][0])


@pytest.fixture(scope="session")
def references(tiny_rms) -> dict[str, TorchReference]:
    return {family: TorchReference(tiny_rms[family], TEMPLATE_KWARGS.get(family)) for family in FAMILIES}
