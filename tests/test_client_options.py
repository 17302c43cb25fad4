"""One set of reward-client options (templar.reward_client.RewardClientConfig) at every entrance. A mutual-TLS
`templar serve` is scored through every command (score, check, eval-rm, loadtest, soak, hostile, gateway, reload)
and every integration (TRL, verl, OpenRLHF's reward-function file, the trainer's reward.client), each reached with
the same options, and each gives the score the Python client gets; every command's client flags are checked against
the dataclass's fields, so a new option appears everywhere or a test here fails."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from templar import wire
from templar.cli import COMMANDS
from templar.cli import main as cli
from templar.client_options import (CONNECTION, EVERY, NAMED_APART, SCORING, TLS, env_var, flag, from_environment,
                                    from_keywords)
from templar.errors import ConfigError
from templar.field_docs import field_docs
from templar.reward_client import RewardClient, RewardClientConfig
from templar.samples import sample_conversations
from templar.server.embedded import ADMIN_KEY_ENV, die_with_parent
from templar.server.ports import free_port
from templar.template_parser import TemplateParser
from templar.trainer.config import load_config

from test_security import openssl, signed
from test_serve_cli import ServeProcess
from test_template_parser import openrlhf_query

ADMIN_KEY = "client-options-admin-key-0123456789"
# the options each command takes: all of them where it scores through the reward client; where it sends raw
# requests (it measures the server), how to reach it; reload, model control on one server, the endpoint and TLS
COMMAND_OPTIONS = {
    "score": EVERY, "check": EVERY, "eval-rm": EVERY, "gateway": EVERY,
    "loadtest": (*CONNECTION, "rows_per_request"), "soak": (*CONNECTION, "rows_per_request"), "hostile": CONNECTION,
    "reload": ("endpoints", *TLS),
}
CASES = sample_conversations()
CONVERSATIONS = [CASES["single_turn"], CASES["multi_turn"], CASES["unicode"]]


# -- the flags, the keywords, the variables: generated from the fields ------------------------------------------------
def test_every_field_is_an_option_somewhere():
    names = [f.name for f in dataclasses.fields(RewardClientConfig)]
    assert sorted(EVERY + NAMED_APART) == sorted(names) and len(set(EVERY)) == len(EVERY)
    assert set(CONNECTION).isdisjoint(SCORING) and set(TLS) <= set(CONNECTION)
    assert all(field_docs(RewardClientConfig)[name] for name in names)  # every option says what it does


def parser_of(command: str) -> tuple[argparse.ArgumentParser, object]:
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"templar {command}")
    module.add_arguments(parser)
    return parser, module


@pytest.mark.parametrize("command", sorted(COMMAND_OPTIONS))
def test_every_command_has_the_generated_client_flags(command):
    parser, module = parser_of(command)
    assert module.CLIENT_FLAGS.fields == COMMAND_OPTIONS[command]
    actions = {action.dest: action for action in parser._actions}  # noqa: SLF001 - the parser's own table
    docs = field_docs(RewardClientConfig)
    for name in COMMAND_OPTIONS[command]:
        action = actions[name]
        assert flag(name) in action.option_strings, (command, name)
        own = module.CLIENT_FLAGS.helps.get(name, docs[name])
        assert action.help.replace("%%", "%").startswith(own), (command, name, action.help)
    defaults = module.CLIENT_FLAGS.config(parser.parse_args(required_args(command)))
    for name in COMMAND_OPTIONS[command]:  # what the flags give unset is the command's declared default
        assert getattr(defaults, name) == getattr(module.CLIENT_FLAGS.defaults, name), (command, name)


def required_args(command: str) -> list[str]:
    return {"score": ["--model", "m", "--data", "x"], "check": ["--model", "m", "--data", "x"],
            "eval-rm": ["--model", "m", "--data", "x"], "loadtest": ["--model", "m"], "soak": ["--model", "m"],
            "hostile": ["--model", "m"], "reload": ["--model", "m"], "gateway": []}[command]


def test_flags_build_the_options_back():
    parser, module = parser_of("score")
    args = parser.parse_args(["--model", "rm", "--data", "x", "--url", "h1:8001, [::1]:8001", "--tls", "--tls-ca",
                              "ca.pem", "--header", "authorization=Bearer t", "--header", "x-team=rl",
                              "--max-attempts", "3", "--request-timeout-s", "7.5", "--compression", "gzip",
                              "--expected-fingerprint", "chat_template_sha256=abc"])
    config = module.CLIENT_FLAGS.config(args, model="rm")
    assert config == RewardClientConfig(
        "rm", ["h1:8001", "[::1]:8001"], max_attempts=3, request_timeout_s=7.5, compression="gzip",
        headers={"authorization": "Bearer t", "x-team": "rl"}, tls=True, tls_ca="ca.pem",
        expected_fingerprints={"chat_template_sha256": "abc"})
    loadtest, tool = parser_of("loadtest")  # the older flag names still work
    old = tool.CLIENT_FLAGS.config(loadtest.parse_args(["--model", "rm", "--batch", "4", "--timeout", "9"]))
    assert (old.rows_per_request, old.request_timeout_s) == (4, 9.0)


def test_the_integrations_take_the_same_options_by_name():
    every = {"url": "h:1", "tls": True, "tls_ca": "ca.pem", "tls_cert": "c.pem", "tls_key": "c.key",
             "headers": {"a": "b"}, "compression": "gzip", "request_timeout_s": 5, "connect_timeout_s": 2,
             "rows_per_request": 4, "max_in_flight": 2, "max_attempts": 3, "backoff_base_s": 0.1,
             "backoff_max_s": 1, "endpoint_cooldown_s": 1, "dns_refresh_s": 5, "expected_fingerprints": {"k": "v"}}
    assert set(every) - {"url"} == set(EVERY) - {"endpoints"}
    config = from_keywords(every, "test")
    assert config.endpoints == ["h:1"] and config.tls_key == "c.key" and config.max_in_flight == 2
    with pytest.raises(ConfigError, match="unknown option.s. tsl; the reward client's options are url and"):
        from_keywords({"tsl": True}, "TemplarReward('rm')")
    environ = {env_var(name): text for name, text in (("endpoints", "h1:1,h2:2"), ("tls", "1"), ("tls_ca", "ca.pem"),
                                                      ("request_timeout_s", "30"), ("headers", "a=b,c=d"))}
    config = from_environment(environ)
    assert (config.endpoints, config.tls, config.tls_ca, config.request_timeout_s, config.headers) == (
        ["h1:1", "h2:2"], True, "ca.pem", 30.0, {"a": "b", "c": "d"})
    assert set(map(env_var, EVERY)) >= {"TEMPLAR_URL", "TEMPLAR_TLS", "TEMPLAR_TLS_CA", "TEMPLAR_MAX_ATTEMPTS"}
    with pytest.raises(ConfigError, match="TEMPLAR_TLS must be one of"):
        from_environment({"TEMPLAR_TLS": "maybe"})


def test_one_endpoint_parser():
    assert wire.parse_endpoints("h1:8001, h2:8001") == ["h1:8001", "h2:8001"]
    assert wire.parse_endpoints(["10.0.0.1:8001", "[::1]:8001,rm-0.svc.cluster.local:8001"]) == [
        "10.0.0.1:8001", "[::1]:8001", "rm-0.svc.cluster.local:8001"]
    for bad, message in (("h1", "'h1' is not host:port"), ("h:0", "no valid port"), ("h:x", "no valid port"),
                         ("::1:8001", r"an IPv6 address goes in brackets, \[::1\]:8001"),
                         ("[fe::zz]:1", "not an IPv6 address"), ("a b:1", "not a host name"), (" , ", "no endpoint"),
                         ("h:1,h:1", "h:1 given more than once")):
        with pytest.raises(ConfigError, match=f"--url: .*{message}"):
            wire.parse_endpoints(bad, "--url")


def test_the_trainer_nests_the_same_options_with_its_own_defaults():
    base = ["reward.models=[{name: rm}]"]
    client = load_config(None, base).reward.client
    assert isinstance(client, RewardClientConfig)
    assert (client.rows_per_request, client.max_in_flight, client.max_attempts) == (16, 4, 10)
    config = load_config(None, [*base, "reward.url=h1:8001,h2:8001", "reward.client.tls=true",
                                "reward.client.tls_ca=ca.pem", "reward.client.headers={x-team: rl}"])
    assert config.reward.client.tls and config.reward.client.headers == {"x-team": "rl"}
    for old in ("max_attempts=2", "rows_per_request=8", "max_in_flight=2", "request_timeout_s=5", "tls=true",
                "tls_ca=ca.pem", "tls_cert=c.pem", "tls_key=c.key"):
        key = old.partition("=")[0]
        with pytest.raises(ConfigError, match=f"unknown key reward.{key}: it sits under reward.client now; set "
                                              f"reward.client.{key}"):
            load_config(None, [*base, f"reward.{old}"])
    for wrong, message in (("reward.client.endpoints=[h:1]", "the trainer's endpoints are reward.url"),
                           ("reward.client.model=rm", "reward.models.N.name"),
                           ("reward.client.tls=true", "reward.client.tls needs reward.url"),
                           ("reward.client.max_attempts=0", "reward.client.max_attempts must be positive"),
                           ("reward.url=h1", "reward.url: 'h1' is not host:port")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, wrong])


# -- a TLS server, scored through every entrance ----------------------------------------------------------------------
@dataclass
class TlsServer:
    url: str
    repo: Path
    certs: Path
    source: Path  # the HF folder rm_small was exported from
    process: ServeProcess

    @property
    def options(self) -> dict[str, object]:
        """Mutual TLS, as keyword arguments named as the fields."""
        return {"tls": True, "tls_ca": str(self.certs / "ca.pem"), "tls_cert": str(self.certs / "client.pem"),
                "tls_key": str(self.certs / "client.key")}

    @property
    def flags(self) -> list[str]:
        return ["--url", self.url, "--tls", "--tls-ca", str(self.certs / "ca.pem"), "--tls-cert",
                str(self.certs / "client.pem"), "--tls-key", str(self.certs / "client.key")]

    @property
    def environment(self) -> dict[str, str]:
        return {env_var("endpoints"): self.url, **{env_var(k): "1" if v is True else str(v)
                                                    for k, v in self.options.items()}}


@pytest.fixture(scope="module")
def tls_server(small_repo, tiny_rms, tmp_path_factory):
    """`templar serve` over mutual TLS (with model control, for reload) on a copy of the small repository."""
    certs = tmp_path_factory.mktemp("client-certs")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=templar client-options ca", cwd=certs)
    signed(certs, "server", "ca", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    signed(certs, "client", "ca", "/CN=every-tool")
    repo = tmp_path_factory.mktemp("tls-repo") / "model_repository"
    shutil.copytree(small_repo, repo)
    server = ServeProcess(repo, extra=("--model-control", "--tls-cert", str(certs / "server.pem"), "--tls-key",
                                       str(certs / "server.key"), "--tls-client-ca", str(certs / "ca.pem")),
                          env={ADMIN_KEY_ENV: ADMIN_KEY})
    try:
        server.wait_for("Ctrl-C stops it.")
        yield TlsServer(f"localhost:{server.ports['grpc']}", repo, certs, tiny_rms["llama3_1"], server)
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)


@pytest.fixture(scope="module")
def expected(tls_server) -> list[float]:
    """The Python client's scores over mutual TLS; plaintext to the same port scores nothing."""
    with RewardClient(RewardClientConfig("rm_small", [tls_server.url], **tls_server.options)) as client:
        result = client.score(CONVERSATIONS)
    assert result.status == ["ok"] * len(CONVERSATIONS)
    with RewardClient(RewardClientConfig("rm_small", [tls_server.url], connect_timeout_s=2)) as plain:
        assert plain.score(CONVERSATIONS[:1]).failed_rows == 1  # the server really speaks TLS only
    return result.scores.tolist()


