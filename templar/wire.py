"""Client side of the wire contract: the one endpoint parser, the one request builder, the one result type and its
decoder, and the transport seam (`Transport`: how the reward client reaches one endpoint; `GrpcTransport` is gRPC's),
with the gRPC settings and error classification that the reward client, `templar loadtest`, `soak`, `hostile`,
`bench` and `score` share. The tensor names and types come from the table in templar.contract."""

from __future__ import annotations

import abc
import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from templar import contract, discovery
from templar.errors import ConfigError, TransportError

MAX_GRPC_MESSAGE_BYTES = 2**31 - 1
DEFAULT_URL = "127.0.0.1:8001"  # Triton's gRPC port on this machine, where `templar serve` listens by default


_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"  # one dot-separated part of a host name
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def parse_endpoints(endpoints: str | Iterable[str], what: str = "endpoints") -> list[str]:
    """`"h1:8001, h2:8001"` (or a list of such texts) -> `["h1:8001", "h2:8001"]`: every `host:port` checked (a host
    name, an IPv4 address or a bracketed IPv6 one, `[::1]:8001`; a port 1-65535), or a `dns:///name:port` target
    (every address the name has; the reward client looks it up again as it runs); `what` names the setting in
    errors."""
    items = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    found = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if not found:
        raise ConfigError(f"{what}: no endpoint given; give host:port[,host:port...], e.g. {DEFAULT_URL}")
    for i, endpoint in enumerate(found):
        if discovery.is_dns_target(endpoint):  # every replica behind a name (templar.discovery), kept as a target
            try:
                found[i] = str(discovery.parse_dns_target(endpoint))
            except ConfigError as exc:
                raise ConfigError(f"{what}: {exc}") from None
        else:
            _check_endpoint(endpoint, what)
    doubled = sorted({e for e in found if found.count(e) > 1})
    if doubled:
        raise ConfigError(f"{what}: {', '.join(doubled)} given more than once")
    return found


def _check_endpoint(endpoint: str, what: str) -> None:
    host, sep, port = endpoint.rpartition(":")
    example = f"host:port, e.g. {DEFAULT_URL} or [::1]:8001"
    if not sep or not host:
        raise ConfigError(f"{what}: {endpoint!r} is not {example} (the port is missing)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{what}: {endpoint!r} has no valid port ({port!r}; 1-65535); give {example}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ConfigError(f"{what}: {host} in {endpoint!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"{what}: {endpoint!r}: an IPv6 address goes in brackets, [{host}]:{port}")
    elif not _HOST_NAME.match(host):
        raise ConfigError(f"{what}: {host!r} in {endpoint!r} is not a host name or address; give {example}")


def channel_args(*, fast_reconnect: bool = True) -> list[tuple[str, int]]:
    """gRPC channel options: messages up to 2 GiB; with `fast_reconnect`, a restarted server is found within
    seconds (gRPC's default reconnect backoff grows to 120 s)."""
    args = [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES)]
    if fast_reconnect:
        args += [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                 ("grpc.max_reconnect_backoff_ms", 2000), ("grpc.keepalive_time_ms", 30000)]
    return args


@dataclass(frozen=True)
class TlsSettings:
    """TLS towards a server started with `templar serve --tls-cert/--tls-key`: `ca` is the PEM file of the CA that
    signed the server's certificate (None: the system's roots); `cert` + `key` are this client's own certificate,
    for a server that demands one (`--tls-client-ca`, mutual TLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def client_kwargs(self) -> dict[str, Any]:
        """tritonclient's ssl arguments (it reads the files itself); a missing file is named here."""
        if (self.cert is None) != (self.key is None):
            raise ConfigError("TLS: a client certificate needs its key, and a key its certificate (give both)")
        for what, path in (("CA file", self.ca), ("client certificate", self.cert), ("client key", self.key)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"TLS {what} {path}: no such file")
        return {"ssl": True, "root_certificates": self.ca, "private_key": self.key, "certificate_chain": self.cert}


