"""Data-parallel training on PyTorch's own engine: torchrun's environment, the process group, DDP.

    torchrun --nproc_per_node=N $(which advfast-train) --method acl ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each worker's environment; ``setup`` reads them,
starts the process group (NCCL on GPUs, gloo on CPUs) and picks the worker's device (cuda:LOCAL_RANK).
Without those variables (or with WORLD_SIZE=1) nothing is started and every helper here is the
identity, so single-process code pays nothing.

Contrastive losses need the *global* batch, not each rank's slice:

* ``gather_with_grad`` is a differentiable all_gather: its backward sums the incoming gradients over
  the ranks and hands each rank the part for its own rows. Every rank computes the same global
  loss, so rank r's features receive ``world_size`` times dL/dz_r, and DDP's averaging of the
  parameter gradients divides that factor away: the update is that of one process holding the
  whole batch. (torch.distributed.nn's all_gather does the same, but its backward needs
  all_to_all, which gloo lacks on some builds; an all_reduce works on every backend.)
* ``gather_views`` gathers a view-major (V*B, d) block into a view-major (V*W*B, d) one, rank-major
  inside each view, the layout of one process whose batch is the ranks' batches concatenated.
* ``all_gather`` (no gradient) is for momentum-queue keys: every rank enqueues the same keys, so
  the queues stay identical.

In an input-gradient attack on a gathered loss the gradient reaching this rank's images is likewise
``world_size`` times dL/dx; PGD and FGSM use only its sign (linf) or per-sample direction (l2), so
the attack is that of one process. An attack loss that adds a gathered term to a rank-local one
would need the local term scaled by ``world_size`` to keep the one-process direction (this is why
advcl and rocl keep their per-rank contrastive losses for now).

``shuffled_forward`` is MoCo's shuffle-BN for the momentum (key) encoders. Otherwise BatchNorm
statistics stay per rank (as in SimCLR's DDP code); SyncBN is not implemented (docs/distributed.md).
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    return rank() == 0


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


def barrier() -> None:
    if is_active():
        dist.barrier()


def rank_seed(seed: int, rank_: int, step: int = 0) -> int:
    """A per-rank seed (attack random starts differ across ranks); rank 0 at step 0 keeps ``seed``
    itself, so a one-process run draws exactly what it drew before distributed training existed.
    ``step``: the seed of a rank resumed at that step (only rank 0's stream is in the checkpoint)."""
    if rank_ == 0 and step == 0:
        return int(seed)
    from advfast.data.loader import _mix

    return _mix(seed, rank_, 0x5EED, step)


# ---- collectives ------------------------------------------------------------------------------------
class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        x = x.contiguous()  # collectives take plain contiguous tensors (channels_last is not)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place: never on autograd's own buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        r = dist.get_rank()
        return grad[r * ctx.rows:(r + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 (rank order); gradients flow back to each rank's
    rows. Every rank must pass the same shape. Identity when not distributed."""
    if not is_active():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, in rank order, detached (queue keys)."""
    if not is_active():
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def gather_views(z: torch.Tensor, n_views: int) -> torch.Tensor:
    """View-major (V*B, d) rows of this rank -> view-major (V*W*B, d) rows of the global batch.

    Inside each view the rows are in rank order, the layout of one process whose batch is the
    ranks' batches concatenated. Differentiable (``gather_with_grad``)."""
    if not is_active():
        return z
    if z.shape[0] % n_views:
        raise ValueError(f"z has {z.shape[0]} rows, not a multiple of n_views={n_views}")
    b = z.shape[0] // n_views
    g = gather_with_grad(z.reshape(n_views, b, *z.shape[1:]).transpose(0, 1).contiguous())  # (W*B, V, ...)
    return g.transpose(0, 1).reshape(-1, *z.shape[1:])


def shuffled_forward(fn, x: torch.Tensor) -> torch.Tensor:
    """MoCo's shuffle-BN: ``fn`` (a train-mode forward with BatchNorm) runs on a random slice of the
    global batch instead of this rank's own rows, and the outputs come back to the rows' owners.

    BN then never normalises an image's key with the statistics of the batch its query sits in (the
    intra-batch signal MoCo's shuffle removes). The permutation is drawn on rank 0 and broadcast.
    Every rank must pass the same number of rows. ``fn(x)`` itself when not distributed."""
    if not is_active():
        return fn(x)
    b, r = x.shape[0], dist.get_rank()
    everyone = gather_with_grad(x)
    perm = torch.randperm(everyone.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    mine = everyone.index_select(0, perm[r * b:(r + 1) * b])
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        mine = mine.contiguous(memory_format=torch.channels_last)  # the layout the model was given
    out = gather_with_grad(fn(mine))
    return out.index_select(0, torch.argsort(perm)[r * b:(r + 1) * b])


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the ranks (a new tensor); ``x`` itself when not distributed."""
    if not is_active():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.div_(dist.get_world_size())


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` of all ranks (a host sync: call it rarely)."""
    if not is_active():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


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

