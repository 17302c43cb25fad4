"""`templar serve` as users run it: a real process, real ports, real signals."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import tritonclient.grpc as grpcclient

from templar import contract, wire
from templar.conversation import conversation_rows
from templar.server.embedded import EmbeddedTriton, ServerError, die_with_parent
from templar.server.ports import free_ports, free_server_ports
from templar.samples import sample_conversations

pytestmark = pytest.mark.integration  # exports ONNX, starts Triton or runs the CLI


class ServeProcess:
    def __init__(self, repo: Path, ports: dict[str, int] | None = None, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.ports = ports or dict(zip(("grpc", "http", "metrics"), free_ports(3)))
        args = [sys.executable, "-m", "templar.cli", "serve", "--repo", str(repo)]
        args += [a for kind, port in self.ports.items() for a in (f"--{kind}-port", str(port))] + list(extra)
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, **(env or {})}, preexec_fn=die_with_parent)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if text in self.lines.get(timeout=1):
                    return
            except queue.Empty:
                if self.process.poll() is not None:
                    break
        raise AssertionError(f"never saw {text!r}; output:\n{''.join(self.output)}")

    def printed(self, label: str) -> str:
        """The value of a `  label   value` line of the start-up banner."""
        return next(line.split(None, 1)[1].strip() for line in self.output if line.startswith(f"  {label} "))

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


def score_once(grpc_port: int, host: str = "127.0.0.1") -> float:
    client = grpcclient.InferenceServerClient(f"{host}:{grpc_port}")
    rows = conversation_rows([sample_conversations()["single_turn"]])
    result = client.infer("rm_small", wire.conversation_inputs(rows))
    assert result.as_numpy(contract.STATUS)[0, 0] == b"ok"
    return float(result.as_numpy(contract.SCORE)[0, 0])


def score_once_reference(repo: Path) -> float:
    """The same conversation through the exported graph in-process (what any server must answer)."""
    from templar.export.repository import read_parameters
    from templar.serving.batching import preprocess_rows
    from templar.serving.settings import load_chat_format
    from templar.serving.onnx_runtime import create_session, run_scores

    params = read_parameters(repo / "rm_small" / "config.pbtxt")
    chat_format, pad = load_chat_format(repo / "rm_small_preprocess" / "1" / "tokenizer", params)
    batch = preprocess_rows(chat_format, conversation_rows([sample_conversations()["single_turn"]]), pad_id=pad)
    session = create_session(repo / "rm_small_model" / "1" / "model.onnx")
    return float(run_scores(session, batch.input_ids, batch.attention_mask)[0, 0])


def test_port_in_use_is_refused_with_a_clear_message(small_repo):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        http, metrics = free_ports(2)
        result = subprocess.run([sys.executable, "-m", "templar.cli", "serve", "--repo", str(small_repo),
                                 "--grpc-port", str(port), "--http-port", str(http),
                                 "--metrics-port", str(metrics)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"port {port} (--grpc-port) on 127.0.0.1 is already in use" in result.stderr


def test_missing_or_empty_repository_is_a_clear_error(tmp_path):
    for repo, message in ((tmp_path / "nope", "does not exist"), (tmp_path, "holds no models")):
        result = subprocess.run([sys.executable, "-m", "templar.cli", "serve", "--repo", str(repo)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_two_servers_serve_side_by_side_and_stop_without_leftovers(small_repo, stop_signal):
    servers = [ServeProcess(small_repo), ServeProcess(small_repo)]
    try:
        for server in servers:
            server.wait_for("Ctrl-C stops it.")
        scores = [score_once(s.ports["grpc"]) for s in servers]
        assert scores[0] == pytest.approx(scores[1], abs=1e-6)
        for server in servers:
            out = "".join(server.output)
            assert f"gRPC     127.0.0.1:{server.ports['grpc']}" in out
            assert "3 models (rm_small, rm_small_model, rm_small_preprocess)" in out
        # loopback only, unless told otherwise
        triton = [p for p in servers[0].descendants() if p.name() == "tritonserver"][0]
        listening = {(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port)  # gRPC listens on a v4-mapped v6 socket
                     for c in triton.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        assert {("127.0.0.1", port) for port in servers[0].ports.values()} == listening

        first, second = servers
        children = first.descendants()
        assert sum("triton_python_backend_stub" in " ".join(p.cmdline()) for p in children) == 3
        prefix = f"templar{first.process.pid}x"
        assert any(p.name.startswith(prefix) for p in Path("/dev/shm").iterdir())
        workdir = Path(first.printed("log")).parent  # the temporary folder of backends and log
        assert workdir.name.startswith("templar-triton-") and workdir.is_dir()
        first.process.send_signal(stop_signal)
        assert first.process.wait(timeout=60) == 0
        time.sleep(0.5)
        assert not workdir.exists()  # a clean stop leaves nothing in the temp folder
        assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)]
        assert score_once(second.ports["grpc"]) == pytest.approx(scores[1], abs=1e-6)  # the other one is untouched
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
                server.process.wait(timeout=60)


def test_a_server_that_dies_keeps_its_log_for_reading(small_repo):
    server = ServeProcess(small_repo, extra=("--no-restart",))
    try:
        server.wait_for("Ctrl-C stops it.")
        log = Path(server.printed("log"))
        triton = [p for p in server.descendants() if p.name() == "tritonserver"][0]
        triton.kill()  # a crash, not a stop
        assert server.process.wait(timeout=60) == 1
        assert "tritonserver stopped unexpectedly" in "".join(server.output)
        assert "Started GRPCInferenceService" in log.read_text()  # the log survives the failure
        assert not (log.parent / "backends").exists()  # the copied backends do not
    finally:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(timeout=60)
    shutil.rmtree(log.parent)


def test_a_server_that_never_gets_ready_names_its_kept_log(small_repo):
    server = EmbeddedTriton(small_repo, **free_server_ports(), startup_timeout_s=0.5)
    with pytest.raises(ServerError, match=r"was not ready after 0s \(log: ") as failure:
        server.start()
    log = Path(re.search(r"\(log: (\S+)\)", str(failure.value)).group(1))
    assert log.is_file() and log.parent.name.startswith("templar-triton-")
    assert not server.alive()
    shutil.rmtree(log.parent)


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(64)  # held together while chosen: no port can come back twice
    assert len(set(ports)) == 64
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))  # released again for the server that will use it


def test_a_server_that_dies_while_starting_says_so(small_repo):
    """tritonserver killed while the models load: start() reports the exit and the log instead of waiting."""
    server = EmbeddedTriton(small_repo, **free_server_ports())

    def kill_when_it_runs() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if server.process is not None:
                server.process.kill()
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_it_runs)
    killer.start()
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"tritonserver exited with code -9 while starting \(log: ") as failure:
        server.start()
    killer.join()
    assert time.monotonic() - started < 60  # noticed at once, not after the start-up timeout
    log = Path(re.search(r"\(log: (\S+)\)", str(failure.value)).group(1))
    assert log.is_file()  # kept for reading
    shutil.rmtree(log.parent)


def listening(server: ServeProcess) -> dict[int, str]:
    """port -> address tritonserver listens on."""
    triton = [p for p in server.descendants() if p.name() == "tritonserver"][0]
    return {c.laddr.port: c.laddr.ip.removeprefix("::ffff:") for c in triton.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def test_serving_on_a_host_other_than_the_default(small_repo):
    """--host with this machine's network address: every endpoint there, and only there."""
    address = next((a.address for name, addrs in psutil.net_if_addrs().items() for a in addrs
                    if a.family == socket.AF_INET and not a.address.startswith("127.")), None)
    assert address, "this machine has no network interface besides loopback"
    server = ServeProcess(small_repo, ports=dict(zip(("grpc", "http", "metrics"), free_ports(3, address))),
                          extra=("--host", address))
    try:
        server.wait_for("Ctrl-C stops it.")
        assert listening(server) == {port: address for port in server.ports.values()}
        assert score_once(server.ports["grpc"], host=address) == pytest.approx(score_once_reference(small_repo),
                                                                             abs=1e-6)
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0


