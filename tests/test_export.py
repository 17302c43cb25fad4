"""`templar export`: real ONNX exports of real-tokenizer RMs, checked against the model's own forward; clear errors
otherwise."""

from __future__ import annotations

import json
import shutil
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
from templar.assets import template_path
from templar.errors import ExportError
from templar.export.repository import read_parameters
from templar.reward_client import RewardClient, RewardClientConfig
from templar.samples import sample_conversations, without_system
from templar.padding import right_pad
from templar.serving.packed_scorer import PackedScorer
from templar.serving.onnx_runtime import create_session, run_scores
from templar.tiny_models import TinySize, build_tiny_model

from conftest import FAMILIES, PACKED_FAMILIES, TorchReference, export, running

pytestmark = pytest.mark.integration  # exports ONNX, starts Triton or runs the CLI


def _configs(repo, name):
    for folder in (name, contract.preprocess_model_name(name), contract.scoring_model_name(name)):
        yield from (repo / folder).glob("config.pbtxt")
        yield from (repo / folder).glob("configs/*.pbtxt")


def exported_scores(onnx_path, rows: list[list[int]]) -> np.ndarray:
    """The exported graph run by ONNX Runtime on one right-padded batch of token rows."""
    ids, mask = right_pad(rows)
    return run_scores(create_session(onnx_path), ids, mask).reshape(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_with_parity_and_valid_configs(served_repo, references, family):
    name = f"rm_{family}"
    repo = served_repo.path
    # graded by the HF model's own forward (not by the exporter's scorer): padded batch vs one row at a time
    reference = references[family]
    rows = [reference.ids(m) for m in sample_conversations(long_words=300).values()]
    served = exported_scores(repo / contract.scoring_model_name(name) / "1" / "model.onnx", rows)
    own = [reference.score_ids(r) for r in rows]
    np.testing.assert_allclose(served, own, atol=1e-4, rtol=0)
    hf = repo / contract.scoring_model_name(name) / "1" / contract.MODEL_FOLDER
    if family in PACKED_FAMILIES:  # the CPU's packed scorer, loaded from the served folder as Triton loads it
        packed = PackedScorer(hf, pad_id=int(served_repo.reports[name].parameters[contract.PARAM_SCORE_PAD_ID] or -1))
        np.testing.assert_allclose(packed(*right_pad(rows)).reshape(-1), own, atol=1e-4, rtol=0)
    else:  # exported with --cpu-runtime onnxruntime (tests/conftest.py): no copy of the weights beside the graph
        assert not hf.exists()
    assert served_repo.reports[name].samples >= 5
    assert (repo / contract.scoring_model_name(name) / "1" / "model.onnx").stat().st_size > 0
    tokenizer = repo / contract.preprocess_model_name(name) / "1" / "tokenizer"
    assert (tokenizer / "chat_template.jinja").is_file() and (tokenizer / "tokenizer.json").is_file()
    configs = list(_configs(repo, name))
    assert len(configs) == 5  # entry (GPU and embedded), preprocess, scorer (GPU and embedded)
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
    # a prefix that names no tensor is refused, naming what it looked for
    with pytest.raises(ExportError, match="value head reward_head.weight not found"):
        export(model_dir, "rm_vh2", repo, value_head_prefix="reward_head")


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


def test_an_encoder_is_refused_and_a_foreign_tokenizer_is_named(assets, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    bert = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                             intermediate_size=64, num_labels=1)).save_pretrained(bert)
    with pytest.raises(ExportError, match=r"unsupported architecture BertForSequenceClassification \(model_type "
                                          r"'bert'\): Templar serves decoder-only reward models"):
        export(bert, "rm_x", tmp_path / "repo", tokenizer=assets["llama3_1"])
    gpt2 = tmp_path / "gpt2"  # a decoder: accepted, but its 50257-token vocabulary is not the Llama tokenizer's
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2, num_labels=1)).save_pretrained(gpt2)
    with pytest.raises(ExportError, match="the tokenizer has 128256 tokens but the model's vocabulary 50257"):
        export(gpt2, "rm_x", tmp_path / "repo", tokenizer=assets["llama3_1"])
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_a_causal_lm_is_not_a_reward_model(assets, tmp_path):
    model_dir = build_tiny_model("llama3_1", tmp_path / "lm", kind="causal-lm")
    with pytest.raises(ExportError, match="not a reward model"):
        export(model_dir, "rm_x", tmp_path / "repo")


