"""Critic-free estimators through the real trainer: DeepSpeed on CPU ranks, two RMs served by the real Triton over gRPC,
n responses per prompt scored in the same requests. The maths itself is checked against hand-computed values in
tests/test_ppo.py; here: no critic anywhere, the diagnostics, two ranks, resume and SIGTERM."""

from __future__ import annotations

import json
import signal

import pytest
import tritonclient.grpc as grpcclient

from templar.trainer.metrics import read_metrics

from test_trainer import (assert_killed_and_resumed_equals_straight, metric_steps, small_run, start_train,
                          templar_train, wait_until)

pytestmark = pytest.mark.integration  # starts Triton and runs the trainer

GROUP = ("generation.samples_per_prompt=4", "ppo.rollout_batch_size=2", "ppo.mini_batch_size=8",
         "ppo.micro_batch_size=4")
ESTIMATOR_RUNS = {
    "grpo": ("ppo.advantage_estimator=grpo", "ppo.kl_estimator=k3", "ppo.kl_in=loss", *GROUP),
    "dr_grpo": ("ppo.advantage_estimator=dr_grpo", *GROUP),
    "rloo": ("ppo.advantage_estimator=rloo", "ppo.kl_estimator=k2", *GROUP),
    "reinforce_pp": ("ppo.advantage_estimator=reinforce_pp", "ppo.kl_estimator=k3"),
}
DIAGNOSTICS = ("entropy", "ratio_mean", "ratio_max", "advantage_mean", "advantage_std", "reward_std_in_group",
               "groups_all_equal", "kl_mean", "kl_estimate_mean", "time/rollout", "time/rewards_wait",
               "time/reference", "time/update", "time/checkpoint", "time/old_logprobs")


def inference_count(url: str, model: str) -> int:
    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        client.close()
    return int(stats.get("inference_count", 0))


@pytest.mark.parametrize("estimator", list(ESTIMATOR_RUNS))
def test_critic_free_runs_train_no_critic_and_log_their_diagnostics(estimator, triton, tiny_actor, tmp_path):
    out = tmp_path / "run"
    before = inference_count(triton.grpc_url, "rm_gemma3")
    result = templar_train(*small_run(out, tiny_actor, triton.grpc_url, *ESTIMATOR_RUNS[estimator], steps=2))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["failed_rows"] == 0 for r in rows)
    # every row of every step scored: 2 prompts x 4 samples, or (REINFORCE++) 4 prompts x 1
    rows_per_step = 8 if GROUP[0] in ESTIMATOR_RUNS[estimator] else 4
    assert inference_count(triton.grpc_url, "rm_gemma3") - before == 2 * rows_per_step
    for row in rows:
        for key in DIAGNOSTICS:
            assert isinstance(row[key], (int, float)), (key, row.get(key))
        penalty = 1.0 * row["unfinished_rows"] / rows_per_step  # reward.unfinished_penalty 1.0 per unended row
        assert row["reward_mean"] == pytest.approx(row["score/rm_llama3_1"] + 0.5 * row["score/rm_gemma3"] - penalty,
                                                   abs=1e-5)
        assert "value_loss" not in row and "explained_variance" not in row and "time/critic" not in row
        assert row["entropy"] > 0 and row["ratio_max"] >= row["ratio_mean"] > 0
        assert 0.0 <= row["groups_all_equal"] <= 1.0 and row["reward_std_in_group"] >= 0
    if estimator in ("grpo", "dr_grpo", "rloo"):  # a group baseline: some spread inside groups of random RMs
        assert all(r["reward_std_in_group"] > 0 and r["groups_all_equal"] < 1 for r in rows)
    else:  # one response per prompt: every group is a lone row
        assert all(r["groups_all_equal"] == 1.0 and r["reward_std_in_group"] == 0.0 for r in rows)
    if estimator == "grpo":  # KL as a loss term: logged, and not in the reward
        assert all(isinstance(r["kl_loss"], float) for r in rows)
    assert rows[1]["time/checkpoint"] == 0.0  # save_every=2: the step-2 checkpoint comes after the last line
    checkpoint = out / "checkpoints" / "step-000002"
    assert (checkpoint / "actor").is_dir() and not (checkpoint / "critic").exists()
    assert sorted(p.name for p in (out / "final").iterdir()) == ["actor"]
    log = (out / "train.log").read_text()
    assert f"advantage estimator {estimator}" in log


def test_gae_logs_the_critic_diagnostics(triton, tiny_actor, tmp_path):
    out = tmp_path / "run"
    result = templar_train(*small_run(out, tiny_actor, triton.grpc_url, "save_every=1", steps=2))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    for row in rows:
        for key in (*DIAGNOSTICS, "value_loss", "explained_variance", "time/critic"):
            assert isinstance(row[key], (int, float)), (key, row.get(key))
        assert row["explained_variance"] <= 1.0 and row["time/critic"] > 0
    assert rows[0]["time/checkpoint"] == 0.0 < rows[1]["time/checkpoint"]  # step 1's checkpoint, in step 2's line
    assert sorted(p.name for p in (out / "checkpoints" / "step-000002").glob("*/")) == ["actor", "critic"]


def test_two_ranks_with_grpo_agree(triton, tiny_actor, tmp_path):
    out = tmp_path / "run"
    before = inference_count(triton.grpc_url, "rm_llama3_1")
    result = templar_train("--num-ranks", "2", *small_run(out, tiny_actor, triton.grpc_url, *ESTIMATOR_RUNS["grpo"],
                                                          steps=2))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["ranks_agree"], summary["actor_sha256_per_rank"]
    assert inference_count(triton.grpc_url, "rm_llama3_1") - before == 2 * 2 * 8  # steps x ranks x (2 x 4) rows


def test_a_killed_grpo_run_resumes_at_its_step_and_equals_a_straight_one(triton, tiny_actor, tmp_path):
    interrupted = tmp_path / "interrupted"
    args = lambda out: small_run(out, tiny_actor, triton.grpc_url, *ESTIMATOR_RUNS["grpo"], steps=4)  # noqa: E731
    assert_killed_and_resumed_equals_straight(args, tmp_path / "straight", interrupted, 4, ("actor",))
    # the same run resumed with a critic estimator: refused in one line, not a DeepSpeed stack trace
    wrong = templar_train(*small_run(interrupted, tiny_actor, triton.grpc_url, steps=6), "--resume")
    assert wrong.returncode == 2
    assert "holds the engines actor, this run has actor, critic: resume with the ppo.advantage_estimator" in \
        wrong.stderr


def test_sigterm_saves_a_grpo_checkpoint_at_the_current_step(triton, tiny_actor, tmp_path):
    out = tmp_path / "run"
    run = start_train(*small_run(out, tiny_actor, triton.grpc_url, *ESTIMATOR_RUNS["grpo"], steps=50))
    wait_until(lambda: len(metric_steps(out)) >= 1, what="the first step")
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=300) == 3
    last = metric_steps(out)[-1]
    assert (out / "checkpoints" / "latest").read_text() == f"step-{last:06d}" and last < 50
    assert not (out / "checkpoints" / f"step-{last:06d}" / "critic").exists()
