"""The trainer's reward client against real servers: splitting, deadlines, retries, fail-over, fingerprints."""

from __future__ import annotations

import dataclasses
import logging
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from templar import contract, wire
from templar.samples import sample_conversations
from templar.server.embedded import EmbeddedTriton
from templar.server.ports import free_port, free_server_ports
from templar.reward_client import FingerprintMismatchError, RewardClient, RewardClientConfig

from conftest import TEST_SETTINGS, export, running
from grpc_proxy import GatedTransport, GrpcProxy

pytestmark = pytest.mark.integration  # exports ONNX, starts Triton or runs the CLI


def rows(n: int) -> list[list[dict]]:
    cases = list(sample_conversations(long_words=120).values())
    return [cases[i % len(cases)] for i in range(n)]


def inference_count(server: EmbeddedTriton, model: str) -> int:
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0].get("inference_count", 0))


@pytest.fixture()
def pair(small_repo):
    """Two replicas of one RM, fresh for each test (a test may stop one)."""
    with running(small_repo) as a, running(small_repo) as b:
        yield a, b


@pytest.fixture(scope="module")
def replica(small_repo):
    """One replica for the tests that only read from it."""
    with running(small_repo) as server:
        yield server


def test_scores_are_split_into_bounded_requests(triton, references):
    config = RewardClientConfig(model="rm_llama3_1", endpoints=[triton.grpc_url], rows_per_request=3, max_in_flight=2)
    conversations = rows(10)
    with RewardClient(config) as client:
        result = client.score(conversations)
        assert client.fingerprints[contract.PARAM_MAX_LENGTH] == "1024"
    assert result.status == ["ok"] * 10 and result.failed_rows == 0
    assert result.attempts == 4  # ceil(10 / 3) requests, no retries
    expected = [references["llama3_1"].score(m) for m in conversations]
    np.testing.assert_allclose(result.scores, expected, atol=1e-4)


def test_submit_returns_at_once_and_scores_in_the_background(triton):
    with RewardClient(RewardClientConfig(model="rm_gemma3", endpoints=[triton.grpc_url])) as client:
        client.connect()
        before = inference_count(triton, "rm_gemma3")
        future = client.submit(rows(64))
        assert not future.done()  # submit handed the work to the client's loop and returned
        result = future.result(timeout=300)
        assert inference_count(triton, "rm_gemma3") - before == 64  # ... which really scored every row
    assert result.failed_rows == 0 and len(result.scores) == 64


def test_deadline_exceeded_is_retried_then_reported(triton):
    """A deadline far below the work asked for: 32 long conversations (seconds of scoring on a CPU) in 50 ms."""
    config = RewardClientConfig(model="rm_qwen2_5", endpoints=[triton.grpc_url], request_timeout_s=0.05,
                                max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02, rows_per_request=32)
    long = sample_conversations(long_words=700)["long"]
    with RewardClient(config) as client:
        result = client.score([long] * 32)
    assert result.attempts == 3 and result.failed_rows == 32
    assert np.isnan(result.scores).all()
    assert all(s.startswith("error: reward request failed after 3 attempt(s): DEADLINE_EXCEEDED") for s in
               result.status)


def test_non_retryable_errors_are_not_retried(triton):
    # the scoring model has no CONVERSATION input: the server answers INVALID_ARGUMENT, which retrying cannot fix
    config = RewardClientConfig(model="rm_qwen2_5_model", endpoints=[triton.grpc_url], max_attempts=5)
    with RewardClient(config) as client:
        result = client.score(rows(2))
    assert result.attempts == 1 and result.failed_rows == 2
    assert "after 1 attempt(s): INVALID_ARGUMENT" in result.status[0]


def test_a_dead_server_costs_the_rows_not_the_caller():
    config = RewardClientConfig(model="rm_small", endpoints=[f"127.0.0.1:{free_port()}"], connect_timeout_s=1.0)
    with RewardClient(config) as client:
        result = client.score(rows(5))
    assert result.failed_rows == 5 and np.isnan(result.scores).all()
    assert "no reward endpoint serves model 'rm_small'" in result.status[0]


