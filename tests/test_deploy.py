"""The docker compose deployment, checked where there is no Docker engine: the compose file validates with
docker-compose (Debian's package, installed by `make test`), the CPU profile's commands really run (export → serve →
healthcheck → train), every generated config.pbtxt parses with Triton's model-config schema, and the Dockerfiles
install what the code imports, at the pinned versions."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from templar.server.embedded import die_with_parent
from templar import contract
from templar.export.repository import EntrySettings, RewardModelEntry, scorer_config_tensorrt
from templar.server.ports import free_ports

from conftest import export

pytestmark = pytest.mark.integration  # exports ONNX, starts Triton or runs the CLI

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
TRITON_DOCKERFILE = ROOT / "docker" / "triton.Dockerfile"
TRAINER_DOCKERFILE = ROOT / "docker" / "trainer.Dockerfile"
# The modules Triton loads from the generated model.py files (templar/export/repository.py writes their names)
PYTHON_MODEL_MODULES = ("templar.serving.preprocess", "templar.serving.reward_entry", "templar.serving.onnx_scorer")


def compose_config(*env: str) -> dict:
    """`docker-compose config` (the resolved file, .env applied) as a dict."""
    tool = shutil.which("docker-compose")
    assert tool, ("docker-compose not found: `make test` installs Debian's docker-compose "
                  "(apt-get install docker-compose)")
    result = subprocess.run(["env", *env, tool, "--project-directory", str(ROOT), "-f", str(COMPOSE), "config"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def parse_model_config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_compose_file_validates_and_wires_gpu_triton_to_the_trainer():
    services = compose_config()["services"]
    triton, trainer, export_job = services["triton"], services["trainer"], services["export"]
    assert triton["build"]["dockerfile"] == "docker/triton.Dockerfile"
    for service in (triton, trainer):
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert {int(p.split(":")[-1]) for p in published_ports(triton)} == {8000, 8001, 8002}
    assert any(v.endswith("/model_repository:/models:ro") for v in triton["volumes"])
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"]) and triton["shm_size"]
    assert trainer["depends_on"] == {"triton": {"condition": "service_healthy"}}
    assert triton["depends_on"] == {"export": {"condition": "service_completed_successfully"}}
    assert "reward.url=triton:8001" in trainer["command"]
    assert any(v.endswith("/runs:/runs:rw") for v in trainer["volumes"])  # checkpoints outlive the container
    assert "--export-only" in export_job["command"]
    # The default profile is the GPU one; CPU hosts switch with COMPOSE_PROFILES=cpu
    assert "COMPOSE_PROFILES=gpu" in (ROOT / ".env").read_text().splitlines()
    assert {name: s["profiles"] for name, s in services.items()} == {
        "export": ["gpu"], "triton": ["gpu"], "trainer": ["gpu"],
        "export-cpu": ["cpu"], "triton-cpu": ["cpu"], "trainer-cpu": ["cpu"]}
    cpu = services["triton-cpu"]
    assert "deploy" not in cpu and "deploy" not in services["trainer-cpu"]
    assert cpu["networks"]["default"]["aliases"] == ["triton"]  # so the trainer's reward.url works on both
    assert services["trainer-cpu"]["depends_on"] == {"triton-cpu": {"condition": "service_healthy"}}


def published_ports(service: dict) -> set[str]:
    """"address:published:target" of each port (docker-compose v1 writes them as strings, v2 as mappings)."""
    return {f"{p['host_ip']}:{p['published']}:{p['target']}" if isinstance(p, dict) else p.removesuffix("/tcp")
            for p in service["ports"]}


def test_compose_environment_overrides_are_honoured():
    services = compose_config("TEMPLAR_CONFIG=configs/mine.yaml", "TRITON_GRPC_PORT=9001")["services"]
    assert services["trainer"]["command"][:4] == ["templar", "train", "--config", "configs/mine.yaml"]
    assert "127.0.0.1:9001:8001" in published_ports(services["triton"])
    exposed = compose_config("TEMPLAR_PUBLISH_ADDRESS=0.0.0.0")["services"]
    assert published_ports(exposed["triton-cpu"]) == {f"0.0.0.0:{p}:{p}" for p in (8000, 8001, 8002)}


def test_compose_publishes_on_loopback_and_locks_triton_admin_protocols():
    services = compose_config()["services"]
    for name in ("triton", "triton-cpu"):
        assert published_ports(services[name]) == {f"127.0.0.1:{p}:{p}" for p in (8000, 8001, 8002)}, name
    # the GPU service's start line, as its shell runs it (compose turns $$ into $), with `echo` for tritonserver
    line = services["triton"]["command"][2].replace("$$", "$").replace("exec tritonserver", "exec echo")
    for env, key in ((["TEMPLAR_ADMIN_KEY="], r"[0-9a-f]{48}"), (["TEMPLAR_ADMIN_KEY=mine-0123456789abcdef"],
                                                                "mine-0123456789abcdef")):
        args = subprocess.run(["env", *env, "sh", "-c", line], capture_output=True, text=True, check=True).stdout
        protocols = "model-repository,logging,trace,shared-memory:templar-admin-key="
        assert re.search(f"--grpc-restricted-protocol={protocols}({key}) --http-restricted-api={protocols}\\1$",
                         args.strip()), args
    assert "--model-control-mode" not in services["triton"]["command"][2]  # Triton's default: none
    for name in ("triton", "triton-cpu"):
        assert "TEMPLAR_ADMIN_KEY" in services[name]["environment"]


def _local(command: list[str], paths: dict[str, str]) -> list[str]:
    """A container command with its container paths and addresses mapped to this machine."""
    out = []
    for arg in command:
        for container, local in paths.items():
            arg = arg.replace(container, local)
        out.append(arg)
    return out


def test_cpu_profile_commands_export_serve_pass_the_healthcheck_and_train(tmp_path):
    """What `COMPOSE_PROFILES=cpu docker compose up` runs, run here with the same commands (no Docker engine)."""
    services = compose_config("COMPOSE_PROFILES=cpu")["services"]
    http, grpc, metrics = free_ports(3)
    paths = {"/models": str(tmp_path / "model_repository"), "/runs": str(tmp_path / "runs"),
             "triton:8001": f"127.0.0.1:{grpc}"}
    cli = [sys.executable, "-m", "templar.cli"]

    exported = subprocess.run(cli + _local(services["export-cpu"]["command"], paths)[1:], cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "reward models ready" in exported.stdout
    repo = tmp_path / "model_repository"
    assert {p.name for p in repo.iterdir()} >= {"rm_llama3", "rm_gemma3", "rm_llama3_model", "rm_gemma3_preprocess"}
    again = subprocess.run(cli + _local(services["export-cpu"]["command"], paths)[1:], cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "exporting reward model" not in again.stderr  # restarts re-export nothing

    serve_command = _local(services["triton-cpu"]["command"], paths)
    serve_command = [a.replace("0.0.0.0", "127.0.0.1") for a in serve_command]  # keep the test on loopback
    for flag, port in (("--http-port", http), ("--grpc-port", grpc), ("--metrics-port", metrics)):
        serve_command[serve_command.index(flag) + 1] = str(port)
    server = subprocess.Popen(cli + serve_command[1:], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, preexec_fn=die_with_parent)
    try:
        healthcheck = services["triton-cpu"]["healthcheck"]["test"][1:]  # ["CMD", "python3", "-c", ...]
        healthcheck = [a.replace("localhost:8000", f"127.0.0.1:{http}") for a in healthcheck]
        deadline = time.monotonic() + 300
        while subprocess.run(healthcheck, capture_output=True).returncode != 0:
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the healthcheck never passed"
            time.sleep(1)
        trained = subprocess.run(cli + _local(services["trainer-cpu"]["command"], paths)[1:] +
                                 ["steps=1", "save_every=1", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8",
                                  "ppo.ppo_epochs=1"], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert trained.returncode == 0, trained.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=120)
    run = tmp_path / "runs" / "demo"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (run / "checkpoints" / "latest").read_text() == "step-000001"
    log = (run / "train.log").read_text()
    assert "embedded Triton serving" not in log  # it used the compose service's server, as reward.url says
    assert set(json.loads((run / "reward_models.json").read_text())) == {"rm_llama3", "rm_gemma3"}


def test_every_generated_config_parses_with_tritons_model_config_schema(served_repo, tmp_path, tiny_rms):
    configs = sorted(served_repo.path.glob("*/config.pbtxt")) + sorted(served_repo.path.glob("*/configs/*.pbtxt"))
    assert len(configs) >= 3 * 9 + 9
    platforms = {}
    for path in configs:
        config = parse_model_config(path.read_text())
        assert config.name == path.parent.name or config.name == path.parent.parent.name
        platforms[str(path.relative_to(served_repo.path))] = config.platform or config.backend
    assert platforms["rm_qwen2_5_model/config.pbtxt"] == "onnxruntime_onnx"  # the GPU container's config
    assert platforms["rm_qwen2_5_model/configs/embedded.pbtxt"] == "python"  # the embedded CPU server's
    assert platforms["rm_qwen2_5/config.pbtxt"] == platforms["rm_qwen2_5_preprocess/config.pbtxt"] == "python"
    gpu = parse_model_config((served_repo.path / "rm_qwen2_5_model" / "config.pbtxt").read_text())
    assert gpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert [i.data_type for i in gpu.input] == [model_config_pb2.TYPE_INT64] * 2

    export(tiny_rms["qwen2_5"], "rm_fp16", tmp_path / "repo", settings=EntrySettings(gpu_fp16=True))
    config = parse_model_config((tmp_path / "repo" / "rm_fp16_model" / "config.pbtxt").read_text())
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"


def test_tensorrt_plan_config_parses_and_takes_int32_ids(tmp_path):
    entry = RewardModelEntry("rm_trt", tmp_path / "model.onnx", tmp_path, {}, EntrySettings(micro_batch_rows=32),
                             tensorrt_plan=tmp_path / "model.plan", tensorrt_max_rows=32)
    config = parse_model_config(scorer_config_tensorrt(entry))
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        (contract.INPUT_IDS, model_config_pb2.TYPE_INT32, [-1]),
        (contract.ATTENTION_MASK, model_config_pb2.TYPE_INT32, [-1])]


def test_export_format_tensorrt_without_tensorrt_says_what_to_install(tiny_rms, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here; the GPU tests cover the engine build")
    result = subprocess.run([sys.executable, "-m", "templar.cli", "export", "--model", str(tiny_rms["llama3_1"]),
                             "--name", "rm_trt", "--repo", str(tmp_path / "repo"), "--format", "tensorrt"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--format tensorrt needs TensorRT, which is not installed" in result.stderr
    assert "pip install tensorrt" in result.stderr and "--format onnx" in result.stderr
    assert not (tmp_path / "repo").exists()  # failed before any work


def _third_party_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """Top-level names of the non-templar modules `module` imports, following templar imports transitively."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    for block in ast.walk(tree):  # imports under `if TYPE_CHECKING:` never run
        if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            block.body = []
        # `try: import x / except ImportError:` is an optional dependency, handled where it is absent
        if isinstance(block, ast.Try) and any(ast.unparse(h.type or ast.Name("")) in ("ImportError",
                                                                                     "ModuleNotFoundError")
                                              for h in block.handlers):
            block.body = [node for node in block.body if not isinstance(node, (ast.Import, ast.ImportFrom))]
    found: set[str] = set()
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        for name in names:
            if name.split(".")[0] == "templar":
                found |= _third_party_imports(name if importlib.util.find_spec(name) else name.rsplit(".", 1)[0],
                                              seen)
            elif name.split(".")[0] not in sys.stdlib_module_names and name != "__future__":
                found.add(name.split(".")[0])
    return found


