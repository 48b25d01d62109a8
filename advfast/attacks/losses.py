"""Loss closures for supervised attacks; the contrastive ones live with their methods.

Each returns ``loss_fn(x) -> scalar`` for :func:`advfast.attacks.pgd`. Losses are summed over the
batch, as the official attack code does (the linf step only sees the sign, and the l2 step
normalises, so the scale does not change the attack; summing keeps per-sample gradients from
shrinking with the batch size under low precision). Extra keyword arguments go to the model call
(e.g. ``branch="pgd"``). The closure does not touch the model's mode: set train/eval before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_loss(model, y: torch.Tensor, reduction: str = "sum", **forward_kwargs):
    """Cross-entropy of ``model(x)`` against labels ``y`` (PGD-AT, robust evaluation)."""
    if not isinstance(y, torch.Tensor) or y.dtype != torch.long:
        raise TypeError(f"y must be an int64 tensor of class labels, got {getattr(y, 'dtype', type(y).__name__)}")

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x, **forward_kwargs).float(), y, reduction=reduction)

    return loss_fn


def trades_kl_loss(model, logits_nat: torch.Tensor, **forward_kwargs):
    """TRADES' inner objective KL(p(x_nat) || p(x)), summed: ``logits_nat`` are the model's
    logits on the clean images (detached here)."""
    if not isinstance(logits_nat, torch.Tensor) or logits_nat.dim() != 2:
        raise ValueError(f"logits_nat must be (B, num_classes) logits, got "
                         f"{tuple(logits_nat.shape) if isinstance(logits_nat, torch.Tensor) else type(logits_nat).__name__}")
    p_nat = F.softmax(logits_nat.detach().float(), dim=1)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(model(x, **forward_kwargs).float(), dim=1), p_nat, reduction="sum")

    return loss_fn
