"""TRADES' inner maximisation (Zhang et al., 2019), as ACL's train_trades.py runs it.

Shared by evaluation (the AFF protocol, advfast.eval.finetune) and by any method whose stage
fine-tunes with TRADES (a post-training stage); the outer loss is advfast.losses.trades.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advfast import ops


def trades_examples(model: nn.Module, x: torch.Tensor, eps: float, alpha: float, steps: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """TRADES' inner maximisation as ACL's train_trades.py: start at x + 0.001 N(0, 1), ascend
    KL(p(x) || p(x')) (summed), model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p_nat = F.softmax(model(x), dim=1)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_adv = (x + 0.001 * noise).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_nat, reduction="sum")
            (grad,) = torch.autograd.grad(kl, x_adv)
            x_adv = ops.pgd_step_(x_adv.detach(), x, grad, eps, alpha)
        return x_adv.detach()
    finally:
        model.train(was_training)
