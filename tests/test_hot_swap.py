"""Hot swap: `templar export --version N` writes a new version beside the served one and `templar reload` swaps to it
under a running `templar loadtest` with no failed request, then unloads the old version. A real embedded Triton with
model control, real gRPC clients, real exports of two different RMs (other weights and a fixed template)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from templar import contract, wire
from templar.cli import main as cli
from templar.conversation import conversation_rows
from templar.server.embedded import ADMIN_KEY_ENV, die_with_parent
from templar.errors import ExportError
from templar.export.repository import check_version, read_parameters
from templar.server.hot_swap import ModelControl, ReloadOptions, reload_model, with_versions
from templar.reward_client import RewardClientConfig
from templar.samples import sample_conversations
from templar.tiny_models import build_tiny_model
from templar.tools.loadtest import LoadTestOptions, run

from conftest import TorchReference, export, running

pytestmark = pytest.mark.integration  # exports RMs and starts Triton

ADMIN_KEY = "hot-swap-admin-key-0123456789"
# the whitespace row tells the two templates apart: a row tokenized by one export and scored by the other would match
# neither export's score
CONVERSATIONS = [sample_conversations()[k] for k in ("single_turn", "multi_turn", "whitespace")]
LOADTEST_S = 60.0  # long enough to span the export of version 2 and the reload on a busy 2-core machine


@pytest.fixture(scope="module")
def two_rms(assets, tmp_path_factory) -> tuple[Path, Path]:
    """Two different RMs on the same real tokenizer: the one served first, the re-trained one."""
    root = tmp_path_factory.mktemp("hot_swap_rms")
    return (build_tiny_model("llama3_1", root / "old", kind="reward", seed=21),
            build_tiny_model("llama3_1", root / "new", kind="reward", seed=22))


def score(url: str, model: str) -> tuple[list[float], str]:
    """The scores of CONVERSATIONS and the model_version Triton says answered."""
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(model, wire.conversation_inputs(conversation_rows(CONVERSATIONS)),
                              outputs=wire.requested_outputs(), client_timeout=60)
    finally:
        client.close()
    return wire.decode_entry(result).scores.tolist(), result.get_response().model_version


def served_parameters(url: str, model: str) -> dict[str, str]:
    client = grpcclient.InferenceServerClient(url)
    try:
        params = client.get_model_config(model, as_json=True)["config"]["parameters"]
    finally:
        client.close()
    return {key: value["string_value"] for key, value in params.items()}


class Probe(threading.Thread):
    """One request after another, each recorded with its time, the version that answered and its scores."""

    def __init__(self, url: str, model: str) -> None:
        super().__init__(daemon=True)
        self.url, self.model = url, model
        self.records: list[tuple[float, float, str, list[float] | str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                scores, version = score(self.url, self.model)
                self.records.append((started, time.monotonic(), version, scores))
            except Exception as exc:  # noqa: BLE001 - a failed request is what the test counts
                self.records.append((started, time.monotonic(), "failed", str(exc)))


class LoadTest(threading.Thread):
    """`templar loadtest` (its run()) at concurrency 4, noting its progress lines to count requests over time."""

    def __init__(self, url: str, out: Path) -> None:
        super().__init__(daemon=True)
        self.opts = LoadTestOptions(client=RewardClientConfig("rm", [url], rows_per_request=8, request_timeout_s=60.0),
                                    concurrency=[4], duration_s=LOADTEST_S, out=out, warmup_requests=0)
        self.progress: list[tuple[float, int]] = [(time.monotonic(), 0)]
        self.report: dict | None = None

    def run(self) -> None:
        self.report = run(self.opts, log=self.note)

    def note(self, line: str) -> None:
        found = re.search(r"\s(\d+) requests$", line)
        if found:
            self.progress.append((time.monotonic(), int(found.group(1))))

    def requests_between(self, start: float, end: float) -> int:
        """Requests answered between two moments, at the 2 s resolution of the progress lines (an upper bound)."""
        before = max((n for t, n in self.progress if t <= start), default=0)
        after = min((n for t, n in self.progress if t >= end), default=self.progress[-1][1])
        return after - before


def check_scores(records, expected: dict[str, list[float]]) -> None:
    """Every answer is wholly one export's: its scores are those of the version that answered."""
    for _, _, version, scores in records:
        assert version in expected, (version, scores)
        np.testing.assert_allclose(scores, expected[version], atol=1e-4, rtol=0, err_msg=f"version {version}")


