"""DeepSpeed plumbing: process group, engines, and the few collectives the trainer needs. CPU ranks talk over gloo,
GPU ranks over NCCL; one process without a launcher is a world of one."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from templar.server.ports import free_port
from templar.errors import TemplarError
from templar.trainer.config import TrainConfig

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    """Join the launcher's process group (deepspeed / torchrun set RANK etc.), or make a world of one."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not torch.distributed.is_initialized():
        from deepspeed.accelerator import get_accelerator

        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    _unlink_deepspeed_shm(world)
    return world


def _unlink_deepspeed_shm(world: World) -> None:
    """DeepSpeed's CPU all-reduce maps one /dev/shm segment per rank and never unlinks it (64 MiB each, left behind
    by every run). Once all ranks have mapped all segments (a barrier after init), the names are no longer needed:
    unlinking them now frees the memory when the processes exit, even if they are killed."""
    barrier()
    segment = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                                  f"{os.environ.get('MASTER_PORT')}_{world.rank}")
    segment.unlink(missing_ok=True)


def zero_stage(config: TrainConfig) -> int:
    """The configured ZeRO stage, except that one rank without offload runs stage 0: ZeRO partitions optimizer
    states, gradients and weights over ranks, so with a single rank stages 1-3 only add copies (on the CPU demo,
    stage 2 took 0.6 s more per step than stage 0: flattening and bucketing every gradient)."""
    ds = config.deepspeed
    single = not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)
    return 0 if single and not ds.offload else ds.zero_stage


def deepspeed_config(config: TrainConfig) -> dict:
    ppo, ds = config.ppo, config.deepspeed
    zero: dict = {"stage": zero_stage(config)}
    if ds.offload and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if ds.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": ppo.micro_batch_size,
        "gradient_accumulation_steps": ppo.mini_batch_size // ppo.micro_batch_size,
        "gradient_clipping": ppo.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # the plain torch AdamW works with offload and needs no compiled op
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def make_engine(model: torch.nn.Module, lr: float, config: TrainConfig):
    import deepspeed

    # fused: one kernel for the whole update (x3 faster than the per-tensor loop on the CPU, measured on the demo)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=1e-5, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config))
    return engine


def allreduce_sum(values: np.ndarray) -> np.ndarray:
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor.numpy()


def allreduce_max(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor[0])


def run_on_main(world: World, work: Callable[[], T]) -> T:
    """`work()` on rank 0, its result broadcast to every rank. If it raises, rank 0 raises the error and every other
    rank an error of the same class with the same message (a TemplarError stays one), so no rank waits forever at
    the next collective for a rank that gave up."""
    result, error = None, None
    if world.is_main:
        try:
            result = work()
        except Exception as exc:
            error = exc
    told = broadcast_object((result, None if error is None else (type(error), str(error))))
    if error is not None:
        raise error
    result, failure = told
    if failure is not None:
        kind, message = failure
        raise kind(message) if issubclass(kind, TemplarError) else RuntimeError(f"rank 0 failed: {message}")
    return result


def broadcast_object(obj, src: int = 0):
    box = [obj]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def parameters_sha256(module: torch.nn.Module) -> str:
    """A fingerprint of a module's weights (ZeRO-3 partitions are gathered first)."""
    import deepspeed

    params = list(module.parameters())
    digest = hashlib.sha256()
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")):
        for name, param in module.named_parameters():
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def rng_state() -> bytes:
    import random

    return pickle.dumps({"python": random.getstate(), "numpy": np.random.get_state(),
                         "torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})


def set_rng_state(blob: bytes) -> None:
    import random

    state = pickle.loads(blob)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
