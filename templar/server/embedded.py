"""The embedded server: the real `tritonserver` from the nvidia-pytriton wheel, on the CPU, with a model repository
(`templar serve`, and the trainer's default reward server).

How it is made to run outside NVIDIA's container: the wheel's Python backend is copied into a private
backend folder together with the Python-backend stub built for the running interpreter; the wheel's libraries and the
interpreter's own libpython go first on LD_LIBRARY_PATH; this interpreter's bin/ goes first on PATH so the stubs import
the packages of this environment. Each server gets its own shared-memory prefix and backend folder, so two servers
on one machine do not collide; stopping one leaves no stub processes and no shared-memory segments behind.
"""

from __future__ import annotations

import ctypes
import importlib.util
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from templar.contract import EMBEDDED_CONFIG_NAME
from templar.environment import use_offline_defaults
from templar.errors import ServerError
from templar.server.ports import DEFAULT_HOST, DEFAULT_PORTS, port_available, url_host

STARTUP_TIMEOUT_S = 600.0  # loading many models on a busy 2-core machine takes minutes
SHM_BYTES = 64 * 1024 * 1024  # Python-backend shared memory per model; grows by the same amount when needed
# What only an administrator may do: load/unload models, change log or trace settings, register shared memory. These
# protocols always need the header ADMIN_HEADER with the server's admin key (a random one unless one is given).
ADMIN_PROTOCOLS = ("model-repository", "logging", "trace", "shared-memory")
ADMIN_HEADER = "templar-admin-key"  # over HTTP; gRPC clients send it as GRPC_ADMIN_HEADER (Triton adds the prefix)
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
ADMIN_KEY_ENV = "TEMPLAR_ADMIN_KEY"
# Triton's health endpoints (HTTP): what start() waits for, and the probes of docker-compose.yml and deploy/kubernetes
READY_PATH = "/v2/health/ready"
LIVE_PATH = "/v2/health/live"


@dataclass(frozen=True)
class ServerTls:
    """gRPC over TLS: the server's certificate and key (PEM), and optionally the CA whose certificates clients must
    present (mutual TLS). HTTP and metrics stay plaintext (Triton has no TLS there): keep them on loopback."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def args(self) -> list[str]:
        for what, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-client-ca", self.client_ca)):
            if path is not None and not Path(path).is_file():
                raise ServerError(f"{what} {path}: no such file")
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.client_ca is not None:
            args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.client_ca}"]
        return args


def pytriton_paths() -> tuple[Path, Path]:
    """(pytriton/tritonserver folder, nvidia_pytriton.libs folder) of the installed wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("the embedded server needs the nvidia-pytriton wheel (its tritonserver binary): "
                          "pip install 'templar-rlhf[embedded]' (Linux x86-64), or run `make setup`")
    root = Path(list(spec.submodule_search_locations)[0])
    return root / "tritonserver", root.parent / "nvidia_pytriton.libs"


