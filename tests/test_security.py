"""Who may do what to a running reward server: model control off unless asked for and key-protected when on,
TLS and mutual TLS on gRPC with certificates made at test time. Real `templar serve` processes, real gRPC clients."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from templar.server.embedded import ADMIN_KEY_ENV, GRPC_ADMIN_HEADER, ServerTls
from templar.reward_client import RewardClient, RewardClientConfig
from templar.samples import sample_conversations

from conftest import running
from test_serve_cli import ServeProcess, score_once

pytestmark = pytest.mark.integration  # starts Triton

ADMIN_KEY = "test-admin-key-0123456789abcdef"
CONVERSATION = sample_conversations()["single_turn"]


def openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    assert binary, "these tests make their certificates with the openssl command (apt-get install openssl)"
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True)


def signed(cwd: Path, name: str, ca: str, subject: str, extensions: str | None = None) -> None:
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
            cwd=cwd)
    extra = []
    if extensions:
        (cwd / f"{name}.ext").write_text(extensions)
        extra = ["-extfile", f"{name}.ext"]
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", *extra, cwd=cwd)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate it signed, plus a second CA that
    signed nothing the server knows (a stranger's)."""
    folder = tmp_path_factory.mktemp("certs")
    for ca in ("ca", "other_ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                "-days", "2", "-subj", f"/CN=templar test {ca}", cwd=folder)
    signed(folder, "server", "ca", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    signed(folder, "client", "ca", "/CN=trainer")
    signed(folder, "stranger", "other_ca", "/CN=stranger")
    return folder


def score(url: str, **tls) -> tuple[float, str]:
    """One conversation through the reward client; (score, status)."""
    config = RewardClientConfig("rm_small", [url], connect_timeout_s=3, max_attempts=1, request_timeout_s=30, **tls)
    with RewardClient(config) as client:
        result = client.score([CONVERSATION])
    return float(result.scores[0]), result.status[0]


def unload(url: str, headers: dict | None) -> str:
    """Try to unload rm_small; 'accepted' or the server's refusal."""
    try:
        grpcclient.InferenceServerClient(url).unload_model("rm_small", headers=headers)
    except Exception as exc:  # noqa: BLE001 - the refusal is what the test reads
        return str(exc)
    return "accepted"


def test_by_default_nobody_can_unload_the_rm_or_change_server_settings(small_repo):
    server = ServeProcess(small_repo)
    try:
        server.wait_for("Ctrl-C stops it.")
        assert "TLS      off; model control off" in "".join(server.output)
        url = f"127.0.0.1:{server.ports['grpc']}"
        expected = score_once(server.ports["grpc"])
        # what a new user tried: a plain client's unload_model stopped a training run's rewards. Not any more.
        assert "restricted" in unload(url, None)
        assert "restricted" in unload(url, {GRPC_ADMIN_HEADER: "a guess"})
        client = grpcclient.InferenceServerClient(url)
        for admin_call in (lambda: client.update_log_settings({"log_verbose_level": 1}),
                           lambda: client.update_trace_settings(settings={"trace_file": "/tmp/x"}),
                           lambda: client.get_model_repository_index()):
            with pytest.raises(Exception, match="restricted"):
                admin_call()
        assert client.is_model_ready("rm_small")
        assert score_once(server.ports["grpc"]) == expected  # still serving, the same RM
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)


def test_model_control_needs_a_key_to_be_switched_on(small_repo):
    env = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_ENV}
    result = subprocess.run([sys.executable, "-m", "templar.cli", "serve", "--repo", str(small_repo),
                             "--model-control"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert f"--model-control needs an admin key: set {ADMIN_KEY_ENV}" in result.stderr
    result = subprocess.run([sys.executable, "-m", "templar.cli", "serve", "--repo", str(small_repo),
                             "--model-control"], capture_output=True, text=True, timeout=120,
                            env={**env, ADMIN_KEY_ENV: "short"})
    assert result.returncode == 2 and "must be at least 16 characters" in result.stderr


def test_mutual_tls_and_key_protected_model_control(small_repo, certs):
    """`templar serve --model-control --tls-cert --tls-key --tls-client-ca`: only a client with a certificate from
    the CA is served, and only the admin key unloads."""
    server = ServeProcess(small_repo, extra=("--model-control", "--tls-cert", str(certs / "server.pem"),
                                             "--tls-key", str(certs / "server.key"),
                                             "--tls-client-ca", str(certs / "ca.pem")),
                          env={ADMIN_KEY_ENV: ADMIN_KEY})
    try:
        server.wait_for("Ctrl-C stops it.")
        assert "TLS      mutual (client certificates required); model control on" in "".join(server.output)
        url = f"localhost:{server.ports['grpc']}"
        ca, mine = str(certs / "ca.pem"), {"tls_cert": str(certs / "client.pem"), "tls_key": str(certs / "client.key")}
        value, status = score(url, tls=True, tls_ca=ca, **mine)
        assert status == "ok" and value == value  # scored (not NaN)
        for refused in ({}, {"tls": True, "tls_ca": ca},  # plaintext; TLS without a client certificate
                        {"tls": True, "tls_ca": ca, "tls_cert": str(certs / "stranger.pem"),
                         "tls_key": str(certs / "stranger.key")}):  # a certificate from another CA
            refused_value, refused_status = score(url, **refused)
            assert refused_value != refused_value and "no reward endpoint serves model" in refused_status, refused
        admin = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=ca,
                                                 private_key=mine["tls_key"], certificate_chain=mine["tls_cert"])
        for headers in (None, {GRPC_ADMIN_HEADER: "not-the-key-0123456789"}):
            with pytest.raises(Exception, match="restricted"):
                admin.unload_model("rm_small", headers=headers)
        assert admin.is_model_ready("rm_small")
        admin.unload_model("rm_small", headers={GRPC_ADMIN_HEADER: ADMIN_KEY})
        assert not admin.is_model_ready("rm_small")
        admin.load_model("rm_small", headers={GRPC_ADMIN_HEADER: ADMIN_KEY})
        assert admin.is_model_ready("rm_small") and score(url, tls=True, tls_ca=ca, **mine) == (value, "ok")
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)


def test_tls_refuses_plaintext_and_unknown_servers(small_repo, certs):
    tls = ServerTls(certs / "server.pem", certs / "server.key")
    with running(small_repo, tls=tls) as server:
        url = f"localhost:{server.ports['grpc']}"
        value, status = score(url, tls=True, tls_ca=str(certs / "ca.pem"))
        assert status == "ok"
        for refused in ({},  # plaintext to a TLS port
                        {"tls": True, "tls_ca": str(certs / "other_ca.pem")}):  # a server this client cannot verify
            refused_value, refused_status = score(url, **refused)
            assert refused_value != refused_value and "no reward endpoint serves model" in refused_status
    with pytest.raises(Exception, match="tls_ca given but tls is off"):
        RewardClient(RewardClientConfig("rm_small", [url], tls_ca=str(certs / "ca.pem")))
    with pytest.raises(Exception, match="TLS CA file .*missing.pem: no such file"):
        score(url, tls=True, tls_ca=str(certs / "missing.pem"))