def test_hot_swap_under_load(two_rms, tmp_path):
    old_rm, new_rm = two_rms
    repo = tmp_path / "model_repository"
    export(old_rm, "rm", repo)
    fixed = tmp_path / "fixed.jinja"  # the "fixed template" of the re-export: content no longer trimmed
    fixed.write_text((old_rm / "chat_template.jinja").read_text().replace("| trim", ""))
    expected = {"1": [TorchReference(old_rm).score(m) for m in CONVERSATIONS],
                "2": [TorchReference(new_rm, chat_template=fixed.read_text()).score(m) for m in CONVERSATIONS]}
    with running(repo, model_control=True, admin_key=ADMIN_KEY) as server:
        before = served_parameters(server.grpc_url, "rm")
        load, probe = LoadTest(server.grpc_url, tmp_path / "loadtest.json"), Probe(server.grpc_url, "rm")
        load.start()
        probe.start()
        time.sleep(3)
        export_started = time.monotonic()
        export(new_rm, "rm", repo, version=2, chat_template=fixed)
        started = time.monotonic()
        reload = subprocess.run([sys.executable, "-m", "templar.cli", "reload", "--model", "rm", "--url",
                                 server.grpc_url, "--repo", str(repo)], capture_output=True, text=True, timeout=600,
                                env={**os.environ, ADMIN_KEY_ENV: ADMIN_KEY})
        ended = time.monotonic()
        assert reload.returncode == 0, reload.stderr
        time.sleep(2)
        probe.stop.set()
        probe.join(timeout=120)
        load.join(timeout=LOADTEST_S + 120)
        after = served_parameters(server.grpc_url, "rm")
        preprocess = served_parameters(server.grpc_url, "rm_preprocess")
        index = {(m["name"], m["version"]): m["state"] for m in server.repository_index()}
        refused = subprocess.run([sys.executable, "-m", "templar.cli", "reload", "--model", "rm", "--url",
                                  server.grpc_url, "--repo", str(repo)], capture_output=True, text=True, timeout=120,
                                 env={**os.environ, ADMIN_KEY_ENV: "not-the-admin-key-0123456789"})
        assert score(server.grpc_url, "rm")[1] == "2"

    assert load.progress[-1][0] > ended, "the load test ended before the reload: raise LOADTEST_S"
    level = load.report["levels"][0]
    assert level["requests"] > 0 and level["ok_requests"] == level["requests"], level["error_examples"]
    assert level["errors"] == {} and level["row_errors"] == 0, level["error_examples"]
    failed = [r for r in probe.records if r[2] == "failed"]
    assert not failed, failed[:3]
    check_scores(probe.records, expected)
    versions = [r[2] for r in probe.records]
    assert versions[0] == "1" and versions[-1] == "2"
    assert versions == sorted(versions), "an answer from the old version after one from the new"
    # the fingerprints clients read changed, to those of the new export, and the tool printed them
    fingerprints = json.loads(reload.stdout.strip().splitlines()[-1])["fingerprints"]
    for key in (contract.PARAM_TEMPLATE_SHA256, contract.PARAM_WEIGHTS_SHA256):
        assert after[key] != before[key] and fingerprints[key] == after[key]
        assert preprocess[key] == after[key]  # the preprocess model serves its on-disk config too
    assert "unloaded rm_preprocess:1, rm_model:1, rm:1" in reload.stdout
    for name in ("rm", "rm_preprocess", "rm_model"):
        assert index[(name, "1")] == "UNAVAILABLE" and index[(name, "2")] == "READY", index
    assert refused.returncode == 2 and "refused the admin key" in refused.stderr, refused.stderr
    during = [r for r in probe.records if r[1] >= started and r[0] <= ended]
    print(f"\nhot swap: export of version 2 {started - export_started:.1f}s, `templar reload` {ended - started:.1f}s; "
          f"load test (concurrency 4, 8 rows/request): {level['requests']} requests, "
          f"~{load.requests_between(started, ended)} during the reload, {level['requests'] - level['ok_requests']} "
          f"failed, {level['row_errors']} row errors, p99 {level['latency_ms']['p99']} ms; probe: {len(during)} "
          f"requests during the reload, {versions.count('1')} answered by version 1 and {versions.count('2')} by "
          "version 2, 0 failed\n" + reload.stderr)