def aio_client(url: str, *, fast_reconnect: bool = True, tls: TlsSettings | None = None):
    """An asyncio Triton gRPC client for `host:port` (over TLS when `tls` is given)."""
    import tritonclient.grpc.aio as grpcclient

    return grpcclient.InferenceServerClient(url, channel_args=channel_args(fast_reconnect=fast_reconnect),
                                            **(tls.client_kwargs() if tls else {}))


def sync_client(url: str, *, fast_reconnect: bool = True, tls: TlsSettings | None = None):
    """The blocking Triton gRPC client for `host:port` (over TLS when `tls` is given), for tools that call from
    threads."""
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url, channel_args=channel_args(fast_reconnect=fast_reconnect),
                                            **(tls.client_kwargs() if tls else {}))


def conversation_inputs(rows: np.ndarray | Sequence[str | bytes]) -> list[Any]:
    """The CONVERSATION input of a request: wire rows (bytes / str), or an already encoded [N, 1] tensor."""
    from tritonclient.grpc import InferInput  # the same class serves the sync and the asyncio client

    data = rows if isinstance(rows, np.ndarray) else contract.encode_strings(rows)
    (spec,) = contract.ENTRY.inputs
    tensor = InferInput(spec.name, list(data.shape), spec.dtype.client)
    tensor.set_data_from_numpy(data)
    return [tensor]


def requested_outputs(names: Sequence[str] = contract.ENTRY_OUTPUTS) -> list[Any]:
    from tritonclient.grpc import InferRequestedOutput

    return [InferRequestedOutput(name) for name in names]


@dataclass
class RewardResult:
    """Per-row scores of one or more requests to an RM: what `decode_entry` reads from one answer, what the reward
    client returns for a whole call (its requests concatenated) and what an ensemble keeps per RM."""

    scores: np.ndarray  # [N] float32, NaN where the row failed
    status: list[str]  # "ok" or "error: ..."
    num_tokens: np.ndarray  # [N] int32, tokens the RM scored
    truncated: np.ndarray  # [N] bool
    latency_s: float = 0.0  # wall time of the whole score() call
    attempts: int = 0  # gRPC attempts made, retries included
    row_versions: list[str] = field(default_factory=list)  # per row, the RM version that answered ("" where none did)
    # a process RM's (templar.steps): per row its steps' scores and where each step ends in the assistant content
    # sent (character offsets); None for an outcome RM
    step_scores: list[np.ndarray] | None = None
    step_ends: list[list[int]] | None = None
    # a multi-objective RM's: [N, K] one value per objective (NaN where the row failed), named by the RM's
    # `objectives` parameter (RewardClient.objectives); None for any other RM
    objectives: np.ndarray | None = None

    @property
    def model_versions(self) -> dict[str, int]:
        """RM version -> rows it scored (more than one after a hot swap)."""
        counts: dict[str, int] = {}
        for version in self.row_versions:
            if version:
                counts[version] = counts.get(version, 0) + 1
        return counts

    @property
    def newest_version(self) -> str | None:
        """The highest RM version that scored rows of this call (after a hot swap: the new one)."""
        return max(self.model_versions, key=version_key, default=None)

    @property
    def ok(self) -> np.ndarray:
        return np.array([contract.is_ok(s) for s in self.status], dtype=bool)

    @property
    def failed_rows(self) -> int:
        return int((~self.ok).sum())

    def with_aggregate(self, how: str | None) -> RewardResult:
        """A process RM's result with each scored row's score recomputed as `how` ("min", "last", "mean") of its
        step scores, in place of the aggregate the RM was exported with; unchanged for None or any other RM."""
        if how is None or self.step_scores is None:
            return self
        from templar.steps import aggregate

        scores = self.scores.copy()
        for i, steps in enumerate(self.step_scores):
            if contract.is_ok(self.status[i]) and len(steps):
                scores[i] = aggregate(steps, how)
        return dataclasses.replace(self, scores=scores)

    def rows(self, part: slice) -> RewardResult:
        """The result of a run of rows (a request's share of a batch scored together), versions included."""
        return RewardResult(self.scores[part], self.status[part], self.num_tokens[part], self.truncated[part],
                            self.latency_s, self.attempts, self.row_versions[part],
                            None if self.step_scores is None else self.step_scores[part],
                            None if self.step_ends is None else self.step_ends[part],
                            None if self.objectives is None else self.objectives[part])

    @classmethod
    def failed(cls, n: int, status: str, latency_s: float = 0.0, attempts: int = 0) -> RewardResult:
        """`n` rows that got no score, each with `status` saying why."""
        return cls(np.full(n, np.nan, np.float32), [status] * n, np.zeros(n, np.int32), np.zeros(n, bool),
                   latency_s, attempts, [""] * n)

    @classmethod
    def concat(cls, parts: Sequence[RewardResult], latency_s: float) -> RewardResult:
        """The requests of one call, in order: one result for all their rows, their attempts summed."""
        def joined(name: str, dtype: type) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts] or [np.zeros(0)]).astype(dtype)

        steps = any(p.step_scores is not None for p in parts)  # a failed request has none: no steps for its rows
        return cls(joined("scores", np.float32), [s for p in parts for s in p.status], joined("num_tokens", np.int32),
                   joined("truncated", bool), latency_s, sum(p.attempts for p in parts),
                   [v for p in parts for v in (p.row_versions or [""] * len(p.status))],
                   [x for p in parts for x in (p.step_scores or [np.zeros(0, np.float32)] * len(p.status))]
                   if steps else None,
                   [x for p in parts for x in (p.step_ends or [[]] * len(p.status))] if steps else None,
                   _joined_objectives(parts))


