"""Endpoint discovery for real: a DNS server on loopback (dnslib) that this test controls answers for one name with
the addresses of `templar serve` replicas (127.0.0.2, .3, .4, one gRPC port), first two, then three, then two again
(one SIGKILLed), then one (the other stopped with SIGTERM, as Kubernetes deletes a pod: Triton unloads its models
while it still takes calls); the reward client, pointed at `dns://<that server>/<name>:<port>`, scores under load the
whole time. No request may fail, the new replica must get requests within the re-resolution period, the killed one
none after the name drops it."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import numpy as np
import psutil
import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSServer

from templar import discovery, wire
from templar.errors import ConfigError
from templar.reward_client import RewardClient, RewardClientConfig
from templar.server.ports import free_port, port_available
from tests.test_serve_cli import ServeProcess

NAME = "templar-rm.templar.svc.cluster.local"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
REFRESH_S = 1.0
CONVERSATION = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}]


class Records(BaseResolver):
    """Answers A queries for NAME with whatever `addresses` holds now; every other name: NXDOMAIN."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.queries = 0

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        self.queries += 1
        if name != NAME:
            reply.header.rcode = 3
        elif request.q.qtype == QTYPE.A:
            for address in list(self.addresses):
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=1))
        return reply


@pytest.fixture()
def dns():
    records = Records()
    server = DNSServer(records, port=free_port(), address="127.0.0.1")
    server.start_thread()
    try:
        yield records, server.server.server_address[1]
    finally:
        server.stop()


def test_dns_targets_parse_resolve_and_name_what_is_wrong(dns):
    records, port = dns
    records.addresses = ["127.0.0.3", "127.0.0.2"]
    target = discovery.parse_dns_target(f"dns://127.0.0.1:{port}/{NAME}:8001")
    assert discovery.resolve(target) == ["127.0.0.2:8001", "127.0.0.3:8001"]
    assert wire.parse_endpoints(f"dns:///{NAME}:8001") == [f"dns:///{NAME}:8001"]
    assert discovery.resolve(discovery.parse_dns_target("dns:///localhost:8001")) \
        in (["127.0.0.1:8001"], ["127.0.0.1:8001", "[::1]:8001"])  # the system resolver
    records.addresses = []
    with pytest.raises(Exception, match="has no address"):
        discovery.resolve(target)
    for bad, reason in ((f"dns:///{NAME}", "no port"), ("dns:///:8001", "no host name"),
                        ("dns://127.0.0.1:99999/a:1", "is not a port number")):
        with pytest.raises(ConfigError, match=f"reward.url: .*{reason}"):
            wire.parse_endpoints(bad, "reward.url")


def _port_free_everywhere() -> int:
    while True:
        port = free_port()
        if all(port_available(host, port) for host in HOSTS):
            return port


def _ready(host: str, http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/ready", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _wait(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Load:
    """Scores batches of 8 conversations back to back in a thread, keeping every result."""

    def __init__(self, client: RewardClient) -> None:
        self.client, self.results, self.stop = client, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.results.append(self.client.score([CONVERSATION] * 8))

    def finish(self) -> list:
        self.stop.set()
        self.thread.join(timeout=120)
        return self.results


@pytest.fixture()
def replicas(small_repo):
    """`templar serve` on each of HOSTS (one port set for all), ready; stopped (SIGTERM) at the end."""
    ports = {kind: _port_free_everywhere() for kind in ("grpc", "http", "metrics")}
    started = {host: ServeProcess(small_repo, ports, extra=("--host", host, "--no-restart")) for host in HOSTS}
    try:
        for host, replica in started.items():
            replica.wait_for("Ctrl-C stops it.")
            assert _ready(host, ports["http"])
        yield ports, started
    finally:
        for replica in started.values():
            if replica.process.poll() is None:
                replica.process.send_signal(signal.SIGTERM)
        for replica in started.values():
            replica.process.wait(timeout=60)


def test_replicas_that_appear_get_requests_and_a_killed_one_stops_getting_them(replicas, dns):
    (ports, replicas), (records, dns_port) = replicas, dns
    url = lambda host: f"{host}:{ports['grpc']}"  # noqa: E731
    records.addresses = list(HOSTS[:2])
    config = RewardClientConfig("rm_small", [f"dns://127.0.0.1:{dns_port}/{NAME}:{ports['grpc']}"],
                                rows_per_request=2, max_in_flight=4, dns_refresh_s=REFRESH_S, endpoint_cooldown_s=1.0)
    with RewardClient(config) as client:
        expected = client.score([CONVERSATION]).scores[0]
        load = Load(client)
        answered = lambda host: client.endpoint_stats().get(url(host), {}).get("answered", 0)  # noqa: E731
        _wait(lambda: answered(HOSTS[0]) > 5 and answered(HOSTS[1]) > 5, 120, "both replicas to answer")
        assert url(HOSTS[2]) not in client.endpoint_stats()  # not behind the name yet: no request

        records.addresses = list(HOSTS)  # a third replica joins
        joined = _wait(lambda: answered(HOSTS[2]) > 0, 30, "the new replica to get requests")
        assert joined <= REFRESH_S + 2.0, f"the new replica got its first request {joined:.1f}s after it joined"

        killed = psutil.Process(replicas[HOSTS[1]].process.pid)
        for process in [*killed.children(recursive=True), killed]:  # tritonserver, its stubs, templar serve
            process.send_signal(signal.SIGKILL)
        replicas[HOSTS[1]].process.wait(timeout=30)
        records.addresses = [HOSTS[0], HOSTS[2]]  # ... and the name drops it, as a Service drops a dead pod
        _wait(lambda: url(HOSTS[1]) not in client.endpoint_stats(), 30, "the client to drop the killed replica")
        served, before = {h: answered(h) for h in (HOSTS[0], HOSTS[2])}, len(load.results)
        _wait(lambda: len(load.results) > before + 20, 120, "more load after the kill")
        results = load.finish()
        assert all(answered(h) > served[h] for h in served), (served, client.endpoint_stats())
        assert url(HOSTS[1]) not in client.endpoint_stats()

        load = Load(client)  # the pod of .4 is deleted: SIGTERM first, the name drops it a moment later
        replicas[HOSTS[2]].process.send_signal(signal.SIGTERM)
        time.sleep(REFRESH_S)
        records.addresses = [HOSTS[0]]
        replicas[HOSTS[2]].process.wait(timeout=60)
        before = len(load.results)
        _wait(lambda: len(load.results) > before + 10, 120, "more load after the stop")
        results += load.finish()
        assert list(client.endpoint_stats()) == [url(HOSTS[0])]
    failed = [s for r in results for s, ok in zip(r.status, r.ok) if not ok]
    assert not failed, f"{len(failed)} rows failed: {failed[:3]}"
    np.testing.assert_allclose(np.concatenate([r.scores for r in results]), expected, rtol=1e-6)  # one RM everywhere
    changes = client.endpoint_changes
    assert any(url(HOSTS[2]) in c["added"] for c in changes)
    assert any(url(HOSTS[1]) in c["removed"] for c in changes)
    assert all(url(HOSTS[1]) not in c["added"] for c in changes[1:])  # never brought back
