"""The serving knobs `templar export` writes into the generated configs, with their defaults. Here, beside the
Python models that read them, so that a model never imports the export tool (and its ONNX and protobuf
dependencies, which the GPU image does not install)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EntrySettings:
    """Serving knobs written into the generated configs (documented defaults; docs/benchmarks.md has the
    measurements behind them)."""

    max_batch_size: int = 256  # rows per request the entry point and the preprocess model accept
    # Micro-batches: rows of similar length scored together. On a 2-core CPU small ones win (a few thousand token
    # slots), and the padding cap matters when dynamic batches are small (the trainer sends a few requests at once).
    micro_batch_rows: int = 32  # at most this many rows per scoring call (also the scoring model's max_batch_size)
    micro_batch_tokens: int = 4096  # at most rows * longest-row tokens per scoring call
    micro_batch_max_padding: float | None = 0.1  # cut a micro-batch before its padding share would exceed this
    queue_delay_us: int = 2000  # dynamic batcher wait for more requests: long enough to merge a burst of requests
    entry_instances: int = 2  # one preprocesses while the other waits on the scoring model
    preprocess_instances: int = 1
    scorer_instances: int = 1
    intra_op_threads: int = 0  # ONNX Runtime threads in the CPU scorer; 0 = one per physical core
    intra_op_spinning: bool = False  # busy-waiting between runs burns CPU a trainer on the same cores could use
    gpu_fp16: bool = False  # GPU container: TensorRT execution accelerator in FP16 instead of CUDA FP32
    # Guards against hostile input (docs/reliability.md). A row past a limit gets a per-row error naming it; a request
    # past max_request_bytes is refused whole; past max_queue_size queued requests, new ones are refused at once
    # (UNAVAILABLE, which the reward client backs off from) instead of queueing without end.
    max_row_bytes: int = 1 << 20  # UTF-8 bytes of one conversation row (tokenizing 1 MiB takes ~0.5-0.75 s)
    max_messages: int = 1024  # messages in one row
    max_json_depth: int = 64  # JSON nesting of one row
    max_request_bytes: int = 32 << 20  # all rows of one request together
    max_queue_size: int = 64  # requests waiting for the entry model; 0 = unbounded
