"""The packed CPU scorer (templar.serving.packed_scorer, the default CPU runtime): rows laid out once per distinct
prefix (templar.serving.prefix_packing), the last layer only at read positions, torch.compile'd layers. Its scores
are the model's own forward's within the fp32 bound, with prefix sharing on or off and whatever the rows beside
them; a model it cannot run is served by ONNX Runtime, and the export says why."""

from __future__ import annotations

import dataclasses
import os
import urllib.request

import numpy as np
import pytest

from templar import contract
from templar.errors import PackedScorerUnsupported
from templar.export.repository import read_parameters
from templar.export.scorer import parity_error
from templar.padding import right_pad
from templar.reward_client import RewardClient, RewardClientConfig
from templar.serving.batching import METRIC_SHARED, METRIC_SLOTS, METRIC_TOKENS
from templar.serving.packed_scorer import NO_COMPILE_ENV, PackedScorer
from templar.serving.prefix_packing import computed_tokens, pack_rows, plan_packed_micro_batches
from templar.tiny_models import build_tiny_model
from templar.tools.workload import grpo_mix

from conftest import TEST_SETTINGS, TorchReference, export, running

FP32_BOUND = 1e-5  # |served - reference| / max(1, |reference|), the README's Fidelity guarantee for fp32


# -- the layout ------------------------------------------------------------------------------------------------------
def spans_tokens(layout, spans) -> list[int]:
    return [int(t) for start, end in spans for t in layout.tokens[start:end]]


def test_each_distinct_prefix_is_laid_out_once_and_every_row_reads_its_own_tokens():
    prompt = [1, 2, 3, 4, 5]
    rows = [prompt + [6, 7], prompt + [8], [9, 9, 9], prompt + [6, 7], prompt[:3], prompt + [6, 7, 10, 11]]
    reads = [6, 5, 2, 5, 2, 8]  # row 3 (a duplicate of row 0) is read one token earlier
    layout = pack_rows(rows, reads)
    # distinct tokens: the prompt once, then 6 7 / 8 / 10 11 after it, 9 9 9 alone
    assert layout.computed == 5 + 2 + 1 + 2 + 3 and layout.shared == sum(map(len, rows)) - layout.computed
    assert layout.computed == computed_tokens(rows)
    for row, read, spans, where in zip(rows, reads, layout.read_contexts, layout.reads):
        assert spans_tokens(layout, spans) == row[: read + 1]  # the row's own tokens up to the read one, in order
        assert layout.tokens[where] == row[read] and layout.positions[where] == read
    for node in layout.nodes:  # a node's context plus its tokens is a prefix of some row
        seen = spans_tokens(layout, (*node.context, (node.start, node.end)))
        assert any(row[: len(seen)] == seen for row in rows)
        assert list(layout.positions[node.start:node.end]) == list(range(len(seen) - (node.end - node.start),
                                                                          len(seen)))
    whole = pack_rows(rows, reads, share=False)  # sharing off: each row laid out whole, nothing shared
    assert whole.computed == sum(map(len, rows)) and whole.shared == 0 and all(not n.context for n in whole.nodes)
    with pytest.raises(ValueError, match="row 2 has 3 tokens, its score cannot be read at 3"):
        pack_rows(rows, [6, 5, 3, 5, 2, 8])


def test_packed_micro_batches_keep_groups_together_and_count_shared_tokens_once():
    groups = [[[g] * 40 + [100 + g, i] * (3 + i) for i in range(4)] for g in range(5)]  # 5 prompts x 4 answers
    rows = [row for group in groups for row in group]
    order = list(np.random.default_rng(0).permutation(len(rows)))
    shuffled = [rows[i] for i in order]
    per_group = computed_tokens(groups[0])
    batches = plan_packed_micro_batches(shuffled, max_rows=64, max_tokens=per_group + 10)
    assert sorted(int(i) for b in batches for i in b) == list(range(len(rows)))  # every row exactly once
    for batch in batches:
        picked = [shuffled[i] for i in batch]
        assert computed_tokens(picked) <= per_group + 10
        assert len({row[0] for row in picked}) == 1 and len(picked) == 4  # one GRPO group per micro-batch
    assert all(len(b) <= 3 for b in plan_packed_micro_batches(shuffled, max_rows=3, max_tokens=10_000))
    long = [[7] * 500, [1, 2], [1, 3]]
    assert [list(b) for b in plan_packed_micro_batches(long, max_rows=8, max_tokens=100)] == [[1, 2], [0]]


# -- the scorer in process -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grpo_rows() -> list[list[dict]]:
    """GRPO-shaped conversations: 3 prompts x 4 responses of mixed lengths (the benchmark's mix, small)."""
    return [row["messages"] for row in grpo_mix(3, group=4, prompt_words=60, seed=5)]


