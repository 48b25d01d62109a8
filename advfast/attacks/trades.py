"""TRADES' inner maximisation (Zhang et al., 2019), as ACL's train_trades.py runs it.

Shared by evaluation (the AFF protocol, advfast.eval.finetune) and by any method whose stage
fine-tunes with TRADES (a post-training stage); the outer loss is advfast.losses.trades.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advfast import ops


def trades_ascent(target_logits, adv_logits, x: torch.Tensor, x_start: torch.Tensor, eps: float, alpha: float,
                  steps: int) -> torch.Tensor:
    """TRADES' inner maximisation from ``x_start`` (a fresh tensor: it is stepped in place): ascend
    KL(softmax(target_logits(x)) || softmax(adv_logits(x'))) (summed) by signed steps inside the eps-ball of x
    and [0, 1]. ``target_logits`` and ``adv_logits`` are callables (one model, or two BN branches of one, as
    the dual-BN and LP-AFF variants); the caller sets the modes (eval in every official script)."""
    with torch.no_grad():
        p_nat = F.softmax(target_logits(x), dim=1)
    x_adv = x_start.detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(adv_logits(x_adv), dim=1), p_nat, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = ops.pgd_step_(x_adv.detach(), x, grad, eps, alpha)
    return x_adv.detach()


def gaussian_start(x: torch.Tensor, std: float = 0.001, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + std N(0, 1), the start of ACL's train_trades.py and the benchmark's trades_loss_dual."""
    return (x + std * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)).detach()


def trades_examples(model: nn.Module, x: torch.Tensor, eps: float, alpha: float, steps: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """TRADES' inner maximisation as ACL's train_trades.py: start at x + 0.001 N(0, 1), ascend
    KL(p(x) || p(x')) (summed), model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return trades_ascent(model, model, x, gaussian_start(x, 0.001, generator), eps, alpha, steps)
    finally:
        model.train(was_training)
