"""Collectives for methods and the engine: rank/world queries and the gathers a contrastive loss needs.

Every helper is the identity (or rank 0 of 1) when no process group of more than one rank is
running, so single-process code pays nothing. The engine starts the group
(advfast.engine.distributed.setup, under torchrun); methods only call these.

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

``shuffled_forward`` is MoCo's shuffle-BN for the momentum (key) encoders.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_active():
        dist.barrier()


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
