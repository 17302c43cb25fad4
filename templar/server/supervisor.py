"""A supervised embedded server: a watcher thread restarts tritonserver when it dies, on the same ports (clients
reconnect to the same address), with exponential backoff, and gives up after too many restarts in a window.

What it watches, every `poll_s`:
- the tritonserver process itself (killed, crashed, OOM-killed);
- its Python-backend stubs (`triton_python_backend_stub`, one per model instance, children of the server). Triton
  2.51's Python backend does not recover a stub that died (measured with SIGKILL on the entry, the preprocessing and
  the scoring stub): it is never restarted; the model stays READY (model ready, repository index, server ready, even
  with --strict-readiness); every request that reaches it fails after ~1 s with "Stub process '<model>_0_0' is not
  healthy" (INTERNAL, or a per-row status when the scoring model behind the entry model is the dead one); the dead
  stub stays a zombie child of the server, and the server's graceful exit then waits out --exit-timeout-secs (the
  model never finishes unloading). Reloading through model control (load_model) is a no-op for a loaded model;
  unload + load does bring a fresh stub up, but leaves the old instance UNLOADING for good, and model control is off
  by default. So a dead stub (a zombie child, or a stub that vanished while models cannot be unloaded) is recovered
  by restarting the whole server.

On either, the broken server is ended at once (SIGKILL of its process group: a graceful exit would hang on the dead
stub, and while it lives it fails requests with errors clients do not retry, where a closed port gives UNAVAILABLE,
which they do), then started again after the backoff.

Restart events are logged (logger "templar.server.supervisor"; the trainer's run log collects it) and, with
`events_path`, appended as JSON lines. `restarts` counts the successful restarts.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from templar.server.embedded import EmbeddedTriton
from templar.errors import ServingError

log = logging.getLogger("templar.server.supervisor")
STUB_BINARY = "triton_python_backend_stub"


@dataclass(frozen=True)
class RestartPolicy:
    backoff_initial_s: float = 1.0  # wait before the first restart; doubles with each restart in a row ...
    backoff_max_s: float = 30.0  # ... up to this
    stable_s: float = 60.0  # a server that stayed up this long starts the backoff afresh when it next dies
    max_restarts: int = 5  # restart attempts allowed within window_s; one more and the supervisor gives up
    window_s: float = 600.0
    poll_s: float = 0.5  # how often the server and its stubs are looked at

    def delay(self, in_a_row: int) -> float:
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** in_a_row)


@dataclass
class ServerEvent:
    kind: str  # "server_died", "stub_died", "restarted", "restart_failed", "gave_up"
    detail: str
    time: float  # time.time()
    restart: int  # restarts so far (after this event)
    down_s: float | None = None  # "restarted": from detection to ready again


def stub_processes(server_pid: int) -> tuple[dict[int, str], list[int]]:
    """The server's Python-backend stubs: ({pid: model name} of the live ones, [pids of zombie children])."""
    live: dict[int, str] = {}
    zombies: list[int] = []
    try:
        children = psutil.Process(server_pid).children()
    except psutil.Error:
        return live, zombies
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child.pid)
                continue
            command = child.cmdline()
        except psutil.ZombieProcess:
            zombies.append(child.pid)
            continue
        except psutil.Error:
            continue  # gone between the listing and the look
        if command and command[0].endswith(STUB_BINARY) and len(command) > 1:
            live[child.pid] = Path(command[1]).parent.parent.name  # <repo>/<model>/<version>/model.py
    return live, zombies


