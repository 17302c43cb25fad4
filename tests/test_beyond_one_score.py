"""Beyond one scalar: process reward models (templar.steps, `templar export --kind prm`) and multi-objective RMs.

Tiny PRMs of the three conventions, each of its model's class on a real tokenizer, and a multi-label RM, exported,
served by one embedded Triton and called over real gRPC. The reference for every score is the untouched model, run
the way its model card runs it (its own template or plain text, `tokenizer.encode`, the logits at the tag tokens):
no Templar code between the text and the number."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from templar import contract
from templar.conversation import Conversation, ConversationError
from templar.errors import ConfigError, ExportError
from templar.export.exporter import ExportOptions, export_reward_model
from templar.reward_client import RewardClient, RewardClientConfig
from templar.steps import PRESETS, aggregate, split_steps, step_format
from templar.tiny_models import TinySize, build_tiny_model
from templar.wire import decode_entry, sync_client, conversation_inputs, requested_outputs

from conftest import TEST_SETTINGS, start_server
from test_template_parser import openrlhf_query

QUESTION = "Tom has 3 apples and buys 2 more. How many apples does he have?"
STEPS = ["Tom starts with 3 apples.", "He buys 2 more, so 3 + 2 = 5.", "The answer is 5."]
SIZE = TinySize(hidden_size=32, intermediate_size=64)
OBJECTIVES = ("helpfulness", "honesty", "verbosity")
WEIGHTS = {"helpfulness": 0.6, "honesty": 0.4, "verbosity": -0.2}

# name -> (family, tiny-model kind, tokens added to the tokenizer, preset)
PRMS = {
    "prm_qwen": ("qwen2_5", "process-reward", ("<extra_0>",), "qwen-prm"),
    "prm_shepherd": ("mistral_nemo", "causal-lm", (), "math-shepherd"),
    "prm_value": ("llama3_1", "value-head-reward", ("<step>",), "value-head"),
}


# -- the steps of a response (no server) -------------------------------------------------------------------------
def test_steps_are_cut_on_the_separator_and_their_ends_are_offsets_in_the_content():
    fmt = PRESETS["qwen-prm"]
    content = "First.\n\n\n\nSecond one.\n\n  \n\nThird"
    steps = split_steps(content, fmt)
    assert steps.texts == ["First.", "Second one.", "Third"]
    assert [content[:end].endswith(text) for text, end in zip(steps.texts, steps.ends)] == [True] * 3
    given = split_steps("a) 2+2=4. b) so 4.", fmt, ["a) 2+2=4.", "b) so 4."])
    assert given.ends == [len("a) 2+2=4."), len("a) 2+2=4. b) so 4.")]


@pytest.mark.parametrize(("content", "given", "message"), [
    ("\n\n \n\n", None, "has no steps"),
    ("one", ["two"], "steps[0] does not occur"),
    ("one two", ["two", "one"], "steps[1] does not occur"),
    ("x", [" "], "steps[0] is blank"),
])
def test_a_response_whose_steps_cannot_be_read_is_refused_with_what_is_wrong(content, given, message):
    with pytest.raises(ConversationError, match=re.escape(message)):
        split_steps(content, PRESETS["qwen-prm"], given)


def test_too_many_steps_are_refused_naming_the_limit():
    fmt = step_format("qwen-prm", max_steps=3)
    with pytest.raises(ConversationError, match="4 steps, over this PRM's limit of 3"):
        split_steps("a\n\nb\n\nc\n\nd", fmt)


def test_aggregates_of_the_step_scores():
    assert [aggregate([0.9, 0.2, 0.7], how) for how in ("min", "last", "mean")] == pytest.approx([0.2, 0.7, 0.6])


# -- exported and served -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prms(assets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prms")
    return {name: build_tiny_model(family, root / name, kind=kind, added_tokens=added, size=SIZE, seed=7)
            for name, (family, kind, added, _) in PRMS.items()}


@pytest.fixture(scope="module")
def multi_rm(assets, tmp_path_factory) -> Path:
    """A multi-objective RM: a Llama-3 sequence classifier with three named labels, on the real Llama-3.1 tokenizer."""
    return build_tiny_model("llama3_1", tmp_path_factory.mktemp("multi") / "rm", kind="reward", labels=OBJECTIVES,
                            size=SIZE, seed=3)


# An RM whose own code combines its objectives, of ArmoRM-Llama3-8B's shape (RLHFlow's modeling_custom.py)
ARMO_CODE = '''"""A reward model of ArmoRM-Llama3-8B's shape (RLHFlow's modeling_custom.py): objectives regressed from
the last token, combined by a gating network that reads the prompt's end, found in Python by its token pattern."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


