"""The PPO trainer end to end: real DeepSpeed (CPU ranks), real Triton over gRPC, real tokenizers and templates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import tritonclient.grpc as grpcclient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from templar.server.embedded import die_with_parent
from templar.fingerprints import sha256_text
from templar.reward_client import RewardClient, RewardClientConfig
from templar.tiny_models import build_tiny_model
from templar.trainer.metrics import read_metrics

from conftest import running

pytestmark = pytest.mark.integration  # exports ONNX, starts Triton or runs the CLI

ACTOR_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def small_run(output_dir: Path, actor: Path, url: str | None, *extra: str, steps: int = 3) -> list[str]:
    """Overrides for a short run against the session server's rm_llama3_1 and rm_gemma3."""
    return [f"output_dir={output_dir}", f"models.actor={actor}", f"steps={steps}", "save_every=2",
            *([f"reward.url={url}"] if url else []),
            "reward.models.0.name=rm_llama3_1", "reward.models.1.name=rm_gemma3", "reward.models.1.weight=0.5",
            "generation.max_new_tokens=8", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4",
            "ppo.micro_batch_size=2", "ppo.ppo_epochs=1", "ppo.actor_lr=1e-4", "ppo.critic_lr=1e-4", *extra]


def templar_train(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "templar.cli", "train", *args], capture_output=True, text=True,
                          timeout=timeout)


def start_train(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "templar.cli", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent)


def wait_until(predicate, timeout: float = 600, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def metric_steps(output_dir: Path) -> list[int]:
    path = output_dir / "metrics.jsonl"
    return [row["step"] for row in read_metrics(path)] if path.exists() else []


def test_training_run_writes_metrics_checkpoints_and_hf_models(triton, tiny_actor, tmp_path):
    out = tmp_path / "run"
    result = templar_train(*small_run(out, tiny_actor, triton.grpc_url))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("step", "reward_mean", "kl_mean", "policy_loss", "value_loss", "response_length_mean",
                "rm_latency_s", "failed_rows", "reward_wait_share", "score/rm_llama3_1", "score/rm_gemma3"):
        assert key in rows[-1], key
    assert all(r["failed_rows"] == 0 for r in rows)
    for r in rows:  # the share is what it says: the wait over the whole step
        assert r["reward_wait_share"] == pytest.approx(r["reward_wait_s"] / r["step_time_s"], rel=1e-9)
    assert (out / "checkpoints" / "latest").read_text() == "step-000003"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    assert (out / "curves.png").stat().st_size > 1000 and list((out / "tensorboard").glob("events.*"))
    fingerprints = json.loads((out / "reward_models.json").read_text())
    assert set(fingerprints) == {"rm_llama3_1", "rm_gemma3"}
    assert len(fingerprints["rm_gemma3"]["tokenizer_sha256"]) == 64
    assert "chat_template sha256" in (out / "train.log").read_text()  # the RM fingerprints are in the run's log
    actor = AutoModelForCausalLM.from_pretrained(out / "final" / "actor")
    assert AutoTokenizer.from_pretrained(out / "final" / "actor").chat_template
    trained = actor.state_dict()["lm_head.weight"]
    initial = AutoModelForCausalLM.from_pretrained(tiny_actor).state_dict()["lm_head.weight"]
    assert not trained.equal(initial)  # PPO changed the actor
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["ranks"] == 1


def test_each_rm_sees_its_native_rendering_of_actor_samples(triton, tiny_actor, tiny_rms, tmp_path):
    """The text each RM's preprocessing produced for the trainer's own samples equals that RM's native rendering
    of the conversation, and carries no actor (Qwen) special token."""
    out = tmp_path / "run"
    result = templar_train(*small_run(out, tiny_actor, triton.grpc_url, steps=2))
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2]
    conversations = [{"messages": s["messages"]} for s in samples]
    for name, family, marker in (("rm_llama3_1", "llama3_1", "<|start_header_id|>"),
                                 ("rm_gemma3", "gemma3", "<start_of_turn>")):
        native = AutoTokenizer.from_pretrained(tiny_rms[family])
        with RewardClient(RewardClientConfig(model=name, endpoints=[triton.grpc_url])) as client:
            seen = client.rendered_text(conversations)
        for text, conversation in zip(seen, conversations):
            assert text == native.apply_chat_template(conversation["messages"], tokenize=False)
            assert marker in text and not any(special in text for special in ACTOR_SPECIALS)
            assert conversation["messages"][-1]["role"] == "assistant"


