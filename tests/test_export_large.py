"""Real-size reward models (issue 10): a 0.6B-parameter Qwen3 RM shipped in bf16, past protobuf's 2 GB limit in
float32, exported with its weights beside the graph, served by the embedded Triton and checked against torch float32;
other architectures (phi3, olmo2, the folder's own code); what an export refuses up front, and why."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from templar.server.embedded import die_with_parent
from templar.errors import ExportError
from templar.export.onnx_files import model_files
from templar.export.repository import read_parameters
from templar.reward_client import RewardClient, RewardClientConfig
from templar.samples import sample_conversations, without_system
from templar.tiny_models import build_tiny_model

from conftest import TEST_SETTINGS, TorchReference, export, running

pytestmark = pytest.mark.integration


def templar_export(*args: str) -> tuple[subprocess.CompletedProcess, float, int]:
    """`templar export` in its own process: (result, wall seconds, peak resident bytes, sampled every 50 ms)."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "templar.cli", "export", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    peak = [0]

    def watch() -> None:
        handle = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                peak[0] = max(peak[0], handle.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    stdout, stderr = process.communicate(timeout=1800)
    watcher.join()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), \
        time.monotonic() - started, peak[0]


def build_qwen3_06b(out: Path) -> Path:
    """A random Qwen3 sequence classifier with the real Qwen3-0.6B shapes, saved in bf16 as such RMs ship."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from templar.assets import tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir("qwen3")))
    config = AutoConfig.for_model(
        "qwen3", vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def served_scores(repo: Path, name: str, conversations: list) -> np.ndarray:
    with running(repo) as server, RewardClient(RewardClientConfig(model=name, endpoints=[server.grpc_url])) as c:
        result = c.score(conversations)
    assert result.status == ["ok"] * len(conversations), result.status
    return result.scores.astype(np.float64)


def test_a_real_size_bf16_rm_exports_serves_and_matches_torch(tmp_path):
    source = build_qwen3_06b(tmp_path / "qwen3-0.6b-rm")
    assert json.loads((source / "config.json").read_text())["dtype"] == "bfloat16"
    repo = tmp_path / "model_repository"
    result, wall, peak = templar_export("--model", str(source), "--name", "rm_big", "--repo", str(repo),
                                        "--max-length", "512")  # the size is in the weights, not the rows
    assert result.returncode == 0, result.stderr[-3000:]
    parameters = int(read_parameters(repo / "rm_big" / "config.pbtxt")["parameters"])
    fp32 = 4 * parameters
    print(f"\nexport of {parameters / 1e6:.0f}M parameters (bf16 -> fp32 {fp32 / 2**30:.2f} GiB): {wall:.0f} s, "
          f"peak RSS {peak / 2**30:.2f} GiB = {peak / fp32:.2f}x the fp32 size")
    assert 5.5e8 < parameters < 6.5e8
    assert peak <= 2.5 * fp32, f"peak RSS {peak / fp32:.2f}x the fp32 size"
    files = model_files(repo / "rm_big_model" / "1" / "model.onnx")  # the weights live beside the graph
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    assert files[1].stat().st_size > 2**31 > files[0].stat().st_size
    for step in ("loading weights", "exporting ONNX", "gathering them into model.onnx.data",
                 "checking ONNX Runtime against the model's own forward on the served files"):
        assert step in result.stderr, step
    conversations = list(sample_conversations(long_words=150).values())  # 28..317 tokens: none cut at 512
    served = served_scores(repo, "rm_big", conversations)
    reference = TorchReference(source)  # the HF model's own forward in float32
    expected = np.array([reference.score(m) for m in conversations])
    assert np.abs(served - expected).max() <= 1e-3 * np.abs(expected).max()


@pytest.mark.parametrize("backbone", ["phi3", "olmo2"])
def test_more_architectures_export_serve_and_match_torch(tmp_path, backbone):
    source = build_tiny_model("llama3_1", tmp_path / backbone, backbone=backbone, seed=3)
    assert json.loads((source / "config.json").read_text())["model_type"] == backbone
    result, wall, peak = templar_export("--model", str(source), "--name", f"rm_{backbone}", "--repo",
                                        str(tmp_path / "repo"), "--max-length", "512")
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"\n{backbone}: export {wall:.1f} s, peak RSS {peak / 2**30:.2f} GiB")
    conversations = list(sample_conversations(long_words=200).values())
    served = served_scores(tmp_path / "repo", f"rm_{backbone}", conversations)
    reference = TorchReference(source)
    np.testing.assert_allclose(served, [reference.score(m) for m in conversations], atol=1e-4, rtol=0)


CUSTOM_CONFIG = '''from transformers import LlamaConfig


class ToyRMConfig(LlamaConfig):
    model_type = "templar_toy_rm"
'''
CUSTOM_MODEL = '''from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel

from .configuration_toy_rm import ToyRMConfig


class ToyRMModel(LlamaModel):
    config_class = ToyRMConfig


class ToyRMForSequenceClassification(LlamaPreTrainedModel):
    """A reward model with its own code, as InternLM2's RMs ship theirs."""

    config_class = ToyRMConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ToyRMModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return self.score(self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state)