def conversations_file(tmp_path: Path) -> Path:
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    return path


def test_score_and_check(tls_server, expected, tmp_path, capsys):
    data, out = conversations_file(tmp_path), tmp_path / "scores.jsonl"
    assert cli(["score", "--model", "rm_small", "--data", str(data), "--out", str(out), *tls_server.flags]) == 0
    scores = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    report = tmp_path / "check.json"
    assert cli(["check", "--model", str(tls_server.source), "--name", "rm_small", "--data", str(data), "--out",
                str(report), *tls_server.flags]) == 0
    checked = json.loads(report.read_text())
    assert checked["compared"] == len(CONVERSATIONS) and checked["over_tolerance"] == 0
    np.testing.assert_allclose([r["served"] for r in checked["rows"]], expected, atol=1e-6)


def test_eval_rm(tls_server, expected, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"chosen": CONVERSATIONS[0], "rejected": CONVERSATIONS[1]}) + "\n")
    out = tmp_path / "eval.json"
    assert cli(["eval-rm", "--model", "rm_small", "--data", str(pairs), "--out", str(out), *tls_server.flags]) == 0
    report = json.loads(out.read_text())["own_template"]
    assert report["pairs"] == 1 and report["mean_margin"] == pytest.approx(expected[0] - expected[1], abs=1e-5)


