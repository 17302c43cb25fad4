"""Faults in serving, with real processes and real signals: tritonserver SIGKILLed during training (the supervisor
restarts it on the same ports), a Python-backend stub SIGKILLed (Triton does not recover it; the supervisor restarts
the server), and a replica that hangs (SIGSTOP) among two (deadlines hold, traffic moves, it is used again after
SIGCONT). The figures (rows lost, steps affected, restart times) are printed: run with -s to see them."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import tritonclient.grpc as grpcclient

from templar.server.embedded import EmbeddedTriton
from templar.server.ports import free_server_ports
from templar.reward_client import RewardClient, RewardClientConfig
from templar.samples import sample_conversations
from templar.server.supervisor import RestartPolicy, SupervisedTriton, stub_processes
from templar.trainer.metrics import read_metrics
from templar.trainer.reward_server import EVENTS_FILE

from conftest import running
from test_trainer import metric_steps, small_run, start_train, wait_until

pytestmark = pytest.mark.integration  # starts Triton, runs the trainer


def rows(n: int) -> list[list[dict]]:
    cases = list(sample_conversations(long_words=20).values())
    return [cases[i % len(cases)] for i in range(n)]


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def embedded_server(run: psutil.Popen | int) -> psutil.Process | None:
    """The tritonserver a training run started (a child of the trainer process)."""
    pid = run if isinstance(run, int) else run.pid
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if child.name() == "tritonserver" and child.status() != psutil.STATUS_ZOMBIE:
                return child
        except psutil.Error:
            continue
    return None


def restarted(path: Path, count: int) -> bool:
    return sum(e["kind"] == "restarted" for e in events(path)) >= count


def kill_after_a_step(run, out: Path, kills: int) -> int:
    """Once one more step has completed, SIGKILL the run's tritonserver (alone, as the OOM killer would: its stubs
    are orphaned) and wait until the supervisor has restarted it for the `kills`-th time. Returns the server's pid."""
    target = max(2, len(metric_steps(out)) + 1)
    wait_until(lambda: len(metric_steps(out)) >= target, timeout=600, what=f"a step before kill {kills}")
    server = embedded_server(run)
    assert server is not None
    os.kill(server.pid, signal.SIGKILL)
    print(f"\nkill {kills}: tritonserver {server.pid} after step {len(metric_steps(out))}")
    wait_until(lambda: restarted(out / EVENTS_FILE, kills) or run.poll() is not None, timeout=300,
               what=f"restart {kills}")
    return server.pid


def test_training_rides_through_two_sigkills_of_the_embedded_server(small_repo, tiny_actor, tmp_path):
    """The embedded default (no reward.url): the trainer's supervised server is SIGKILLed twice mid-run. Every step
    completes; the rows lost and the steps affected are reported from metrics.jsonl."""
    out, steps = tmp_path / "run", 12
    run = start_train(*small_run(out, tiny_actor, None, f"reward.repo={small_repo}",
                                 "reward.models=[{name: rm_small}]", steps=steps))
    try:
        first = kill_after_a_step(run, out, 1)
        assert kill_after_a_step(run, out, 2) != first  # the second kill hit the restarted server
        _, stderr = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, stderr[-3000:]
    metrics = read_metrics(out / "metrics.jsonl")
    failed = {row["step"]: row["failed_rows"] for row in metrics}
    affected = [step for step, n in failed.items() if n]
    log = events(out / EVENTS_FILE)
    down = [round(e["down_s"], 1) for e in log if e["kind"] == "restarted"]
    print(f"\n{steps} steps, 2 SIGKILLs: failed rows per step {failed}; rows lost {sum(failed.values())} "
          f"of {4 * steps}; steps affected {affected}; restarts took {down} s (from the crash seen to serving again)")
    assert [row["step"] for row in metrics] == list(range(1, steps + 1))  # every step ran, once
    assert [e["kind"] for e in log] == ["server_died", "restarted"] * 2
    assert all("killed by SIGKILL" in e["detail"] for e in log if e["kind"] == "server_died")
    assert len(affected) <= 4 and failed[steps] == 0  # at most two steps per kill; the end is clean again
    unscored = out / "unscored.rank0.jsonl"  # the rows lost are kept for re-scoring, each with why
    assert len(unscored.read_text().splitlines() if unscored.exists() else []) == sum(failed.values())
    assert json.loads((out / "summary.json").read_text())["completed"]
    train_log = (out / "train.log").read_text()
    assert train_log.count("restarting it on the same ports") == 2 and "restart(s) during the run" in train_log
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(small_repo) in " ".join(p.info["cmdline"] or [])
                and p.info["cmdline"][0].endswith("tritonserver")]  # nothing left running


def score_until_clean(client: RewardClient, supervisor: SupervisedTriton, restarts: int,
                      timeout_s: float = 120) -> tuple[int, int]:
    """Score 4 rows at a time until a call comes back clean from the restarted server: (rows lost, calls)."""
    lost = calls = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = client.score(rows(4))
        calls += 1
        lost += result.failed_rows
        if supervisor.restarts >= restarts and result.failed_rows == 0:
            return lost, calls
    raise AssertionError(f"scoring did not recover within {timeout_s}s (restarts {supervisor.restarts})")


