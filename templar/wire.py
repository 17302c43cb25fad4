"""Client side of the wire contract over gRPC: the one request builder and the one response decoder that the reward
client, `templar loadtest`, `templar bench` and `templar score` share, with the gRPC settings and error
classification they all use. The tensor names and types come from the table in templar.contract."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from templar import contract
from templar.errors import ConfigError

MAX_GRPC_MESSAGE_BYTES = 2**31 - 1
DEFAULT_URL = "127.0.0.1:8001"  # Triton's gRPC port on this machine, where `templar serve` listens by default


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
class EntryResult:
    """The entry model's per-row outputs, decoded."""

    scores: np.ndarray  # [N] float32, NaN where the row failed
    status: list[str]
    num_tokens: np.ndarray  # [N] int32
    truncated: np.ndarray  # [N] bool
    model_version: str = ""  # the version of the RM that answered (Triton's response says)


def decode_entry(result: Any) -> EntryResult:
    """An InferResult of `<rm>` -> per-row arrays (dtypes from the contract's table)."""
    def column(name: str) -> np.ndarray:
        return result.as_numpy(name).reshape(-1).astype(contract.ENTRY.output(name).dtype.numpy, copy=False)

    return EntryResult(scores=column(contract.SCORE), status=contract.decode_strings(result.as_numpy(contract.STATUS)),
                       num_tokens=column(contract.NUM_TOKENS), truncated=column(contract.TRUNCATED),
                       model_version=result.get_response().model_version)


def status_code(exc: BaseException) -> str:
    """The gRPC status code name of a failed call ("UNAVAILABLE", ...), or the exception's type name."""
    status = getattr(exc, "status", None)
    code = (status() if callable(status) else None) or ""
    return code.replace("StatusCode.", "") or type(exc).__name__


def error_message(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    return str(message() if callable(message) else exc)