def test_rm_input_actor_text_feeds_the_rms_the_actors_rendering(triton, tiny_actor, tmp_path):
    """reward.rm_input=actor_text (the single-template way, for comparison): every RM scores the conversation as
    the actor's template rendered it, read as text by the RM's tokenizer, not its own rendering."""
    from templar.chat_format import ChatFormat
    from templar.conversation import Conversation

    out = tmp_path / "run"
    result = templar_train(*small_run(out, tiny_actor, triton.grpc_url, "reward.rm_input=actor_text", steps=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reward.rm_input=actor_text" in (out / "train.log").read_text()
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    text = ChatFormat.from_dir(tiny_actor).render(Conversation(sample["messages"]))
    assert "<|im_start|>assistant" in text
    for name in ("rm_llama3_1", "rm_gemma3"):
        with RewardClient(RewardClientConfig(model=name, endpoints=[triton.grpc_url])) as client:
            as_text, own = client.score([{"text": text}, {"messages": sample["messages"]}]).scores
        assert sample["scores"][name] == pytest.approx(float(as_text), abs=1e-5) and as_text != own


def test_two_ranks_train_against_one_server_and_agree(triton, tiny_actor, tmp_path):
    out = tmp_path / "run"
    stats = grpcclient.InferenceServerClient(triton.grpc_url)
    count = lambda: int(stats.get_inference_statistics("rm_gemma3", as_json=True)["model_stats"][0].get(  # noqa: E731
        "inference_count", 0))
    before = count()
    result = templar_train("--num-ranks", "2", *small_run(out, tiny_actor, triton.grpc_url, steps=2))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["ranks_agree"]
    assert len(summary["actor_sha256_per_rank"]) == 2 and len(set(summary["actor_sha256_per_rank"])) == 1
    assert count() - before == 2 * 2 * 4  # steps x ranks x rollout rows, each rank scoring its own rollouts
    assert sorted((out / "checkpoints" / "step-000002").glob("rank*.pt")) == [
        out / "checkpoints" / "step-000002" / f"rank{r}.pt" for r in range(2)]


def test_an_interrupted_run_resumes_from_its_checkpoint(triton, tiny_actor, tmp_path):
    out = tmp_path / "run"
    args = small_run(out, tiny_actor, triton.grpc_url, steps=6)
    first = start_train(*args)
    try:
        wait_until(lambda: (out / "checkpoints" / "latest").is_file(), what="the first checkpoint")
    finally:
        first.kill()  # no chance to clean up: the checkpoint must already be complete
        first.wait()
    saved = int((out / "checkpoints" / "latest").read_text().split("-")[1])
    assert saved >= 2 and saved % 2 == 0
    resumed = templar_train(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert f"continuing at step {saved + 1}" in log
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]  # every step once: steps after the checkpoint were redone
    assert json.loads((out / "summary.json").read_text())["completed"]


def test_sigterm_saves_a_checkpoint_at_the_current_step(triton, tiny_actor, tmp_path):
    out = tmp_path / "run"
    run = start_train(*small_run(out, tiny_actor, triton.grpc_url, steps=50))
    wait_until(lambda: len(metric_steps(out)) >= 1, what="the first step")
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=300) == 3  # stopped early, on purpose
    last = metric_steps(out)[-1]
    assert (out / "checkpoints" / "latest").read_text() == f"step-{last:06d}"
    assert last < 50


def test_a_dead_reward_server_costs_rows_not_the_run(small_repo, tiny_actor, tmp_path):
    out = tmp_path / "run"
    # the log goes to tmp_path: a server that died is otherwise left with its log in /tmp for someone to read
    with running(small_repo, log_file=tmp_path / "tritonserver.log") as server:
        run = start_train(*small_run(out, tiny_actor, server.grpc_url, "reward.models=[{name: rm_small}]",
                                     "reward.client.max_attempts=2", "reward.client.request_timeout_s=5", steps=5))
        wait_until(lambda: len(metric_steps(out)) >= 2, what="two steps")
        os.killpg(server.process.pid, signal.SIGKILL)  # a crash: no unloading, the port just goes dead
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["failed_rows"] == 0 and rows[-1]["failed_rows"] == 4 and rows[-1]["reward_mean"] is None
    unscored = [json.loads(line) for line in (out / "unscored.rank0.jsonl").read_text().splitlines()]
    errors = [row["errors"]["rm_small"] for row in unscored]
    assert errors and all(e.startswith("error: reward request failed after") for e in errors)
    assert all("UNAVAILABLE" in e and "after 2 attempt(s)" in e for e in errors)  # retried, then given up
    assert unscored[0]["messages"][-1]["role"] == "assistant"  # the rollout itself is kept for re-scoring
    assert (out / "checkpoints" / "latest").read_text() == "step-000005"


def test_embedded_default_exports_serves_and_stops(tiny_actor, tiny_rms, tmp_path):
    out, repo = tmp_path / "run", tmp_path / "model_repository"
    result = templar_train(*small_run(out, tiny_actor, None, f"reward.repo={repo}",
                                      f"reward.models.0.path={tiny_rms['llama3_1']}",
                                      f"reward.models.1.path={tiny_rms['gemma3']}", steps=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in repo.iterdir()) == ["rm_gemma3", "rm_gemma3_model", "rm_gemma3_preprocess",
                                                      "rm_llama3_1", "rm_llama3_1_model", "rm_llama3_1_preprocess"]
    assert "Started GRPCInferenceService" in (out / "tritonserver.log").read_text()
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(repo) in " ".join(p.info["cmdline"] or [])]


def test_rewards_combine_weights_normalisation_penalty_and_mask_failures(triton):
    from templar.trainer.config import RewardConfig, RewardModelConfig
    from templar.trainer.rewards import RewardModels, reward_conversations

    import numpy as np

    config = RewardConfig(models=[RewardModelConfig(name="rm_qwen2_5", weight=2.0, normalize=True),
                                  RewardModelConfig(name="rm_gemma1", weight=0.5)], unfinished_penalty=1.5)
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(5)]
    prompts[3] = [{"role": "system", "content": "Be brief."}] + prompts[3]  # the Gemma-1 template rejects this row
    conversations = reward_conversations(prompts, [f"Answer number {i}." for i in range(5)])
    ended = np.array([True, False, True, True, True])
    rewards = RewardModels(config, [triton.grpc_url])
    try:
        batch = rewards.collect(rewards.submit(conversations), ended)
    finally:
        rewards.close()
    assert batch.valid.tolist() == [True, True, True, False, True]
    assert "System role not supported" in batch.per_rm["rm_gemma1"].status[3]
    qwen = batch.per_rm["rm_qwen2_5"].scores.astype(np.float64)
    gemma = batch.per_rm["rm_gemma1"].scores.astype(np.float64)
    good = qwen[batch.valid]
    normalised = (qwen - good.mean()) / good.std()  # the first batch defines the running statistics
    expected = 2.0 * normalised + 0.5 * gemma - 1.5 * (~ended)
    np.testing.assert_allclose(batch.scores[batch.valid], expected[batch.valid], rtol=1e-5)
    assert np.isnan(batch.scores[3])
    assert rewards.state_dict()["rm_qwen2_5"]["count"] == 4


