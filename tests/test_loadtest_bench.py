"""`templar loadtest` against a real Triton server over real gRPC, and `templar bench` with all four backends really
running (embedded Triton, in-process ONNX Runtime, in-process torch, the OpenRLHF-style HTTP server in its own
process) on a tiny RM. Speed is not asserted here (the benchmark prints and saves it); these tests check that the
tools measure what they say, count errors by their real gRPC codes, stop by themselves, and that every backend
produces the same scores."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest

from templar.cli import main as cli
from templar.server.embedded import die_with_parent
from templar.tools.bench.serving import BenchError, BenchOptions, CpuMonitor, parse_setting, run_bench
from templar.tools.bench.http_rm_server import HttpRewardServer
from templar.reward_client import RewardClientConfig
from templar.tools.loadtest import LoadTestOptions, run
from templar.export.repository import EntrySettings
from templar.tools.bench.torch_rm import TorchRewardModel
from templar.tools.workload import conversation_mix

from conftest import running

pytestmark = pytest.mark.integration  # exports ONNX, starts Triton or runs the CLI

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(small_repo):
    with running(small_repo) as triton:
        yield triton


def _loadtest(server, tmp_path, model: str = "rm_small", batch: int = 32, **kwargs) -> dict:
    client = RewardClientConfig(model, [server.grpc_url], rows_per_request=batch, request_timeout_s=60.0)
    opts = LoadTestOptions(client=client, out=tmp_path / "load.json", quiet=True, metrics_url=server.metrics_url,
                           **kwargs)
    return run(opts)


def test_loadtest_reports_every_level_and_stops_in_bounded_time(server, tmp_path):
    before = served_counts(server, "rm_small")
    started = time.monotonic()
    report = _loadtest(server, tmp_path, concurrency=[1, 4], duration_s=1.5, batch=4, conversations=64)
    elapsed = time.monotonic() - started
    after = served_counts(server, "rm_small")
    assert elapsed < 2 * 1.5 + 20, f"two 1.5 s levels took {elapsed:.1f}s"
    saved = json.loads((tmp_path / "load.json").read_text())
    assert saved["levels"] == report["levels"] and (tmp_path / "load.png").read_bytes()[:8] == PNG_MAGIC
    assert [level["concurrency"] for level in saved["levels"]] == [1, 4]
    # the report's counts are what the server itself counted (warm-up requests of 4 rows included)
    warmup = 2 * len(saved["levels"])
    assert after["requests"] - before["requests"] == sum(level["requests"] for level in saved["levels"]) + warmup
    assert after["rows"] - before["rows"] == sum(level["conversations"] for level in saved["levels"]) + 4 * warmup
    for level in saved["levels"]:
        assert level["errors"] == {} and level["row_errors"] == 0
        assert level["ok_requests"] == level["requests"] > 0
        assert level["conversations"] == level["ok_rows"] == 4 * level["requests"]  # the 64-row mix cut in 4s
        assert level["conversations_per_s"] * level["wall_s"] == pytest.approx(level["conversations"])
        assert level["wall_s"] <= elapsed
        assert level["tokens_per_s"] > level["conversations_per_s"]
        latency = level["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        # a level stops issuing requests at its duration; the last ones finish right after
        assert 1.5 <= level["wall_s"] < 1.5 + latency["max"] / 1e3 + 1.0
        server_side = level["server"]  # from Triton's statistics and the entry model's padding counters
        assert 0 < server_side["preprocess_share_of_wall"] < 1
        assert 0 <= server_side["padding_waste"] < 1 and server_side["scoring_calls"] >= 1
    assert saved["machine"]["cpus"] >= 1 and saved["workload"]["distinct_conversations"] == 64


def served_counts(server, model: str) -> dict[str, int]:
    """Requests answered and rows scored, by Triton's own statistics."""
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(model, as_json=True)
    s = stats["model_stats"][0]
    return {"requests": int(s["inference_stats"].get("success", {}).get("count", 0)),
            "rows": int(s.get("inference_count", 0))}


def test_loadtest_stops_after_a_request_count(server, tmp_path):
    report = _loadtest(server, tmp_path, concurrency=[3], duration_s=None, requests=7, batch=2, warmup_requests=0)
    level = report["levels"][0]
    assert level["requests"] == 7 and level["conversations"] == 14


