"""Overload: a server given more requests than it can take sheds them at once (a bounded queue: Triton's
default_queue_policy max_queue_size answers UNAVAILABLE "Exceeds maximum queue size") instead of queueing without
end, the load test reports it, and the reward client backs off (fewer in flight, a wait) until every row is scored."""

from __future__ import annotations

import dataclasses

import pytest

from templar.reward_client import RewardClient, RewardClientConfig
from templar.samples import sample_conversations
from templar.tools.loadtest import LoadTestOptions, run

from conftest import TEST_SETTINGS, export, running

pytestmark = pytest.mark.integration  # exports ONNX, starts Triton

QUEUE = 2


@pytest.fixture(scope="module")
def busy_repo(tiny_rms, tmp_path_factory):
    repo = tmp_path_factory.mktemp("overload") / "model_repository"
    export(tiny_rms["llama3_1"], "rm_busy", repo, settings=dataclasses.replace(TEST_SETTINGS, max_queue_size=QUEUE))
    assert f"default_queue_policy {{ max_queue_size: {QUEUE} }}" in (repo / "rm_busy" / "config.pbtxt").read_text()
    return repo


def test_a_full_queue_sheds_load_at_once_and_the_client_backs_off(busy_repo, tmp_path, capsys):
    with running(busy_repo) as server:
        target = RewardClientConfig("rm_busy", [server.grpc_url], rows_per_request=16, request_timeout_s=60.0)
        report = run(LoadTestOptions(client=target, concurrency=[32], duration_s=6.0, warmup_requests=0,
                                     out=tmp_path / "loadtest.json", quiet=True),
                     log=lambda _: None)
        (level,) = report["levels"]
        shed = level["errors"].get("UNAVAILABLE", 0)
        assert shed > 0 and level["ok_requests"] > 0, level
        assert "Exceeds maximum queue size" in level["error_examples"]["UNAVAILABLE"]
        assert set(level["errors"]) == {"UNAVAILABLE"} and level["row_errors"] == 0
        # refused at once, not after a wait in the queue: far faster than an answer
        assert level["error_latency_ms"]["p99"] < 0.25 * level["latency_ms"]["p50"]

        long_rows = [sample_conversations(long_words=200)["long"]] * (16 * 32)
        config = RewardClientConfig("rm_busy", [server.grpc_url], rows_per_request=16, max_in_flight=32)
        with RewardClient(config) as client:
            result = client.score(long_rows)
            window = client.window.size
    with capsys.disabled():
        print(f"\noverload (queue {QUEUE}, 32 in flight): load test {level['ok_requests']} answered, {shed} refused "
              f"in p99 {level['error_latency_ms']['p99']} ms (answered p50 {level['latency_ms']['p50']} ms); reward "
              f"client: {len(long_rows)} rows in 32 requests, {result.failed_rows} failed, {result.attempts} attempts, "
              f"window 32 -> {window:.1f}, {result.latency_s:.1f}s")
    assert result.failed_rows == 0  # every row scored in the end
    assert result.attempts > 32 and window < 32  # it was refused, and it slowed down
