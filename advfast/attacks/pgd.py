"""PGD and FGSM driven by a loss closure, with gradients taken w.r.t. the input only.

The closure ``loss_fn(x) -> scalar`` decides everything model-side: which model, train or eval
mode, which BN branch, which loss (contrastive, instance-wise, CE, TRADES KL). The attack only
ascends it: ``torch.autograd.grad(loss, x)`` computes the input gradient and nothing else (no
weight gradients are computed, parameters' ``.grad`` are never touched), and each step is one
fused ``advfast.ops.pgd_step_`` (ascent step, projection onto the eps-ball, clamp to
[lower, upper]). The perturbed images stay float32 even when the model runs under autocast.
"""

from __future__ import annotations

from typing import Callable

import torch

from advfast.ops.pgd import pgd_step_
from advfast.ops.pgd import random_start as draw_start

_NORMS = ("linf", "l2")


def _check(loss_fn, x_nat, steps, norm):
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (x -> scalar loss), got {type(loss_fn).__name__}")
    if not isinstance(x_nat, torch.Tensor) or not x_nat.is_floating_point():
        raise TypeError(f"x_nat must be a floating-point tensor of images, got "
                        f"{type(x_nat).__name__ if not isinstance(x_nat, torch.Tensor) else x_nat.dtype}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")


def _input_grad(loss_fn, x: torch.Tensor) -> torch.Tensor:
    x.requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}; reduce it with .sum() or .mean()")
    (grad,) = torch.autograd.grad(loss.reshape(()), (x,), allow_unused=True)
    x.requires_grad_(False)
    if grad is None:
        raise ValueError("loss_fn's result does not depend on its input x; the closure must run the model on x")
    return grad


def pgd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x_nat: torch.Tensor, eps, alpha, steps: int,
        norm: str = "linf", random_start: bool = True, lower: float = 0.0, upper: float = 1.0,
        generator: torch.Generator | None = None, backend: str = "auto") -> torch.Tensor:
    """Projected gradient ascent on ``loss_fn`` around ``x_nat``; returns detached adversarial images.

    eps, alpha: floats or per-sample tensors of shape (B,). ``random_start`` draws the start
    uniformly in the eps-ball (clamped to [lower, upper]) with ``generator``; otherwise the
    ascent starts at ``x_nat``. ``backend`` selects the ``ops.pgd_step_`` backend.
    """
    _check(loss_fn, x_nat, steps, norm)
    x_nat = x_nat.detach()
    if x_nat.dtype not in (torch.float32, torch.float64):
        x_nat = x_nat.float()  # perturbations live in fp32 whatever precision the model runs in
    if random_start:
        x_adv = draw_start(x_nat, eps, norm=norm, lower=lower, upper=upper, generator=generator)
    else:
        x_adv = x_nat.clone()
    for _ in range(steps):
        grad = _input_grad(loss_fn, x_adv)
        pgd_step_(x_adv, x_nat, grad, eps, alpha, norm=norm, lower=lower, upper=upper, backend=backend)
    return x_adv.detach()


def fgsm(loss_fn: Callable[[torch.Tensor], torch.Tensor], x_nat: torch.Tensor, eps, norm: str = "linf",
         random_start: bool = False, alpha=None, lower: float = 0.0, upper: float = 1.0,
         generator: torch.Generator | None = None, backend: str = "auto") -> torch.Tensor:
    """One gradient step of size eps from ``x_nat`` (Goodfellow et al.).

    With ``random_start=True`` it is the "fast is better than free" FGSM of Wong et al. (2020):
    a uniform start in the eps-ball, then one step of size ``alpha`` (default 1.25 * eps),
    projected back onto the ball.
    """
    if random_start:
        alpha = 1.25 * eps if alpha is None else alpha
    elif alpha is not None:
        raise ValueError("fgsm without random_start steps by eps; alpha is only used with random_start=True")
    else:
        alpha = eps
    return pgd(loss_fn, x_nat, eps, alpha, 1, norm=norm, random_start=random_start, lower=lower, upper=upper,
               generator=generator, backend=backend)