def _joined_objectives(parts: Sequence[RewardResult]) -> np.ndarray | None:
    """The objectives of several requests' rows (NaN for the rows of a request that got none: it failed)."""
    width = max((p.objectives.shape[1] for p in parts if p.objectives is not None), default=None)
    if width is None:
        return None
    return np.concatenate([p.objectives if p.objectives is not None else np.full((len(p.status), width), np.nan)
                           for p in parts]).astype(np.float32)


def version_key(version: str) -> tuple[int, str]:
    """Order of RM versions: numbers by value, above any non-numeric label."""
    return (int(version), "") if version.isdigit() else (-1, version)


@dataclass
class Answer:
    """One inference answer as a transport hands it back: output tensors by name, and the model version that
    answered (Triton's response says)."""

    arrays: dict[str, np.ndarray]
    model_version: str = ""


def answer_of(result: Any) -> Answer:
    """A tritonclient InferResult (sync or asyncio client) as an Answer."""
    response = result.get_response()
    return Answer({out.name: result.as_numpy(out.name) for out in response.outputs}, response.model_version)


def decode_entry(answer: Answer | Any, attempts: int = 1) -> RewardResult:
    """An answer of `<rm>` (an Answer, or a tritonclient InferResult) -> per-row arrays (dtypes from the contract's
    table), every row marked with the version that answered."""
    if not isinstance(answer, Answer):
        answer = answer_of(answer)

    def column(name: str) -> np.ndarray:
        return answer.arrays[name].reshape(-1).astype(contract.ENTRY.output(name).dtype.numpy, copy=False)

    status = contract.decode_strings(answer.arrays[contract.STATUS])
    steps = {}
    if contract.STEP_SCORES in answer.arrays:  # a process RM asked for its steps: ragged rows, cut to NUM_STEPS
        counts = answer.arrays[contract.NUM_STEPS].reshape(-1)
        scores = answer.arrays[contract.STEP_SCORES].astype(np.float32, copy=False)
        ends = answer.arrays[contract.STEP_ENDS].astype(np.int64, copy=False)
        steps = {"step_scores": [scores[i, :n] for i, n in enumerate(counts)],
                 "step_ends": [ends[i, :n].tolist() for i, n in enumerate(counts)]}
    if contract.SCORES in answer.arrays:  # a multi-objective RM asked for its objectives
        steps["objectives"] = answer.arrays[contract.SCORES].astype(np.float32, copy=False).reshape(len(status), -1)
    return RewardResult(scores=column(contract.SCORE), status=status, num_tokens=column(contract.NUM_TOKENS),
                        truncated=column(contract.TRUNCATED), attempts=attempts,
                        row_versions=[answer.model_version] * len(status), **steps)