def test_loadtest_soak_and_hostile(tls_server, expected, tmp_path, capsys):
    load = tmp_path / "load.json"
    assert cli(["loadtest", "--model", "rm_small", "--concurrency", "2", "--requests", "4", "--batch", "2",
                "--warmup", "0", "--out", str(load), *tls_server.flags]) == 0
    (level,) = json.loads(load.read_text())["levels"]
    assert level["ok_requests"] == 4 and level["errors"] == {} and level["row_errors"] == 0
    soak = tmp_path / "soak.json"
    assert cli(["soak", "--model", "rm_small", "--duration", "2", "--window", "1", "--concurrency", "2", "--batch",
                "4", "--out", str(soak), *tls_server.flags]) == 0
    summary = json.loads(soak.read_text())["summary"]
    assert summary["requests"] > 0 and summary["errors"] == 0
    hostile = tmp_path / "hostile.json"
    assert cli(["hostile", "--model", "rm_small", "--rows", "60", "--out", str(hostile), *tls_server.flags]) == 0
    campaign = json.loads(hostile.read_text())
    assert campaign["holds"] and campaign["rows"] >= 60 and campaign["requests_failed"] == 0


def test_reload(tls_server, expected, capsys, monkeypatch):
    """Model control over mutual TLS: the admin calls of `templar reload` reach the server (the newest version is
    already served, so nothing is swapped)."""
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
    assert cli(["reload", "--model", "rm_small", "--repo", str(tls_server.repo), *tls_server.flags]) == 0
    assert "rm_small: serving version 1" in capsys.readouterr().out