def test_a_killed_backend_stub_is_recovered_by_a_restart(small_repo, tmp_path):
    """Triton 2.51 leaves a SIGKILLed Python-backend stub dead (its model still READY, every request failing); the
    supervisor sees the dead stub and restarts the server. Each of the three stubs of an RM, in turn."""
    supervisor = SupervisedTriton(EmbeddedTriton(small_repo, **free_server_ports(), log_file=tmp_path / "triton.log"),
                                  RestartPolicy(backoff_initial_s=0.5), events_path=tmp_path / "events.jsonl").start()
    config = RewardClientConfig(model="rm_small", endpoints=[supervisor.grpc_url], rows_per_request=4,
                                request_timeout_s=30, max_attempts=60, backoff_max_s=1.0)
    figures = {}
    try:
        with RewardClient(config) as client:
            assert client.score(rows(4)).failed_rows == 0
            for n, model in enumerate(("rm_small_preprocess", "rm_small_model", "rm_small"), start=1):
                live, zombies = stub_processes(supervisor.server.process.pid)
                assert sorted(live.values()) == ["rm_small", "rm_small_model", "rm_small_preprocess"] and not zombies
                os.kill(next(pid for pid, name in live.items() if name == model), signal.SIGKILL)
                started = time.monotonic()
                lost, calls = score_until_clean(client, supervisor, n)
                figures[model] = (lost, calls, round(time.monotonic() - started, 1))
                assert supervisor.events[-2].kind == "stub_died" and model in supervisor.events[-2].detail
                assert lost <= 8, figures  # what was in flight before the dead stub was seen (polled every 0.5 s)
            after = client.score(rows(16))
        assert after.failed_rows == 0  # scoring works again
    finally:
        supervisor.stop()
    down = [round(e.down_s, 1) for e in supervisor.events if e.kind == "restarted"]
    print(f"\nstub SIGKILLed -> (rows lost, calls, seconds until a clean call): {figures}; restarts took {down} s")
    assert supervisor.restarts == 3 and not supervisor.gave_up
    assert [e["kind"] for e in events(tmp_path / "events.jsonl")] == ["stub_died", "restarted"] * 3


def test_the_supervisor_gives_up_after_too_many_restarts(small_repo, tmp_path, caplog):
    policy = RestartPolicy(backoff_initial_s=0.2, max_restarts=1, window_s=600)
    supervisor = SupervisedTriton(EmbeddedTriton(small_repo, **free_server_ports(), log_file=tmp_path / "triton.log"),
                                  policy).start()
    try:
        with caplog.at_level(logging.WARNING, logger="templar.server.supervisor"):
            first = supervisor.server.process.pid
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: supervisor.restarts == 1, timeout=300, what="the restart")
            assert supervisor.server.process.pid != first and supervisor.server.alive()
            os.kill(supervisor.server.process.pid, signal.SIGKILL)
            wait_until(lambda: supervisor.gave_up, timeout=60, what="giving up")
    finally:
        supervisor.stop()
    assert [e.kind for e in supervisor.events] == ["server_died", "restarted", "server_died", "gave_up"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "1 restart(s) within 600s; giving up" in errors[0], errors


def test_a_hung_replica_costs_deadlines_not_rows_and_is_used_again(small_repo):
    """Two replicas; one is frozen with SIGSTOP (its whole process group: server and stubs). No attempt waits past
    request_timeout_s, every row is scored by the healthy replica, and after SIGCONT the frozen one serves again."""
    timeout_s, cooldown_s = 3.0, 2.0
    with running(small_repo) as healthy, running(small_repo) as frozen:
        config = RewardClientConfig(model="rm_small", endpoints=[healthy.grpc_url, frozen.grpc_url],
                                    rows_per_request=4, max_in_flight=2, request_timeout_s=timeout_s,
                                    endpoint_cooldown_s=cooldown_s, max_attempts=4)
        stats = grpcclient.InferenceServerClient(healthy.grpc_url)
        scored_rows = lambda: int(stats.get_inference_statistics("rm_small", as_json=True)  # noqa: E731
                                  ["model_stats"][0].get("inference_count", 0))
        with RewardClient(config) as client:
            assert client.score(rows(8)).failed_rows == 0
            before, healthy_rows = client.endpoint_stats(), scored_rows()
            durations = []
            os.killpg(frozen.process.pid, signal.SIGSTOP)
            try:
                # until the frozen replica has been tried (and timed out) three times: after each cooldown it is
                # picked again
                until = time.monotonic() + 4 * (timeout_s + cooldown_s)
                while sum(d > timeout_s for d in durations) < 3 and time.monotonic() < until:
                    started = time.perf_counter()
                    result = client.score(rows(4))
                    durations.append(round(time.perf_counter() - started, 2))
                    assert result.failed_rows == 0, result.status
                    time.sleep(0.1)  # a caller with other work between calls
                during, healthy_delta = client.endpoint_stats(), scored_rows() - healthy_rows
            finally:
                os.killpg(frozen.process.pid, signal.SIGCONT)
            time.sleep(cooldown_s + 0.5)
            for _ in range(6):
                assert client.score(rows(4)).failed_rows == 0
            after = client.endpoint_stats()
    hung = frozen.grpc_url
    slow = [d for d in durations if d > timeout_s]
    print(f"\nwhile a replica was frozen: {len(durations)} score() calls, {len(slow)} met it first and took {slow} s, "
          f"the others at most {max(d for d in durations if d <= timeout_s)} s; per endpoint: before {before}, "
          f"frozen {during}, after SIGCONT {after}")
    assert len(slow) == 3  # it was tried again after each cooldown
    assert max(durations) <= timeout_s + 1.5  # one deadline on the frozen replica, then the healthy one answers
    assert len(durations) > len(slow) * 3  # between its tries, the calls went straight to the healthy replica
    assert during[hung]["answered"] == before[hung]["answered"]  # the frozen one answered nothing ...
    assert during[hung]["failed"] - before[hung]["failed"] == len(slow)  # ... each try there was one deadline
    assert healthy_delta == 4 * len(durations)  # every row of the frozen period was scored by the healthy replica
    assert after[hung]["answered"] > during[hung]["answered"]  # used again after SIGCONT and the cooldown
    assert after[hung]["outstanding"] == 0