def test_errors_are_counted_by_grpc_code(server, tmp_path):
    missing = _loadtest(server, tmp_path, model="no_such_rm", concurrency=[2], duration_s=None, requests=5)
    assert missing["model"] == "no_such_rm"
    level = missing["levels"][0]
    assert level["errors"] == {"NOT_FOUND": 5} and level["ok_requests"] == 0
    assert level["latency_ms"]["p50"] is None and "no_such_rm" in level["error_examples"]["NOT_FOUND"]
    # more rows than the entry's max_batch_size (256): rejected by the server, not by the client
    too_big = _loadtest(server, tmp_path, concurrency=[1], duration_s=None, requests=2, batch=300,
                        conversations=300, warmup_requests=0)
    assert too_big["levels"][0]["errors"] == {"INVALID_ARGUMENT": 2}


def test_bad_rows_are_counted_inside_ok_requests(server, tmp_path):
    good = json.dumps(conversation_mix(1)[0])
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join([good, "{not json", good, json.dumps({"messages": [{"role": "user", "content": "?"}]})])
                    + "\n")
    report = _loadtest(server, tmp_path, concurrency=[1], duration_s=None, requests=2, batch=4, data=data,
                       warmup_requests=0)
    level = report["levels"][0]
    assert level["errors"] == {} and level["ok_requests"] == 2
    assert level["row_errors"] == 4 and level["ok_rows"] == 4
    assert any("not JSON" in message for message in level["error_examples"].values())


