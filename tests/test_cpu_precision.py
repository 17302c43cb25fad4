"""The CPU scorer's precision: fp32 on ONNX Runtime, bf16 on OpenVINO where the CPU has bf16 in hardware. What `auto`
picks on which CPU, what the export writes, and the bf16 path's measured agreement with fp32 over real gRPC: its
bound against the fp32 scores, its rank agreement, and how far a row's score may move with its batch.

The rest of the suite pins `auto` to fp32 ($TEMPLAR_CPU_PRECISION, tests/conftest.py): its fidelity checks hold
the served scores bit for bit to fp32 references on every CPU the suite runs on."""

from __future__ import annotations

import numpy as np
import pytest

from templar import contract
from templar.export.repository import EntrySettings
from templar.reward_client import RewardClient, RewardClientConfig
from templar.serving.cpu_precision import BF16_BATCH_BOUND, BF16_TOLERANCE, ENV_OVERRIDE, bf16_in_hardware, resolve
from templar.tools.stats import spearman
from templar.tools.workload import conversation_mix

from conftest import TEST_SETTINGS, export, running


@pytest.mark.parametrize("flags, environ, setting, expected", [
    ({"avx2", "fma"}, {}, "auto", ("fp32", "onnxruntime")),  # AVX2 only: bf16 would be emulated, slower
    ({"avx512f", "avx512_bf16"}, {}, "auto", ("bf16", "openvino")),  # Zen 4, Cooper Lake
    ({"amx_tile", "amx_bf16"}, {}, "auto", ("bf16", "openvino")),  # Sapphire Rapids and later
    ({"amx_bf16"}, {ENV_OVERRIDE: "fp32"}, "auto", ("fp32", "onnxruntime")),  # the machine's override of auto
    ({"avx2"}, {ENV_OVERRIDE: "bf16"}, "auto", ("bf16", "openvino")),
    ({"amx_bf16"}, {}, "fp32", ("fp32", "onnxruntime")),  # an export's explicit choice wins on any CPU
    ({"amx_bf16"}, {ENV_OVERRIDE: "bf16"}, "fp32", ("fp32", "onnxruntime")),  # ... over the override too
    ({"avx2"}, {}, "bf16", ("bf16", "openvino")),
])
def test_auto_is_bf16_where_the_cpu_computes_it(flags, environ, setting, expected):
    choice = resolve(setting, flags=flags, environ=environ)
    assert (choice.precision, choice.runtime) == expected
    assert choice.reason  # the line the scoring model logs
    if setting == "auto" and not environ:
        assert (bf16_in_hardware(flags) or "no bf16") in choice.reason


def test_a_wrong_precision_is_refused_with_its_name():
    with pytest.raises(ValueError, match="cpu_precision must be one of auto, fp32, bf16, got 'fp16'"):
        resolve("fp16", flags=set(), environ={})
    with pytest.raises(ValueError, match=rf"\${ENV_OVERRIDE} must be fp32 or bf16, got 'half'"):
        resolve("auto", flags=set(), environ={ENV_OVERRIDE: "half"})
    settings = EntrySettings(cpu_precision="bf16")
    assert settings.to_parameters("scorer")["cpu_precision"] == "bf16"
    assert EntrySettings.from_parameters(settings.to_parameters("scorer"), "scorer").cpu_precision == "bf16"
    assert EntrySettings.from_parameters({}, "scorer").cpu_precision == "auto"  # a config written before the knob


@pytest.fixture(scope="module")
def precision_repo(tiny_rms, tmp_path_factory):
    """One tiny RM exported twice: --precision bf16 and --precision fp32."""
    repo = tmp_path_factory.mktemp("precision") / "model_repository"
    reports = {p: export(tiny_rms["qwen2_5"], f"rm_{p}", repo, precision=p) for p in ("bf16", "fp32")}
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
    # the bf16 export checked the bf16 scorer against the model's own forward, beside the fp32 graph's check
    assert 0 < float(reports["bf16"].parameters["bf16_max_abs_diff"]) <= BF16_TOLERANCE
    assert "bf16_max_abs_diff" not in reports["fp32"].parameters
    default = export(tiny_rms["qwen2_5"], "rm_auto", tmp_path / "repo")
    assert default.parameters[contract.PARAM_PRECISION] == "auto"
    assert scorer_parameter(tmp_path / "repo", "rm_auto", "cpu_precision") == "auto"


def test_bf16_scores_over_grpc_agree_with_fp32_within_their_bound(precision_repo):
    """256 conversations of the built-in mix through both exports of one RM on one server: the bf16 scores within
    BF16_TOLERANCE of the fp32 ones, ranked alike (Spearman >= 0.99), each row's score moved by its batch at most
    BF16_BATCH_BOUND (alone vs in one request of 256 vs beside other rows in shuffled requests)."""
    repo, _ = precision_repo
    rows = [row["messages"] for row in conversation_mix(256, seed=3)]
    with running(repo) as server:
        scores = {}
        for precision in ("fp32", "bf16"):
            config = RewardClientConfig(model=f"rm_{precision}", endpoints=[server.grpc_url], rows_per_request=256)
            with RewardClient(config) as client:
                result = client.score(rows)
                assert result.status == ["ok"] * len(rows)
                scores[precision] = result.scores.astype(np.float64)
                if precision == "bf16":
                    alone = np.array([client.score([row]).scores[0] for row in rows[:24]], dtype=np.float64)
                    shuffled = client.score(rows[24:48] + rows[:24]).scores[24:].astype(np.float64)
        log = server.log_path.read_text(errors="replace")
    assert "rm_bf16_model: scoring in bf16 on openvino" in log
    assert "rm_fp32_model: scoring in fp32 on onnxruntime" in log
    error = np.abs(scores["bf16"] - scores["fp32"]) / np.maximum(1.0, np.abs(scores["fp32"]))
    print(f"bf16 vs fp32 over {len(rows)} conversations: max {error.max():.2e}, mean {error.mean():.2e}, Spearman "
          f"{spearman(scores['bf16'], scores['fp32']):.4f}")
    assert error.max() <= BF16_TOLERANCE
    assert spearman(scores["bf16"], scores["fp32"]) >= 0.99
    for other in (scores["bf16"][:24], shuffled):
        assert np.abs(alone - other).max() <= BF16_BATCH_BOUND


def test_the_suite_pins_auto_to_fp32():
    """The other tests compare served scores with fp32 references bit for bit: they must not run bf16 on a CPU that
    has it (conftest sets the override; this fails if that line goes)."""
    assert resolve(TEST_SETTINGS.cpu_precision).precision == "fp32"
