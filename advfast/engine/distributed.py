"""Data-parallel training on PyTorch's own engine: torchrun's environment, the process group, DDP.

    torchrun --nproc_per_node=N $(which advfast-train) --method acl ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each worker's environment; ``setup`` reads them,
starts the process group (NCCL on GPUs, gloo on CPUs) and picks the worker's device (cuda:LOCAL_RANK).
Without those variables (or with WORLD_SIZE=1) nothing is started and every collective is the
identity, so single-process code pays nothing.

The collectives themselves (gathers, shuffle-BN, rank queries) live one floor down in advfast.dist,
where methods import them; this module is the engine's side: the process group, per-rank seeds,
the DDP-wrapped step and SyncBatchNorm. BatchNorm statistics stay per rank (as in SimCLR's DDP code)
unless sync_bn converts them (``convert_sync_bn``, CUDA only); the momentum key encoders use
shuffle-BN (``advfast.dist.shuffled_forward``) either way (docs/distributed.md).
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# the engine's calls (trainer: distributed.barrier, rank means, stop votes) are the collectives methods use
from advfast.dist import all_reduce_mean, barrier, is_active, max_over_ranks  # noqa: F401


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun, "
                         f"which sets it") from None


def detect() -> DistInfo:
    """The torchrun environment of this process (rank 0 of 1 when not launched by torchrun)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}; launch with torchrun")
    if local < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local}; launch with torchrun")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """The worker's device: cuda:LOCAL_RANK when training on GPUs, ``device`` otherwise."""
    device = torch.device(device)
    if not info.enabled or device.type != "cuda":
        return device
    if info.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {info.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                         f"use --nproc_per_node={torch.cuda.device_count()} or fewer")
    return torch.device("cuda", info.local_rank)


def setup(device: torch.device, info: DistInfo | None = None, timeout_s: float = 1800.0) -> tuple[DistInfo, torch.device]:
    """Start the process group when launched by torchrun; returns (info, this worker's device).

    Idempotent: a process group already started (by the caller or a test) is used as it is.
    """
    info = detect() if info is None else info
    device = device_for(info, device)
    if not info.enabled:
        return info, device
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; install a build with it to use torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
        atexit.register(cleanup)  # the group this call started ends with the process
    if dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
        raise RuntimeError(f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with "
                           f"RANK={info.rank}, WORLD_SIZE={info.world_size}")
    return info, device


def cleanup() -> None:
    """Tear the process group down (safe to call when none was started)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank_: int, step: int = 0) -> int:
    """A per-rank seed (attack random starts differ across ranks); rank 0 at step 0 keeps ``seed``
    itself, so a one-process run draws exactly what it drew before distributed training existed.
    ``step``: the seed of a rank resumed at that step (only rank 0's stream is in the checkpoint)."""
    if rank_ == 0 and step == 0:
        return int(seed)
    from advfast.data.loader import mix_seed

    return mix_seed(seed, rank_, 0x5EED, step)


class NullLogger:
    """The metric logger of ranks other than 0: logs nothing."""

    def log(self, record) -> None:
        pass

    def close(self) -> None:
        pass


# ---- the DDP-wrapped step ------------------------------------------------------------------------
class _Step(nn.Module):
    """DDP synchronises gradients only for forwards that go through DDP.forward: this runs the
    method's whole training_step (attack included) as that forward."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch):
        return self.method.training_step(batch)


def wrap_step(method: nn.Module, device: torch.device, find_unused_parameters: bool = False):
    """``step(batch) -> (loss, metrics)``: the method's training_step, under DDP when distributed.

    ``method`` is not modified (its state_dict keys stay those of a single-process run, so
    checkpoints move freely between world sizes). Buffers (BN statistics, queues) are broadcast
    from rank 0 at each step, as DDP does by default."""
    if not is_active():
        return method.training_step
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DDP(_Step(method), device_ids=ids, find_unused_parameters=find_unused_parameters)


def convert_sync_bn(method: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``method`` (each branch of a multi-branch BN on its own, the momentum key
    encoders included) becomes a torch SyncBatchNorm: statistics over the global batch, per branch.

    In place (state_dict keys and the branch switches are unchanged). Only for CUDA devices under
    torchrun: torch synchronises BN statistics for GPU tensors only. In one process SyncBatchNorm
    computes exactly what BatchNorm does."""
    if is_active() and torch.device(device).type != "cuda":
        raise ValueError("sync_bn needs CUDA GPUs (torch's SyncBatchNorm synchronises GPU tensors only); "
                         "on CPU ranks leave it off: the key encoders already use shuffle-BN")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if converted is not method:  # only when ``method`` itself is a bare BatchNorm
        raise TypeError("convert_sync_bn expects a model containing BatchNorm layers, not a BatchNorm")
    return method