def test_an_old_repository_serves_and_swaps(two_rms, tmp_path):
    """A repository exported before the per-version serving.json (settings in config.pbtxt only) still loads, and
    swaps; while both versions of the sub-models are loaded, the old entry still calls its own version."""
    old_rm, new_rm = two_rms
    repo = tmp_path / "model_repository"
    export(old_rm, "rm", repo)
    (repo / "rm_preprocess" / "1" / "serving.json").unlink()
    for cache in repo.rglob("__pycache__"):
        shutil.rmtree(cache)
    expected = {"1": [TorchReference(old_rm).score(m) for m in CONVERSATIONS],
                "2": [TorchReference(new_rm).score(m) for m in CONVERSATIONS]}
    with running(repo, model_control=True, admin_key=ADMIN_KEY) as server:
        scores, version = score(server.grpc_url, "rm")
        assert version == "1"
        check_scores([(0, 0, version, scores)], expected)
        export(new_rm, "rm", repo, version=2)
        assert (repo / "rm_preprocess" / "2" / "serving.json").is_file()
        control = ModelControl(server.grpc_url, ADMIN_KEY)
        for name in ("rm_preprocess", "rm_model"):  # step 1 of the swap, by hand
            control.load(name, with_versions(control.config(name), {1, 2}))
        assert control.versions()["rm_preprocess"] == {1: "READY", 2: "READY"}
        control.close()
        scores, version = score(server.grpc_url, "rm")
        assert version == "1"
        check_scores([(0, 0, version, scores)], expected)  # not version 2's sub-models
        report = reload_model(ReloadOptions(model="rm", url=server.grpc_url, repo=repo, admin_key=ADMIN_KEY),
                              log=lambda _: None)
        assert report.version == 2 and report.unloaded == ["rm_preprocess:1", "rm_model:1", "rm:1"]
        scores, version = score(server.grpc_url, "rm")
        assert version == "2"
        check_scores([(0, 0, version, scores)], expected)


def test_export_version_refusals_and_force(two_rms, tmp_path, capsys):
    old_rm, new_rm = two_rms
    repo = tmp_path / "model_repository"
    export(old_rm, "rm", repo)
    base = ["export", "--model", str(new_rm), "--name", "rm", "--repo", str(repo)]
    assert cli([*base, "--version", "1"]) == 2
    assert "version 1 of 'rm' already exists" in capsys.readouterr().err
    assert cli([*base, "--force"]) == 2
    assert "--force goes with --version" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_code:
        cli([*base, "--version", "0"])
    assert exit_code.value.code == 2 and "must be a positive integer" in capsys.readouterr().err
    (tmp_path / "newer" / "rm_model" / "3").mkdir(parents=True)
    with pytest.raises(ExportError, match="already has version 3 .* export --version 4"):
        check_version(tmp_path / "newer", "rm", 2)
    weights = read_parameters(repo / "rm" / "config.pbtxt")[contract.PARAM_WEIGHTS_SHA256]
    gpu_config = (repo / "rm_model" / "config.pbtxt").stat().st_mtime_ns
    export(new_rm, "rm", repo, version=1, force=True)  # replaces version 1, keeps what did not change
    assert sorted(p.name for p in (repo / "rm_model").iterdir()) == ["1", "config.pbtxt", "configs"]
    # unchanged, so not rewritten (on the embedded server Triton would re-initialise every version of rm_model)
    assert (repo / "rm_model" / "config.pbtxt").stat().st_mtime_ns == gpu_config
    recorded = json.loads((repo / "rm_preprocess" / "1" / "serving.json").read_text())
    assert recorded[contract.PARAM_WEIGHTS_SHA256] == read_parameters(repo / "rm" / "config.pbtxt")[
        contract.PARAM_WEIGHTS_SHA256] != weights
    assert not list(tmp_path.glob(".model_repository-staging-*"))


