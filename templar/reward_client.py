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
- backs off when a server sheds load (its queue is full): fewer requests in flight (`InFlightWindow`, the one limit
  on requests in flight, halved on overload, grown back by one per window of answers) and a retry after a jittered
  wait, instead of hammering it;
- never invents a reward: a row that still fails gets NaN and a status saying why;
- finds the replicas behind a name: an endpoint `dns:///name:port` (gRPC's naming, a Kubernetes headless Service)
  stands for every address the name has; it is resolved again every `dns_refresh_s` seconds and soon after a failure
  (templar.discovery), so replicas that appear get requests (once their fingerprints match) and replicas that vanish
  stop getting them.

It reaches each endpoint through a transport (templar.wire.Transport; gRPC by default), so a test's fault-injecting
wrapper or another protocol plugs in without touching the logic above.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from templar import contract, discovery, wire
from templar.conversation import conversation_rows
from templar.errors import ConfigError, FingerprintMismatchError, RewardServerError, ServingError
from templar.wire import RewardResult, Transport

__all__ = ["FingerprintMismatchError", "InFlightWindow", "RewardClient", "RewardClientConfig", "RewardResult",
           "RewardServerError", "Transport", "draining", "overloaded", "unreached"]  # RewardResult, errors: re-exported

log = logging.getLogger("templar.reward_client")

RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
COOL_DOWN = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})  # the endpoint is gone or hung: try the others first
# What Triton answers when a model's queue is full (dynamic_batching default_queue_policy max_queue_size): the server
# is alive and shedding load, so the client slows down rather than avoiding the endpoint.
OVERLOAD_MESSAGES = ("Exceeds maximum queue size",)
# What Triton answers while it shuts down (SIGTERM: a Kubernetes pod being deleted, a replica scaled away): it unloads
# its models but still takes calls for a while (NOT_FOUND: the model has no version left; INTERNAL: the entry model's
# call into its sub-models met the stopping server). The server is going away, not the model: try the other endpoints.
DRAINING_MESSAGES = {"NOT_FOUND": ("has no available versions",), "INTERNAL": ("Server not ready",)}
UNREACHED_PREFIXES = ("no reward endpoint serves", "reward request failed after")  # statuses of rows never scored


def unreached(status: str) -> bool:
    """The row failed because the reward server could not be reached or did not answer in time (worth trying again
    later), not because of what the row holds."""
    return status.removeprefix(contract.ERROR_PREFIX).startswith(UNREACHED_PREFIXES)