def test_loadtest_command_line(server, tmp_path, capsys):
    out = tmp_path / "cli.json"
    code = cli(["loadtest", "--url", server.grpc_url, "--model", "rm_small", "--concurrency", "2", "--requests", "3",
                "--batch", "2", "--out", str(out)])
    assert code == 0 and json.loads(out.read_text())["levels"][0]["requests"] == 3
    assert cli(["loadtest", "--url", server.grpc_url, "--model", "nope", "--concurrency", "1", "--requests",
                "1", "--out", str(out)]) == 1  # every request failed
    with pytest.raises(SystemExit) as exit_:  # argparse's own one-line error
        cli(["loadtest", "--model", "rm_small", "--concurrency", "0,x"])
    assert exit_.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
    assert cli(["loadtest", "--url", "127.0.0.1:1", "--model", "rm_small", "--requests", "1", "--out",
                str(out)]) == 2
    assert "no Triton server answers at 127.0.0.1:1" in capsys.readouterr().err
    assert cli(["loadtest", "--url", server.grpc_url, "--model", "rm_small", "--requests", "1", "--data",
                str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_runs_all_four_backends_with_the_same_scores(assets, tmp_path):
    """Two interleaved rounds on GRPO-shaped conversations (6 prompts x 4 answers): every backend scores each round's
    conversations alike; the served packed scorer shares each prompt, its unshared twin does not."""
    opts = BenchOptions(out=tmp_path / "bench", size="tiny", conversations=24, batch=4, concurrency=4, torch_batch=4,
                        max_length=2048, warmup=2, rounds=2, workload="grpo", group=4,
                        settings=EntrySettings(entry_instances=1, intra_op_threads=1, micro_batch_tokens=2048,
                                               packed_compile=False),
                        backends=["templar", "templar-unshared", "packed", "onnxruntime", "torch", "http", "vllm"],
                        vllm_python=tmp_path / "no-vllm" / "bin" / "python",
                        quiet_wait_s=0)  # the suite's other worker keeps the machine busy: no wait for quiet
    lines: list[str] = []
    report = run_bench(opts, log=lines.append)
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    # vLLM's environment is not made here: the backend is skipped with a line that says how to make it
    assert saved["skipped"] == ["vllm"]
    assert any("skipping vllm: no vLLM environment at" in line and "make vllm-env" in line for line in lines), lines
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    assert (tmp_path / "bench" / "bench.png").read_bytes()[:8] == PNG_MAGIC
    backends = {"templar", "templar-unshared", "packed", "onnxruntime", "torch", "http"}
    assert set(saved["backends"]) == backends
    for name, backend in saved["backends"].items():
        assert backend["conversations"] == 24 and backend["conversations_per_s"] > 0, name
    summary = saved["summary"]
    assert {name: len(r) for name, r in summary["rounds_conversations_per_s"].items()} == dict.fromkeys(backends, 2)
    assert sum(f"round {n}/2" in line for line in lines for n in (1, 2)) == 2 * len(backends)
    assert summary["reference"] == "torch"
    assert max(summary["max_abs_diff_vs_reference"].values()) <= 1e-4
    assert set(summary["ratios"]) == {"templar_vs_torch", "templar_vs_http", "templar_vs_onnxruntime",
                                      "templar_vs_bare_onnxruntime", "templar_vs_packed",
                                      "templar_vs_templar-unshared"}
    assert summary["targets"]["scores within 1e-4 of torch"]["met"]
    served = saved["backends"]["templar"]["server"]
    assert 0 < served["preprocess_share_of_wall"] < 1 and served["padding_waste"] == 0
    assert served["prefix_shared_tokens"] > 0 and saved["backends"]["templar-unshared"]["server"][
        "prefix_shared_tokens"] == 0
    # identical micro-batching logic in-process and served: arrival-order batches waste more than sorted ones
    assert saved["backends"]["torch"]["padding_waste"] > saved["backends"]["onnxruntime"]["padding_waste"]
    assert saved["model"]["non_embedding_parameters"] < saved["model"]["parameters"]
    assert saved["workload"]["conversations"] == 24 and saved["workload"]["max_tokens"] > saved["workload"][
        "median_tokens"]
    assert saved["workload"]["round_seeds"] == [0, 1]


def test_bench_rejects_bad_options(tmp_path):
    with pytest.raises(BenchError, match="unknown backends"):
        run_bench(BenchOptions(out=tmp_path, backends=["triton"]), log=lambda _: None)
    with pytest.raises(BenchError, match="--size must be one of"):
        run_bench(BenchOptions(out=tmp_path, size="huge", conversations=2), log=lambda _: None)
    assert parse_setting("queue_delay_us=500") == ("queue_delay_us", 500)
    assert parse_setting("micro_batch_max_padding=0.1") == ("micro_batch_max_padding", 0.1)
    assert parse_setting("intra_op_spinning=true") == ("intra_op_spinning", True)
    with pytest.raises(argparse.ArgumentTypeError, match="NAME one of"):
        parse_setting("queue_delay=5")
    with pytest.raises(argparse.ArgumentTypeError, match="takes a number"):
        parse_setting("queue_delay_us=soon")


def test_openrlhf_style_http_server_scores_like_the_rms_own_reference(tiny_rms, references):
    model_dir = tiny_rms["llama3_1"]
    conversations = conversation_mix(5, seed=3)
    reference = references["llama3_1"]
    expected = [reference.score(c["messages"]) for c in conversations]
    local = TorchRewardModel(model_dir, max_length=1024)
    texts = local.render(conversations)
    # padded batches (left padding, as serve_rm) give the unpadded per-row scores
    np.testing.assert_allclose(local.score_texts(texts, batch_size=3), expected, atol=1e-4)

    async def post(url: str, body) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/get_reward", json=body) as response:
                return response.status, await response.json()

    with HttpRewardServer(model_dir, max_length=1024) as server:
        status, body = asyncio.run(post(server.url, {"query": texts}))
        assert status == 200
        np.testing.assert_allclose(body["rewards"], expected, atol=1e-4)
        status, body = asyncio.run(post(server.url, {"queries": texts}))
        assert status == 400 and "query" in body["error"]


def test_a_timed_pass_waits_for_a_quiet_machine_and_says_when_it_is_not():
    """A process spinning on each core: the wait gives up after its timeout and says how busy
    the machine was; once they are gone it returns within seconds, without a word (unless a neighbour is busy)."""
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=die_with_parent)
            for _ in range(os.cpu_count() or 1)]
    try:
        lines: list[str] = []
        started = time.monotonic()
        CpuMonitor().wait_until_quiet(lines.append, timeout_s=2.0)
        assert 2.0 <= time.monotonic() - started < 6.0
        assert len(lines) == 1 and "the machine stayed busy" in lines[0] and "timing anyway" in lines[0], lines
        busy = int(lines[0].split("(")[1].split("%")[0])
        assert busy >= 50, lines
    finally:
        for process in spin:
            process.kill()
            process.wait()