class Transport(abc.ABC):
    """How the reward client reaches one endpoint (the seam httpx calls a transport): the client does the rest
    (splitting, deadlines, retries, balancing, fingerprints). `GrpcTransport` is the default; a test's fault-injecting
    wrapper or an HTTP (KServe v2 REST) transport plug in through `RewardClient(config, transport=factory)`.

    A failed call raises; the client reads the failure with `status_code` / `error_message`, which know gRPC's
    errors. A transport of another protocol raises `TransportError(code, message)` with the gRPC status name its
    failure means (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED are retried; e.g. HTTP 503, 504, 429)."""

    url: str

    @abc.abstractmethod
    async def infer(self, model: str, rows: np.ndarray, *, outputs: Sequence[str], timeout_s: float,
                    headers: Mapping[str, str] | None = None, compression: str | None = None) -> Answer:
        """One request of `rows` (an encoded [N, 1] CONVERSATION tensor) to `model`, answered within `timeout_s`."""

    @abc.abstractmethod
    async def model_config(self, model: str, *, timeout_s: float,
                           headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The model's config as JSON (`parameters`, `max_batch_size`, ...), as Triton's model-config API gives it."""

    async def close(self) -> None:  # noqa: B027 - optional: a transport without a connection has nothing to close
        """Release the connection (default: nothing to release)."""


class GrpcTransport(Transport):
    """Triton's gRPC API (tritonclient's asyncio client), over TLS when `tls` is given. Beside the two calls the
    client needs, the health and statistics calls the load tools read."""

    def __init__(self, url: str, *, tls: TlsSettings | None = None, fast_reconnect: bool = True) -> None:
        self.url = url
        self.client = aio_client(url, fast_reconnect=fast_reconnect, tls=tls)

    async def infer(self, model: str, rows: np.ndarray, *, outputs: Sequence[str], timeout_s: float,
                    headers: Mapping[str, str] | None = None, compression: str | None = None) -> Answer:
        result = await self.client.infer(model, conversation_inputs(rows), outputs=requested_outputs(outputs),
                                         client_timeout=timeout_s, headers=dict(headers) if headers else None,
                                         compression_algorithm=compression)
        return answer_of(result)

    async def model_config(self, model: str, *, timeout_s: float,
                           headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        config = await self.client.get_model_config(model, as_json=True, client_timeout=timeout_s,
                                                    headers=dict(headers) if headers else None)
        return config["config"]

    async def server_live(self, *, timeout_s: float, headers: Mapping[str, str] | None = None) -> bool:
        return await self.client.is_server_live(client_timeout=timeout_s, headers=dict(headers) if headers else None)

    async def model_ready(self, model: str, *, timeout_s: float, headers: Mapping[str, str] | None = None) -> bool:
        return await self.client.is_model_ready(model, client_timeout=timeout_s,
                                                headers=dict(headers) if headers else None)

    async def statistics(self, model: str, *, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Triton's cumulative inference statistics of `model` (JSON)."""
        return await self.client.get_inference_statistics(model, as_json=True,
                                                          headers=dict(headers) if headers else None)

    async def close(self) -> None:
        await self.client.close()


def status_code(exc: BaseException) -> str:
    """The gRPC status code name of a failed call ("UNAVAILABLE", ...), or the exception's type name."""
    if isinstance(exc, TransportError):
        return exc.code
    status = getattr(exc, "status", None)
    code = (status() if callable(status) else None) or ""
    return code.replace("StatusCode.", "") or type(exc).__name__


def error_message(exc: BaseException) -> str:
    if isinstance(exc, TransportError):
        return exc.message
    message = getattr(exc, "message", None)
    return str(message() if callable(message) else exc)
