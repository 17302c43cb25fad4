"""The reward client: structured conversations in, scores and per-row status out, over gRPC (asyncio). The trainer
scores through it; so do `templar score`, the integrations and any user code.

- splits conversations into requests of `rows_per_request`, at most `max_in_flight` in flight at once;
- gives every attempt an end-to-end deadline (`request_timeout_s`);
- retries with exponential backoff and full jitter, but only on UNAVAILABLE, DEADLINE_EXCEEDED and
  RESOURCE_EXHAUSTED (anything else is a real answer: retrying it would only repeat it);
- spreads requests over several endpoints by least outstanding requests and fails over when one goes away or
  hangs (UNAVAILABLE or DEADLINE_EXCEEDED cools the endpoint down for `endpoint_cooldown_s`, then it is tried again);
- reads the RM's fingerprints (template and tokenizer sha256) on connect, logs them, and refuses replicas that
  serve different RMs under one name;
- backs off when a server sheds load (its queue is full): fewer requests in flight (`InFlightWindow`, halved on
  overload, grown back by one per window of answers) and a retry after a jittered wait, instead of hammering it;
- never invents a reward: a row that still fails gets NaN and a status saying why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from templar import contract, wire
from templar.conversation import conversation_rows
from templar.errors import ConfigError, FingerprintMismatchError, RewardServerError

log = logging.getLogger("templar.reward_client")

RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
COOL_DOWN = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})  # the endpoint is gone or hung: try the others first
# What Triton answers when a model's queue is full (dynamic_batching default_queue_policy max_queue_size): the server
# is alive and shedding load, so the client slows down rather than avoiding the endpoint.
OVERLOAD_MESSAGES = ("Exceeds maximum queue size",)
UNREACHED_PREFIXES = ("no reward endpoint serves", "reward request failed after")  # statuses of rows never scored


def unreached(status: str) -> bool:
    """The row failed because the reward server could not be reached or did not answer in time (worth trying again
    later), not because of what the row holds."""
    return status.removeprefix(contract.ERROR_PREFIX).startswith(UNREACHED_PREFIXES)


def overloaded(code: str, message: str) -> bool:
    """A server that sheds load (RESOURCE_EXHAUSTED, or UNAVAILABLE because its queue is full)."""
    return code == "RESOURCE_EXHAUSTED" or (code == "UNAVAILABLE" and any(m in message for m in OVERLOAD_MESSAGES))


class InFlightWindow:
    """How many requests may be in flight at once: starts at `limit`; an overloaded answer halves it (at most once per
    `cooldown_s`, so one burst of refusals counts once); each answered request grows it by 1/size, i.e. by one per
    window of answers (additive increase, multiplicative decrease, as TCP does)."""

    def __init__(self, limit: int, cooldown_s: float = 1.0) -> None:
        self.limit = limit
        self.size = float(limit)
        self.in_flight = 0
        self.cooldown_s = cooldown_s
        self.shrunk_at = float("-inf")
        self._changed: asyncio.Condition | None = None

    async def acquire(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < max(1, int(self.size)))
            self.in_flight += 1

    async def release(self, overloaded: bool) -> None:
        async with self._changed:
            self.in_flight -= 1
            now = time.monotonic()
            if overloaded and now - self.shrunk_at > self.cooldown_s:
                self.size, self.shrunk_at = max(1.0, self.size / 2), now
                log.info("reward server overloaded: at most %d request(s) in flight now", int(self.size))
            elif not overloaded:
                self.size = min(float(self.limit), self.size + 1.0 / self.size)
            self._changed.notify_all()


@dataclass
class RewardClientConfig:
    model: str  # the RM's name in Triton
    endpoints: list[str] = field(default_factory=lambda: [wire.DEFAULT_URL])  # host:port, gRPC
    rows_per_request: int = 32  # conversations per gRPC request (capped by the model's max_batch_size)
    max_in_flight: int = 8  # concurrent requests over all endpoints
    request_timeout_s: float = 120.0  # end-to-end deadline of one attempt
    max_attempts: int = 6  # first attempt + retries, per request
    backoff_base_s: float = 0.25  # retry k sleeps uniform(0, min(backoff_max_s, backoff_base_s * 2**k))
    backoff_max_s: float = 8.0
    endpoint_cooldown_s: float = 2.0  # an endpoint that was UNAVAILABLE or missed a deadline is avoided this long
    connect_timeout_s: float = 30.0  # connect(): how long to wait for at least one endpoint to be ready
    compression: str | None = None  # "gzip" or "deflate" for large conversations over slow links
    headers: dict[str, str] = field(default_factory=dict)  # sent with every call (e.g. a proxy's auth header)
    tls: bool = False  # gRPC over TLS (a server started with `templar serve --tls-cert ... --tls-key ...`)
    tls_ca: str | None = None  # PEM file of the CA that signed the server's certificate; None = the system's roots
    tls_cert: str | None = None  # this client's certificate (PEM), for a server that demands one (mutual TLS)
    tls_key: str | None = None  # its private key (PEM)
    expected_fingerprints: dict[str, str] = field(default_factory=dict)  # e.g. {"chat_template_sha256": "..."}


@dataclass
class RewardResult:
    scores: np.ndarray  # [N] float32, NaN where the row failed
    status: list[str]  # "ok" or "error: ..."
    num_tokens: np.ndarray  # [N] int32, tokens the RM scored
    truncated: np.ndarray  # [N] bool
    latency_s: float  # wall time of the whole score() call
    attempts: int  # gRPC attempts made, retries included
    model_versions: dict[str, int] = field(default_factory=dict)  # RM version -> rows it scored

    @property
    def newest_version(self) -> str | None:
        """The highest RM version that scored rows of this call (after a hot swap: the new one)."""
        return max(self.model_versions, key=_version_key, default=None)

    @property
    def ok(self) -> np.ndarray:
        return np.array([contract.is_ok(s) for s in self.status], dtype=bool)

    @property
    def failed_rows(self) -> int:
        return int((~self.ok).sum())


@dataclass
class _Endpoint:
    url: str
    client: Any
    outstanding: int = 0
    down_until: float = 0.0
    answered: int = 0  # requests it answered
    failed: int = 0  # attempts that ended in an error there (unreachable, too slow, overloaded, refused)


class RewardClient:
    """Async core with a sync face: `score()` blocks, `submit()` returns a future (overlap it with other work)."""

    def __init__(self, config: RewardClientConfig) -> None:
        if not config.endpoints:
            raise ConfigError("RewardClientConfig.endpoints is empty: give at least one host:port")
        given = [name for name in ("tls_ca", "tls_cert", "tls_key") if getattr(config, name)]
        if given and not config.tls:
            raise ConfigError(f"{', '.join(given)} given but tls is off: set tls=True to talk TLS to the server")
        self.config = config
        self.fingerprints: dict[str, str] = {}
        self.parameters: dict[str, str] = {}  # every parameter of the entry's config (fingerprints among them)
        self.max_batch_size: int | None = None
        self._endpoints: list[_Endpoint] = []
        self._rr = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._connected = False
        self._connect_lock: asyncio.Lock | None = None
        self.window = InFlightWindow(config.max_in_flight)  # shared by every score() call of this client
        self.model_version: str | None = None  # the newest RM version seen answering
        self.version_changes: list[dict[str, Any]] = []  # each swap seen: time, old and new version, fingerprints

    # -- event loop for the sync API ------------------------------------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="reward-client", daemon=True)
            self._thread.start()
        return self._loop

    def _run(self, coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self._ensure_loop())

    def connect(self) -> dict[str, str]:
        return self._run(self.connect_async()).result()

    def score(self, conversations: Sequence[Any]) -> RewardResult:
        return self._run(self.score_async(conversations)).result()

    def submit(self, conversations: Sequence[Any]) -> concurrent.futures.Future:
        """Start scoring in the background; `.result()` gives the RewardResult."""
        return self._run(self.score_async(conversations))

    def rendered_text(self, conversations: Sequence[Any]) -> list[str]:
        """The exact text each conversation becomes under the RM's own template (asks `<rm>_preprocess`)."""
        return self._run(self._rendered_text_async(conversations)).result()

    def close(self) -> None:
        if self._loop is not None:
            self._run(self._close_async()).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- async core -----------------------------------------------------------------------------------------------
    async def _close_async(self) -> None:
        for endpoint in self._endpoints:
            await endpoint.client.close()
        self._endpoints = []
        self._connected = False

    def _make_endpoints(self) -> None:
        c = self.config
        tls = wire.TlsSettings(c.tls_ca, c.tls_cert, c.tls_key) if c.tls else None
        self._endpoints = [_Endpoint(url, wire.aio_client(url, tls=tls)) for url in c.endpoints]

    async def connect_async(self) -> dict[str, str]:
        """Check the endpoints, read and log the RM's fingerprints. Waits up to connect_timeout_s for one."""
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._connected:
                return self.fingerprints
            if not self._endpoints:
                self._make_endpoints()
            deadline = time.monotonic() + self.config.connect_timeout_s
            seen: dict[str, dict[str, str]] = {}
            errors: dict[str, str] = {}
            while True:
                for endpoint in self._endpoints:
                    if endpoint.url in seen:
                        continue
                    try:
                        config = await endpoint.client.get_model_config(
                            self.config.model, as_json=True, headers=self.config.headers or None,
                            client_timeout=5.0)
                        seen[endpoint.url] = _fingerprints(config["config"])
                        self.parameters = _parameters(config["config"])
                        if self.max_batch_size is None:
                            self.max_batch_size = int(config["config"].get("max_batch_size", 0)) or None
                    except Exception as exc:  # noqa: BLE001 - reported below with the endpoint's name
                        errors[endpoint.url] = f"{wire.status_code(exc)}: {exc}"
                        endpoint.down_until = time.monotonic() + self.config.endpoint_cooldown_s
                if seen and (len(seen) == len(self._endpoints) or time.monotonic() > deadline):
                    break
                if time.monotonic() > deadline:
                    raise RewardServerError(
                        f"no reward endpoint serves model {self.config.model!r}: "
                        + "; ".join(f"{url}: {err}" for url, err in errors.items()))
                await asyncio.sleep(0.5)
            distinct = {tuple(sorted(fp.items())) for fp in seen.values()}
            if len(distinct) > 1:
                raise FingerprintMismatchError(f"endpoints serve different versions of {self.config.model!r}: {seen}")
            self.fingerprints = next(iter(seen.values()))
            for key, expected in self.config.expected_fingerprints.items():
                if self.fingerprints.get(key) != expected:
                    raise FingerprintMismatchError(f"{self.config.model}: {key} is {self.fingerprints.get(key)!r}, "
                                            f"expected {expected!r}")
            for url in errors.keys() - seen.keys():
                log.warning("reward endpoint %s is not answering yet (%s); requests fail over to the others",
                            url, errors[url])
            log.info("reward model %s on %s: chat_template sha256 %s, tokenizer sha256 %s, weights sha256 %s, "
                     "max_length %s, special tokens %s", self.config.model, ", ".join(seen),
                     self.fingerprints.get(contract.PARAM_TEMPLATE_SHA256, "?"),
                     self.fingerprints.get(contract.PARAM_TOKENIZER_SHA256, "?"),
                     self.fingerprints.get(contract.PARAM_WEIGHTS_SHA256, "?"),
                     self.fingerprints.get(contract.PARAM_MAX_LENGTH, "?"),
                     self.fingerprints.get(contract.PARAM_SPECIAL_TOKENS, "?"))
            self._connected = True
            return self.fingerprints

    async def _rendered_text_async(self, conversations: Sequence[Any]) -> list[str]:
        await self.connect_async()
        result = await self._pick().client.infer(
            contract.preprocess_model_name(self.config.model),
            wire.conversation_inputs(conversation_rows(conversations)),
            outputs=wire.requested_outputs((contract.TEXT, contract.STATUS)),
            client_timeout=self.config.request_timeout_s, headers=self.config.headers or None)
        texts = contract.decode_strings(result.as_numpy(contract.TEXT))
        status = contract.decode_strings(result.as_numpy(contract.STATUS))
        return [text if contract.is_ok(st) else st for text, st in zip(texts, status)]

    def _pick(self) -> _Endpoint:
        """Least outstanding requests among endpoints not cooling down; round-robin among ties."""
        now = time.monotonic()
        healthy = [e for e in self._endpoints if e.down_until <= now] or \
            [min(self._endpoints, key=lambda e: e.down_until)]
        self._rr += 1
        fewest = min(e.outstanding for e in healthy)
        candidates = [e for e in healthy if e.outstanding == fewest]
        return candidates[self._rr % len(candidates)]

    def endpoint_stats(self) -> dict[str, dict[str, int]]:
        """Per endpoint: requests answered, attempts that failed there, requests outstanding now."""
        return {e.url: {"answered": e.answered, "failed": e.failed, "outstanding": e.outstanding}
                for e in self._endpoints}

    def _has_other_healthy(self, endpoint: _Endpoint) -> bool:
        now = time.monotonic()
        return any(e is not endpoint and e.down_until <= now for e in self._endpoints)

    async def score_async(self, conversations: Sequence[Any]) -> RewardResult:
        """Score conversations (Conversation objects, row dicts or message lists)."""
        started = time.perf_counter()
        rows = conversation_rows(conversations)
        try:
            await self.connect_async()
        except FingerprintMismatchError:
            raise
        except RewardServerError as exc:  # a dead server costs these rows their rewards, never the caller its run
            return _failed(len(rows), contract.error_status(str(exc)), time.perf_counter() - started, 0)
        size = self.config.rows_per_request
        if self.max_batch_size:
            size = min(size, self.max_batch_size)
        semaphore = asyncio.Semaphore(self.config.max_in_flight)

        async def bounded(chunk: list[bytes]):
            async with semaphore:
                return await self._score_chunk(chunk)

        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        parts = await asyncio.gather(*(bounded(chunk) for chunk in chunks))
        results = [part for part, _ in parts]
        versions: dict[str, int] = {}
        for part in results:
            if part.model_version:
                versions[part.model_version] = versions.get(part.model_version, 0) + len(part.status)
        await self._note_versions(versions)
        return RewardResult(
            scores=np.concatenate([r.scores for r in results] or [np.zeros(0)]).astype(np.float32),
            status=[s for r in results for s in r.status],
            num_tokens=np.concatenate([r.num_tokens for r in results] or [np.zeros(0)]).astype(np.int32),
            truncated=np.concatenate([r.truncated for r in results] or [np.zeros(0)]).astype(bool),
            latency_s=time.perf_counter() - started,
            attempts=sum(attempts for _, attempts in parts), model_versions=versions,
        )

    async def _note_versions(self, versions: dict[str, int]) -> None:
        """A version newer than the one seen so far answered: the RM was swapped. Read and log its fingerprints."""
        newest = max(versions, key=_version_key, default=None)
        if newest is None or newest == self.model_version or (
                self.model_version is not None and _version_key(newest) < _version_key(self.model_version)):
            return
        old_version, old = self.model_version, dict(self.fingerprints)
        self.model_version = newest
        if old_version is None:
            return  # the first answer: the version connect() found
        try:
            config = await self._pick().client.get_model_config(
                self.config.model, as_json=True, headers=self.config.headers or None, client_timeout=5.0)
            self.fingerprints = _fingerprints(config["config"])
        except Exception as exc:  # noqa: BLE001 - the swap is still logged, without the new fingerprints
            log.warning("reward model %s: could not read the new version's fingerprints (%s)", self.config.model, exc)
        changed = {k: (old.get(k), v) for k, v in self.fingerprints.items() if old.get(k) != v}
        self.version_changes.append({"time": time.time(), "from": old_version, "to": newest,
                                     "fingerprints": dict(self.fingerprints), "changed": sorted(changed)})
        log.warning("reward model %s: now served by version %s (was %s); changed: %s", self.config.model, newest,
                    old_version, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) or "no fingerprint")

    async def _attempt(self, endpoint: _Endpoint, data: np.ndarray):
        """One gRPC call, inside the in-flight window (released before any backoff wait)."""
        await self.window.acquire()
        shed = False
        try:
            return await endpoint.client.infer(
                self.config.model, wire.conversation_inputs(data), outputs=wire.requested_outputs(),
                client_timeout=self.config.request_timeout_s, headers=self.config.headers or None,
                compression_algorithm=self.config.compression)
        except Exception as exc:
            shed = overloaded(wire.status_code(exc), wire.error_message(exc))
            raise
        finally:
            await self.window.release(shed)

    async def _score_chunk(self, rows: list[bytes]) -> tuple[wire.EntryResult, int]:
        """One request of `rows`, retried as configured; (per-row results, gRPC attempts made). A refusal from a
        server that sheds load does not use up an attempt: it is retried (after a wait) until request_timeout_s."""
        data = contract.encode_strings(rows)
        last_error = ""
        failures = tries = 0  # failures count against max_attempts; tries are all gRPC calls made
        shed_until = time.monotonic() + self.config.request_timeout_s
        while True:
            tries += 1
            endpoint = self._pick()
            endpoint.outstanding += 1
            try:
                result = await self._attempt(endpoint, data)
                endpoint.answered += 1
                return wire.decode_entry(result), tries
            except Exception as exc:  # noqa: BLE001 - classified below; never lost
                code, message = wire.status_code(exc), wire.error_message(exc)
                last_error = f"{code}: {message}"
                endpoint.failed += 1
                shedding = overloaded(code, message)  # alive and busy: slow down, do not avoid it
                failures += not shedding
                if code not in RETRYABLE or failures >= self.config.max_attempts or \
                        (shedding and time.monotonic() > shed_until):
                    break
                if code in COOL_DOWN and not shedding:  # gone, or hung (a stopped process answers nothing)
                    endpoint.down_until = time.monotonic() + self.config.endpoint_cooldown_s
                    if self._has_other_healthy(endpoint):
                        log.info("reward endpoint %s: %s, failing over", endpoint.url, code)
                        continue
                await asyncio.sleep(self._backoff(max(failures, tries - failures), code, endpoint.url))
            finally:
                endpoint.outstanding -= 1
        status = contract.error_status(f"reward request failed after {tries} attempt(s): {last_error}")
        failed = _failed(len(rows), status, 0.0, tries)
        return wire.EntryResult(failed.scores, failed.status, failed.num_tokens, failed.truncated), tries

    def _backoff(self, retry: int, code: str, url: str) -> float:
        """Full jitter: uniform(0, min(backoff_max_s, backoff_base_s * 2**(retry-1)))."""
        delay = random.uniform(0, min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (retry - 1)))
        log.info("reward request failed (%s) on %s; retry %d in %.2fs", code, url, retry, delay)
        return delay


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


def _failed(n: int, status: str, latency_s: float, attempts: int) -> RewardResult:
    return RewardResult(np.full(n, np.nan, np.float32), [status] * n, np.zeros(n, np.int32), np.zeros(n, bool),
                        latency_s, attempts)


def _parameters(config: Mapping[str, Any]) -> dict[str, str]:
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def _fingerprints(config: Mapping[str, Any]) -> dict[str, str]:
    params = _parameters(config)
    return {key: params[key] for key in contract.FINGERPRINT_PARAMS if key in params}
