"""The CPU scorer's precision: bf16 only where a bf16 product is measured faster than fp32 here (the packed torch
scorer in bf16; OpenVINO for the ONNX graph), fp32 elsewhere. What `auto` picks on which CPU, what the export writes,
and each bf16 path's measured agreement with fp32 over real gRPC: its bound against the fp32 scores, its rank
agreement, and how far a row's score may move with its batch.

The rest of the suite pins `auto` to fp32 ($TEMPLAR_CPU_PRECISION, tests/conftest.py): its fidelity checks hold
the served scores bit for bit to fp32 references on every CPU the suite runs on."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

from templar import contract
from templar.export.repository import EntrySettings
from templar.reward_client import RewardClient, RewardClientConfig
from templar.serving.cpu_precision import (BF16_BATCH_BOUND, BF16_TOLERANCE, ENV_OVERRIDE, INT8_BATCH_BOUND,
                                          INT8_SPEARMAN, INT8_TOLERANCE, bf16_in_hardware,
                                          bf16_speedup, resolve)
from templar.tools.stats import spearman
from templar.tools.workload import conversation_mix

from conftest import TEST_SETTINGS, TorchReference, export, running


SLOWER, FASTER = (lambda: 0.6), (lambda: 2.0)  # bf16_speedup() on an AVX-512 BF16 Xeon without AMX / on Zen 4
UNMEASURED = (lambda: None)  # bf16_speedup() where torch is not installed (an image serving the ONNX graph only)


@pytest.mark.parametrize("flags, environ, setting, runtime, measure, expected", [
    ({"avx2", "fma"}, {}, "auto", "torch", FASTER, ("fp32", "torch")),  # AVX2 only: never asked, never bf16
    ({"avx512f", "avx512_bf16"}, {}, "auto", "torch", FASTER, ("bf16", "torch")),  # Zen 4: bf16 measured faster
    ({"avx512f", "avx512_bf16"}, {}, "auto", "torch", SLOWER, ("fp32", "torch")),  # Xeon without AMX: slower
    ({"amx_tile", "amx_bf16"}, {}, "auto", "onnxruntime", FASTER, ("bf16", "openvino")),  # the ONNX graph's bf16
    ({"amx_bf16"}, {}, "auto", "onnxruntime", SLOWER, ("fp32", "onnxruntime")),
    ({"amx_bf16"}, {ENV_OVERRIDE: "fp32"}, "auto", "torch", FASTER, ("fp32", "torch")),  # the machine's override
    ({"avx2"}, {ENV_OVERRIDE: "bf16"}, "auto", "torch", SLOWER, ("bf16", "torch")),
    ({"amx_bf16"}, {}, "fp32", "torch", FASTER, ("fp32", "torch")),  # an export's explicit choice wins on any CPU
    ({"amx_bf16"}, {ENV_OVERRIDE: "bf16"}, "fp32", "onnxruntime", FASTER, ("fp32", "onnxruntime")),  # ... over it
    ({"avx2"}, {}, "bf16", "onnxruntime", SLOWER, ("bf16", "openvino")),
    ({"avx512_bf16"}, {}, "fp32", "openvino", FASTER, ("fp32", "openvino")),  # cpu_runtime openvino: its fp32
    ({"amx_bf16"}, {}, "auto", "openvino", UNMEASURED, ("bf16", "openvino")),  # no torch: the hardware's word
    ({"avx512_vnni"}, {}, "int8", "torch", FASTER, ("int8", "torch")),  # int8 is asked for, never picked by auto
    ({"avx2"}, {ENV_OVERRIDE: "fp32"}, "int8", "torch", FASTER, ("int8", "torch")),  # the override replaces auto only
    ({"avx512_vnni"}, {}, "int8", "onnxruntime", FASTER, ("fp32", "onnxruntime")),  # the graph itself is int8
])
def test_auto_is_bf16_where_it_is_measured_faster(flags, environ, setting, runtime, measure, expected):
    choice = resolve(setting, runtime=runtime, flags=flags, environ=environ, measure=measure)
    assert (choice.precision, choice.runtime) == expected
    assert choice.reason  # the line the scoring model logs
    if setting == "int8" and runtime == "torch":
        assert ("avx512_vnni" if "avx512_vnni" in flags else "no int8 dot products") in choice.reason
    if setting == "auto" and not environ:
        assert (bf16_in_hardware(flags) or "no bf16") in choice.reason
        if bf16_in_hardware(flags) and measure() is not None:
            assert f"x{measure():.2f}" in choice.reason  # the measured figure is in the log line


def test_the_bf16_measurement_compares_fp32_with_bf16_products():
    speedup = bf16_speedup(hidden=64, rows=64, repeats=2)
    assert np.isfinite(speedup) and speedup > 0


def test_a_wrong_precision_is_refused_with_its_name():
    with pytest.raises(ValueError, match="cpu_precision must be one of auto, fp32, bf16, int8, got 'fp16'"):
        resolve("fp16", flags=set(), environ={})
    with pytest.raises(ValueError, match="cpu_runtime must be one of torch, onnxruntime, openvino, got 'tvm'"):
        resolve("auto", runtime="tvm", flags=set(), environ={})
    with pytest.raises(ValueError, match=rf"\${ENV_OVERRIDE} must be fp32 or bf16, got 'half'"):
        resolve("auto", flags=set(), environ={ENV_OVERRIDE: "half"})
    settings = EntrySettings(cpu_precision="bf16")
    assert settings.to_parameters("scorer")["cpu_precision"] == "bf16"
    assert EntrySettings.from_parameters(settings.to_parameters("scorer"), "scorer").cpu_precision == "bf16"
    assert EntrySettings.from_parameters({}, "scorer").cpu_precision == "auto"  # a config written before the knob


@pytest.fixture(scope="module")
def precision_repo(tiny_rms, tmp_path_factory):
    """One tiny RM exported four times: --precision bf16, fp32 and int8 (the packed torch scorer), and bf16 with
    cpu_runtime openvino (the ONNX graph in OpenVINO)."""
    repo = tmp_path_factory.mktemp("precision") / "model_repository"
    reports = {p: export(tiny_rms["qwen2_5"], f"rm_{p}", repo, precision=p) for p in ("bf16", "fp32", "int8")}
    reports["ov"] = export(tiny_rms["qwen2_5"], "rm_ov", repo, precision="bf16",
                           settings=dataclasses.replace(TEST_SETTINGS, cpu_runtime="openvino"))
    return repo, reports


def scorer_parameter(repo, name: str, key: str) -> str:
    text = (repo / contract.scoring_model_name(name) / "configs" / "embedded.pbtxt").read_text()  # the CPU scorer
    marker = f'key: "{key}"'
    assert marker in text, text
    return text.split(marker, 1)[1].split('"')[1]


def test_export_records_the_cpu_precision_and_checks_bf16(precision_repo, tiny_rms, tmp_path):
    repo, reports = precision_repo
    assert scorer_parameter(repo, "rm_bf16", "cpu_precision") == "bf16"
    assert scorer_parameter(repo, "rm_fp32", "cpu_precision") == "fp32"
    assert scorer_parameter(repo, "rm_bf16", "cpu_runtime") == "torch"
    assert scorer_parameter(repo, "rm_int8", "cpu_precision") == "int8"
    assert scorer_parameter(repo, "rm_int8", "cpu_runtime") == "torch"
    # the int8 scorer checked against the model's own forward within int8's tolerance; the graph stays float32 (the
    # GPU paths read it), checked within fp32's
    assert 0 < float(reports["int8"].parameters["int8_max_abs_diff"]) <= INT8_TOLERANCE
    assert reports["int8"].max_abs_diff <= 1e-4
    graph = onnx.load(str(repo / "rm_int8_model" / "1" / "model.onnx"), load_external_data=False)
    assert not {node.op_type for node in graph.graph.node} & {"MatMulInteger", "DynamicQuantizeLinear"}
    assert scorer_parameter(repo, "rm_ov", "cpu_runtime") == "openvino"
    # each bf16 export checked its bf16 scorer against the model's own forward, beside the fp32 checks
    for name in ("bf16", "ov"):
        assert 0 < float(reports[name].parameters["bf16_max_abs_diff"]) <= BF16_TOLERANCE
    assert "bf16_max_abs_diff" not in reports["fp32"].parameters
    assert float(reports["fp32"].parameters["packed_max_abs_diff"]) <= 1e-5  # the packed fp32 scorer's own check
    default = export(tiny_rms["qwen2_5"], "rm_auto", tmp_path / "repo")
    assert default.parameters[contract.PARAM_PRECISION] == "auto"
    assert scorer_parameter(tmp_path / "repo", "rm_auto", "cpu_precision") == "auto"


def test_bf16_and_int8_scores_over_grpc_agree_with_fp32_within_their_bounds(precision_repo):
    """256 conversations of the built-in mix through every export of one RM on one server: the bf16 scores within
    BF16_TOLERANCE of the fp32 ones, ranked alike (Spearman >= 0.99), each row's score moved by its batch at most
    BF16_BATCH_BOUND (alone vs in one request of 256 vs beside other rows in shuffled requests); the int8 scores
    within INT8_TOLERANCE, Spearman >= INT8_SPEARMAN, a row moved by its batch at most INT8_BATCH_BOUND."""
    repo, _ = precision_repo
    rows = [row["messages"] for row in conversation_mix(256, seed=3)]
    scores, alone, shuffled = {}, {}, {}
    with running(repo) as server:
        for name in ("fp32", "bf16", "ov", "int8"):
            config = RewardClientConfig(model=f"rm_{name}", endpoints=[server.grpc_url], rows_per_request=256)
            with RewardClient(config) as client:
                result = client.score(rows)
                assert result.status == ["ok"] * len(rows)
                scores[name] = result.scores.astype(np.float64)
                if name != "fp32":
                    alone[name] = np.array([client.score([row]).scores[0] for row in rows[:24]], dtype=np.float64)
                    shuffled[name] = client.score(rows[24:48] + rows[:24]).scores[24:].astype(np.float64)
        log = server.log_path.read_text(errors="replace")
    assert "rm_bf16_model: scoring in bf16 on torch" in log
    assert "rm_fp32_model: scoring in fp32 on torch" in log
    assert "rm_ov_model: scoring in bf16 on openvino" in log
    assert "rm_int8_model: scoring in int8 on torch" in log
    bounds = {"bf16": (BF16_TOLERANCE, 0.99, BF16_BATCH_BOUND), "ov": (BF16_TOLERANCE, 0.99, BF16_BATCH_BOUND),
              "int8": (INT8_TOLERANCE, INT8_SPEARMAN, INT8_BATCH_BOUND)}
    for name, (tolerance, rank, batch_bound) in bounds.items():
        error = np.abs(scores[name] - scores["fp32"]) / np.maximum(1.0, np.abs(scores["fp32"]))
        moved = max(np.abs(alone[name] - other).max() for other in (scores[name][:24], shuffled[name]))
        print(f"{name} vs fp32 over {len(rows)} conversations: max {error.max():.2e}, mean {error.mean():.2e}, "
              f"Spearman {spearman(scores[name], scores['fp32']):.4f}; moved by its batch: {moved:.2e}")
        assert error.max() <= tolerance
        assert spearman(scores[name], scores["fp32"]) >= rank
        assert moved <= batch_bound


def test_the_suite_pins_auto_to_fp32():
    """The other tests compare served scores with fp32 references bit for bit: they must not run bf16 on a CPU that
    has it (conftest sets the override; this fails if that line goes)."""
    assert resolve(TEST_SETTINGS.cpu_precision).precision == "fp32"


@pytest.mark.integration
def test_bench_precision_counts_the_pairs_whose_winner_bf16_or_int8_changes(tmp_path):
    """`templar bench-precision` on the demo's Llama-3 RM (trained, cached) and 60 of its held-out pairs: fp32 orders
    them as the RM's own forward does, bf16 and int8 change no more winners than the bound, and the report's counts
    follow from its own scores."""
    from templar.tools.bench.precision import PrecisionBenchOptions, model_folder, run
    from templar.trainer.preferences import read_pairs, write_pairs

    folder = model_folder("tiny-rm:llama3_1", 0, tmp_path)  # configs/demo.yaml's rm_llama3 (built once, cached)
    pairs = read_pairs(folder / "eval_pairs.jsonl")[:60]
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    lines = []
    report = run(PrecisionBenchOptions(out=tmp_path / "bench.json", models=["tiny-rm:llama3_1"],
                                       pairs=tmp_path / "pairs.jsonl", precisions=["fp32", "bf16", "int8"]),
                 log=lines.append)
    assert json.loads((tmp_path / "bench.json").read_text())["models"] == json.loads(json.dumps(report["models"]))
    model = report["models"]["tiny-rm:llama3_1"]
    assert model["pairs"] == 60 and report["all_within_bound"]
    assert report["served"]["rm0_bf16_model"].startswith("bf16 on torch")
    assert report["served"]["rm0_fp32_model"].startswith("fp32 on torch")
    assert report["served"]["rm0_int8_model"].startswith("int8 on torch")
    reference = TorchReference(folder)
    own = np.array([reference.score(p.chosen) - reference.score(p.rejected) for p in pairs])
    scores = {p: np.array(s) for p, s in model["scores"].items()}
    for precision, result in model["precisions"].items():
        margin = scores[precision][:60] - scores[precision][60:]
        assert result["flipped"] == int(np.sum((margin > 0) != (scores["fp32"][:60] - scores["fp32"][60:] > 0)))
        assert result["accuracy"] == pytest.approx(float(np.mean(margin > 0)))
        assert result["flipped_share"] <= 0.01
    assert model["precisions"]["fp32"]["accuracy"] == pytest.approx(float(np.mean(own > 0)))
    assert model["precisions"]["fp32"]["max_abs_diff"] == 0.0
    assert 0 < model["precisions"]["bf16"]["max_abs_diff"] <= BF16_TOLERANCE * max(1.0, np.abs(scores["fp32"]).max())
    assert 0 < model["precisions"]["int8"]["max_abs_diff"] <= INT8_TOLERANCE * max(1.0, np.abs(scores["fp32"]).max())
    assert any("bf16: accuracy" in line and "pairs change winner vs fp32" in line for line in lines), lines