def http_host_for(host: str) -> str:
    """Where the HTTP and metrics endpoints can bind for `host`. Triton 2.51's HTTP server cannot bind one IPv6
    address (it takes "ipv6:[addr]" and then listens on every interface), so for the IPv6 loopback ::1 they stay on
    the IPv4 loopback, and any other IPv6 address is refused rather than silently exposed."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host  # a host name
    if address.version == 4:
        return host
    if address.is_loopback:
        return "127.0.0.1"
    raise ServerError(f"--host {host}: the embedded server's HTTP and metrics endpoints cannot bind a single IPv6 "
                      "address (Triton 2.51 would listen on every interface); use an IPv4 address, or ::1 (gRPC on "
                      "[::1], HTTP and metrics on 127.0.0.1)")


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the launching process dies, so no server is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedTriton:
    """A tritonserver process serving `repo` on the CPU. Use as a context manager or call start()/stop()."""

    def __init__(self, repo: str | os.PathLike, *, host: str = DEFAULT_HOST, grpc_port: int = DEFAULT_PORTS["grpc"],
                 http_port: int = DEFAULT_PORTS["http"], metrics_port: int = DEFAULT_PORTS["metrics"],
                 log_file: str | os.PathLike | None = None, startup_timeout_s: float = STARTUP_TIMEOUT_S,
                 model_config_name: str = EMBEDDED_CONFIG_NAME, model_control: bool = False,
                 admin_key: str | None = None, tls: ServerTls | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.repo = Path(repo).resolve()
        self.host = host
        self.http_host = http_host_for(host)
        self.ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.startup_timeout_s = startup_timeout_s
        self.model_config_name = model_config_name
        self.extra_args = tuple(extra_args)
        self.model_control = model_control  # off: the models load at start and nobody can unload them
        if admin_key is not None and not re.fullmatch(r"[A-Za-z0-9._~+/=-]{16,}", admin_key):
            raise ServerError(f"the admin key ({ADMIN_KEY_ENV}) must be at least 16 characters of letters, digits "
                              "and ._~+/=-")
        self.admin_key = admin_key or secrets.token_urlsafe(24)
        self.tls = tls
        self.shm_prefix = f"templar{os.getpid()}x{secrets.token_hex(4)}_"
        self._workdir: Path | None = None
        self._log_file = Path(log_file) if log_file else None
        self._log_in_workdir = log_file is None  # a fresh temporary log per start()
        self.process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    # -- addresses ------------------------------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{url_host(self.host)}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{url_host(self.http_host)}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{url_host(self.http_host)}:{self.ports['metrics']}/metrics"

    @property
    def log_path(self) -> Path:
        assert self._log_file is not None, "the server has not been started"
        return self._log_file

    def admin_headers(self, protocol: str = "grpc") -> dict[str, str]:
        """The header the admin protocols (model control, logging, trace) need on this server, for gRPC or HTTP."""
        return {GRPC_ADMIN_HEADER if protocol == "grpc" else ADMIN_HEADER: self.admin_key}

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def _command(self, backends: Path, binary: Path) -> list[str]:
        args = [
            str(binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            # explicit: models (and versions) can be loaded and unloaded while serving, by whoever has the key
            *(["--model-control-mode=explicit", "--load-model=*"] if self.model_control else
              ["--model-control-mode=none"]),
            f"--model-config-name={self.model_config_name}",
            f"--grpc-address={url_host(self.host)}", f"--grpc-port={self.ports['grpc']}",  # gRPC: [v6]:port
            f"--http-address={self.http_host}", f"--http-port={self.ports['http']}",
            f"--metrics-address={self.http_host}", f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false", "--strict-readiness=true", "--exit-timeout-secs=20",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={SHM_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_BYTES}",
            "--log-verbose=0",
            # Triton takes the key on its command line (readable in /proc by this machine's users, not the network)
            f"--grpc-restricted-protocol={','.join(ADMIN_PROTOCOLS)}:{ADMIN_HEADER}={self.admin_key}",
            f"--http-restricted-api={','.join(ADMIN_PROTOCOLS)}:{ADMIN_HEADER}={self.admin_key}",
        ]
        return args + (self.tls.args() if self.tls else []) + list(self.extra_args)

    def _prepare(self) -> tuple[list[str], dict[str, str]]:
        server_dir, libs = pytriton_paths()
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(f"nvidia-pytriton ships no Python-backend stub for Python {version}")
        self._workdir = Path(tempfile.mkdtemp(prefix="templar-triton-"))
        backends = self._workdir / "backends"
        shutil.copytree(server_dir / "backends", backends)
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        if self._log_in_workdir:
            self._log_file = self._workdir / "tritonserver.log"
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        use_offline_defaults(env)  # the stubs load tokenizers: no hub, no thread pools that warn when forked
        return self._command(backends, server_dir / "bin" / "tritonserver"), env

    def start(self, progress: Callable[[str], None] = lambda _: None) -> EmbeddedTriton:
        if not self.repo.is_dir():
            raise ServerError(f"model repository {self.repo} does not exist; export a model with `templar export`")
        if not any(p.is_dir() and (p / "config.pbtxt").is_file() for p in self.repo.iterdir()):
            raise ServerError(f"model repository {self.repo} holds no models; export one with `templar export`")
        for kind, port in self.ports.items():
            host = self.host if kind == "grpc" else self.http_host
            if not port_available(host, port):
                raise ServerError(f"port {port} (--{kind}-port) on {host} is already in use; stop what uses it "
                                  f"or pick another port with --{kind}-port")
        command, env = self._prepare()
        progress(f"starting tritonserver (log: {self._log_file})")
        log = open(self._log_file, "ab")
        try:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=die_with_parent)
        finally:
            log.close()
        try:
            self._wait_ready(progress)
        except BaseException:
            self.stop(keep_log=True)  # a server that never got ready is a failure someone will want to read
            raise
        return self

    def _wait_ready(self, progress: Callable[[str], None]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last_note = 0.0
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting "
                                  f"(log: {self._log_file}):\n" + self.log_tail())
            if _http_status(f"{self.http_url}{READY_PATH}") == 200:
                not_ready = [m for m in self.repository_index() if m.get("state") != "READY"]
                if not not_ready:
                    return
            if time.monotonic() - last_note > 10:
                progress("waiting for the models to load ...")
                last_note = time.monotonic()
            time.sleep(0.25)
        raise ServerError(f"tritonserver was not ready after {self.startup_timeout_s:.0f}s (log: {self._log_file}):\n"
                          + self.log_tail())

    def repository_index(self) -> list[dict]:
        request = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST",
                                         headers=self.admin_headers("http"))
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self._log_file.read_text(errors="replace").splitlines() if self._log_file else []
        except OSError:
            text = []
        return "\n".join(text[-lines:])

    def stop(self, timeout_s: float = 30.0, keep_log: bool = False) -> None:
        """Graceful SIGTERM, then SIGKILL for whatever is left of the process group; frees shared memory.
        A temporary log is kept when the server died by itself or `keep_log` is set, and removed otherwise."""
        with self._lock:
            process, self.process = self.process, None
            died_by_itself = process is not None and process.poll() is not None
            if process is not None:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(timeout=timeout_s)
                    except subprocess.TimeoutExpired:
                        pass
                try:  # stubs share the server's process group (it was started in a session of its own)
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                process.wait()
                _wait_group_gone(process.pid)
            for segment in Path("/dev/shm").glob(self.shm_prefix + "*"):
                segment.unlink(missing_ok=True)
            if self._workdir is not None:
                # a log in the work folder is kept only after a failure (someone will want to read it); otherwise
                # the folder goes, so repeated runs leave nothing behind in the temp folder
                if self._log_in_workdir and (died_by_itself or keep_log):
                    shutil.rmtree(self._workdir / "backends", ignore_errors=True)
                else:
                    shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    def __enter__(self) -> EmbeddedTriton:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _wait_group_gone(pgid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)