def draining(code: str, message: str) -> bool:
    """A server shutting down: its models unloaded under it (DRAINING_MESSAGES)."""
    return any(m in message for m in DRAINING_MESSAGES.get(code, ()))


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
    """The reward client's options: the one set every entrance takes (the Python client, the trainer's
    `reward.client`, every command's client flags, the integrations' keyword arguments and environment variables)."""

    model: str = ""  # the RM's name in Triton (an ensemble and the trainer set it per RM)
    endpoints: list[str] = field(default_factory=lambda: [wire.DEFAULT_URL])  # host:port of the server's gRPC port
    rows_per_request: int = 32  # conversations per gRPC request (capped by the model's max_batch_size)
    max_in_flight: int = 8  # concurrent requests over all endpoints
    request_timeout_s: float = 120.0  # end-to-end deadline of one attempt, in seconds
    max_attempts: int = 6  # first attempt + retries, per request
    backoff_base_s: float = 0.25  # retry k sleeps uniform(0, min(backoff_max_s, backoff_base_s * 2**k)) seconds
    backoff_max_s: float = 8.0  # the longest backoff sleep between two attempts, in seconds
    endpoint_cooldown_s: float = 2.0  # seconds an endpoint that was UNAVAILABLE or missed a deadline is avoided
    # seconds between two lookups of a dns:///name:port endpoint's addresses (one also follows a failure, at most one
    # a second)
    dns_refresh_s: float = 30.0
    connect_timeout_s: float = 30.0  # how long to wait for at least one endpoint to answer, in seconds
    compression: str | None = None  # "gzip" or "deflate" for large conversations over slow links
    headers: dict[str, str] = field(default_factory=dict)  # sent with every call (e.g. a proxy's auth header)
    tls: bool = False  # gRPC over TLS (a server started with `templar serve --tls-cert ... --tls-key ...`)
    tls_ca: str | None = None  # PEM file of the CA that signed the server's certificate; None = the system's roots
    tls_cert: str | None = None  # this client's certificate (PEM), for a server that demands one (mutual TLS)
    tls_key: str | None = None  # its private key (PEM)
    # refuse the RM unless its fingerprints are these, e.g. {"chat_template_sha256": "..."} (model-config parameters)
    expected_fingerprints: dict[str, str] = field(default_factory=dict)

    def tls_settings(self) -> wire.TlsSettings | None:
        """The TLS settings of `tls`, `tls_ca`, `tls_cert`, `tls_key` (None: plaintext)."""
        return wire.TlsSettings(self.tls_ca, self.tls_cert, self.tls_key) if self.tls else None

    def check(self, where: str = "RewardClientConfig", *, target: bool = True) -> RewardClientConfig:
        """Every option usable, or a ConfigError naming `where.<field>`; with `target`, also the model and the
        endpoints (parsed in place). Returns self."""
        if target:
            if not self.model:
                raise ConfigError(f"{where}.model is empty: name the served reward model")
            self.endpoints = wire.parse_endpoints(self.endpoints, f"{where}.endpoints")
        for name in ("rows_per_request", "max_in_flight", "max_attempts", "request_timeout_s", "connect_timeout_s",
                     "dns_refresh_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name} must be positive, got {getattr(self, name)}")
        if self.compression not in (None, "gzip", "deflate"):
            raise ConfigError(f"{where}.compression must be gzip, deflate or None, got {self.compression!r}")
        given = [name for name in ("tls_ca", "tls_cert", "tls_key") if getattr(self, name)]
        if given and not self.tls:  # a CA file without TLS is a mistake, never silently plaintext
            raise ConfigError(f"{where}: {', '.join(given)} given but tls is off: set tls too, to talk TLS to the "
                              "server")
        return self


@dataclass
class _Endpoint:
    url: str
    transport: Transport
    outstanding: int = 0
    down_until: float = 0.0
    answered: int = 0  # requests it answered
    failed: int = 0  # attempts that ended in an error there (unreachable, too slow, overloaded, refused)


