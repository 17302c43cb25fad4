"""Templar as the reward server of OpenRLHF, TRL and verl, against the real embedded Triton over real gRPC: the
requests are built exactly as each framework builds them, and every reward must equal each RM's score of the
conversation in ITS OWN template (the Qwen-templated text an RM gets from those frameworks today scores otherwise)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest

from templar.server.embedded import die_with_parent
from templar.server.ports import free_port
from templar.samples import sample_conversations
from templar.template_parser import TemplateParser

from test_template_parser import openrlhf_query

pytestmark = pytest.mark.integration
WEIGHTS = {"rm_llama3_1": 1.0, "rm_gemma3": 0.5}
MODELS = ",".join(f"{name}:{weight}" for name, weight in WEIGHTS.items())


def rows_for(family: str) -> list[tuple[list[dict], str]]:
    """(prompt messages, response) pairs: one turn, several turns, unicode."""
    cases = sample_conversations(long_words=80)
    picked = [cases["single_turn"], cases["multi_turn"], cases["unicode"], cases["whitespace"]]
    rows = [(m[:-1], m[-1]["content"]) for m in picked]
    if family == "qwen3":  # a thinking model: the reasoning is part of what it answered
        rows.append((cases["single_turn"][:-1], "<think>\nFrance's capital.\n</think>\n\nIt is Paris."))
    return rows


def expected_reward(references, messages: list[dict]) -> float:
    return sum(w * references[name.removeprefix("rm_")].score(messages) for name, w in WEIGHTS.items())


def the_rm_reading_the_actors_text(references, query: str) -> float:
    """What an RM server without templates (OpenRLHF's serve_rm) scores: the actor-templated text as it is."""
    rm = references["llama3_1"]
    return rm.score_ids(rm.tokenizer(query, add_special_tokens=False)["input_ids"])


class Gateway:
    """`templar gateway` as users run it, in its own process."""

    def __init__(self, url: str, *extra: str, actor: str = "qwen2_5") -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "templar.cli", "gateway", "--actor-template", actor, "--url", url,
             "--port", str(self.port), *[a for m in MODELS.split(",") for a in ("--model", m)], *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while asyncio.run(self.get("/health"))[0] is None:
            assert self.process.poll() is None and time.monotonic() < deadline, self.process.stdout.read()
            time.sleep(0.3)

    async def get(self, path: str) -> tuple[int | None, dict | None]:
        try:
            async with aiohttp.ClientSession() as session, session.get(self.url + path) as response:
                return response.status, await response.json()
        except aiohttp.ClientConnectionError:
            return None, None

    def post_rows(self, rows: list[dict]) -> list[tuple[int, dict]]:
        """One row per request, all in flight at once: OpenRLHF's pattern."""
        async def go():
            async with aiohttp.ClientSession() as session:
                async def one(row):
                    async with session.post(self.url + "/get_reward", json=row) as response:
                        return response.status, await response.json()
                return await asyncio.gather(*(one(row) for row in rows))
        return asyncio.run(go())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def gateway(triton):
    served = Gateway(triton.grpc_url)
    yield served
    served.stop()


def test_openrlhf_requests_get_each_rms_own_template(gateway, references):
    parser = TemplateParser.from_source("qwen2_5")
    rows, expected, mismatch = [], [], []
    for prompt, response in rows_for("qwen2_5"):
        prompt_text = parser.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        for pads in (0, 3):  # older OpenRLHF versions left the padding in
            query = openrlhf_query(parser.tokenizer, prompt_text, response, pads=pads)
            rows.append({"query": [query], "prompts": [prompt_text], "labels": [""]})
            messages = [*prompt, {"role": "assistant", "content": response}]
            expected.append(expected_reward(references, messages))
            mismatch.append(the_rm_reading_the_actors_text(references, query))
    answers = gateway.post_rows(rows)
    assert all(status == 200 for status, _ in answers), answers
    rewards = [body["rewards"][0] for _, body in answers]
    np.testing.assert_allclose(rewards, expected, atol=1e-4, rtol=0)
    for _, body in answers:
        assert body["scores"] == body["rewards"] and body["extra_logs"]["templar/failed"] == [0.0]
    llama = [body["extra_logs"]["templar/rm_llama3_1"][0] for _, body in answers]
    assert min(abs(a - b) for a, b in zip(llama, mismatch)) > 1e-3  # the bug: the actor's text scores otherwise
    status, health = asyncio.run(gateway.get("/health"))
    assert status == 200 and set(health["models"]) == set(WEIGHTS)


def test_labels_with_messages_take_the_exact_path(gateway, references):
    """OpenRLHF's label column can carry the prompt's messages: used as they are (the system prompt included)."""
    parser = TemplateParser.from_source("qwen2_5")
    prompt = sample_conversations()["system_prompt"][:-1]
    prompt_text = parser.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    query = openrlhf_query(parser.tokenizer, prompt_text, "Test one thing at a time.")
    ((status, body),) = gateway.post_rows([{"query": [query], "prompts": [prompt_text],
                                            "labels": [json.dumps({"messages": prompt})]}])
    assert status == 200
    messages = [*prompt, {"role": "assistant", "content": "Test one thing at a time."}]
    assert body["rewards"][0] == pytest.approx(expected_reward(references, messages), abs=1e-4)


def test_rows_that_cannot_be_read_or_scored_are_never_a_silent_zero(triton, gateway, references):
    parser = TemplateParser.from_source("qwen2_5")
    good_prompt = parser.render([{"role": "user", "content": "Hi"}], generation_prompt=True)
    good = {"query": [good_prompt + "Hello!<|im_end|>"], "prompts": [good_prompt], "labels": [""]}
    raw = {"query": ["Question: 2+2?\nAnswer: 4"], "prompts": ["Question: 2+2?\nAnswer:"], "labels": [""]}
    (status, body), (ok_status, _) = gateway.post_rows([raw, good])
    assert status == 422 and "1 of 1 rows failed" in body["error"] and "not a prompt" in body["error"]
    assert ok_status == 200
    lenient = Gateway(triton.grpc_url, "--failed-reward", "-5")
    try:
        ((status, body),) = lenient.post_rows([{key: good[key] + raw[key] for key in good}])
    finally:
        lenient.stop()
    assert status == 200 and body["rewards"][1] == -5.0 and body["extra_logs"]["templar/failed"] == [0.0, 1.0]
    expected = expected_reward(references, [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello!"}])
    assert body["rewards"][0] == pytest.approx(expected, abs=1e-4)
    # no reward server: worth retrying, so 503 (the gateway starts after one short wait for its RMs, not the default)
    dead = Gateway(f"127.0.0.1:{free_port()}", "--connect-timeout-s", "2")
    try:
        ((status, body),) = dead.post_rows([good])
    finally:
        dead.stop()
    assert status == 503 and "no reward endpoint serves" in body["error"]


def load_reward_func_as_openrlhf_does(monkeypatch, actor: str, url: str):
    import templar.integrations.openrlhf_reward_func as shipped

    monkeypatch.setenv("TEMPLAR_ACTOR_TEMPLATE", actor)
    monkeypatch.setenv("TEMPLAR_MODELS", MODELS)
    monkeypatch.setenv("TEMPLAR_URL", url)
    spec = importlib.util.spec_from_file_location("reward_func", shipped.__file__)  # OpenRLHF's own loading
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reward_func


@pytest.mark.parametrize("actor", ["llama3_1", "llama3_2", "gemma3", "mistral_nemo", "deepseek_v3", "qwen3"])
def test_every_other_actor_family_through_the_reward_function_file(triton, references, monkeypatch, actor):
    reward_func = load_reward_func_as_openrlhf_does(monkeypatch, actor, triton.grpc_url)
    parser = TemplateParser.from_source(actor)
    for prompt, response in rows_for(actor):
        prompt_text = parser.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if actor == "llama3_2":
            assert "Cutting Knowledge Date" in prompt_text  # the date preamble the user never wrote
        query = openrlhf_query(parser.tokenizer, prompt_text, response, pads=2)
        answer = reward_func([query], [prompt_text], [""])
        kept = parser.parse_prompt(prompt_text)  # Gemma / Mistral fold a system turn into the user turn
        expected = expected_reward(references, [*kept, {"role": "assistant", "content": response}])
        assert answer["rewards"][0] == pytest.approx(expected, abs=1e-4), (actor, prompt)
        assert answer["extra_logs"]["templar/failed"] == [0.0]
        if actor != "llama3_1":  # another family's text read as it is: not what the RM was trained on
            assert abs(answer["extra_logs"]["templar/rm_llama3_1"][0]
                       - the_rm_reading_the_actors_text(references, query)) > 1e-3


def test_verl_compute_score_with_verls_argument_shapes(triton, references):
    from templar.integrations.verl import compute_score, compute_score_batch

    rows = rows_for("qwen2_5")
    # as verl's batch reward manager passes them: numpy object arrays from the Parquet columns
    extra_infos = np.array([{"prompt": np.array(prompt, dtype=object), "index": i}
                            for i, (prompt, _) in enumerate(rows)], dtype=object)
    data_sources = np.array(["chat"] * len(rows), dtype=object)
    kwargs = {"models": MODELS, "url": triton.grpc_url}
    scores = compute_score_batch(data_sources=data_sources, solution_strs=[r for _, r in rows],
                                 ground_truths=[None] * len(rows), extra_infos=extra_infos, **kwargs)
    for (prompt, response), score in zip(rows, scores):
        messages = [*prompt, {"role": "assistant", "content": response}]
        assert score["score"] == pytest.approx(expected_reward(references, messages), abs=1e-4)
        assert score["templar_failed"] == 0.0 and set(score) == {"score", "templar_failed", "templar/rm_llama3_1",
                                                                  "templar/rm_gemma3"}
    single = compute_score(data_source="chat", solution_str=rows[0][1], ground_truth=None,
                           extra_info={"prompt": rows[0][0]}, **kwargs)
    assert single["score"] == pytest.approx(scores[0]["score"], abs=1e-6)
    one = compute_score(data_source="chat", solution_str=rows[0][1], ground_truth=None,
                        extra_info={"prompt": rows[0][0]}, model="rm_gemma3", url=triton.grpc_url)
    messages = [*rows[0][0], {"role": "assistant", "content": rows[0][1]}]
    assert one["score"] == pytest.approx(references["gemma3"].score(messages), abs=1e-4)
    with pytest.raises(Exception, match='extra_info has no "prompt"'):
        compute_score(data_source="chat", solution_str="x", ground_truth=None, extra_info={}, **kwargs)
    lenient = compute_score_batch(data_sources=data_sources[:2], solution_strs=["x", "y"], ground_truths=[None, None],
                                  extra_infos=[{}, {"prompt": "Hi"}], failed_reward=-3.0, **kwargs)
    assert lenient[0] == {"score": -3.0, "templar_failed": 1.0, "templar/rm_llama3_1": -3.0, "templar/rm_gemma3": -3.0}
    assert lenient[1]["templar_failed"] == 0.0


def test_trl_grpo_trainer_trains_with_templar_rewards(triton, tiny_actor, tmp_path):
    """A real trl.GRPOTrainer, two steps on the tiny actor, rewarded by two served RMs (each its own template)."""
    import datasets
    import tritonclient.grpc as grpcclient
    from trl import GRPOConfig, GRPOTrainer

    from templar.integrations.trl import TemplarReward

    stats = grpcclient.InferenceServerClient(triton.grpc_url)
    rows_scored = lambda: int(stats.get_inference_statistics("rm_gemma3", as_json=True)[  # noqa: E731
        "model_stats"][0].get("inference_count", 0))
    prompts = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in
                                          ("Name a colour.", "Say hello.", "Count to three.", "Name a fruit.")])
    rewards = [TemplarReward("rm_llama3_1", url=triton.grpc_url), TemplarReward("rm_gemma3", url=triton.grpc_url)]
    config = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                        max_completion_length=8, max_steps=2, learning_rate=1e-4, logging_steps=1, report_to=[],
                        use_cpu=True, bf16=False, save_strategy="no", reward_weights=[1.0, 0.5], seed=0)
    before = rows_scored()
    trainer = GRPOTrainer(model=str(tiny_actor), reward_funcs=rewards, args=config, train_dataset=prompts)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logged) == 2
    for entry in logged:
        for name in ("templar_rm_llama3_1", "templar_rm_gemma3"):
            assert np.isfinite(entry[f"rewards/{name}/mean"])
    assert rows_scored() - before == 2 * 4  # every completion of both steps was scored by the served RM
    for reward in rewards:
        reward.close()