def _pip_install_lines(dockerfile: Path) -> list[list[str]]:
    commands = re.split(r"&&|;|\n", dockerfile.read_text().replace("\\\n", " "))
    return [c.split("pip install", 1)[1].split() for c in commands if "pip install" in c]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("#")[0].strip().split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_triton_dockerfile_installs_what_the_python_models_import_at_the_pinned_versions():
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_VERSION\}-py3$",
                     TRITON_DOCKERFILE.read_text(), re.M)
    assert re.search(r"^ARG TRITON_VERSION=\d\d\.\d\d$", TRITON_DOCKERFILE.read_text(), re.M)
    imports = set().union(*(_third_party_imports(m) for m in PYTHON_MODEL_MODULES))
    imports.discard("triton_python_backend_utils")  # provided by Triton's Python backend itself
    distributions = importlib.metadata.packages_distributions()
    needed = {distributions[name][0].lower() for name in imports}
    assert {"numpy", "transformers", "jinja2", "onnxruntime"} <= needed
    lines = [line for line in _pip_install_lines(TRITON_DOCKERFILE) if "torch==2.13.0" not in line]
    installed = {a.lower() for line in lines for a in line
                 if not a.startswith("-") and a not in (".", "constraints.txt")}
    assert needed <= installed, f"the Python models import {sorted(needed - installed)}, which the image lacks"
    assert any(line[:2] == ["-c", "constraints.txt"] for line in lines)  # the project's pins apply
    pins = _pins()
    assert all(name in pins for name in installed), sorted(installed - set(pins))
    # Triton's own backends score; the Python models never import torch, but for an RM served by its own forward
    # (templar.serving.torch_scorer), which the image gets only when built with OWN_FORWARD_TORCH=1
    assert "torch" not in installed
    torch_line = re.search(r'^RUN if \[ "\$\{OWN_FORWARD_TORCH\}" = 1 \]; then pip install -c constraints.txt '
                           r"torch==(\S+); fi$", TRITON_DOCKERFILE.read_text(), re.M)
    assert torch_line and torch_line.group(1) == pins["torch"]
    assert _third_party_imports("templar.serving.torch_scorer") - imports - {"triton_python_backend_utils"} \
        <= {"torch"}
    assert compose_config()["services"]["triton"]["build"]["args"]["OWN_FORWARD_TORCH"] == "0"
    assert ["--no-deps", "."] in lines  # the templar package itself