def test_serving_on_ipv6_loopback(small_repo):
    """gRPC on [::1]; Triton 2.51's HTTP server cannot bind one IPv6 address, so HTTP and metrics stay on the IPv4
    loopback (never every interface), and another IPv6 address is refused with the reason."""
    server = ServeProcess(small_repo, ports=dict(zip(("grpc", "http", "metrics"), free_ports(3, "::1"))),
                          extra=("--host", "::1"))
    try:
        server.wait_for("Ctrl-C stops it.")
        out = "".join(server.output)
        assert f"gRPC     [::1]:{server.ports['grpc']}" in out
        assert f"HTTP     http://127.0.0.1:{server.ports['http']}" in out
        assert listening(server) == {server.ports["grpc"]: "::1", server.ports["http"]: "127.0.0.1",
                                     server.ports["metrics"]: "127.0.0.1"}
        assert score_once(server.ports["grpc"], host="[::1]") == pytest.approx(score_once_reference(small_repo),
                                                                             abs=1e-6)
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    refused = subprocess.run([sys.executable, "-m", "templar.cli", "serve", "--repo", str(small_repo), "--host",
                              "2001:db8::1"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "cannot bind a single IPv6 address" in refused.stderr


def test_killing_templar_serve_leaves_no_server_behind(small_repo):
    """kill -9 of `templar serve` itself: tritonserver gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and takes
    its Python stubs with it."""
    server = ServeProcess(small_repo)
    server.wait_for("Ctrl-C stops it.")
    children = server.descendants()
    assert any(p.name() == "tritonserver" for p in children)
    assert sum("triton_python_backend_stub" in " ".join(p.cmdline()) for p in children) == 3
    server.process.kill()
    server.process.wait(timeout=30)
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline()[:1] for p in alive]


def test_a_killed_server_is_restarted_on_the_same_ports(small_repo):
    """Supervised by default: tritonserver SIGKILLed (a crash, the OOM killer) comes back on the same address."""
    server = ServeProcess(small_repo)
    try:
        server.wait_for("Ctrl-C stops it.")
        assert "restarted if it or a model stub dies" in "".join(server.output)
        before = score_once(server.ports["grpc"])
        triton = [p for p in server.descendants() if p.name() == "tritonserver"][0]
        triton.kill()
        server.wait_for("restarted: serving again on", timeout=120)
        assert server.process.poll() is None
        assert score_once(server.ports["grpc"]) == before  # the same RM, the same address
        assert [p for p in server.descendants() if p.name() == "tritonserver"][0].pid != triton.pid
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
