"""The TRADES objective (Zhang et al., 2019) as ACL's train_trades.py computes it: cross-entropy on
the natural logits plus beta times KL(p(x) || p(x_adv)), averaged over the batch. Its examples come
from advfast.attacks.trades.trades_examples."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """CE(logits_nat, labels) + beta * KL(softmax(logits_nat) || softmax(logits_adv)) (batch mean)."""
    return F.cross_entropy(logits_nat, labels) + beta * F.kl_div(
        F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")
