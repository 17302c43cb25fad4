"""`templar gateway`: OpenRLHF's remote reward server, with every reward model applying its own chat template.

    POST /get_reward   {"query": [...], "prompts": [...], "labels": [...]}  ->  {"rewards", "scores", "extra_logs"}
    GET  /health       200 once every configured RM answers on its gRPC endpoints (with their fingerprints)

Rows are turned into messages (templar.integrations.openrlhf) and scored over gRPC by the reward client. OpenRLHF
sends one row per request with many requests in flight, so the rows of concurrent requests are gathered for a few
milliseconds (`MicroBatcher`) and scored together.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse

from templar.conversation import Messages
from templar.errors import DataError, TemplarError
from templar.integrations.openrlhf import OpenRLHFRewards, RowsFailed, request_rows
from templar.reward_client import RewardClientConfig
from templar.reward_ensemble import EnsembleResult, RewardEnsemble, WeightedModel
from templar.steps import check_aggregate
from templar.template_parser import TemplateParser

log = logging.getLogger("templar.gateway")


@dataclass
class GatewayOptions:
    actor_template: str  # the actor's tokenizer folder, or a family name fetched by `templar assets`
    models: list[str] = field(default_factory=list)  # NAME or NAME:WEIGHT, one per served RM
    host: str = "127.0.0.1"  # the address the gateway binds (loopback only by default)
    port: int = 5000  # its HTTP port
    failed_reward: float | None = None  # reward of a row that cannot be parsed or scored; None: fail the request
    aggregate: str | None = None  # a process RM's steps -> its reward: min, last, mean (None: as it was exported)
    batch_delay_ms: float = 5.0  # how long a request's rows wait for those of concurrent requests
    max_batch_rows: int = 256  # rows scored together at most
    template_kwargs: dict = field(default_factory=dict)  # the actor template's variables, e.g. a date_string
    # how the gateway reaches the RMs: endpoints, TLS, deadlines, retries (the reward client's options; no model)
    client: RewardClientConfig = field(default_factory=RewardClientConfig)


class MicroBatcher:
    """Rows of concurrent requests scored together: the first waiting request opens a batch that closes after
    `max_delay_s` or at `max_rows`; each request then gets its own rows' results."""

    def __init__(self, ensemble: RewardEnsemble, *, max_rows: int = 256, max_delay_s: float = 0.005,
                 aggregate: str | None = None) -> None:
        self.ensemble, self.max_rows, self.max_delay_s = ensemble, max_rows, max_delay_s
        self.aggregate = aggregate
        self._pending: list[tuple[list[Messages], asyncio.Future]] = []
        self._rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self.batches = 0  # batches sent (for the benchmark and the tests)

    async def score(self, conversations: list[Messages]) -> EnsembleResult:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((conversations, future))
        self._rows += len(conversations)
        if self._rows >= self.max_rows:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_delay_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._rows = self._pending, [], 0
        if batch:
            self.batches += 1
            asyncio.ensure_future(self._run(batch))

    async def _run(self, batch: list[tuple[list[Messages], asyncio.Future]]) -> None:
        rows = [conversation for conversations, _ in batch for conversation in conversations]
        try:
            result = await self.ensemble.score_async(rows, self.aggregate)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for conversations, future in batch:
            if not future.done():
                future.set_result(result.rows(slice(start, start + len(conversations))))
            start += len(conversations)


def create_app(rewards: OpenRLHFRewards, ensemble: RewardEnsemble, batcher: MicroBatcher) -> FastAPI:
    app = FastAPI(title="templar gateway")

    @app.get("/health")
    async def health():
        try:
            fingerprints = await asyncio.to_thread(ensemble.connect)
        except TemplarError as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return {"status": "ok", "models": fingerprints}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        try:
            queries, prompts, labels = request_rows(await request.json())
        except DataError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        rows = await asyncio.to_thread(rewards.rows, queries, prompts, labels)
        good = [c for c in rows.conversations if c is not None]
        result = await batcher.score(good) if good else None
        try:
            return JSONResponse(rewards.answer(rows, result))
        except RowsFailed as exc:
            log.warning("%s", exc)
            return JSONResponse({"error": str(exc)}, status_code=503 if exc.retryable else 422)

    return app


def build(options: GatewayOptions) -> tuple[FastAPI, RewardEnsemble, MicroBatcher]:
    """The app and what it holds; a TemplarError when the actor template or the models are not usable."""
    parser = TemplateParser.from_source(options.actor_template, template_kwargs=options.template_kwargs)
    ensemble = RewardEnsemble(WeightedModel.parse_list(options.models), options.client)
    batcher = MicroBatcher(ensemble, max_rows=options.max_batch_rows, max_delay_s=options.batch_delay_ms / 1e3,
                           aggregate=check_aggregate(options.aggregate, "--aggregate"))
    return create_app(OpenRLHFRewards(parser, options.failed_reward), ensemble, batcher), ensemble, batcher
