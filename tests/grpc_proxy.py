"""A real gRPC proxy in front of a real Triton server, for what the client does on the wire: it forwards every unary
call (raw bytes, any method) and records how many inference calls were in flight at once; it can also answer the
first calls with a status of its choice, as a rate-limiting gateway (Envoy, a service mesh) in front of a reward
server does with RESOURCE_EXHAUSTED. Nothing is mocked: both hops are gRPC over TCP.

`GatedTransport` does the same one layer up, in the client's process: a transport (templar.wire.Transport) wrapped
around the real gRPC one, plugged in through `RewardClient(config, transport=...)`."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc

from templar.errors import TransportError
from templar.wire import Transport

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


class GrpcProxy:
    def __init__(self, upstream: str, *, reject_first: int = 0, reject_code: grpc.StatusCode | None = None,
                 max_workers: int = 64) -> None:
        self.upstream = grpc.insecure_channel(upstream, options=[("grpc.max_send_message_length", -1),
                                                                 ("grpc.max_receive_message_length", -1)])
        self.reject_first, self.reject_code = reject_first, reject_code
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.infer_calls = self.rejected = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                  options=[("grpc.max_send_message_length", -1),
                                           ("grpc.max_receive_message_length", -1)])
        self.server.add_generic_rpc_handlers([_Handler(self)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def forward(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        infer = method == INFER_METHOD
        if infer:
            with self.lock:
                self.infer_calls += 1
                reject = self.rejected < self.reject_first
                self.rejected += reject
                self.in_flight += not reject
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if reject:
                context.abort(self.reject_code, "proxy: too many requests, try again later")
        try:
            call = self.upstream.unary_unary(method)
            return call(request, timeout=context.time_remaining(),
                        metadata=[(k, v) for k, v in context.invocation_metadata() if not k.startswith("grpc-")])
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")
        finally:
            if infer:
                with self.lock:
                    self.in_flight -= 1

    def __enter__(self) -> GrpcProxy:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None)
        self.upstream.close()


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: GrpcProxy) -> None:
        self.proxy = proxy

    def service(self, details: grpc.HandlerCallDetails):
        method = details.method

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self.proxy.forward(method, request, context)

        return grpc.unary_unary_rpc_method_handler(forward)


class GatedTransport(Transport):
    """Counts the inference calls in flight through it and refuses the first `reject_first` with `reject_code` (a
    TransportError, as a transport of another protocol reports its failures); everything else goes to `inner`."""

    def __init__(self, inner: Transport, *, reject_first: int = 0, reject_code: str = "RESOURCE_EXHAUSTED") -> None:
        self.inner, self.url = inner, inner.url
        self.reject_first, self.reject_code = reject_first, reject_code
        self.in_flight = self.max_in_flight = self.infer_calls = self.rejected = 0

    async def infer(self, model, rows, **kwargs):
        self.infer_calls += 1  # one event loop: no lock needed
        if self.rejected < self.reject_first:
            self.rejected += 1
            raise TransportError(self.reject_code, "gate: too many requests, try again later")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.inner.infer(model, rows, **kwargs)
        finally:
            self.in_flight -= 1

    async def model_config(self, model, **kwargs):
        return await self.inner.model_config(model, **kwargs)

    async def close(self) -> None:
        await self.inner.close()
