"""Hostile input against a real server over real gRPC: a campaign of 10,000 rows (a third good, scattered among
hostile ones) in requests of mixed sizes, and hostile requests (wrong dtype or shape, empty, unknown model, far past
the limits). Every row is answered as it is when sent alone, no request fails as a whole, the server stays ready."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import InferInput

from templar import contract, wire
from templar.conversation import RESERVED_TEMPLATE_KWARGS
from templar.reward_client import RewardClientConfig
from templar.tools.hostile import (EXPENSIVE_BYTES, good_rows, hostile_rows, plan_requests, process_tree_rss_mib,
                                   run_campaign)

from conftest import running

pytestmark = pytest.mark.integration  # starts Triton

LLAMA3_CONTROL = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


@pytest.fixture(scope="module")
def server(small_repo):
    with running(small_repo) as server:
        yield server


def test_the_generator_covers_what_the_issue_lists():
    kinds = {row.kind for row in hostile_rows(LLAMA3_CONTROL)}
    for needed in ("not_json", "empty", "invalid_utf8", "lone_surrogate:escaped", "nested_100k:messages",
                   "content:megabyte", "content:over_limit", "messages:5000", "nul_bytes", "control_tokens",
                   "jinja_in_content", "override:messages", "override:bos_token", "override:add_generation_prompt",
                   "no_assistant_turn", "assistant_only"):
        assert needed in kinds
    for level in ("row", "messages", "message", "role", "content", "tools", "template_kwargs"):
        assert any(kind.startswith(f"{level}:") for kind in kinds), level
    assert {k.split(":")[1] for k in kinds if k.startswith("override:")} <= RESERVED_TEMPLATE_KWARGS
    requests = plan_requests(good_rows(), hostile_rows(), 3000, random.Random(0))
    rows = [row for request in requests for row in request]
    assert len(rows) == 3000 and max(map(len, requests)) <= 256
    big = [row for row in rows if len(row.data) > EXPENSIVE_BYTES]
    assert 0 < len(big) <= 5 * sum(len(r.data) > EXPENSIVE_BYTES for r in hostile_rows())
    assert 0.25 < sum(r.kind.startswith("good:") for r in rows) / len(rows) < 0.4


def test_a_10k_row_campaign_answers_every_row_as_it_is_alone(server, capsys):
    rss = lambda: process_tree_rss_mib(server.process.pid)  # noqa: E731
    options = RewardClientConfig("rm_small", [server.grpc_url], request_timeout_s=300)
    warmup = run_campaign(options, total_rows=2000, seed=1, control_tokens=LLAMA3_CONTROL)
    assert warmup.holds, warmup.examples
    report = run_campaign(options, total_rows=10_000, seed=0, control_tokens=LLAMA3_CONTROL,
                          rss_mib=rss)
    with capsys.disabled():
        print(f"\ncampaign: {report.rows} rows ({report.good_rows} good, {report.hostile_rows} hostile of "
              f"{report.hostile_kinds} kinds: {report.hostile_scored} still valid and scored, {report.hostile_refused} "
              f"refused per row) in {report.requests} requests {report.request_sizes}, {report.seconds:.1f}s; "
              f"failed requests {report.requests_failed}, mismatched rows {report.rows_mismatched}, max |d| "
              f"{report.max_score_diff:.1e}; server RSS {report.rss_mib_before:.0f} -> {report.rss_mib_after:.0f} MiB")
    assert report.rows == 10_000 and 3000 < report.good_rows < 3700
    assert report.requests_failed == 0 and report.rows_mismatched == 0, report.examples
    assert report.server_ready_after
    assert report.hostile_scored > 0 and report.hostile_refused > report.hostile_scored
    assert set(report.request_sizes) == {"1", "2-8", "9-64", "65+"}
    assert report.rss_mib_after - report.rss_mib_before < 64  # after the warm-up, memory stays where it was


def call(client, model: str, inputs, timeout_s: float = 120) -> tuple[str, float]:
    """('ok', seconds) or (the gRPC error, seconds): never a hang (the client deadline bounds it)."""
    started = time.perf_counter()
    try:
        client.infer(model, inputs, outputs=wire.requested_outputs(), client_timeout=timeout_s)
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - the error is what the test reads
        outcome = str(exc)
    return outcome, time.perf_counter() - started


def tensor(name: str, data: np.ndarray, dtype: str) -> InferInput:
    t = InferInput(name, list(data.shape), dtype)
    t.set_data_from_numpy(data)
    return t


def test_hostile_requests_get_a_clear_error_or_an_answer(server):
    client = grpcclient.InferenceServerClient(server.grpc_url, channel_args=wire.channel_args())
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    one = contract.encode_strings([good])
    big_row = json.dumps({"messages": [{"role": "user", "content": "x" * 1_500_000},
                                       {"role": "assistant", "content": "ok"}]}).encode()
    cases = {
        "wrong dtype": ("rm_small", [tensor(contract.CONVERSATION, np.array([[1]], np.int32), "INT32")],
                        "data-type is 'INT32', but model 'rm_small' expects 'BYTES'"),
        "wrong shape": ("rm_small", [tensor(contract.CONVERSATION, np.array([[good.encode()] * 2], object), "BYTES")],
                        "unexpected shape for input 'CONVERSATION'"),
        "wrong input name": ("rm_small", [tensor("PROMPT", one, "BYTES")], "unexpected inference input"),
        "no input": ("rm_small", [], "missing required input(s) ['CONVERSATION']"),
        "unknown model": ("rm_nope", wire.conversation_inputs([good]), "unknown model: 'rm_nope'"),
        "3000 rows": ("rm_small", wire.conversation_inputs([good] * 3000), "batch-size must be <= 256"),
        "300 MB": ("rm_small", wire.conversation_inputs([big_row] * 200), "over the limit of 33554432 "
                   "(max_request_bytes)"),
    }
    for name, (model, inputs, expected) in cases.items():
        outcome, seconds = call(client, model, inputs)
        assert expected in outcome and ("INVALID_ARGUMENT" in outcome or "NOT_FOUND" in outcome), (name, outcome)
        assert seconds < 60, (name, seconds)
    empty = call(client, "rm_small", wire.conversation_inputs(contract.encode_strings([])))[0]
    assert "INVALID_ARGUMENT" in empty and "got 0" in empty, empty  # an empty batch: refused clearly
    # 20 rows of 1.5 MB (under the request limit): each row refused alone, the good row beside them scored
    result = wire.decode_entry(client.infer("rm_small", wire.conversation_inputs([big_row] * 20 + [good.encode()]),
                                            outputs=wire.requested_outputs()))
    assert all("over the limit of 1048576 (max_row_bytes)" in s for s in result.status[:20])
    assert result.status[20] == "ok" and np.isfinite(result.scores[20])
    assert client.is_server_ready() and client.is_model_ready("rm_small")
    assert server.alive()
