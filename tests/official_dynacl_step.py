"""A float64 transcription of one official DynACL training iteration, for the step-fidelity test of
``--method dynacl`` (issue 16). Not a test module itself (pytest collects only test_*.py).

PKU-ML/DYNACL @7d143db, ``train_DynACL.py: train, PGD_contrastive``, ``utils.py: nt_xent``,
``models/resnet_multi_bn.py: resnet18_momentum.forward(swap=True), _momentum_update_encoder_k``.
Validated against the real code on the CPU by docs/official_checks/dynacl_air_validate_step.py
(docs/methods_dynacl_air.md). Rows are the official layout: 2i and 2i+1 are the two views of image i
(advfast's methods stack views view-major; reorder with ``x.view(2, B, ...).transpose(0, 1)``).

``q`` and ``k`` are the trained and the EMA encoder (backbone + projection head), each called as
``module(x, bn_name)``; ``delta0`` is the attack's uniform start (``torch.rand_like(x) * 2 eps - eps``
in the code), passed in so both sides start identically.
"""

from __future__ import annotations

import torch


def official_nt_xent(x: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """utils.nt_xent: adjacent pairs, column sums, self term removed by subtracting e^{1/t}."""
    n = x.norm(p=2, dim=1, keepdim=True)
    x = (x @ x.t()) / (n * n.t()).clamp(min=1e-8)
    x = torch.exp(x / t)
    idx = torch.arange(x.size()[0])
    idx[::2] += 1
    idx[1::2] -= 1
    x = x[idx]
    x = x.diag() / (x.sum(0) - torch.exp(torch.tensor(1 / t, dtype=x.dtype)))
    return -torch.log(x).mean()


def swap_features(q, k, x: torch.Tensor, bn_name: str) -> torch.Tensor:
    """resnet18_momentum.forward(swap=True): even rows through q, odd rows through k, interleaved."""
    fq, fk = q(x[::2], bn_name), k(x[1::2], bn_name)
    return torch.stack([fq, fk], 1).reshape(x.shape[0], -1)


def official_pgd_contrastive(q, k, x, delta0, eps=8 / 255, alpha=2 / 255, iters=5):
    """PGD_contrastive with both encoders in eval mode on the 'pgd' branch (start not clamped to [0, 1])."""
    q.eval(), k.eval()
    delta = delta0.clone()
    for _ in range(iters):
        delta.requires_grad_(True)
        loss = official_nt_xent(swap_features(q, k, x + delta, "pgd"))
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


@torch.no_grad()
def official_ema_update(q, k, m: float = 0.99) -> None:
    """_momentum_update_encoder_k: parameters only (k's BN buffers stay its own)."""
    for pq, pk in zip(q.parameters(), k.parameters()):
        pk.copy_(pk * m + pq * (1.0 - m))


def official_dynacl_step(q, k, x, delta0, epoch: int, epochs: int, step: int = 50, swap_param: float = 2 / 3,
                         m: float = 0.99, iters: int = 5):
    """(loss, x_adv) of one iteration of train(); the caller back-propagates ``loss`` into q (only q
    gets parameter gradients) and steps its optimizer. k has been EMA-updated (before the step, as coded)."""
    x_adv = official_pgd_contrastive(q, k, x, delta0, iters=iters)
    q.train(), k.train()
    features_adv = swap_features(q, k, x_adv, "pgd")
    features = swap_features(q, k, x, "normal")
    official_ema_update(q, k, m)
    weight_adv = min(1.0 + (epoch // step) * (step / epochs) * swap_param, 2)
    loss = (official_nt_xent(features) * (2 - weight_adv) + official_nt_xent(features_adv) * weight_adv) / 2
    return loss, x_adv