class RewardClient:
    """Async core with a sync face: `score()` blocks, `submit()` returns a future (overlap it with other work)."""

    def __init__(self, config: RewardClientConfig,
                 transport: Callable[[str], Transport] | None = None) -> None:
        """`transport`: url -> the Transport to reach it (default: gRPC, over TLS as the config says)."""
        self.config = dataclasses.replace(config).check()  # a copy: the caller's object is never rewritten
        self._transport = transport or self._grpc_transport
        self.fingerprints: dict[str, str] = {}
        self.parameters: dict[str, str] = {}  # every parameter of the entry's config (fingerprints among them)
        self.max_batch_size: int | None = None
        self._endpoints: list[_Endpoint] = []
        self._rr = 0
        # endpoint discovery (dns: endpoints): the addresses each target had at its last good lookup, when to look
        # again, the lookup running now, endpoints no longer listed (closed once their requests are done)
        self._discovering = any(discovery.is_dns_target(e) for e in self.config.endpoints)
        self._resolved: dict[str, list[str]] = {}
        self._resolve_errors: list[str] = []
        self._next_resolve = self._last_resolve = 0.0
        self._resolving: asyncio.Task | None = None
        self._retired: list[_Endpoint] = []
        self.endpoint_changes: list[dict[str, Any]] = []  # each change discovery made: time, added, removed
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
        if self._resolving is not None:
            self._resolving.cancel()
        for endpoint in self._endpoints + self._retired:
            await endpoint.transport.close()
        self._endpoints, self._retired = [], []
        self._connected = False

    def _grpc_transport(self, url: str) -> Transport:
        return wire.GrpcTransport(url, tls=self.config.tls_settings())

    # -- endpoints and their discovery ---------------------------------------------------------------------------
    def _lookup(self) -> list[str]:
        """The config's endpoints, each dns: target replaced by the addresses its name has now (a target whose lookup
        fails keeps the addresses of its last good one: a DNS hiccup never drops live replicas)."""
        urls: list[str] = []
        errors = []
        for endpoint in self.config.endpoints:
            if not discovery.is_dns_target(endpoint):
                urls.append(endpoint)
                continue
            try:
                self._resolved[endpoint] = discovery.resolve(discovery.parse_dns_target(endpoint))
            except ServingError as exc:
                errors.append(str(exc))
            urls += self._resolved.get(endpoint, [])
        self._resolve_errors = errors
        return list(dict.fromkeys(urls))

    async def _refresh_endpoints(self, verify: bool = True) -> None:
        """Look the dns: targets up again and follow what changed: new addresses become endpoints (with `verify`,
        only once they answer with this RM's fingerprints), addresses no longer listed stop getting requests."""
        self._last_resolve = time.monotonic()
        self._next_resolve = self._last_resolve + self.config.dns_refresh_s
        urls = await asyncio.to_thread(self._lookup)
        for error in self._resolve_errors:
            log.warning("reward endpoint discovery: %s; keeping the addresses of the last good lookup", error)
        listed = set(urls)
        kept = [e for e in self._endpoints if e.url in listed]
        known = {e.url for e in kept}
        added = []
        for url in (u for u in urls if u not in known):
            endpoint = _Endpoint(url, self._transport(url))
            if verify and not await self._serves_this_rm(endpoint):
                await endpoint.transport.close()
                self._next_resolve = min(self._next_resolve, time.monotonic() + self.config.endpoint_cooldown_s)
                continue
            added.append(endpoint)
        if not kept and not added and self._endpoints:
            log.warning("reward endpoint discovery: no listed address serves %s; keeping %s", self.config.model,
                        ", ".join(e.url for e in self._endpoints))
            return
        removed = [e for e in self._endpoints if e.url not in listed]
        self._endpoints = kept + added
        self._retired += removed
        await self._close_retired()
        if added or removed:
            change = {"time": time.time(), "added": [e.url for e in added], "removed": [e.url for e in removed]}
            self.endpoint_changes.append(change)
            log.info("reward endpoints of %s: %s (added %s, removed %s)", self.config.model,
                     ", ".join(e.url for e in self._endpoints), ", ".join(change["added"]) or "none",
                     ", ".join(change["removed"]) or "none")

    async def _serves_this_rm(self, endpoint: _Endpoint) -> bool:
        """A new replica answers with the fingerprints the others serve (else it is left out, and said so)."""
        try:
            config = await endpoint.transport.model_config(self.config.model, timeout_s=5.0,
                                                           headers=self.config.headers)
        except Exception as exc:  # noqa: BLE001 - not ready yet: tried again at the next lookup
            log.info("reward endpoint %s (discovered) is not answering yet: %s", endpoint.url, wire.status_code(exc))
            return False
        fingerprints = _fingerprints(config)
        if self.fingerprints and fingerprints != self.fingerprints:
            log.error("reward endpoint %s (discovered) serves a different %s (%s); it gets no requests",
                      endpoint.url, self.config.model, fingerprints)
            return False
        return True

    async def _close_retired(self) -> None:
        for endpoint in [e for e in self._retired if e.outstanding == 0]:
            self._retired.remove(endpoint)
            await endpoint.transport.close()

    def _maybe_refresh(self, soon: bool = False) -> None:
        """Start a lookup in the background when one is due (`soon`: after a failure, at most one a second)."""
        if not self._discovering:
            return
        if soon:
            self._next_resolve = min(self._next_resolve, self._last_resolve + 1.0)
        if time.monotonic() >= self._next_resolve and (self._resolving is None or self._resolving.done()):
            self._resolving = asyncio.get_running_loop().create_task(self._refresh_in_background())

    async def _refresh_in_background(self) -> None:
        try:
            await self._refresh_endpoints()
        except Exception as exc:  # noqa: BLE001 - the endpoints stay as they are; the next lookup tries again
            log.warning("reward endpoint discovery failed (%s: %s); keeping %s", type(exc).__name__, exc,
                        ", ".join(e.url for e in self._endpoints))

    async def connect_async(self) -> dict[str, str]:
        """Check the endpoints, read and log the RM's fingerprints. Waits up to connect_timeout_s for one."""
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._connected:
                return self.fingerprints
            deadline = time.monotonic() + self.config.connect_timeout_s
            if not self._endpoints:
                await self._refresh_endpoints(verify=False)
            seen: dict[str, dict[str, str]] = {}
            errors: dict[str, str] = {}
            while True:
                for endpoint in self._endpoints:
                    if endpoint.url in seen:
                        continue
                    try:
                        config = await endpoint.transport.model_config(self.config.model, timeout_s=5.0,
                                                                       headers=self.config.headers)
                        seen[endpoint.url] = _fingerprints(config)
                        endpoint.down_until = 0.0  # it answers now: a slow first try no longer keeps it cold
                        self.parameters = _parameters(config)
                        if self.max_batch_size is None:
                            self.max_batch_size = int(config.get("max_batch_size", 0)) or None
                    except Exception as exc:  # noqa: BLE001 - reported below with the endpoint's name
                        errors[endpoint.url] = f"{wire.status_code(exc)}: {exc}"
                        endpoint.down_until = time.monotonic() + self.config.endpoint_cooldown_s
                if seen and (len(seen) == len(self._endpoints) or time.monotonic() > deadline):
                    break
                if time.monotonic() > deadline:
                    raise RewardServerError(
                        f"no reward endpoint serves model {self.config.model!r}: "
                        + "; ".join([*(f"{url}: {err}" for url, err in errors.items()), *self._resolve_errors]))
                await asyncio.sleep(0.5)
                if self._discovering and not seen:  # a name with no address yet, or none answering: look again
                    await self._refresh_endpoints(verify=False)
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

    @property
    def outputs(self) -> tuple[str, ...]:
        """What each request asks for: the four outputs of every RM, and a process RM's steps (templar.contract)."""
        kind = self.parameters.get(contract.PARAM_RM_KIND) or "outcome"
        return contract.entry_signature(kind).output_names

    @property
    def objectives(self) -> list[str]:
        """A multi-objective RM's objective names, in the order of `RewardResult.objectives` (after connect)."""
        return json.loads(self.parameters.get(contract.PARAM_OBJECTIVES) or "[]")

    async def _rendered_text_async(self, conversations: Sequence[Any]) -> list[str]:
        await self.connect_async()
        answer = await self._pick().transport.infer(
            contract.preprocess_model_name(self.config.model),
            contract.encode_strings(conversation_rows(conversations)), outputs=(contract.TEXT, contract.STATUS),
            timeout_s=self.config.request_timeout_s, headers=self.config.headers)
        texts = contract.decode_strings(answer.arrays[contract.TEXT])
        status = contract.decode_strings(answer.arrays[contract.STATUS])
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
            return RewardResult.failed(len(rows), contract.error_status(str(exc)), time.perf_counter() - started)
        size = self.config.rows_per_request
        if self.max_batch_size:
            size = min(size, self.max_batch_size)
        # every request starts at once and waits for a place in the in-flight window (the one limit on requests in
        # flight, shared by every score() call of this client)
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        parts = await asyncio.gather(*(self._score_chunk(chunk) for chunk in chunks))
        result = RewardResult.concat(parts, time.perf_counter() - started)
        await self._note_versions(result.model_versions)
        return result

    async def _note_versions(self, versions: dict[str, int]) -> None:
        """A version newer than the one seen so far answered: the RM was swapped. Read and log its fingerprints."""
        newest = max(versions, key=wire.version_key, default=None)
        if newest is None or newest == self.model_version or (
                self.model_version is not None and wire.version_key(newest) < wire.version_key(self.model_version)):
            return
        old_version, old = self.model_version, dict(self.fingerprints)
        self.model_version = newest
        if old_version is None:
            return  # the first answer: the version connect() found
        try:
            config = await self._pick().transport.model_config(self.config.model, timeout_s=5.0,
                                                               headers=self.config.headers)
            self.fingerprints = _fingerprints(config)
        except Exception as exc:  # noqa: BLE001 - the swap is still logged, without the new fingerprints
            log.warning("reward model %s: could not read the new version's fingerprints (%s)", self.config.model, exc)
        changed = {k: (old.get(k), v) for k, v in self.fingerprints.items() if old.get(k) != v}
        self.version_changes.append({"time": time.time(), "from": old_version, "to": newest,
                                     "fingerprints": dict(self.fingerprints), "changed": sorted(changed)})
        log.warning("reward model %s: now served by version %s (was %s); changed: %s", self.config.model, newest,
                    old_version, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) or "no fingerprint")

    async def _attempt(self, endpoint: _Endpoint, data: np.ndarray) -> wire.Answer:
        """One call, holding a place in the in-flight window (taken by the caller; given back here, before any
        backoff wait)."""
        shed = False
        try:
            return await endpoint.transport.infer(
                self.config.model, data, outputs=self.outputs, timeout_s=self.config.request_timeout_s,
                headers=self.config.headers, compression=self.config.compression)
        except Exception as exc:
            shed = overloaded(wire.status_code(exc), wire.error_message(exc))
            raise
        finally:
            await self.window.release(shed)

    async def _score_chunk(self, rows: list[bytes]) -> RewardResult:
        """One request of `rows`, retried as configured (its `attempts`: the calls made). A refusal from a server
        that sheds load does not use up an attempt: it is retried (after a wait) until request_timeout_s."""
        data = contract.encode_strings(rows)
        last_error = ""
        failures = tries = 0  # failures count against max_attempts; tries are all calls made
        shed_until = None  # retrying refusals ends request_timeout_s after the request first went out
        while True:
            tries += 1
            await self.window.acquire()  # before picking: the endpoint is chosen when the request can go
            shed_until = shed_until or time.monotonic() + self.config.request_timeout_s
            self._maybe_refresh()
            endpoint = self._pick()
            endpoint.outstanding += 1
            try:
                answer = await self._attempt(endpoint, data)
                endpoint.answered += 1
                return wire.decode_entry(answer, attempts=tries)
            except Exception as exc:  # noqa: BLE001 - classified below; never lost
                code, message = wire.status_code(exc), wire.error_message(exc)
                last_error = f"{code}: {message}"
                endpoint.failed += 1
                shedding = overloaded(code, message)  # alive and busy: slow down, do not avoid it
                going = draining(code, message)  # shutting down: as good as gone
                failures += not shedding
                if (code not in RETRYABLE and not going) or failures >= self.config.max_attempts or \
                        (shedding and time.monotonic() > shed_until):
                    break
                if (code in COOL_DOWN and not shedding) or going:  # gone, hung (a stopped process answers nothing)
                    endpoint.down_until = time.monotonic() + self.config.endpoint_cooldown_s
                    self._maybe_refresh(soon=True)  # a replica that vanished may have left the name too
                    if self._has_other_healthy(endpoint):
                        log.info("reward endpoint %s: %s, failing over", endpoint.url, code)
                        continue
                await asyncio.sleep(self._backoff(max(failures, tries - failures), code, endpoint.url))
            finally:
                endpoint.outstanding -= 1
                if self._retired and not endpoint.outstanding:
                    await self._close_retired()  # a replica discovery dropped: closed once its last answer is in
        status = contract.error_status(f"reward request failed after {tries} attempt(s): {last_error}")
        return RewardResult.failed(len(rows), status, attempts=tries)

    def _backoff(self, retry: int, code: str, url: str) -> float:
        """Full jitter: uniform(0, min(backoff_max_s, backoff_base_s * 2**(retry-1)))."""
        delay = random.uniform(0, min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (retry - 1)))
        log.info("reward request failed (%s) on %s; retry %d in %.2fs", code, url, retry, delay)
        return delay


def _parameters(config: Mapping[str, Any]) -> dict[str, str]:
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def _fingerprints(config: Mapping[str, Any]) -> dict[str, str]:
    params = _parameters(config)
    return {key: params[key] for key in contract.FINGERPRINT_PARAMS if key in params}
