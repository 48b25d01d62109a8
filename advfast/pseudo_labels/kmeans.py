"""k-means on torch tensors: Lloyd's algorithm with k-means++ init, seeded and deterministic on a
device, and scikit-learn's KMeans behind the same result type (the ``kmeans_backend="sklearn"`` choice).

Used by the ClusterFit pseudo-label generator (advfast.pseudo_labels.generate) and by any method that
clusters features itself (DynACL's pseudo-label step, advfast.methods.lp_pseudo_labels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class KMeansResult:
    labels: torch.Tensor  # int64 (N,)
    centers: torch.Tensor  # (k, D)
    inertia: float  # sum of squared distances to the assigned centre
    iterations: int


def _sq_dists(x: torch.Tensor, c: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    # ||x||^2 - 2 x.c + ||c||^2, clamped: the expansion can dip below 0 by rounding
    return (x_sq[:, None] - 2.0 * (x @ c.t()) + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def _assign(x, c, x_sq, chunk):
    """Nearest centre and its squared distance, chunk by chunk (never N x k at once for big N)."""
    labels, dist = [], []
    for s in range(0, x.shape[0], chunk):
        d = _sq_dists(x[s:s + chunk], c, x_sq[s:s + chunk])
        m, i = d.min(1)
        labels.append(i)
        dist.append(m)
    return torch.cat(labels), torch.cat(dist)


def _kmeans_pp(x, k, x_sq, gen, chunk):
    """Greedy k-means++ (as scikit-learn: 2 + log k candidate draws per centre, keep the best)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = torch.randint(n, (1,), generator=gen, device="cpu").item()
    centers = [x[first]]
    closest = _sq_dists(x, x[first:first + 1], x_sq)[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: any point will do
            cand = torch.randint(n, (trials,), generator=gen, device="cpu").to(x.device)
        else:
            probs = (closest / total).double().cpu()
            cand = torch.multinomial(probs, trials, replacement=True, generator=gen).to(x.device)
        d_cand = torch.cat([_sq_dists(x[s:s + chunk], x[cand], x_sq[s:s + chunk])
                            for s in range(0, n, chunk)])  # (n, trials)
        new_closest = torch.minimum(closest[:, None], d_cand)
        best = new_closest.sum(0).argmin()
        centers.append(x[cand[best]])
        closest = new_closest[:, best]
    return torch.stack(centers)


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 300, tol: float = 1e-4,
           chunk: int = 16384, init: torch.Tensor | None = None) -> KMeansResult:
    """Lloyd's k-means on x's device, k-means++ init from ``seed``, or from the given initial centres
    ``init`` (k, D) (then ``seed`` is unused): e.g. another k-means code's starting point, to compare
    the two from the same start.

    Deterministic for a given seed and device: centre sums are one-hot matmuls (no atomics), and
    empty clusters are re-seeded with the points farthest from their centres (as scikit-learn).
    ``tol`` is relative to the mean per-feature variance of x (scikit-learn's convention).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating 2-D tensor (N, D), got {getattr(x, 'shape', type(x))}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    if init is not None:
        if not isinstance(init, torch.Tensor) or tuple(init.shape) != (k, x.shape[1]) or not init.is_floating_point():
            raise ValueError(f"init must be a floating (k, D) = ({k}, {x.shape[1]}) tensor of initial centres, got "
                             f"{getattr(init, 'dtype', type(init).__name__)} {tuple(getattr(init, 'shape', ()))}")
        if not torch.isfinite(init).all():
            raise ValueError("init holds NaN or infinite values")
    x_sq = (x * x).sum(1)
    tol_abs = tol * x.var(0).mean().item()
    if init is None:
        centers = _kmeans_pp(x, k, x_sq, torch.Generator().manual_seed(int(seed)), chunk)
    else:
        centers = init.detach().to(device=x.device, dtype=x.dtype).clone()
    it = 0
    for it in range(1, max_iter + 1):
        labels, dist = _assign(x, centers, x_sq, chunk)
        sums = torch.zeros_like(centers)
        counts = torch.zeros(k, dtype=x.dtype, device=x.device)
        for s in range(0, n, chunk):
            onehot = torch.nn.functional.one_hot(labels[s:s + chunk], k).to(x.dtype)
            sums += onehot.t() @ x[s:s + chunk]
            counts += onehot.sum(0)
        new = sums / counts.clamp_min(1)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            far = dist.topk(empty.numel()).indices
            new[empty] = x[far]
        shift = ((new - centers) ** 2).sum().item()
        centers = new
        if shift <= tol_abs:
            break
    labels, dist = _assign(x, centers, x_sq, chunk)
    return KMeansResult(labels=labels, centers=centers, inertia=dist.sum().item(), iterations=it)


def kmeans_sklearn(x: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 300,
                   tol: float = 1e-4) -> KMeansResult:
    from sklearn.cluster import KMeans

    arr = x.detach().cpu().numpy()
    km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=max_iter, tol=tol,
                random_state=int(seed)).fit(arr)
    return KMeansResult(labels=torch.from_numpy(km.labels_.astype(np.int64)),
                        centers=torch.from_numpy(km.cluster_centers_), inertia=float(km.inertia_),
                        iterations=int(km.n_iter_))
