"""`templar export`: real ONNX exports of real-tokenizer RMs, checked against torch; clear errors otherwise."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from safetensors.torch import load_file
from tritonclient.grpc import model_config_pb2

from templar import contract
from templar.chat_format import ChatFormat
from templar.conversation import Conversation
from templar.errors import ExportError
from templar.samples import sample_conversations
from templar.serving.batching import right_pad
from templar.serving.onnx_runtime import create_session, run_scores
from templar.tiny_models import TinySize, build_tiny_model

from conftest import FAMILIES, export

pytestmark = pytest.mark.integration  # exports ONNX, starts Triton or runs the CLI


def _configs(repo, name):
    for folder in (name, contract.preprocess_model_name(name), contract.scoring_model_name(name)):
        yield from (repo / folder).glob("config.pbtxt")
        yield from (repo / folder).glob("configs/*.pbtxt")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_with_parity_and_valid_configs(served_repo, family):
    name = f"rm_{family}"
    report = served_repo.reports[name]
    assert report.max_abs_diff <= 1e-4 and report.samples >= 5
    repo = served_repo.path
    assert (repo / contract.scoring_model_name(name) / "1" / "model.onnx").stat().st_size > 0
    tokenizer = repo / contract.preprocess_model_name(name) / "1" / "tokenizer"
    assert (tokenizer / "chat_template.jinja").is_file() and (tokenizer / "tokenizer.json").is_file()
    configs = list(_configs(repo, name))
    assert len(configs) == 4  # entry, preprocess, scorer (GPU) and scorer (embedded)
    for path in configs:
        parsed = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert parsed.max_batch_size > 0
    entry = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [i.name for i in entry.input] == [contract.CONVERSATION]
    assert [o.name for o in entry.output] == list(contract.ENTRY_OUTPUTS)
    params = {k: v.string_value for k, v in entry.parameters.items()}
    assert params[contract.PARAM_TEMPLATE_SHA256] == ChatFormat.from_dir(tokenizer).template_sha256
    assert len(params[contract.PARAM_TOKENIZER_SHA256]) == 64
    gpu = text_format.Parse((repo / contract.scoring_model_name(name) / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    assert gpu.platform == "onnxruntime_onnx"
    assert gpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_value_head_rm_from_openrlhf(assets, tmp_path):
    model_dir = build_tiny_model("qwen2_5", tmp_path / "vh", kind="value-head-reward", seed=3)
    repo = tmp_path / "repo"
    report = export(model_dir, "rm_vh", repo)
    assert report.max_abs_diff <= 1e-4
    # the reference is OpenRLHF's own arithmetic: backbone, value head at the last mask position, (r - mean) / std
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    backbone = AutoModel.from_config(config).eval()
    backbone.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")},
                             strict=False)
    chat = ChatFormat.from_dir(model_dir)
    rows = [chat.tokenize(Conversation(m)).input_ids for m in sample_conversations(long_words=200).values()]
    with torch.no_grad():
        expected = [float((backbone(input_ids=torch.tensor([r])).last_hidden_state[0, -1]
                           @ state["value_head.weight"][0] - config.mean) / config.std) for r in rows]
    ids, mask = right_pad(rows)
    session = create_session(repo / "rm_vh_model" / "1" / "model.onnx")
    served = run_scores(session, ids, mask).reshape(-1)
    np.testing.assert_allclose(served, expected, atol=1e-4)


def test_missing_template_names_the_flag(tiny_rms, tmp_path):
    model_dir = tmp_path / "no_template"
    build_tiny_model("llama3_1", model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="has no chat template.*--chat-template FILE"):
        export(model_dir, "rm_x", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_unsupported_architecture_lists_the_supported_ones(assets, tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model_dir = tmp_path / "gpt2"
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2, num_labels=1)).save_pretrained(model_dir)
    with pytest.raises(ExportError, match=r"unsupported architecture GPT2ForSequenceClassification.*supported model "
                                          r"types: llama, mistral"):
        export(model_dir, "rm_x", tmp_path / "repo", tokenizer=assets["llama3_1"])


def test_a_causal_lm_is_not_a_reward_model(assets, tmp_path):
    model_dir = build_tiny_model("llama3_1", tmp_path / "lm", kind="causal-lm")
    with pytest.raises(ExportError, match="not a reward model"):
        export(model_dir, "rm_x", tmp_path / "repo")


def test_two_labels_is_not_a_reward_model(assets, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from templar.tiny_models import tiny_config

    tok = AutoTokenizer.from_pretrained(str(assets["llama3_1"]))
    model = AutoModelForSequenceClassification.from_config(tiny_config("llama3_1", len(tok), 0, TinySize(),
                                                                       num_labels=2))
    model.save_pretrained(tmp_path / "two")
    tok.save_pretrained(str(tmp_path / "two"))
    with pytest.raises(ExportError, match="num_labels=2"):
        export(tmp_path / "two", "rm_x", tmp_path / "repo")


def test_pickle_weights_are_refused_unless_allowed(tiny_rms, tmp_path):
    import shutil

    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_rms["llama3_1"], model_dir)
    torch.save(load_file(str(model_dir / "model.safetensors")), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="only pickle weights.*--allow-pickle"):
        export(model_dir, "rm_pickle", tmp_path / "repo")
    report = export(model_dir, "rm_pickle", tmp_path / "repo", allow_pickle=True)
    assert report.max_abs_diff <= 1e-4


def test_failed_parity_writes_nothing(tiny_rms, tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match="differs from torch.*nothing was written"):
        export(tiny_rms["llama3_1"], "rm_strict", repo, tolerance=1e-12)
    assert not (repo / "rm_strict").exists() and not (repo / "rm_strict_model").exists()
    assert not list(tmp_path.glob(".repo-staging-*"))


def test_reexport_replaces_cleanly(tiny_rms, tmp_path):
    repo = tmp_path / "repo"
    export(tiny_rms["qwen2_5"], "rm_same", repo)
    first = (repo / "rm_same" / "config.pbtxt").read_text()
    export(tiny_rms["gemma3"], "rm_same", repo)
    second = (repo / "rm_same" / "config.pbtxt").read_text()
    assert first != second and "gemma3_text" in second
    assert sorted(p.name for p in repo.iterdir()) == ["rm_same", "rm_same_model", "rm_same_preprocess"]
    assert not list(tmp_path.glob(".repo-staging-*"))


def test_cli_shows_progress_and_fails_clearly(tiny_rms, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "templar.cli", "export", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    ok = run("--model", str(tiny_rms["mistral_nemo"]), "--name", "rm_cli", "--repo", str(tmp_path / "repo"),
             "--max-length", "256")
    assert ok.returncode == 0, ok.stderr
    assert "[1/6] loading tokenizer" in ok.stderr and "[6/6] writing Triton entries" in ok.stderr
    assert "max |onnxruntime - torch|" in ok.stderr
    bad = run("--model", str(tmp_path / "nowhere"), "--name", "rm_cli")
    assert bad.returncode == 2 and "model folder" in bad.stderr and "does not exist" in bad.stderr
    bad_name = run("--model", str(tiny_rms["mistral_nemo"]), "--name", "../evil")
    assert bad_name.returncode == 2 and "invalid model name" in bad_name.stderr