def test_gateway(tls_server, expected):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "templar.cli", "gateway", "--actor-template", "qwen2_5",
                                "--model", "rm_small", "--port", str(port), *tls_server.flags],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=die_with_parent)
    parser = TemplateParser.from_source("qwen2_5")
    prompt = parser.tokenizer.apply_chat_template(CONVERSATIONS[0][:-1], tokenize=False, add_generation_prompt=True)
    body = {"query": [openrlhf_query(parser.tokenizer, prompt, CONVERSATIONS[0][-1]["content"])], "prompts": [prompt],
            "labels": [""]}

    async def post() -> tuple[int, dict] | None:
        try:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"http://127.0.0.1:{port}/get_reward", json=body) as response:
                    return response.status, await response.json()
        except aiohttp.ClientConnectionError:
            return None

    try:
        deadline = time.monotonic() + 120
        while (answer := asyncio.run(post())) is None:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.3)
    finally:
        process.terminate()
        process.wait(timeout=60)
    status, reply = answer
    assert status == 200, reply
    assert reply["rewards"][0] == pytest.approx(expected[0], abs=1e-5)


def test_trl_verl_and_openrlhf(tls_server, expected, monkeypatch):
    from templar.integrations.trl import TemplarReward
    from templar.integrations.verl import compute_score

    reward = TemplarReward("rm_small", url=tls_server.url, **tls_server.options)
    try:
        scores = reward([m[:-1] for m in CONVERSATIONS], [[m[-1]] for m in CONVERSATIONS])
    finally:
        reward.close()
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    verl = compute_score("chat", CONVERSATIONS[0][-1]["content"], None, {"prompt": CONVERSATIONS[0][:-1]},
                         model="rm_small", url=tls_server.url, **tls_server.options)
    assert verl["score"] == pytest.approx(expected[0], abs=1e-6)
    import templar.integrations.openrlhf_reward_func as shipped

    for name, value in {"TEMPLAR_ACTOR_TEMPLATE": "qwen2_5", "TEMPLAR_MODELS": "rm_small",
                        **tls_server.environment}.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("reward_func", shipped.__file__)  # as OpenRLHF loads it
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = TemplateParser.from_source("qwen2_5")
    prompt = parser.tokenizer.apply_chat_template(CONVERSATIONS[1][:-1], tokenize=False, add_generation_prompt=True)
    answer = module.reward_func([openrlhf_query(parser.tokenizer, prompt, CONVERSATIONS[1][-1]["content"])],
                                [prompt], [""])
    assert answer["rewards"][0] == pytest.approx(expected[1], abs=1e-5)


def test_the_trainers_reward_client(tls_server, expected, tmp_path):
    from templar.trainer.distributed import World
    from templar.trainer.reward_server import reward_endpoints
    from templar.trainer.rewards import RewardModels, reward_conversations

    tls = [f"reward.client.{key}={json.dumps(value)}" for key, value in tls_server.options.items()]
    config = load_config(None, ["reward.models=[{name: rm_small}]", f"reward.url={tls_server.url}", *tls])
    prompts, responses = [m[:-1] for m in CONVERSATIONS], [m[-1]["content"] for m in CONVERSATIONS]
    with reward_endpoints(config, World(rank=0, size=1, local_rank=0), tmp_path) as endpoints:
        rewards = RewardModels(config.reward, endpoints)
        try:
            batch = rewards.collect(rewards.submit(reward_conversations(prompts, responses)),
                                    np.ones(len(CONVERSATIONS), dtype=bool))
        finally:
            rewards.close()
    assert batch.valid.all()
    np.testing.assert_allclose(batch.scores, expected, atol=1e-6)