def counts_reaching(servers, each: list[int] | None = None, total: int | None = None,
                    timeout_s: float = 10.0) -> list[int]:
    """The servers' inference counts once they reach `each` (per server) or `total` (summed): a server's statistics
    take in a request just after it answered, so a count read at once can miss the last one."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = [inference_count(s, "rm_small") for s in servers]
        reached = (each is None or all(c >= e for c, e in zip(counts, each))) and \
            (total is None or sum(counts) >= total)
        if reached or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def test_least_outstanding_balancing_and_fail_over(pair):
    a, b = pair
    config = RewardClientConfig(model="rm_small", endpoints=[a.grpc_url, b.grpc_url], rows_per_request=2,
                                max_in_flight=4, endpoint_cooldown_s=30)
    before = [inference_count(s, "rm_small") for s in pair]
    for server in pair:  # a replica's first requests pay its warm-up: measure the split between warm replicas
        with RewardClient(RewardClientConfig(model="rm_small", endpoints=[server.grpc_url])) as warm:
            warm.score(rows(4))
    before = counts_reaching(pair, [n + 4 for n in before])  # Triton counts a request just after answering it
    with RewardClient(config) as client:
        result = client.score(rows(48))
        assert result.failed_rows == 0
        after = counts_reaching(pair, total=sum(before) + 48)
        shares = [n - m for n, m in zip(after, before)]
        assert sum(shares) == 48 and min(shares) >= 12, f"both replicas should share the load: {shares}"
        a.stop()  # one replica goes away
        started = time.perf_counter()
        result = client.score(rows(16))
        elapsed = time.perf_counter() - started
    assert result.failed_rows == 0, result.status
    expected = RewardClient(RewardClientConfig(model="rm_small", endpoints=[b.grpc_url])).score(rows(16)).scores
    np.testing.assert_allclose(result.scores, expected, atol=1e-6)
    assert elapsed < 15, "fail-over should not wait out long backoffs"


def test_retries_ride_through_a_server_restart(small_repo):
    ports = free_server_ports()
    config = RewardClientConfig(model="rm_small", endpoints=[f"127.0.0.1:{ports['grpc_port']}"], max_attempts=60,
                                backoff_base_s=0.2, backoff_max_s=1.0, request_timeout_s=30, rows_per_request=4)
    server = EmbeddedTriton(small_repo, **ports).start()
    with RewardClient(config) as client:
        baseline = client.score(rows(8))
        assert baseline.failed_rows == 0
        server.stop()
        future = client.submit(rows(8))  # sent while nothing listens
        time.sleep(2)
        assert not future.done()
        restarted = EmbeddedTriton(small_repo, **ports).start()
        try:
            result = future.result(timeout=300)
        finally:
            restarted.stop()
    assert result.failed_rows == 0 and result.attempts > 2  # two requests, retried until the server was back
    np.testing.assert_allclose(result.scores, baseline.scores, atol=1e-6)


def test_replicas_serving_different_rms_are_refused(replica, tiny_rms, tmp_path):
    other = tmp_path / "model_repository"
    export(tiny_rms["gemma3"], "rm_small", other)  # same name, another template and tokenizer
    live = replica
    with running(other) as impostor:
        with RewardClient(RewardClientConfig(model="rm_small", endpoints=[live.grpc_url, impostor.grpc_url])) as c:
            with pytest.raises(FingerprintMismatchError, match="serve different versions"):
                c.connect()
    expected = {contract.PARAM_TEMPLATE_SHA256: "0" * 64}
    with RewardClient(RewardClientConfig(model="rm_small", endpoints=[live.grpc_url],
                                         expected_fingerprints=expected)) as client:
        with pytest.raises(FingerprintMismatchError, match="expected '0000"):
            client.score(rows(1))


def test_max_in_flight_is_honoured_at_the_server(replica):
    """Counted where it matters: concurrent ModelInfer calls arriving at a gRPC proxy in front of the server."""
    for limit in (1, 3):
        with GrpcProxy(replica.grpc_url) as proxy:
            config = RewardClientConfig(model="rm_small", endpoints=[proxy.url], rows_per_request=2,
                                        max_in_flight=limit)
            with RewardClient(config) as client:
                result = client.score(rows(24))
        assert result.failed_rows == 0 and proxy.infer_calls == 12
        assert proxy.max_in_flight == limit, (limit, proxy.max_in_flight)  # reached, never exceeded


def test_resource_exhausted_is_retried(replica):
    """A rate-limiting gateway answers RESOURCE_EXHAUSTED to the first calls; the client backs off and retries."""
    with GrpcProxy(replica.grpc_url, reject_first=3, reject_code=grpc.StatusCode.RESOURCE_EXHAUSTED) as proxy:
        config = RewardClientConfig(model="rm_small", endpoints=[proxy.url], rows_per_request=4, max_attempts=5,
                                    backoff_base_s=0.01, backoff_max_s=0.05)
        with RewardClient(config) as client:
            result = client.score(rows(4))
    assert result.failed_rows == 0 and proxy.rejected == 3 and result.attempts == 4
    # a server that sheds load is alive: its refusals do not use up max_attempts, they are retried (after a wait)
    # until the request's deadline
    with GrpcProxy(replica.grpc_url, reject_first=10, reject_code=grpc.StatusCode.RESOURCE_EXHAUSTED) as proxy:
        config = RewardClientConfig(model="rm_small", endpoints=[proxy.url], max_attempts=2, backoff_base_s=0.01,
                                    backoff_max_s=0.05)
        with RewardClient(config) as client:
            result = client.score(rows(3))
    assert result.failed_rows == 0 and proxy.rejected == 10 and result.attempts == 11
    with GrpcProxy(replica.grpc_url, reject_first=10**6, reject_code=grpc.StatusCode.RESOURCE_EXHAUSTED) as proxy:
        config = RewardClientConfig(model="rm_small", endpoints=[proxy.url], max_attempts=2, backoff_base_s=0.01,
                                    backoff_max_s=0.05, request_timeout_s=1.0)
        with RewardClient(config) as client:
            started = time.monotonic()
            result = client.score(rows(3))
    assert result.failed_rows == 3 and "RESOURCE_EXHAUSTED" in result.status[0]
    assert 1.0 <= time.monotonic() - started < 3.0 and result.attempts > 2


def test_a_transport_plugs_into_the_client(replica):
    """The transport seam: a transport wrapped around the gRPC one sees every call; the client's in-flight limit and
    its retries of a refusal (a TransportError naming RESOURCE_EXHAUSTED) hold through it as through the proxy."""
    gates: list[GatedTransport] = []

    def gated(url: str) -> GatedTransport:
        gates.append(GatedTransport(wire.GrpcTransport(url), reject_first=3))
        return gates[-1]

    config = RewardClientConfig(model="rm_small", endpoints=[replica.grpc_url], rows_per_request=2, max_in_flight=3,
                                max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.05)
    with RewardClient(config, transport=gated) as client:
        result = client.score(rows(24))
    with RewardClient(RewardClientConfig(model="rm_small", endpoints=[replica.grpc_url])) as direct:
        expected = direct.score(rows(24))
    (gate,) = gates
    assert result.failed_rows == 0 and gate.rejected == 3 and result.attempts == 12 + 3
    assert gate.infer_calls == 15 and 1 <= gate.max_in_flight <= 3  # the window, halved by the refusals at most
    np.testing.assert_allclose(result.scores, expected.scores, atol=1e-6)
    assert result.model_versions == {"1": 24}


def test_rows_per_request_is_capped_at_the_models_max_batch_size(tiny_rms, tmp_path):
    repo = tmp_path / "model_repository"
    export(tiny_rms["llama3_1"], "rm_b4", repo, settings=dataclasses.replace(TEST_SETTINGS, max_batch_size=4))
    with running(repo) as server:
        before = request_count(server, "rm_b4")
        with RewardClient(RewardClientConfig(model="rm_b4", endpoints=[server.grpc_url], rows_per_request=32)) as c:
            result = c.score(rows(10))
            assert c.max_batch_size == 4
        assert request_count(server, "rm_b4") - before == 3  # 4 + 4 + 2 rows, none refused for its size
    assert result.failed_rows == 0 and result.attempts == 3


def test_empty_input_sends_nothing(replica):
    before = request_count(replica, "rm_small")
    with RewardClient(RewardClientConfig(model="rm_small", endpoints=[replica.grpc_url])) as client:
        result = client.score([])
    assert len(result.scores) == 0 and result.status == [] and result.attempts == 0
    assert request_count(replica, "rm_small") == before


def test_connect_with_one_replica_down(replica, caplog):
    dead = f"127.0.0.1:{free_port()}"
    config = RewardClientConfig(model="rm_small", endpoints=[dead, replica.grpc_url], connect_timeout_s=2.0,
                                rows_per_request=2)
    with caplog.at_level(logging.WARNING, logger="templar.reward_client"), RewardClient(config) as client:
        fingerprints = client.connect()
        result = client.score(rows(8))
    assert fingerprints[contract.PARAM_MAX_LENGTH] == "1024" and result.failed_rows == 0
    assert any(dead in r.getMessage() and "not answering" in r.getMessage() for r in caplog.records)


def request_count(server: EmbeddedTriton, model: str) -> int:
    """Requests the model answered (not rows): Triton's success count."""
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0]["inference_stats"].get("success", {}).get("count", 0))


def test_an_ensemble_waits_for_its_rms_together():
    """No server at the endpoint: three RMs cost one connect timeout, not three (the gateway and the trainer wait
    for their RMs this way at start), and the error names the endpoint."""
    from templar.errors import TemplarError
    from templar.reward_ensemble import RewardEnsemble, WeightedModel

    options = RewardClientConfig(endpoints=[f"127.0.0.1:{free_port()}"], connect_timeout_s=2.0)
    ensemble = RewardEnsemble([WeightedModel(name, 1.0) for name in ("rm_a", "rm_b", "rm_c")], options)
    started = time.monotonic()
    try:
        with pytest.raises(TemplarError, match=options.endpoints[0]):
            ensemble.connect()
    finally:
        ensemble.close()
    assert 2.0 <= time.monotonic() - started < 4.0