@pytest.mark.integration
def test_in_process_scores_are_the_models_own_forward_shared_or_not(tiny_rms, grpo_rows):
    folder = tiny_rms["llama3_1"]
    reference = TorchReference(folder)
    rows = [reference.ids(m) for m in grpo_rows]
    own = np.array([reference.score_ids(r) for r in rows])
    pad = reference.model.config.pad_token_id
    scores = {}
    for share in (True, False):
        scorer = PackedScorer(folder, pad_id=pad, share_prefixes=share)
        assert scorer.wrapped == ["q_proj", "o_proj", "mlp"]  # the last layer's token-wise parts, at reads only
        layout = scorer.layout(*right_pad(rows, 0))
        assert (layout.shared > 0) == share
        scores[share] = scorer(*right_pad(rows, 0)).reshape(-1).astype(np.float64)
        alone = np.array([scorer(*right_pad([r], 0))[0, 0] for r in rows], dtype=np.float64)
        assert parity_error(scores[share], own).max() <= FP32_BOUND
        assert parity_error(scores[share], alone).max() <= FP32_BOUND
    assert parity_error(scores[True], scores[False]).max() <= FP32_BOUND
    assert np.ptp(own) > 1e-3  # different answers, different scores


def test_a_model_without_decoder_layers_is_refused_by_name(assets, tmp_path):
    folder = build_tiny_model("llama3_1", tmp_path / "gpt2", backbone="gpt2", seed=1)
    with pytest.raises(PackedScorerUnsupported, match="GPT2Model has no `layers` list of decoder layers"):
        PackedScorer(folder, pad_id=None)


def test_compiled_layers_that_disagree_with_the_uncompiled_ones_are_not_used(tiny_rms, grpo_rows, monkeypatch):
    """The real case: torch's on-disk kernel cache written under ATEN_CPU_CAPABILITY=avx512 and read back under avx2
    scored NaN (docs/benchmarks.md). It needs a CPU with AVX-512 to cause, so here torch.compile hands back layers
    that answer NaN; the scorer notices on its warm-up batch, keeps the uncompiled layers and says why."""
    import torch

    class Broken(torch.nn.Module):
        def __init__(self, layer, **_):
            super().__init__()
            self.layer = layer

        def forward(self, *args, **kwargs):
            return self.layer(*args, **kwargs) * float("nan")

    monkeypatch.setattr(torch, "compile", Broken)
    monkeypatch.delenv(NO_COMPILE_ENV)  # the suite's pin to uncompiled layers: this test asks for compiled ones
    folder = tiny_rms["llama3_1"]
    reference = TorchReference(folder)
    rows = [reference.ids(m) for m in grpo_rows[:4]]
    lines = []
    scorer = PackedScorer(folder, pad_id=reference.model.config.pad_token_id, compile=True, log=lines.append)
    assert not scorer.compiled
    assert any("the compiled layers score nan (relative) away from the uncompiled ones" in line
               and line.endswith("the layers run uncompiled") for line in lines), lines
    scores = scorer(*right_pad(rows, 0)).reshape(-1).astype(np.float64)
    assert parity_error(scores, np.array([reference.score_ids(r) for r in rows])).max() <= FP32_BOUND


# -- served over gRPC ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed_repo(tiny_rms, tmp_path_factory):
    """One tiny RM exported as `templar export` does by default (packed scorer, compiled layers), again with prefix
    sharing off, and a GPT-2 RM the packed scorer cannot run."""
    repo = tmp_path_factory.mktemp("packed") / "model_repository"
    served = dataclasses.replace(TEST_SETTINGS, packed_compile=True)
    logs: list[str] = []
    reports = {"rm_packed": export(tiny_rms["llama3_1"], "rm_packed", repo, settings=served),
               # uncompiled: one compile per server start is the test's (two at once doubled its time and memory)
               "rm_unshared": export(tiny_rms["llama3_1"], "rm_unshared", repo,
                                     settings=dataclasses.replace(TEST_SETTINGS, prefix_sharing=False))}
    gpt2 = build_tiny_model("llama3_1", tmp_path_factory.mktemp("gpt2") / "rm", backbone="gpt2", seed=1)
    from templar.export.exporter import ExportOptions, export_reward_model

    reports["rm_gpt2"] = export_reward_model(ExportOptions(model=gpt2, name="rm_gpt2", repo=repo, max_length=1024,
                                                           settings=served), log=logs.append)
    return repo, reports, "\n".join(logs), {"rm_packed": tiny_rms["llama3_1"], "rm_gpt2": gpt2}