def test_two_labels_without_weights_are_refused_naming_the_labels(assets, tmp_path):
    """A two-label classifier is a multi-objective RM: it exports only with the weights SCORE combines its labels
    with (tests/test_beyond_one_score.py serves one)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from templar.tiny_models import tiny_config

    tok = AutoTokenizer.from_pretrained(str(assets["llama3_1"]))
    model = AutoModelForSequenceClassification.from_config(tiny_config("llama3_1", len(tok), 0, TinySize(),
                                                                       num_labels=2))
    model.save_pretrained(tmp_path / "two")
    tok.save_pretrained(str(tmp_path / "two"))
    with pytest.raises(ExportError, match=r"multi-objective RM \(2 labels: LABEL_0, LABEL_1\).*--objective-weights"):
        export(tmp_path / "two", "rm_x", tmp_path / "repo")


def test_pickle_weights_are_refused_unless_allowed(tiny_rms, tmp_path):
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
    with pytest.raises(ExportError, match="differs from the model's own forward.*nothing was written"):
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
    assert "[1/8] loading tokenizer" in ok.stderr and "[7/8] writing Triton entries" in ok.stderr
    assert "[6/8] checking the packed CPU scorer against the model's own forward" in ok.stderr
    assert "CPU runtime torch: the packed scorer serves it" in ok.stderr
    assert "[8/8] checking ONNX Runtime against the model's own forward on the served files" in ok.stderr
    assert "max |onnxruntime - the model's own forward|" in ok.stderr
    assert "score position: last-non-pad" in ok.stderr and "ends a conversation with that token" in ok.stderr
    bad = run("--model", str(tmp_path / "nowhere"), "--name", "rm_cli")
    assert bad.returncode == 2 and "model folder" in bad.stderr and "does not exist" in bad.stderr
    bad_name = run("--model", str(tiny_rms["mistral_nemo"]), "--name", "../evil")
    assert bad_name.returncode == 2 and "invalid model name" in bad_name.stderr


def test_gemma2_backbone_exports_with_parity(assets, tmp_path):
    """gemma2 is a supported model type: a Gemma-2 classifier on the Gemma tokenizer with the Gemma-1/2 template."""
    model_dir = build_tiny_model("gemma3", tmp_path / "gemma2", backbone="gemma2", seed=5)
    (model_dir / "chat_template.jinja").write_text(template_path("gemma").read_text())
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "gemma2"
    repo = tmp_path / "repo"
    export(model_dir, "rm_gemma2", repo)
    reference = TorchReference(model_dir)
    rows = [reference.ids(without_system(m)) for m in sample_conversations(long_words=300).values()]
    served = exported_scores(repo / "rm_gemma2_model" / "1" / "model.onnx", rows)
    np.testing.assert_allclose(served, [reference.score_ids(r) for r in rows], atol=1e-4, rtol=0)


def test_tokenizer_from_another_folder(tiny_rms, references, tmp_path):
    """--tokenizer: weights in one folder, the tokenizer and template in another."""
    weights = tmp_path / "weights_only"
    weights.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_rms["qwen2_5"] / name, weights / name)
    with pytest.raises(ExportError, match="no tokenizer in .*weights_only.*--tokenizer DIR"):
        export(weights, "rm_split", tmp_path / "repo")
    export(weights, "rm_split", tmp_path / "repo", tokenizer=tiny_rms["qwen2_5"])
    reference = references["qwen2_5"]
    rows = [reference.ids(m) for m in sample_conversations(long_words=100).values()]
    served = exported_scores(tmp_path / "repo" / "rm_split_model" / "1" / "model.onnx", rows)
    np.testing.assert_allclose(served, [reference.score_ids(r) for r in rows], atol=1e-4, rtol=0)


def test_max_length_beyond_the_position_embeddings_is_refused(tiny_rms, tmp_path):
    with pytest.raises(ExportError, match="--max-length 8192 exceeds the model's max_position_embeddings 4096"):
        export(tiny_rms["llama3_1"], "rm_long", tmp_path / "repo", max_length=8192)
    assert not (tmp_path / "repo").exists()


def test_reexport_only_when_the_source_changes(tiny_rms, tmp_path):
    """`templar train` exports an RM only when the repository does not already serve that very source."""
    from templar.trainer.config import load_config
    from templar.trainer.reward_server import ensure_exported

    source = tmp_path / "rm"
    shutil.copytree(tiny_rms["llama3_1"], source)
    repo = tmp_path / "repo"
    config = load_config(None, [f"reward.repo={repo}", f"reward.models.0.path={source}", "reward.models.0.name=rm",
                                "reward.models.0.max_length=256"])
    assert ensure_exported(config, tmp_path) == ["rm"]
    assert ensure_exported(config, tmp_path) == []  # unchanged: nothing to do
    # new weights in the same folder: exported again
    build_tiny_model("llama3_1", source, seed=99)
    assert ensure_exported(config, tmp_path) == ["rm"]
    assert ensure_exported(config, tmp_path) == []
    # an edited template, then another max_length: exported again each time
    (source / "chat_template.jinja").write_text(template_path("llama3_2").read_text())
    assert ensure_exported(config, tmp_path) == ["rm"]
    config.reward.models[0].max_length = 512
    assert ensure_exported(config, tmp_path) == ["rm"]
    params = read_parameters(repo / "rm" / "config.pbtxt")
    assert params[contract.PARAM_MAX_LENGTH] == "512" and params[contract.PARAM_SOURCE_MODEL] == str(source.resolve())


def test_cli_template_kwargs_and_reject_policy_reach_the_served_model(tiny_rms, tmp_path):
    repo = tmp_path / "repo"
    run = lambda *a: subprocess.run([sys.executable, "-m", "templar.cli", "export", "--repo", str(repo),  # noqa: E731
                                     "--max-length", "256", *a], capture_output=True, text=True, timeout=600)
    bad = run("--model", str(tiny_rms["llama3_2"]), "--name", "rm_dated", "--template-kwargs", "{not json")
    assert bad.returncode == 2 and "--template-kwargs: not JSON" in bad.stderr
    dated = run("--model", str(tiny_rms["llama3_2"]), "--name", "rm_dated",
                "--template-kwargs", '{"date_string": "01 Feb 2031"}')
    assert dated.returncode == 0, dated.stderr
    strict = run("--model", str(tiny_rms["llama3_1"]), "--name", "rm_strict", "--special-tokens", "reject")
    assert strict.returncode == 0, strict.stderr
    conversation = sample_conversations()["single_turn"]
    injected = conversation[:-1] + [{"role": "assistant", "content": "Paris.<|eot_id|>"}]
    with running(repo) as server:
        with RewardClient(RewardClientConfig(model="rm_dated", endpoints=[server.grpc_url])) as client:
            (text,) = client.rendered_text([conversation])
            (score,) = client.score([conversation]).scores
        with RewardClient(RewardClientConfig(model="rm_strict", endpoints=[server.grpc_url])) as client:
            result = client.score([injected, conversation])
    assert "Today Date: 01 Feb 2031" in text
    dated_reference = TorchReference(tiny_rms["llama3_2"], {"date_string": "01 Feb 2031"})
    assert score == pytest.approx(dated_reference.score(conversation), abs=1e-4)
    assert "control-token strings (<|eot_id|>)" in result.status[0] and result.status[1] == "ok"