'''


def test_model_code_shipped_in_the_folder_runs_only_when_trusted(tmp_path):
    source = build_tiny_model("llama3_1", tmp_path / "toy", seed=4)
    (source / "configuration_toy_rm.py").write_text(CUSTOM_CONFIG)
    (source / "modeling_toy_rm.py").write_text(CUSTOM_MODEL)
    config = json.loads((source / "config.json").read_text())
    config.update(model_type="templar_toy_rm", architectures=["ToyRMForSequenceClassification"],
                  auto_map={"AutoConfig": "configuration_toy_rm.ToyRMConfig", "AutoModel": "modeling_toy_rm.ToyRMModel",
                            "AutoModelForSequenceClassification": "modeling_toy_rm.ToyRMForSequenceClassification"})
    (source / "config.json").write_text(json.dumps(config))
    repo = tmp_path / "repo"
    refused, _, _ = templar_export("--model", str(source), "--name", "rm_toy", "--repo", str(repo))
    assert refused.returncode == 2 and "ships its own model code (configuration_toy_rm.py, modeling_toy_rm.py)" \
        in refused.stderr and "--trust-remote-code" in refused.stderr
    assert not repo.exists()
    trusted, _, _ = templar_export("--model", str(source), "--name", "rm_toy", "--repo", str(repo),
                                   "--max-length", "512", "--trust-remote-code")
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert "running the model code shipped in" in trusted.stderr
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(source, trust_remote_code=True).eval()
    assert type(model).__name__ == "ToyRMForSequenceClassification"
    tokenizer = AutoTokenizer.from_pretrained(source)
    conversations = list(sample_conversations(long_words=100).values())
    with torch.no_grad():
        expected = [float(model.score(model.model(input_ids=torch.tensor([tokenizer.apply_chat_template(
            m, tokenize=True, return_dict=False)])).last_hidden_state[0, -1])[0]) for m in conversations]
    np.testing.assert_allclose(served_scores(repo, "rm_toy", conversations), expected, atol=1e-4, rtol=0)


def test_an_op_onnx_lacks_is_named_with_the_model_type(tmp_path):
    source = build_tiny_model("llama3_1", tmp_path / "mixtral", backbone="mixtral", seed=5)
    with pytest.raises(ExportError, match=r"model_type 'mixtral' \(MixtralForSequenceClassification\) cannot be "
                                          r"exported to ONNX: the operator aten::histc has no ONNX form at opset 17"):
        export(source, "rm_moe", tmp_path / "repo", max_length=256)
    assert not any((tmp_path / "repo").iterdir())


def sparse_safetensors(folder: Path, parameters: int) -> None:
    """A weights file that declares `parameters` bf16 values (a sparse file: its size without the disk use)."""
    header = json.dumps({"w": {"dtype": "BF16", "shape": [parameters], "data_offsets": [0, 2 * parameters]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2 * parameters)


def test_too_little_memory_or_disk_is_refused_up_front(tiny_rms, tmp_path):
    source = tmp_path / "huge"
    source.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (source / name).write_text((tiny_rms["llama3_1"] / name).read_text())
    sparse_safetensors(source, 400_000_000_000)  # 400B parameters: 1.6 TB in float32
    started = time.monotonic()
    with pytest.raises(ExportError, match=r"\(400.00B parameters, 1490.1 GiB in float32\) needs about 2981.2 GiB of "
                                          r"memory and .* GiB is available"):
        export(source, "rm_huge", tmp_path / "repo")
    assert time.monotonic() - started < 5  # before anything was loaded


def test_a_failed_check_keeps_the_model_that_was_served(tiny_rms, tmp_path):
    repo = tmp_path / "repo"
    first = export(tiny_rms["qwen2_5"], "rm_keep", repo)
    with pytest.raises(ExportError, match="nothing was written"):
        export(tiny_rms["gemma3"], "rm_keep", repo, tolerance=1e-12)  # fails its check after the files moved in
    assert read_parameters(repo / "rm_keep" / "config.pbtxt")["weights_sha256"] == first.parameters["weights_sha256"]
    assert sorted(p.name for p in repo.iterdir()) == ["rm_keep", "rm_keep_model", "rm_keep_preprocess"]
    assert not list(tmp_path.glob(".repo-staging-*"))
    conversations = [without_system(m) for m in sample_conversations(long_words=50).values()]
    expected = [TorchReference(tiny_rms["qwen2_5"]).score(m) for m in conversations]
    np.testing.assert_allclose(served_scores(repo, "rm_keep", conversations), expected, atol=1e-4)


def test_int8_for_the_cpu_where_the_onnx_graph_serves(tiny_rms, tmp_path):
    """cpu_runtime onnxruntime: ONNX Runtime's dynamic quantization of the graph, int8 weights, checked against torch
    with int8's tolerance (the packed scorer's int8 products: tests/test_cpu_precision.py)."""
    repo = tmp_path / "repo"
    fp32 = export(tiny_rms["llama3_1"], "rm_fp32", repo)
    int8 = export(tiny_rms["llama3_1"], "rm_int8", repo, precision="int8",
                  settings=dataclasses.replace(TEST_SETTINGS, cpu_runtime="onnxruntime"))
    assert int8.parameters["precision"] == "int8" and 1e-6 < int8.max_abs_diff <= 0.5
    size = lambda name: sum(f.stat().st_size for f in model_files(repo / name / "1" / "model.onnx"))  # noqa: E731
    assert size("rm_int8_model") < 0.5 * size("rm_fp32_model")
    conversations = list(sample_conversations(long_words=100).values())
    with running(repo) as server:
        scores = {}
        for name in ("rm_fp32", "rm_int8"):
            with RewardClient(RewardClientConfig(model=name, endpoints=[server.grpc_url])) as client:
                scores[name] = client.score(conversations).scores.astype(np.float64)
    assert np.abs(scores["rm_int8"] - scores["rm_fp32"]).max() <= 0.5
    assert fp32.max_abs_diff <= 1e-4