def counters(metrics_url: str, model: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        for name in (METRIC_TOKENS, METRIC_SLOTS, METRIC_SHARED):
            if line.startswith(name + "{") and f'model="{model}"' in line:
                values[name] = float(line.rsplit(" ", 1)[1])
    return values


@pytest.mark.integration
def test_served_packed_scores_are_the_models_own_forward_and_share_each_prompt(packed_repo, grpo_rows, monkeypatch):
    """GRPO-shaped rows over real gRPC: the compiled packed scorer gives the model's own forward within the fp32
    bound, in one request, row by row, and with prefix sharing off; the entry counts what sharing saved."""
    monkeypatch.delenv(NO_COMPILE_ENV)  # served as deployed: compiled (the rest of the suite runs uncompiled)
    repo, reports, _, models = packed_repo
    assert float(reports["rm_packed"].parameters["packed_max_abs_diff"]) <= FP32_BOUND  # the export's own check
    embedded = read_parameters(repo / contract.scoring_model_name("rm_packed") / "configs" / "embedded.pbtxt")
    assert embedded["cpu_runtime"] == "torch" and embedded["packed_compile"] == "1"
    entry = read_parameters(repo / "rm_packed" / "configs" / "embedded.pbtxt")
    assert entry[contract.PARAM_SCORER_PACKING] == "prefix"
    assert read_parameters(repo / "rm_packed" / "config.pbtxt")[contract.PARAM_SCORER_PACKING] == "padded"  # GPU
    reference = TorchReference(models["rm_packed"])
    own = np.array([reference.score(m) for m in grpo_rows])
    with running(repo) as server:
        scores = {}
        for name in ("rm_packed", "rm_unshared"):
            before = counters(server.metrics_url, name)
            # one GRPO group per request, one request at a time: each group is a dynamic batch of its own
            config = RewardClientConfig(model=name, endpoints=[server.grpc_url], rows_per_request=4, max_in_flight=1)
            with RewardClient(config) as client:
                result = client.score(grpo_rows)
                assert result.status == ["ok"] * len(grpo_rows)
                scores[name] = result.scores.astype(np.float64)
                alone = np.array([client.score([m]).scores[0] for m in grpo_rows[:4]], dtype=np.float64)
            after = counters(server.metrics_url, name)
            delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            ids = [reference.ids(m) for m in grpo_rows]
            tokens = sum(map(len, ids)) + sum(map(len, ids[:4]))
            assert delta[METRIC_TOKENS] == tokens
            assert delta[METRIC_SLOTS] + delta[METRIC_SHARED] == tokens  # no padding: computed + shared = all
            # shared on: every prefix two rows of a group share computed once (a trie of the group's rows: in sorted
            # order each row shares its common prefix with the row before), at least the prompt 3 times a group
            groups = [sorted(ids[g:g + 4]) for g in range(0, len(ids), 4)]
            trie = sum(len(os.path.commonprefix([a, b])) for group in groups for a, b in zip(group, group[1:]))
            assert trie >= 3 * sum(len(os.path.commonprefix(group)) for group in groups) > 0
            assert delta[METRIC_SHARED] == (trie if name == "rm_packed" else 0)
            assert parity_error(scores[name][:4], alone).max() <= FP32_BOUND
        log = server.log_path.read_text(errors="replace")
    for name in ("rm_packed", "rm_unshared"):
        assert parity_error(scores[name], own).max() <= FP32_BOUND, name
    assert "rm_packed_model: decoder layers compiled (torch.compile)" in log
    assert "rm_packed_model: scoring in fp32 on torch" in log and "compiled layers" in log


@pytest.mark.integration
def test_a_model_the_packed_scorer_cannot_run_is_served_by_onnxruntime_and_the_export_says_why(packed_repo):
    repo, reports, log, models = packed_repo
    assert "CPU runtime onnxruntime: the packed scorer cannot run it (GPT2Model has no `layers` list" in log
    embedded = read_parameters(repo / contract.scoring_model_name("rm_gpt2") / "configs" / "embedded.pbtxt")
    assert embedded["cpu_runtime"] == "onnxruntime"
    assert read_parameters(repo / "rm_gpt2" / "configs" / "embedded.pbtxt")[contract.PARAM_SCORER_PACKING] == "padded"
    assert not (repo / contract.scoring_model_name("rm_gpt2") / "1" / "hf").exists()
    reference = TorchReference(models["rm_gpt2"])
    conversations = [[{"role": "user", "content": "Tell me about the rain."},
                      {"role": "assistant", "content": "It falls. " * n}] for n in (1, 5, 30)]
    with running(repo) as server, \
            RewardClient(RewardClientConfig(model="rm_gpt2", endpoints=[server.grpc_url])) as client:
        result = client.score(conversations)
    own = np.array([reference.score(m) for m in conversations])
    assert result.status == ["ok"] * 3 and parity_error(result.scores, own).max() <= FP32_BOUND
    assert contract.PARAM_PACKED_LOAD not in embedded  # nothing for a packed scorer to load
