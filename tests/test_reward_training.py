"""`templar train-rm` and `templar eval-rm`: an RM trained (Bradley-Terry) on the built-in preference pairs rendered
with ITS OWN template, exported, served by the real Triton, and measured over gRPC on held-out pairs, its own way and
the way a framework that templates once with the actor's template feeds it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from templar.cli import main as cli
from templar.trainer.preferences import read_pairs
from templar.tools.eval_rm import evaluate_served

from conftest import TorchReference, export, running

pytestmark = pytest.mark.integration  # trains, exports and serves an RM


@pytest.fixture(scope="module")
def trained_rm(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_rm") / "run"
    result = subprocess.run([sys.executable, "-m", "templar.cli", "train-rm", f"output_dir={out}",
                             "base=tiny:llama3_1", "train_pairs=900", "eval_pairs=200", "epochs=2", "seed=5"],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads(result.stdout.strip().splitlines()[-1])


def test_training_learns_the_rule_on_its_own_template(trained_rm):
    out, printed = trained_rm
    metrics = json.loads((out / "metrics.json").read_text())
    first, last = metrics["history"][0], metrics["history"][-1]
    assert first["epoch"] == 0 and last["epoch"] == 2 and last["train_loss"] < 0.6931  # below chance's log 2
    assert last["held_out_accuracy"] > 0.7 and last["held_out_accuracy"] > first["held_out_accuracy"]
    assert printed["held_out_accuracy"] == last["held_out_accuracy"]
    assert (out / "model" / "chat_template.jinja").is_file() and (out / "model" / "model.safetensors").is_file()
    assert len(read_pairs(out / "eval_pairs.jsonl")) == 200


def test_a_served_trained_rm_beats_chance_on_held_out_pairs(trained_rm, tmp_path):
    from templar.assets import chat_format_from_source
    from templar.conversation import Conversation
    from templar.reward_client import RewardClient, RewardClientConfig

    out, printed = trained_rm
    repo = tmp_path / "model_repository"
    export(out / "model", "rm_trained", repo)
    pairs = read_pairs(out / "eval_pairs.jsonl")
    qwen_text = chat_format_from_source("qwen2_5").render(Conversation(pairs[0].chosen))
    with running(repo) as server:
        report = evaluate_served(RewardClientConfig("rm_trained", [server.grpc_url]), pairs, as_template="qwen2_5")
        cli_out = tmp_path / "eval.json"
        assert cli(["eval-rm", "--model", "rm_trained", "--data", str(out / "eval_pairs.jsonl"), "--url",
                    server.grpc_url, "--out", str(cli_out)]) == 0
        with RewardClient(RewardClientConfig(model="rm_trained", endpoints=[server.grpc_url])) as client:
            served = client.score([pairs[0].chosen, {"text": qwen_text}]).scores
    own, other, agreement = report["own_template"], report["as_template"], report["agreement"]
    assert own["pairs"] == 200 and own["failed_pairs"] == 0 and other["pairs"] == 200 and other["failed_pairs"] == 0
    # through Triton, on its own template: what training measured in torch on the same held-out pairs
    assert own["accuracy"] == pytest.approx(printed["held_out_accuracy"], abs=0.011) and own["accuracy"] > 0.7
    assert own["mean_margin"] > 0
    assert other["template"] == "qwen2_5" and 0 <= other["accuracy"] <= 1
    assert -1 <= agreement["spearman"] < 1 and agreement["mean_score_shift"] != 0
    assert agreement["margin_shrinks_x"] == pytest.approx(own["mean_margin"] / other["mean_margin"])
    assert json.loads(cli_out.read_text())["own_template"] == own  # the command line reports the same
    # served scores are the RM's torch scores: of its own rendering, and of the Qwen text read by its tokenizer
    reference = TorchReference(out / "model")
    assert served[0] == pytest.approx(reference.score(pairs[0].chosen), abs=1e-4)
    assert served[1] == pytest.approx(reference.score_ids(reference.tokenizer(qwen_text)["input_ids"]), abs=1e-4)
    assert "<|im_start|>assistant" in qwen_text and "<|start_header_id|>" not in qwen_text


def test_train_rm_errors_are_one_line(tmp_path, capsys):
    assert cli(["train-rm", f"output_dir={tmp_path}", "epochs=0"]) == 2
    assert "epochs and batch_size must be >= 1" in capsys.readouterr().err
    assert cli(["train-rm", f"output_dir={tmp_path}", "data=/nonexistent.jsonl"]) == 2
    assert "preference data /nonexistent.jsonl does not exist" in capsys.readouterr().err
    assert cli(["train-rm", f"output_dir={tmp_path}", "epoch=1"]) == 2
    assert "unknown key epoch; did you mean 'epochs'?" in capsys.readouterr().err
