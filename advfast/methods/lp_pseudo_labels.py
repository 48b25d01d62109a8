"""The pseudo-label step of LP-AFT / LP-AFF on advfast's existing k-means (no second k-means).

The official step is ``kmeans_pytorch.kmeans(features, K)``: Lloyd's algorithm from K distinct random
data points (unseeded), stopped when (sum_k ||c_k - c_k'||)^2 < tol, returning the assignment made
*before* the last centre update. advfast runs ``advfast.pseudo_labels.kmeans`` (seeded k-means++
init, Lloyd to ``tol`` relative to the mean feature variance, at most ``max_iter`` rounds, labels of the
final centres). From the same initial centres both follow the same Lloyd iterates, so at convergence
they give the same labels and the same clustering objective; the labels of two unseeded official runs
differ anyway, which is why the step is compared by its objective (tests/test_dynacl_air_parts.py, and
tests/test_lp_post_stage.py from kmeans_pytorch's own kind of start, K random data points, given as
``init``). The stages that use it: advfast.methods.lp_post_stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advfast.pseudo_labels.kmeans import kmeans

DEFAULT_TOL = 1e-8  # relative; tight enough that Lloyd has converged on the pseudo-label step's features


@dataclass
class PseudoLabels:
    labels: torch.Tensor  # int64 (N,)
    objective: float  # within-cluster sum of squares of ``labels`` (their own cluster means)
    iterations: int


def within_cluster_ss(features: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """sum over clusters of sum ||x_i - mean of its cluster||^2: the k-means objective of a labelling,
    independent of any centres (so labels from different k-means codes can be compared)."""
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    x = features.double()
    onehot = torch.nn.functional.one_hot(labels.long(), k).to(x.dtype)
    counts = onehot.sum(0)
    means = (onehot.t() @ x) / counts.clamp_min(1)[:, None]
    return float(((x - means[labels]) ** 2).sum())


def cluster_pseudo_labels(features: torch.Tensor, k: int, *, seed: int = 0, tol: float = DEFAULT_TOL,
                          max_iter: int = 300, init: torch.Tensor | None = None) -> PseudoLabels:
    """Pseudo labels of ``features`` (N, D) (used as given: the official step does not normalise).
    ``init``: initial centres (k, D) instead of the seeded k-means++ ones (to start where another
    k-means code starts, e.g. a transcription of kmeans_pytorch in the tests)."""
    result = kmeans(features, k, seed=seed, tol=tol, max_iter=max_iter, init=init)
    return PseudoLabels(labels=result.labels, objective=within_cluster_ss(features, result.labels, k),
                        iterations=result.iterations)
