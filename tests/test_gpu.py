"""The GPU path: marked `gpu`, skipped without a CUDA GPU (conftest), run on a GPU machine with
`python -m pytest -m gpu` (plus `pip install onnxruntime-gpu tensorrt` there for the ONNX Runtime CUDA and TensorRT
tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from templar.chat_format import ChatFormat
from templar.export.exporter import sample_token_rows
from templar.padding import right_pad
from templar.serving.onnx_runtime import create_session, run_scores

from conftest import MAX_LENGTH, export
from test_trainer import metric_steps, small_run, templar_train

pytestmark = pytest.mark.gpu


def _rows(model_dir) -> list[list[int]]:
    return sample_token_rows(ChatFormat.from_dir(model_dir, max_length=MAX_LENGTH), MAX_LENGTH)


def test_exported_onnx_on_cuda_matches_torch_on_the_gpu(tiny_rms, references, tmp_path):
    import onnxruntime as ort

    assert "CUDAExecutionProvider" in ort.get_available_providers(), "install onnxruntime-gpu on the GPU machine"
    export(tiny_rms["llama3_1"], "rm_cuda", tmp_path / "repo")
    session = create_session(tmp_path / "repo" / "rm_cuda_model" / "1" / "model.onnx",
                             providers=["CUDAExecutionProvider"])
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    rows = _rows(tiny_rms["llama3_1"])
    ids, mask = right_pad(rows)
    served = run_scores(session, ids, mask).reshape(-1)
    # graded by the HF model's own forward at the last real token (not by the exporter's scorer), on the GPU
    reference = references["llama3_1"]
    model = reference.model.cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        expected = np.array([float(model.score(getattr(model, model.base_model_prefix)(
            input_ids=torch.tensor([r], device="cuda")).last_hidden_state[0, -1])[0]) for r in rows])
    reference.model.cpu()
    assert np.abs(served - expected).max() <= 1e-3, (served, expected)


def test_export_format_tensorrt_builds_a_checked_engine(tiny_rms, tmp_path):
    pytest.importorskip("tensorrt", reason="install tensorrt on the GPU machine")
    result = subprocess.run([sys.executable, "-m", "templar.cli", "export", "--model", str(tiny_rms["llama3_1"]),
                             "--name", "rm_trt", "--repo", str(tmp_path / "repo"), "--format", "tensorrt",
                             "--max-length", str(MAX_LENGTH)], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max |tensorrt - the model's own forward|" in result.stderr
    folder = tmp_path / "repo" / "rm_trt_model"
    assert (folder / "1" / "model.plan").stat().st_size > 0 and (folder / "1" / "model.onnx").is_file()
    assert 'platform: "tensorrt_plan"' in (folder / "config.pbtxt").read_text()
    assert '"scoring_ids_dtype" value: { string_value: "int32" }' in (tmp_path / "repo" / "rm_trt" /
                                                                        "config.pbtxt").read_text()
    from templar.export.tensorrt import engine_scores

    rows = _rows(tiny_rms["llama3_1"])[:4]
    ids, mask = right_pad(rows)
    onnx = run_scores(create_session(folder / "1" / "model.onnx"), ids, mask).reshape(-1)
    assert np.abs(engine_scores(folder / "1" / "model.plan", ids, mask) - onnx).max() <= 1e-3


def test_deepspeed_ppo_steps_on_the_gpu(triton, tiny_actor, tmp_path):
    out = tmp_path / "run"
    result = templar_train(*small_run(out, tiny_actor, triton.grpc_url, "deepspeed.zero_stage=2", steps=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert metric_steps(out) == [1, 2]
    assert "on cuda:0" in (out / "train.log").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["policy_loss"]) and np.isfinite(r["kl_mean"]) for r in rows)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_engines_against_torch(tiny_rms, tmp_path, precision):
    """The measurement the README's GPU precision table waits for: max |engine - torch float32| per precision."""
    pytest.importorskip("tensorrt", reason="install tensorrt on the GPU machine")
    result = subprocess.run([sys.executable, "-m", "templar.cli", "export", "--model", str(tiny_rms["llama3_1"]),
                             "--name", f"rm_{precision}", "--repo", str(tmp_path / "repo"), "--format", "tensorrt",
                             "--precision", precision, "--max-length", str(MAX_LENGTH)],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = next(line for line in result.stderr.splitlines() if "max |tensorrt - the model's own forward|" in line)
    print(f"\n{precision}: {measured.strip()}")
    config = (tmp_path / "repo" / f"rm_{precision}" / "config.pbtxt").read_text()
    assert f'"tensorrt_precision" value: {{ string_value: "{precision}" }}' in config


def test_an_rm_served_by_its_own_forward_runs_on_the_gpu_as_on_the_cpu(assets, tmp_path):
    """templar.serving.torch_scorer on a KIND_GPU instance's device: the ArmoRM-shaped RM's SCORE and objectives on
    CUDA match the CPU's (float32, TF32 off) on the export's sample conversations."""
    from templar.export.exporter import ExportOptions, export_reward_model
    from templar.serving.torch_scorer import MODEL_FOLDER, OwnForwardScorer

    from test_beyond_one_score import build_armo_like

    torch.backends.cuda.matmul.allow_tf32 = False
    source = build_armo_like(tmp_path / "armo")
    export_reward_model(ExportOptions(model=source, name="rm_armo", repo=tmp_path / "repo", max_length=256,
                                      trust_remote_code=True), log=lambda _: None)
    folder = tmp_path / "repo" / "rm_armo_model" / "1" / MODEL_FOLDER
    ids, mask = right_pad(_rows(source), pad_id=json.loads((source / "config.json").read_text())["pad_token_id"])
    cpu, gpu = OwnForwardScorer(folder)(ids, mask), OwnForwardScorer(folder, "cuda:0")(ids, mask)
    for on_cpu, on_gpu in zip(cpu, gpu):
        np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-4, atol=1e-5)