def test_trainer_dockerfile_installs_like_make_setup():
    lines = _pip_install_lines(TRAINER_DOCKERFILE)
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt torch==2.13.0" in makefile
    assert any("torch==2.13.0" in line and "constraints.txt" in line for line in lines)
    assert ["-c", "constraints.txt", "'.[embedded]'"] in lines
    assert "RUN templar assets" in TRAINER_DOCKERFILE.read_text()
    assert _pins()["torch"] == "2.13.0"
    python = re.search(r"^FROM python:(\d+\.\d+)", TRAINER_DOCKERFILE.read_text(), re.M).group(1)
    requires = re.search(r'requires-python = ">=(\d+\.\d+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert tuple(map(int, python.split("."))) >= tuple(map(int, requires.split(".")))


def test_a_tensorrt_repository_still_serves_on_the_embedded_cpu_server(tiny_rms, references, tmp_path):
    """A `--format tensorrt` repository sends int32 ids to its scoring model; the embedded server's ONNX config takes
    them too, so the same repository serves on both. (The engine itself needs a GPU to build: here the plan file is
    a placeholder, which the CPU config never opens; tests/test_gpu.py builds a real one.)"""
    from templar.samples import sample_conversations
    from templar.export.repository import write_reward_model
    from templar.reward_client import RewardClient, RewardClientConfig

    from conftest import TEST_SETTINGS, running

    report = export(tiny_rms["llama3_1"], "rm_onnx", tmp_path / "onnx")
    placeholder = tmp_path / "model.plan"
    placeholder.write_bytes(b"not an engine: the CPU config runs model.onnx")
    source = tmp_path / "onnx"
    entry = RewardModelEntry("rm_trt", source / "rm_onnx_model" / "1" / "model.onnx",
                             source / "rm_onnx_preprocess" / "1" / "tokenizer", report.parameters, TEST_SETTINGS,
                             tensorrt_plan=placeholder, tensorrt_max_rows=TEST_SETTINGS.micro_batch_rows)
    repo = tmp_path / "trt"
    write_reward_model(repo, entry)
    assert parse_model_config((repo / "rm_trt_model" / "config.pbtxt").read_text()).platform == "tensorrt_plan"
    conversations = list(sample_conversations().values())[:4]
    with running(repo) as server, RewardClient(RewardClientConfig(model="rm_trt", endpoints=[server.grpc_url])) as c:
        result = c.score(conversations)
    assert result.status == ["ok"] * len(conversations)
    expected = [references["llama3_1"].score(m) for m in conversations]
    np.testing.assert_allclose(result.scores, expected, atol=1e-4)