@pytest.mark.parametrize("stage, offload", [(0, False), (3, True)])
def test_zero_stages_and_cpu_offload(triton, tiny_actor, tmp_path, stage, offload):
    out = tmp_path / "run"
    result = templar_train(*small_run(out, tiny_actor, triton.grpc_url, f"deepspeed.zero_stage={stage}",
                                      f"deepspeed.offload={str(offload).lower()}", steps=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert metric_steps(out) == [1, 2]
    actor = AutoModelForCausalLM.from_pretrained(out / "final" / "actor")  # gathered from the ZeRO partitions
    initial = AutoModelForCausalLM.from_pretrained(tiny_actor)
    assert actor.state_dict()["lm_head.weight"].shape == initial.state_dict()["lm_head.weight"].shape
    assert not actor.state_dict()["lm_head.weight"].equal(initial.state_dict()["lm_head.weight"])


TIMING_KEYS = {"step_time_s", "rm_latency_s", "reward_wait_s", "reward_wait_share", "wall_time"}


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS and not k.startswith("time/")} for row in rows]


def assert_killed_and_resumed_equals_straight(args, straight: Path, interrupted: Path, steps: int,
                                              engines: tuple[str, ...]) -> None:
    """Run `args(straight)` through; run `args(interrupted)`, kill it (SIGKILL) once its step-2 checkpoint is written,
    resume it: the metrics (timings aside) and the final weights of `engines` agree bit for bit."""
    result = templar_train(*args(straight))
    assert result.returncode == 0, result.stderr[-3000:]
    run = start_train(*args(interrupted))
    try:
        wait_until(lambda: (interrupted / "checkpoints" / "latest").is_file(), what="the step-2 checkpoint")
    finally:
        run.kill()
        run.wait()
    assert (interrupted / "checkpoints" / "latest").read_text() == "step-000002"
    resumed = templar_train(*args(interrupted), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing at step 3" in (interrupted / "train.log").read_text()
    expected, got = read_metrics(straight / "metrics.jsonl"), read_metrics(interrupted / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert without_timings(got) == without_timings(expected)  # exact: floats compared as written
    for name in engines:
        a = load_file(str(straight / "final" / name / "model.safetensors"))
        b = load_file(str(interrupted / "final" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name


def test_a_resumed_run_equals_an_uninterrupted_one(triton, tiny_actor, tmp_path):
    """Same seed; one run goes straight through, the other is killed (SIGKILL) after its step-2 checkpoint and
    resumed. On the CPU everything is deterministic, so the metrics and the final weights agree bit for bit."""
    args = lambda out: small_run(out, tiny_actor, triton.grpc_url, "ppo.ppo_epochs=2", steps=5)  # noqa: E731
    assert_killed_and_resumed_equals_straight(args, tmp_path / "straight", tmp_path / "interrupted", 5,
                                              ("actor", "critic"))


def test_adaptive_kl_and_reward_whitening_in_a_real_run(triton, tiny_actor, tmp_path):
    adaptive = ("ppo.adaptive_kl=true", "ppo.kl_coef=0.05", "ppo.target_kl=0.5", "ppo.kl_horizon=16")
    runs = {}
    for whiten in (False, True):
        out = tmp_path / f"whiten_{whiten}"
        result = templar_train(*small_run(out, tiny_actor, triton.grpc_url, *adaptive,
                                          f"ppo.whiten_rewards={str(whiten).lower()}", steps=3))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[whiten] = read_metrics(out / "metrics.jsonl")
    for rows in runs.values():  # Ziegler et al.: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * rows / horizon
        coef = 0.05
        for row in rows:
            coef *= 1 + min(max(row["kl_mean"] / 0.5 - 1, -0.2), 0.2) * 4 / 16
            assert row["kl_coef"] == pytest.approx(coef, rel=1e-12)
        assert rows[-1]["kl_coef"] != 0.05
    plain, whitened = runs[False][0], runs[True][0]
    assert plain["reward_mean"] == whitened["reward_mean"]  # the same first rollout and rewards ...
    # ... trained on differently shaped rewards: the critic's targets are the returns of the rewards as shaped (the
    # policy loss cannot show it here: one epoch of one mini-batch at ratio 1 on normalised advantages is ~0 either way)
    assert plain["value_loss"] != whitened["value_loss"]


def test_a_separate_critic_a_template_override_and_a_prompt_file(triton, tiny_actor, tmp_path):
    critic = build_tiny_model("qwen2_5", tmp_path / "critic", kind="causal-lm", seed=7)  # the actor's tokenizer
    template = tmp_path / "terse.jinja"
    own = (tiny_actor / "chat_template.jinja").read_text()
    assert "You are Qwen, created by Alibaba Cloud." in own
    template.write_text(own.replace("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                                    "You are terse."))
    prompts = tmp_path / "prompts.jsonl"
    asked = ["Name a river.", "Name a mountain.", "Name a lake."]
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in asked))
    out = tmp_path / "run"
    result = templar_train(*small_run(out, tiny_actor, triton.grpc_url, f"models.critic={critic}",
                                      f"models.actor_chat_template={template}", f"data.path={prompts}", steps=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"chat_template sha256 {sha256_text(template.read_text())}" in (out / "train.log").read_text()
    assert (out / "final" / "actor" / "chat_template.jinja").read_text() == template.read_text()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["messages"][0]["content"] for s in samples} <= set(asked)
    trained = load_file(str(out / "final" / "critic" / "model.safetensors"))
    initial = load_file(str(critic / "model.safetensors"))
    assert trained["model.embed_tokens.weight"].shape == initial["model.embed_tokens.weight"].shape
    assert not trained["model.norm.weight"].equal(initial["model.norm.weight"])  # this critic was trained


def test_bad_inputs_end_in_one_line_before_any_server_starts(tiny_actor, tiny_rms, tmp_path):
    repo = tmp_path / "model_repository"
    base = small_run(tmp_path / "run", tiny_actor, None, f"reward.repo={repo}",
                     f"reward.models.0.path={tiny_rms['llama3_1']}", f"reward.models.1.path={tiny_rms['gemma3']}",
                     steps=1)
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"prompt": "fine"}\n{"messages": [{"role": "user"}]}\n')
    cases = {
        "models.critic": (f"models.critic={tiny_rms['llama3_1']}", "does not use the actor's tokenizer"),
        "data.path": (f"data.path={bad_data}", "bad.jsonl row 1: messages[0] has no 'content'"),
        "template": (f"models.actor_chat_template={tmp_path / 'nope.jinja'}", "nope.jinja does not exist"),
        "actor": (f"models.actor={tmp_path / 'no_actor'}", "actor: " + str(tmp_path / "no_actor") + " does not exist"),
    }
    for what, (override, message) in cases.items():
        result = templar_train(*base, override)
        assert result.returncode == 2, (what, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("templar train: error: ")]
        assert len(errors) == 1 and message in errors[0], (what, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, what
        assert not repo.exists(), what  # nothing exported, no server started
    resume = templar_train(*base, "--resume")
    assert resume.returncode == 2 and "--resume: no checkpoint in" in resume.stderr
    assert "Traceback" not in resume.stderr


def test_an_error_on_rank_0_reaches_every_rank(triton, tiny_actor, tmp_path):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"text": "no prompt here"}\n')
    started = time.monotonic()
    result = templar_train("--num-ranks", "2", *small_run(tmp_path / "run", tiny_actor, triton.grpc_url,
                                                          f"data.path={bad_data}", steps=1), timeout=600)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "templar train: error: " in line]
    assert len(errors) == 2 and all("bad.jsonl row 0" in line for line in errors), result.stderr[-3000:]
    assert time.monotonic() - started < 300  # both ranks ended; none waited for the other
