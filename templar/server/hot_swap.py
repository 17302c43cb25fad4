"""Hot swap (`templar reload`): serve a newly exported version of an RM (`templar export --version N`) without failing
a request, then unload the old one. Needs a server with model control (`templar serve --model-control`) and its
admin key ($TEMPLAR_ADMIN_KEY).

The three models of one export share a version number and the entry calls its sub-models at its own version, so the
swap happens at the entry, at once for every row:
  1. the preprocess and scoring models load the new version beside the old (a config override listing both versions,
     otherwise the config the server already uses: Triton then leaves the live old versions as they are);
  2. the entry loads from the repository: its new version calls the new sub-models, and Triton unloads the old entry
     once its in-flight requests are answered; we wait until it is gone (it may still call the old sub-models);
  3. the preprocess and scoring models load with the new version only (and with the config on disk, whose
     parameters describe it), so the old versions go.

What this relies on in Triton 2.51 (tests/test_hot_swap.py checks the outcome under load):
  * a load with a config override is always applied; a plain load after one is ignored unless a file changed since
    (Triton stamps the override with the current time), hence overrides in steps 1 and 3;
  * a loaded version whose folder is unchanged and whose config differs only in version_policy is updated in place,
    not re-initialised; any other change re-initialises it in the background while the old instance keeps serving;
  * versions a load drops are unloaded after the load call returns, once their requests are answered.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from templar import contract, wire
from templar.server.embedded import ADMIN_KEY_ENV, GRPC_ADMIN_HEADER
from templar.errors import ConfigError, ServingError
from templar.export.repository import existing_versions, model_names

GONE = ("UNAVAILABLE", "")  # states of a version that no longer serves (Triton's index, or not listed)
Log = Callable[[str], None]


@dataclass
class ReloadOptions:
    model: str  # the RM's entry name
    version: int | None = None  # default: the newest version folder of the RM in `repo`
    url: str = wire.DEFAULT_URL  # the server's gRPC endpoint
    repo: Path = Path("model_repository")  # the repository the server reads
    admin_key: str | None = None  # default: $TEMPLAR_ADMIN_KEY
    tls: wire.TlsSettings | None = None  # gRPC over TLS (`templar serve --tls-cert ...`)
    timeout_s: float = 600.0  # for each load, and for the old versions to finish their requests


@dataclass
class ReloadReport:
    model: str
    version: int
    loaded: list[str] = field(default_factory=list)  # "name:version"
    unloaded: list[str] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)  # the entry's config, as clients read it
    seconds: float = 0.0


class ModelControl:
    """Triton's model-repository protocol on one server, with the admin key; errors become one clear line."""

    def __init__(self, url: str, key: str, tls: wire.TlsSettings | None = None, timeout_s: float = 600.0) -> None:
        self.url, self.timeout_s = url, timeout_s
        self.headers = {GRPC_ADMIN_HEADER: key}
        self.client = wire.sync_client(url, fast_reconnect=False, tls=tls)

    def close(self) -> None:
        self.client.close()

    def call(self, what: str, method: str, *args, **kwargs) -> Any:
        try:
            return getattr(self.client, method)(*args, headers=self.headers, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tritonclient raises one type for every failure
            message = wire.error_message(exc)
            if "restricted" in message.lower():
                raise ConfigError(f"the server at {self.url} refused the admin key in ${ADMIN_KEY_ENV} (not the key "
                                  f"it was started with): {message}") from None
            if "not allowed" in message.lower() or "explicit model load" in message.lower():
                raise ServingError(f"the server at {self.url} does not allow model control; start it with "
                                   f"`templar serve --model-control`: {message}") from None
            raise ServingError(f"{what} at {self.url} failed: {wire.status_code(exc)}: {message}") from None

    def versions(self) -> dict[str, dict[int, str]]:
        """model -> {version: state} from the repository index."""
        index = self.call("reading the repository index", "get_model_repository_index", as_json=True,
                          client_timeout=30)
        out: dict[str, dict[int, str]] = {}
        for model in index.get("models", []):
            if model.get("version"):
                out.setdefault(model["name"], {})[int(model["version"])] = model.get("state", "")
        return out

    def config(self, name: str) -> dict[str, Any]:
        return self.call(f"reading the config of {name}", "get_model_config", name, as_json=True,
                         client_timeout=30)["config"]

    def load(self, name: str, config: dict[str, Any] | None = None) -> None:
        kwargs = {"config": json.dumps(config)} if config is not None else {}
        self.call(f"loading {name}", "load_model", name, client_timeout=self.timeout_s, **kwargs)

    def wait_gone(self, old: dict[str, set[int]]) -> None:
        """Until every listed version has stopped serving (unloaded after its in-flight requests)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            served = self.versions()
            left = [f"{name}:{v}" for name, versions in old.items() for v in sorted(versions)
                    if served.get(name, {}).get(v, "") not in GONE]
            if not left:
                return
            if time.monotonic() > deadline:
                raise ServingError(f"{', '.join(left)} still loaded {self.timeout_s:.0f}s after the swap")
            time.sleep(0.1)


def with_versions(config: dict[str, Any], versions: set[int]) -> dict[str, Any]:
    """A model config serving exactly `versions` (nothing else changed)."""
    return {**config, "version_policy": {"specific": {"versions": sorted(versions)}}}


def disk_config(repo: Path, name: str, served: dict[str, Any]) -> dict[str, Any]:
    """The config file of `name` the server reads (configs/*.pbtxt or config.pbtxt, the one with the served backend
    or platform), as JSON; the served config when none matches."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    folder = repo / name
    for path in [*sorted((folder / "configs").glob("*.pbtxt")), folder / "config.pbtxt"]:
        if not path.is_file():
            continue
        config = json_format.MessageToDict(text_format.Parse(path.read_text(), model_config_pb2.ModelConfig()),
                                           preserving_proto_field_name=True)
        if all(config[key] == served.get(key) for key in ("backend", "platform") if config.get(key)):
            return config
    return served


def admin_key(opts: ReloadOptions) -> str:
    key = opts.admin_key or os.environ.get(ADMIN_KEY_ENV)
    if not key:
        raise ConfigError(f"model control needs the server's admin key: set {ADMIN_KEY_ENV} to the key `templar serve "
                          "--model-control` was started with")
    return key


def target_version(opts: ReloadOptions) -> int:
    """The version to serve: --version, or the newest on disk; all three models must have it."""
    folders = model_names(opts.model)
    if not (Path(opts.repo) / opts.model).is_dir():
        raise ConfigError(f"{opts.repo} has no model {opts.model!r} (--repo is the repository the server reads)")
    newest = max(existing_versions(opts.repo, opts.model), default=0)
    version = opts.version if opts.version is not None else newest
    if version < 1:
        raise ConfigError(f"--version must be a positive integer, got {version}")
    if version != newest:  # the entry loads from disk, where Triton serves the newest version and config describes it
        raise ConfigError(f"version {version} of {opts.model!r} is not the newest in {opts.repo} ({newest}); to serve "
                          f"an older export again, export it as --version {newest + 1}")
    missing = [name for name in folders if not (Path(opts.repo) / name / str(version)).is_dir()]
    if missing:
        raise ConfigError(f"version {version} of {opts.model!r} is not in {opts.repo} (missing: "
                          f"{', '.join(missing)}); export it first with `templar export --version {version}`")
    return version


def ready(served: dict[str, dict[int, str]], name: str) -> set[int]:
    return {v for v, state in served.get(name, {}).items() if state == "READY"}


def timed(log: Log, what: str, action: Callable[[], None]) -> None:
    started = time.perf_counter()
    log(f"{what} ...")
    action()
    log(f"      done in {time.perf_counter() - started:.1f}s")


def swap_in(control: ModelControl, names: tuple[str, str, str], version: int, configs: dict[str, dict],
            old: dict[str, set[int]], log: Log) -> None:
    """Steps 1 and 2. On failure the sub-models go back to their old versions (Triton keeps the old entry when the
    new one fails to load)."""
    pre, scorer, entry = names
    try:
        for name in (pre, scorer):
            both = old[name] | {version}
            timed(log, f"loading {name} version(s) {', '.join(map(str, sorted(both)))}",
                  lambda name=name, both=both: control.load(name, with_versions(configs[name], both)))
        timed(log, f"loading {entry} version {version} (it calls {pre} and {scorer} version {version})",
              lambda: control.load(entry))
        serving = ready(control.versions(), entry)
        if version not in serving:
            raise ServingError(f"the server serves {entry} version(s) {sorted(serving)} after the load, not {version}: "
                               "does it read this --repo?")
    except Exception:
        for name in (pre, scorer):
            if old[name]:
                try:
                    control.load(name, with_versions(configs[name], old[name]))
                except ServingError as exc:
                    log(f"could not put {name} back to version(s) {sorted(old[name])}: {exc}")
        raise


def retire(control: ModelControl, repo: Path, names: tuple[str, str, str], version: int, configs: dict[str, dict],
           old: dict[str, set[int]], log: Log) -> None:
    """Step 3: once the old entry is gone (its last requests may still call the old sub-models), the sub-models keep
    only the new version, with the config on disk."""
    pre, scorer, entry = names
    if old[entry]:
        timed(log, f"waiting for {entry} version(s) {sorted(old[entry])} to answer their requests and unload",
              lambda: control.wait_gone({entry: old[entry]}))
    for name in (pre, scorer):
        timed(log, f"loading {name} version {version} only",
              lambda name=name: control.load(name, with_versions(disk_config(repo, name, configs[name]), {version})))
    timed(log, "waiting for the old sub-model versions to unload",
          lambda: control.wait_gone({pre: old[pre], scorer: old[scorer]}))


def served_fingerprints(config: dict[str, Any]) -> dict[str, str]:
    params = config.get("parameters", {})
    return {key: params[key]["string_value"] for key in contract.FINGERPRINT_PARAMS if key in params}


def reload_model(opts: ReloadOptions, log: Log = print) -> ReloadReport:
    """Serve version `opts.version` (default: the newest on disk) of `opts.model`, then unload the old versions."""
    started = time.perf_counter()
    key = admin_key(opts)
    version = target_version(opts)
    control = ModelControl(opts.url, key, opts.tls, opts.timeout_s)
    try:
        return swap(control, opts, version, log, started)
    finally:
        control.close()


def swap(control: ModelControl, opts: ReloadOptions, version: int, log: Log, started: float) -> ReloadReport:
    names = model_names(opts.model)
    served = control.versions()
    missing = [name for name in names if not ready(served, name)]
    if missing:
        raise ServingError(f"{', '.join(missing)} not loaded at {opts.url}: `templar reload` swaps the version of a "
                           "served RM")
    old = {name: ready(served, name) - {version} for name in names}
    report = ReloadReport(opts.model, version)
    if not any(old.values()) and all(version in ready(served, name) for name in names):
        log(f"{opts.model} version {version} is already served")
    else:
        configs = {name: control.config(name) for name in names[:2]}
        swap_in(control, names, version, configs, old, log)
        retire(control, Path(opts.repo), names, version, configs, old, log)
        report.loaded = [f"{name}:{version}" for name in names]
        report.unloaded = [f"{name}:{v}" for name in names for v in sorted(old[name])]
    report.fingerprints = served_fingerprints(control.config(opts.model))
    report.seconds = time.perf_counter() - started
    return report