def exit_reason(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"tritonserver was killed by {signal.Signals(-returncode).name}"
    return f"tritonserver exited with code {returncode}"


class SupervisedTriton:
    """Starts `server` and keeps it serving until stop(). Use as a context manager or call start()/stop()."""

    def __init__(self, server: EmbeddedTriton, policy: RestartPolicy | None = None,
                 events_path: str | Path | None = None,
                 on_event: Callable[[ServerEvent], None] = lambda _: None) -> None:
        self.server = server
        self.policy = policy or RestartPolicy()
        self.events_path = Path(events_path) if events_path else None
        self.on_event = on_event
        self.events: list[ServerEvent] = []
        self.restarts = 0
        self.gave_up = False
        self._stubs: dict[int, str] = {}  # pid -> model, as last seen alive
        self._attempts: list[float] = []  # monotonic times of restart attempts (for the window)
        self._in_a_row = 0
        self._up_since = 0.0
        self._closing = threading.Event()
        self._lock = threading.Lock()  # a restart and stop() never overlap
        self._thread: threading.Thread | None = None

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    @property
    def http_url(self) -> str:
        return self.server.http_url

    def start(self, progress: Callable[[str], None] = lambda _: None) -> SupervisedTriton:
        self.server.start(progress)
        self._up_since = time.monotonic()
        self._stubs = stub_processes(self.server.process.pid)[0]
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the watcher first (no restart after this), then the server."""
        self._closing.set()
        with self._lock:
            self.server.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def __enter__(self) -> SupervisedTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- watching -------------------------------------------------------------------------------------------------
    # The restarted server is started from the watcher thread, and the server asks for SIGTERM when the thread that
    # started it ends (PR_SET_PDEATHSIG follows the thread): so the watcher lives as long as the server it started.
    def _watch(self) -> None:
        while not self._closing.wait(self.policy.poll_s):
            try:
                problem = self._problem()
                if problem is None or self._closing.is_set():  # stop() sets closing before it ends the server
                    continue
                if not self._recover(*problem):
                    return
            except Exception:  # noqa: BLE001 - a supervisor that dies silently is worse than one that logs and goes on
                log.exception("embedded Triton supervisor: unexpected error; still watching")

    def _problem(self) -> tuple[str, str] | None:
        """(event kind, what is wrong), or None while the server and every stub are alive."""
        process = self.server.process
        if process is None:  # stop() (filtered out by the caller) or a restart that failed unexpectedly
            return "server_died", "tritonserver is not running"
        if process.poll() is not None:
            return "server_died", exit_reason(process.returncode)
        live, zombies = stub_processes(process.pid)
        dead = {pid: self._stubs.get(pid, "?") for pid in zombies}
        if not self.server.model_control:  # models never unload: a stub that vanished died
            dead |= {pid: model for pid, model in self._stubs.items() if pid not in live}
        self._stubs |= live
        if dead and self._server_exits(process):  # a dying server's stubs leave its children (orphaned, not dead)
            return "server_died", exit_reason(process.returncode)
        if dead:
            names = ", ".join(f"{model} (pid {pid})" for pid, model in sorted(dead.items()))
            return "stub_died", f"the Python-backend stub of {names} died; Triton does not restart it"
        return None

    @staticmethod
    def _server_exits(process: subprocess.Popen, grace_s: float = 1.0) -> bool:
        """Whether the server exits within `grace_s` (a SIGKILLed server reparents its children before it can be
        reaped, so a stub can look gone a moment before the server does)."""
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _recover(self, kind: str, problem: str) -> bool:
        """Restart until the server serves again (True), or give up / stop was asked for (False)."""
        detected = time.monotonic()
        if detected - self._up_since >= self.policy.stable_s:
            self._in_a_row = 0
        self._record(kind, problem)
        log.warning("embedded Triton on %s: %s; restarting it on the same ports", self.grpc_url, problem)
        with self._lock:  # at once: a server with a dead stub answers errors (rows lost), a dead port UNAVAILABLE
            if self._closing.is_set():  # (which clients retry); SIGKILL, as a graceful exit would only hang
                return False
            self.server.stop(timeout_s=0)
        while True:
            now = time.monotonic()
            self._attempts = [t for t in self._attempts if now - t < self.policy.window_s]
            if len(self._attempts) >= self.policy.max_restarts:
                return self._give_up(problem)
            if self._closing.wait(self.policy.delay(self._in_a_row)):
                return False
            self._attempts.append(time.monotonic())
            self._in_a_row += 1
            try:
                if not self._restart():
                    return False
            except (ServingError, OSError) as exc:
                self._record("restart_failed", (str(exc).splitlines() or [repr(exc)])[0])
                log.warning("embedded Triton on %s: restart failed: %s", self.grpc_url, exc)
                continue
            self.restarts += 1
            self._up_since = time.monotonic()
            self._record("restarted", f"serving again on {self.grpc_url}", down_s=self._up_since - detected)
            log.warning("embedded Triton on %s restarted (restart %d), %.1fs after it failed", self.grpc_url,
                        self.restarts, self._up_since - detected)
            return True

    def _restart(self) -> bool:
        with self._lock:
            if self._closing.is_set():
                return False
            self._stubs = {}
            self.server.start()
            self._stubs = stub_processes(self.server.process.pid)[0]
            return True

    def _give_up(self, problem: str) -> bool:
        self.gave_up = True
        detail = (f"{len(self._attempts)} restart(s) within {self.policy.window_s:.0f}s; giving up (last problem: "
                  f"{problem}); requests to {self.grpc_url} will fail")
        self._record("gave_up", detail)
        log.error("embedded Triton: %s. Server log %s:\n%s", detail, self.server.log_path, self.server.log_tail(20))
        return False

    def _record(self, kind: str, detail: str, down_s: float | None = None) -> None:
        event = ServerEvent(kind, detail, time.time(), self.restarts, down_s)
        self.events.append(event)
        if self.events_path is not None:
            try:
                with open(self.events_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(asdict(event)) + "\n")
            except OSError as exc:
                log.warning("could not record %s in %s: %s", kind, self.events_path, exc)
        self.on_event(event)