def test_reload_needs_the_admin_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    assert cli(["reload", "--model", "rm", "--repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("templar reload: error:") and f"set {ADMIN_KEY_ENV}" in err
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    assert cli(["reload", "--model", "rm", "--repo", str(tmp_path)]) == 2
    assert f"{tmp_path} has no model 'rm'" in capsys.readouterr().err


def test_a_training_run_records_the_step_its_rewards_came_from_the_new_version(two_rms, tiny_actor, tmp_path):
    """PPO against a served RM that is swapped mid-run: no row is lost, metrics.jsonl says which version scored each
    step, summary.json the step the new version's rewards began at, and the reward client logs the new fingerprints.
    The run is long; once the swap is done and three more steps ran, SIGTERM ends it (checkpoint, exit 3)."""
    import signal

    from templar.trainer.metrics import read_metrics

    old_rm, new_rm = two_rms
    repo, out = tmp_path / "model_repository", tmp_path / "run"
    export(old_rm, "rm", repo)

    def steps_logged() -> int:
        return len(read_metrics(out / "metrics.jsonl")) if (out / "metrics.jsonl").is_file() else 0

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 600
        while steps_logged() < count:
            assert run.poll() is None and time.monotonic() < deadline, f"the run ended before step {count}"
            time.sleep(0.2)

    with running(repo, model_control=True, admin_key=ADMIN_KEY) as server:
        before = served_parameters(server.grpc_url, "rm")
        export(new_rm, "rm", repo, version=2)  # on disk; the server goes on serving version 1 until the reload
        run = subprocess.Popen(
            [sys.executable, "-m", "templar.cli", "train", f"output_dir={out}", f"models.actor={tiny_actor}",
             "steps=1000", "save_every=1000", f"reward.url={server.grpc_url}", "reward.models=[{name: rm}]",
             "generation.max_new_tokens=8", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4",
             "ppo.micro_batch_size=2", "ppo.ppo_epochs=1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, preexec_fn=die_with_parent)
        wait_for(2)
        report = reload_model(ReloadOptions(model="rm", url=server.grpc_url, repo=repo, admin_key=ADMIN_KEY),
                              log=lambda _: None)
        swapped_after = steps_logged()
        wait_for(swapped_after + 3)  # a step that began after the swap has finished
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=900)
    assert run.returncode == 3, stderr[-3000:]  # stopped on purpose, after a checkpoint
    assert report.version == 2
    rows = read_metrics(out / "metrics.jsonl")
    steps = len(rows)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) and steps >= swapped_after + 3
    assert all(r["failed_rows"] == 0 for r in rows), [r["failed_rows"] for r in rows]
    versions = [r["rm_version/rm"] for r in rows]
    first_new = versions.index(2) + 1
    assert versions == [1] * (first_new - 1) + [2] * (steps + 1 - first_new), versions  # never back to version 1
    assert 3 <= first_new <= swapped_after + 1, (first_new, swapped_after)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_model_versions"]["rm"] == [{"version": "1", "from_step": 1},
                                                      {"version": "2", "from_step": first_new}]
    train_log = (out / "train.log").read_text()
    assert f"step {first_new}: rewards of rm now come from version 2 (was 1)" in train_log
    changed = re.search(r"reward model rm: now served by version 2 \(was 1\); changed: (.*)", train_log)
    assert changed, train_log[-3000:]
    key = contract.PARAM_WEIGHTS_SHA256
    assert f"{key} {before[key]} -> {report.fingerprints[key]}" in changed.group(1)