class GatingNetwork(nn.Module):
    def __init__(self, in_features, out_features, temperature=10.0, hidden_dim=32, n_hidden=2):
        super().__init__()
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.ones(1))
        layers = []
        for _ in range(n_hidden):
            layers.append(nn.Linear(in_features, hidden_dim))
            in_features = hidden_dim
        layers.append(nn.Linear(in_features, out_features))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return F.softmax(x / self.temperature, dim=1) * self.logit_scale[0]


# "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n" in the Llama-3 tokenizer
token_pattern = [128009, 128006, 78191, 128007, 271]


def find_token_for_gating(lst):
    """The last occurrence of token_pattern in a list."""
    for j in range(len(lst) - len(token_pattern), -1, -1):
        if lst[j:j + len(token_pattern)] == token_pattern:
            return j
    raise ValueError("Token pattern not found in the list.")


@dataclass
class CustomOutput(ModelOutput):
    rewards: Optional[torch.FloatTensor] = None
    gating_output: Optional[torch.FloatTensor] = None
    score: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None


class LlamaForRewardModelWithGating(LlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.num_objectives = config.num_objectives
        self.regression_layer = nn.Linear(config.hidden_size, self.num_objectives, bias=False)
        self.post_init()
        eye = torch.zeros(self.num_objectives, self.num_objectives)
        eye[range(self.num_objectives), range(self.num_objectives)] = 1.0
        self.reward_transform_matrix = nn.Parameter(eye, requires_grad=False)
        self.gating = GatingNetwork(config.hidden_size, self.num_objectives)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        tokens_hidden_states = self.model(input_ids, attention_mask=attention_mask)[0]
        batch_size = input_ids.shape[0]
        sequence_lengths = torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1
        sequence_lengths = sequence_lengths % input_ids.shape[-1]
        rows = torch.arange(batch_size, device=tokens_hidden_states.device)
        hidden_states = tokens_hidden_states[rows, sequence_lengths]
        rewards = self.regression_layer(hidden_states)
        gating_token_positions = [find_token_for_gating(ids.tolist()) for ids in input_ids]
        prompt_embedding = tokens_hidden_states[rows, gating_token_positions, :]
        gating_output = self.gating(prompt_embedding)
        rewards_adjusted = rewards @ self.reward_transform_matrix
        score = torch.sum(gating_output * rewards_adjusted, dim=1)
        return CustomOutput(rewards=rewards, gating_output=gating_output, score=score, logits=score)
'''
ARMO_OBJECTIVES = ("helpsteer-helpfulness", "helpsteer-correctness", "ultrafeedback-honesty", "code-complexity")


def build_armo_like(out: Path, seed: int = 5) -> Path:
    """A tiny RM of ArmoRM's class on the real Llama-3.1 tokenizer, with ArmoRM's "[PAD]" pad token; loaded, as
    ArmoRM is, with AutoModelForSequenceClassification and trust_remote_code."""
    from transformers import AutoTokenizer

    from templar.assets import tokenizer_dir
    from templar.tiny_models import tiny_config

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("llama3_1")))
    tok.add_special_tokens({"pad_token": "[PAD]"})
    config = tiny_config("llama3_1", len(tok), tok.pad_token_id, SIZE)
    config.num_objectives = len(ARMO_OBJECTIVES)
    namespace: dict = {}
    exec(compile(ARMO_CODE, "modeling_custom.py", "exec"), namespace)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = namespace["LlamaForRewardModelWithGating"](config)
        with torch.no_grad():  # spread the objectives and the gate, so that rows and objectives differ visibly
            model.regression_layer.weight.normal_(0.0, 1.0 / config.hidden_size ** 0.5)
            model.gating.layers[-1].weight.normal_(0.0, 3.0)
    model.save_pretrained(out, safe_serialization=True)
    (out / "modeling_custom.py").write_text(ARMO_CODE)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(architectures=["LlamaForRewardModelWithGating"],
               auto_map={"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def armo_rm(assets, tmp_path_factory) -> Path:
    return build_armo_like(tmp_path_factory.mktemp("armo") / "rm")


@pytest.fixture(scope="module")
def prm_server(prms, multi_rm, armo_rm, tmp_path_factory):
    """One repository and one server for the module: the three PRMs, the multi-objective RM and the RM that combines
    its own objectives."""
    repo = tmp_path_factory.mktemp("prm_repo") / "model_repository"
    reports = {}
    for name, (_, _, _, preset) in PRMS.items():
        fmt = step_format(preset, max_steps=8)
        reports[name] = export_reward_model(ExportOptions(
            model=prms[name], name=name, repo=repo, max_length=256, kind="prm", step_format=fmt,
            trust_remote_code=True, settings=TEST_SETTINGS), log=lambda _: None)
    reports["rm_multi"] = export_reward_model(ExportOptions(
        model=multi_rm, name="rm_multi", repo=repo, max_length=256, objective_weights=WEIGHTS,
        settings=TEST_SETTINGS), log=lambda _: None)
    reports["rm_armo"] = export_reward_model(ExportOptions(
        model=armo_rm, name="rm_armo", repo=repo, max_length=256, trust_remote_code=True,
        objective_names=list(ARMO_OBJECTIVES), settings=TEST_SETTINGS), log=lambda _: None)
    server = start_server(repo)
    yield server, reports
    server.stop()


@functools.cache
def _untouched(name: str, folder: Path):
    """(tokenizer, model) as Hugging Face loads them: the class each PRM's card loads."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    auto = {"prm_qwen": AutoModel, "prm_shepherd": AutoModelForCausalLM, "prm_value": AutoModel}[name]
    return AutoTokenizer.from_pretrained(str(folder)), auto.from_pretrained(
        str(folder), trust_remote_code=name == "prm_qwen", dtype=torch.float32).eval()


def _model_card_step_scores(name: str, folder: Path, messages: list[dict], steps: list[str]) -> np.ndarray:
    """Each PRM run as its model card runs it: the text built by hand, `tokenizer.encode`, the untouched model."""
    from safetensors.torch import load_file

    tok, model = _untouched(name, folder)
    with torch.no_grad():
        if name == "prm_qwen":  # Qwen2.5-Math-PRM's card: its system prompt, "<extra_0>".join(steps) + "<extra_0>"
            chat = [{"role": "system", "content": PRESETS["qwen-prm"].system_prompt},
                    *[m for m in messages if m["role"] != "system"][:-1],
                    {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
            ids = tok.encode(tok.apply_chat_template(chat, tokenize=False), return_tensors="pt")
            probs = torch.softmax(model(input_ids=ids)[0], dim=-1)[0, :, 1]
            return probs[ids[0] == tok.encode("<extra_0>")[0]].numpy()
        if name == "prm_shepherd":  # Math-Shepherd's card: f"{question} {output}", the "+"/"-" logits at each "ки"
            output = "\n".join(f"{step} ки" for step in steps)
            question = " ".join(m["content"] for m in messages[:-1] if m["role"] != "system")
            ids = torch.tensor([tok.encode(f"{question} {output}")])
            good_bad = [tok.encode(t, add_special_tokens=False)[0] for t in ("+", "-")]
            scores = model(ids).logits[:, :, good_bad].softmax(dim=-1)[0, :, 0]
            return scores[ids[0] == tok.encode(" ки", add_special_tokens=False)[-1]].numpy()
        # a value head on the base model's last hidden state (OpenRLHF's layout), read at each "<step>"
        chat = [*messages[:-1], {"role": "assistant", "content": "".join(f"{s}<step>" for s in steps)}]
        ids = torch.tensor([tok.encode(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)])
        head = load_file(str(folder / "model.safetensors"))["value_head.weight"]
        values = (model(input_ids=ids).last_hidden_state[0] @ head.T)[:, 0]
        return values[ids[0] == tok.convert_tokens_to_ids("<step>")].numpy()


CONVERSATIONS = [
    [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "\n".join(STEPS)}],
    [{"role": "system", "content": "You are a careful tutor."}, {"role": "user", "content": QUESTION},
     {"role": "assistant", "content": STEPS[1]}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": QUESTION}, {"role": "assistant", "content": " ".join(STEPS)}],
]


@pytest.mark.parametrize("name", list(PRMS))
def test_served_step_scores_are_the_model_cards_own_forward_at_every_tag(prm_server, prms, name):
    """Over gRPC, batched with rows of other lengths: every step score within 1e-5 (relative) of the untouched
    model at that step's tag, SCORE their minimum, STEP_ENDS where each step ends in the content sent."""
    server, reports = prm_server
    separator = PRESETS[PRMS[name][3]].step_separator
    rows = [Conversation(c[:-1] + [{**c[-1], "content": separator.join(STEPS[:n + 1])}], steps=None)
            for n, c in enumerate(CONVERSATIONS)]
    rows.append(Conversation(CONVERSATIONS[2][:-1] + [CONVERSATIONS[2][-1]], steps=list(STEPS)))  # steps sent
    with RewardClient(RewardClientConfig(model=name, endpoints=[server.grpc_url])) as client:
        result = client.score(rows)
    assert result.status == ["ok"] * len(rows)
    for i, row in enumerate(rows):
        steps = row.steps or split_steps(row.messages[-1]["content"], PRESETS[PRMS[name][3]]).texts
        expected = _model_card_step_scores(name, prms[name], row.messages, steps)
        served = result.step_scores[i]
        assert len(served) == len(steps) == len(expected)
        error = np.abs(served - expected) / np.maximum(1.0, np.abs(expected))
        assert error.max() < 1e-5, (name, i, served, expected)
        assert result.scores[i] == pytest.approx(float(served.min()), abs=1e-7)
        content = row.messages[-1]["content"]
        assert [content[:end].endswith(step) for step, end in zip(steps, result.step_ends[i])] == [True] * len(steps)
    assert reports[name].parameters[contract.PARAM_RM_KIND] == "process"


def test_an_old_client_reading_only_the_four_outputs_gets_the_aggregate_unchanged(prm_server):
    """A client of the outcome contract (it asks for SCORE, STATUS, NUM_TOKENS, TRUNCATED by name, as every client
    before process RMs did) works against a PRM unchanged: SCORE is the aggregate of the steps."""
    server, _ = prm_server
    rows = [json.dumps({"messages": CONVERSATIONS[0]}).encode()]
    client = sync_client(server.grpc_url)
    try:
        answer = client.infer("prm_qwen", conversation_inputs(rows), outputs=requested_outputs(contract.ENTRY_OUTPUTS))
        assert {o.name for o in answer.get_response().outputs} == set(contract.ENTRY_OUTPUTS)
        old = decode_entry(answer)
        full = decode_entry(client.infer("prm_qwen", conversation_inputs(rows),
                                         outputs=requested_outputs(contract.ENTRY_PROCESS_OUTPUTS)))
    finally:
        client.close()
    assert old.step_scores is None and old.status == ["ok"]
    assert old.scores[0] == full.scores[0] == float(full.step_scores[0].min())


def test_rows_whose_steps_cannot_be_read_get_their_own_error_and_cost_no_neighbour(prm_server):
    server, _ = prm_server
    long_prompt = "word " * 400
    rows = {
        "ok": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "\n".join(STEPS)}],
        "no steps": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "\n \n"}],
        "too many": [{"role": "user", "content": QUESTION},
                     {"role": "assistant", "content": "\n".join(f"step {i}" for i in range(9))}],
        "typed tag": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "3 + 2 = 5 ки"}],
        "cut steps": [{"role": "user", "content": QUESTION},
                      {"role": "assistant", "content": "\n".join([STEPS[0], long_prompt, STEPS[2]])}],
        "text row": None,
        "bad steps": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "5", "steps": "5"}],
    }
    wire = [{"messages": m} if m else {"text": "3 + 2 = 5"} for m in rows.values()]
    with RewardClient(RewardClientConfig(model="prm_shepherd", endpoints=[server.grpc_url])) as client:
        result = client.score(wire)
    status = dict(zip(rows, result.status))
    assert status["ok"] == "ok" and len(result.step_scores[0]) == 3
    assert "has no steps" in status["no steps"]
    assert "9 steps, over this PRM's limit of 8 (max_steps)" in status["too many"]
    assert "step tag 'ки' is ordinary text" in status["typed tag"]
    assert "over max_length 256, and cutting it from the start drops steps: 2 of 3 step tags left" in \
        status["cut steps"]
    assert "not a 'text' row" in status["text row"]
    assert "messages[-1].steps must be a list of strings" in status["bad steps"]
    assert all(len(s) == 0 for s in result.step_scores[1:]) and np.isnan(result.scores[1:]).all()


def test_a_step_tag_typed_in_the_content_is_escaped_where_it_is_a_control_token(prm_server, prms):
    """Qwen's `<extra_0>` is an added special token: typed inside a step it is text, not a tag; the row keeps its
    own number of steps and each score is still the model's at the real tags (the reference escapes by hand: the
    typed tag tokenized as plain text)."""
    server, _ = prm_server
    steps = ["3 + 2 <extra_0> = 5.", "So 5."]
    conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "\n\n".join(steps)}]
    with RewardClient(RewardClientConfig(model="prm_qwen", endpoints=[server.grpc_url])) as client:
        result = client.score([conversation])
    assert result.status == ["ok"] and len(result.step_scores[0]) == 2
    # by hand: the model card's text, its typed tag encoded as plain text between the pieces around it
    tok, model = _untouched("prm_qwen", prms["prm_qwen"])
    chat = [{"role": "system", "content": PRESETS["qwen-prm"].system_prompt}, conversation[0],
            {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
    before, after = tok.apply_chat_template(chat, tokenize=False).split("3 + 2 <extra_0>", 1)
    ids = (tok.encode(before + "3 + 2 ") + tok.encode("<extra_0>", split_special_tokens=True) + tok.encode(after))
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([ids]))[0], dim=-1)[0, :, 1]
    expected = probs[torch.tensor(ids) == tok.convert_tokens_to_ids("<extra_0>")].numpy()
    assert len(expected) == 2
    np.testing.assert_allclose(result.step_scores[0], expected, rtol=0, atol=1e-5)


def test_a_step_tag_that_is_not_one_token_is_refused_at_export(prms, tmp_path):
    """Math-Shepherd's ' ки' is two tokens of Qwen2.5's tokenizer: the export names the tag and what it became."""
    fmt = step_format("qwen-prm", step_tag="ки", tag_prefix=" ")
    with pytest.raises(ExportError, match="step tag 'ки' is not one token of this tokenizer"):
        export_reward_model(ExportOptions(model=prms["prm_qwen"], name="bad", repo=tmp_path, max_length=256,
                                          kind="prm", step_format=fmt), log=lambda _: None)
    assert not (tmp_path / "bad").exists()


# -- multi-objective RMs ------------------------------------------------------------------------------------------
def test_a_multi_objective_rm_serves_its_own_logits_by_name_and_their_weighted_sum(prm_server, multi_rm):
    """SCORES are the classifier's own `logits[0]` (the model-card snippet), SCORE their weighted sum; the objective
    names come from the config's id2label; a client that reads only SCORE gets the sum unchanged."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    server, reports = prm_server
    tok = AutoTokenizer.from_pretrained(str(multi_rm))
    rm = AutoModelForSequenceClassification.from_pretrained(str(multi_rm), dtype=torch.float32).eval()
    with RewardClient(RewardClientConfig(model="rm_multi", endpoints=[server.grpc_url])) as client:
        result = client.score(CONVERSATIONS)
        assert client.objectives == list(OBJECTIVES)
    assert result.status == ["ok"] * 3 and result.objectives.shape == (3, 3)
    weights = np.array([WEIGHTS[name] for name in OBJECTIVES])
    for i, conversation in enumerate(CONVERSATIONS):
        with torch.no_grad():
            own = rm(**tok.apply_chat_template(conversation, return_tensors="pt", return_dict=True)).logits[0]
        own = own.double().numpy()
        assert (np.abs(result.objectives[i] - own) / np.maximum(1.0, np.abs(own))).max() < 1e-5
        assert result.scores[i] == pytest.approx(float(own @ weights), rel=1e-5, abs=1e-6)
    assert json.loads(reports["rm_multi"].parameters[contract.PARAM_OBJECTIVES]) == list(OBJECTIVES)
    client = sync_client(server.grpc_url)
    try:
        old = decode_entry(client.infer("rm_multi", conversation_inputs(
            [json.dumps({"messages": CONVERSATIONS[0]}).encode()]), outputs=requested_outputs(contract.ENTRY_OUTPUTS)))
    finally:
        client.close()
    # alone instead of beside two rows: the packed CPU scorer's fp32 bound, not bit-identity (docs: Fidelity)
    assert old.objectives is None and old.scores[0] == pytest.approx(result.scores[0], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("weights", "message"), [
    (None, "needs the weights SCORE combines them with"),
    ({"kindness": 1.0}, "names kindness, which are not objectives of this RM (helpfulness, honesty, verbosity)"),
    ([1.0, 2.0], "has 2 weights for 3 objectives"),
])
def test_a_multi_objective_rm_without_usable_weights_is_refused_at_export(multi_rm, tmp_path, weights, message):
    with pytest.raises(ExportError, match=re.escape(message)):
        export_reward_model(ExportOptions(model=multi_rm, name="multi", repo=tmp_path, max_length=256,
                                          objective_weights=weights), log=lambda _: None)


def test_an_rm_that_combines_its_own_objectives_is_served_by_its_own_forward(prm_server, armo_rm):
    """ArmoRM's shape: its code finds the gating position in Python (a trace would freeze it), so its own forward is
    served, in torch. SCORE is its `score` (its gate's combination), SCORES its `rewards`, each within 1e-5 of the
    model card's snippet (`AutoModelForSequenceClassification` with trust_remote_code, `apply_chat_template`, one
    conversation at a time), batched with rows of other lengths; the names are the ones given at export."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    server, reports = prm_server
    parameters = reports["rm_armo"].parameters
    assert parameters[contract.PARAM_SCORER_RUNTIME] == "torch" and parameters[contract.PARAM_RM_KIND] == \
        "multi-objective" and float(parameters["parity_max_abs_diff"]) < 1e-5
    tok = AutoTokenizer.from_pretrained(str(armo_rm))
    rm = AutoModelForSequenceClassification.from_pretrained(str(armo_rm), trust_remote_code=True,
                                                            dtype=torch.float32).eval()
    with RewardClient(RewardClientConfig(model="rm_armo", endpoints=[server.grpc_url])) as client:
        result = client.score(CONVERSATIONS)
        assert client.objectives == list(ARMO_OBJECTIVES)
    assert result.status == ["ok"] * 3 and result.objectives.shape == (3, len(ARMO_OBJECTIVES))
    for i, conversation in enumerate(CONVERSATIONS):
        with torch.no_grad():
            own = rm(**tok.apply_chat_template(conversation, return_tensors="pt", return_dict=True))
        rewards, score = own.rewards[0].double().numpy(), float(own.score[0])
        assert (np.abs(result.objectives[i] - rewards) / np.maximum(1.0, np.abs(rewards))).max() < 1e-5
        assert result.scores[i] == pytest.approx(score, rel=1e-5, abs=1e-6)
        assert result.scores[i] != pytest.approx(float(rewards.mean()), abs=1e-3)  # the gate, not a plain mean
    assert len({round(float(s), 4) for s in result.scores}) == 3


def test_a_row_an_rms_own_code_refuses_costs_no_neighbour(prm_server):
    """ArmoRM's code raises for a conversation without an assistant header (its gating pattern): that row gets the
    error, the rows batched with it are scored."""
    server, _ = prm_server
    rows = [{"messages": CONVERSATIONS[0]}, {"text": "no chat template at all"}, {"messages": CONVERSATIONS[1]}]
    with RewardClient(RewardClientConfig(model="rm_armo", endpoints=[server.grpc_url])) as client:
        result = client.score(rows)
    assert result.status[0] == "ok" and result.status[2] == "ok"
    assert "Token pattern not found" in result.status[1]


def test_an_rm_that_combines_its_objectives_refuses_weights_and_a_wrong_number_of_names(armo_rm, tmp_path):
    for extra, message in (({"objective_weights": [1.0] * 4}, "combines its objectives itself"),
                           ({"objective_names": ["a", "b"]}, "gives 2 names (a, b) for the 4 objectives")):
        with pytest.raises(ExportError, match=re.escape(message)):
            export_reward_model(ExportOptions(model=armo_rm, name="armo", repo=tmp_path, max_length=256,
                                              trust_remote_code=True, **extra), log=lambda _: None)


# -- step scores on the actor's tokens --------------------------------------------------------------------------
ACTOR_RESPONSE = "Tom starts with 3 apples 🍎\n\nHe buys 2 more, so 3 + 2 = 5.\n\nThe answer is 5."


@pytest.mark.parametrize("family", ["llama3_1", "qwen2_5", "gemma3"])
def test_each_step_end_lands_on_the_actor_token_that_writes_it(assets, family):
    """Byte-level (Llama-3, Qwen) and SentencePiece (Gemma) actors: the token a step's score lands on is the one whose
    text completes the step, checked on the decoded tokens: the step's last character (the first step's is an emoji,
    several byte tokens where the vocabulary lacks it) is in the text up to that token and not in the text before."""
    from transformers import AutoTokenizer

    from templar.steps import step_end_tokens

    tok = AutoTokenizer.from_pretrained(str(assets[family]))
    ids = tok.encode(ACTOR_RESPONSE, add_special_tokens=False)
    text = tok.decode(ids, skip_special_tokens=True)  # what the trainer sends as the response
    steps = split_steps(text, PRESETS["qwen-prm"])
    positions = step_end_tokens(tok, ids, steps.ends)
    assert positions == sorted(positions) and len(set(positions)) == 3
    for step, end, j in zip(steps.texts, steps.ends, positions):
        upto = tok.decode(ids[: j + 1], skip_special_tokens=True)
        before = tok.decode(ids[:j], skip_special_tokens=True).rstrip("\ufffd")
        assert upto.startswith(text[:end]) and len(before) < end, (family, step, tok.convert_ids_to_tokens(ids[j]))
    assert positions[-1] == len(ids) - 1  # the last step ends the response
    with pytest.raises(ValueError, match="outside the response"):
        step_end_tokens(tok, ids, [len(text) + 1])


def test_a_response_cut_mid_character_has_its_last_step_on_its_last_token(assets):
    """A sampled response can end in bytes no token completes (cut at max_new_tokens, or token soup): its text, as
    decoded and sent to the PRM, ends in U+FFFD characters, and the last step (ending there) lands on the last token.
    (A PPO run of configs/demo_prm.yaml once stopped here: the step end was 2 characters past the text counted.)"""
    from transformers import AutoTokenizer

    from templar.steps import step_end_tokens

    tok = AutoTokenizer.from_pretrained(str(assets["qwen2_5"]))
    partial = [i for i in range(5000) if tok.decode([i]).endswith("\ufffd")][:2]  # lone bytes of a character
    ids = tok.encode("The rain is wonderful. Hope", add_special_tokens=False) + partial
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.endswith("\ufffd\ufffd")
    steps = split_steps(text, step_format("qwen-prm", step_separator=". "))
    assert step_end_tokens(tok, ids, steps.ends) == [3, len(ids) - 1]  # "wonderful" ends step 1


@pytest.mark.parametrize(("actor_family", "prm"), [("llama3_1", "prm_qwen"), ("qwen2_5", "prm_value")])
def test_a_prm_on_another_tokenizer_puts_each_step_score_on_the_actor_token_that_ends_the_step(
        prm_server, assets, actor_family, prm):
    """The trainer's step rewards (templar.trainer.rewards.step_rewards) from a served PRM whose tokenizer is not the
    actor's (a Qwen-style PRM scoring a Llama-3 actor, a Llama-3 PRM scoring a Qwen actor): right-padded response ids
    as the actor generated them, one ended by its stop token; each served step score, times the RM's weight, sits on
    the token whose decoded text completes the step, and nowhere else."""
    from transformers import AutoTokenizer

    from templar.trainer.rewards import step_rewards

    server, _ = prm_server
    tok = AutoTokenizer.from_pretrained(str(assets[actor_family]))
    responses = [ACTOR_RESPONSE, "So 3 + 2 = 5.\n\nFive apples."]
    rows = [tok.encode(text, add_special_tokens=False) for text in responses]
    rows[1].append(tok.eos_token_id)  # generation stopped here: not part of the text
    width = max(map(len, rows)) + 2
    ids = torch.full((2, width), tok.eos_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    ended = torch.tensor([False, True])
    texts = [tok.decode(row[: len(row) - int(done)], skip_special_tokens=True) for row, done in zip(rows, ended)]
    conversations = [[{"role": "user", "content": QUESTION}, {"role": "assistant", "content": t}] for t in texts]
    with RewardClient(RewardClientConfig(model=prm, endpoints=[server.grpc_url])) as client:
        result = client.score(conversations)
    assert result.status == ["ok", "ok"]
    dense = step_rewards(tok, ids, mask, ended, {prm: result}, {prm: 0.5})
    for i, text in enumerate(texts):
        steps = split_steps(text, PRESETS["qwen-prm"])
        assert result.step_ends[i] == steps.ends
        placed = np.flatnonzero(dense[i])
        assert len(placed) == len(steps.texts)
        for j, end, score in zip(placed, steps.ends, result.step_scores[i]):
            assert tok.decode(ids[i, : j + 1], skip_special_tokens=True).startswith(text[:end])
            assert len(tok.decode(ids[i, :j], skip_special_tokens=True).rstrip("\ufffd")) < end
            assert dense[i, j] == pytest.approx(0.5 * float(score))


# -- the integrations ---------------------------------------------------------------------------------------------
def test_trl_verl_and_openrlhf_take_a_process_rms_aggregate_and_report_its_steps(prm_server):
    """TRL's TemplarReward and verl's compute_score take the aggregate a trainer wants from the steps (default: the
    RM's own, SCORE); OpenRLHF's answer (the gateway's) rewards with the aggregate and logs the steps per row."""
    from templar.integrations.openrlhf import OpenRLHFRewards
    from templar.integrations.trl import TemplarReward
    from templar.integrations.verl import compute_score_batch
    from templar.reward_ensemble import RewardEnsemble, WeightedModel
    from templar.template_parser import TemplateParser

    server, _ = prm_server
    prompt = [{"role": "user", "content": QUESTION}]
    responses = ["\n\n".join(STEPS), "\n\n".join(STEPS[1:])]
    with RewardClient(RewardClientConfig(model="prm_qwen", endpoints=[server.grpc_url])) as client:
        steps = client.score([[*prompt, {"role": "assistant", "content": r}] for r in responses]).step_scores
    expected = {how: [float(f(s)) for s in steps] for how, f in
                (("min", np.min), ("last", lambda s: s[-1]), ("mean", np.mean))}

    for how in (None, "last"):
        reward = TemplarReward("prm_qwen", url=server.grpc_url, aggregate=how)
        try:
            got = reward(prompts=[prompt, prompt], completions=responses)
        finally:
            reward.close()
        assert got == pytest.approx(expected[how or "min"], abs=1e-6)
    rows = compute_score_batch(["math"] * 2, responses, [None] * 2, [{"prompt": prompt}] * 2, model="prm_qwen",
                               url=server.grpc_url, aggregate="mean")
    assert [r["score"] for r in rows] == pytest.approx(expected["mean"], abs=1e-6)
    with pytest.raises(ConfigError, match="aggregate must be one of min, last, mean"):
        TemplarReward("prm_qwen", url=server.grpc_url, aggregate="max")

    parser = TemplateParser.from_source("qwen2_5")
    prompt_text = parser.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    queries = [openrlhf_query(parser.tokenizer, prompt_text, r) for r in responses]  # what OpenRLHF sends
    rewards = OpenRLHFRewards(parser)
    parsed = rewards.rows(queries, [prompt_text] * 2, [None, None])
    assert parsed.errors == [None, None]
    ensemble = RewardEnsemble([WeightedModel("prm_qwen", 1.0)], RewardClientConfig(endpoints=[server.grpc_url]))
    try:
        answer = rewards.answer(parsed, ensemble.score(parsed.conversations, "last"))
    finally:
        ensemble.close()
    assert answer["rewards"] == pytest.approx(expected["last"], abs=1e-6)
    logs = answer["extra_logs"]
    assert logs["templar/prm_qwen/num_steps"] == [3.0, 2.0]
    assert logs["templar/prm_qwen/min_step"] == pytest.approx(expected["min"], abs=1e-6)
    assert logs["templar/prm_qwen/last_step"] == pytest.approx(expected["last"], abs=1e-6)


# -- a PPO run with a process RM --------------------------------------------------------------------------------
def test_a_ppo_run_with_a_prm_on_another_tokenizer_puts_each_step_score_on_its_token(prm_server, tiny_actor,
                                                                                     tmp_path):
    """`templar train` (GAE with a critic) against a Llama-3 PRM (value head at each `<step>`) and a multi-objective
    RM, with the Qwen actor: the run learns from both, logs the steps, and each sample records where every step's
    score landed, which the decoded actor tokens confirm by hand."""
    from transformers import AutoTokenizer

    from templar.trainer.metrics import read_metrics
    from test_trainer import templar_train

    server, _ = prm_server
    out = tmp_path / "run"
    result = templar_train(
        f"output_dir={out}", f"models.actor={tiny_actor}", "steps=2", "save_every=2", f"reward.url={server.grpc_url}",
        "reward.models.0.name=prm_value", "reward.models.0.kind=prm", "reward.models.1.name=rm_multi",
        "reward.models.1.weight=0.5", "generation.max_new_tokens=12", "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=4", "ppo.micro_batch_size=2", "ppo.ppo_epochs=1", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["steps/prm_value"] >= 1 and np.isfinite(r["step_rewards_mean"]) for r in rows)
    tok = AutoTokenizer.from_pretrained(str(tiny_actor))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    placed = [s for s in samples if "steps" in s]
    assert placed, samples
    for sample in placed:
        text, ids = sample["messages"][-1]["content"], sample["response_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text
        for step in sample["steps"]["prm_value"]:
            upto = tok.decode(ids[: step["token"] + 1], skip_special_tokens=True)
            before = tok.decode(ids[: step["token"]], skip_special_tokens=True).rstrip("\ufffd")
            assert upto.startswith(text[: step["end"]]) and len(before) < step["end"]
