"""PGD and FGSM driven by a loss closure, with gradients taken w.r.t. the input only.

The closure ``loss_fn(x) -> scalar`` decides everything model-side: which model, train or eval
mode, which BN branch, which loss (contrastive, instance-wise, CE, TRADES KL). The attack only
ascends it: ``torch.autograd.grad(loss, x)`` computes the input gradient and nothing else (no
weight gradients are computed, parameters' ``.grad`` are never touched; for a torch.compile'd model
only while its parameters do not require grad, which ``input_only_gradients`` arranges and
``Method.run_attack`` uses), and each step is one
fused ``advfast.ops.pgd_step_`` (ascent step, projection onto the eps-ball, clamp to
[lower, upper]). The perturbed images stay float32 even when the model runs under autocast.

``gradients="full"`` (or the block ``with attack_gradients("full"):``) takes the gradient the way
the official codes do instead: ``loss.backward()``, which also computes every parameter's
gradient and accumulates it into ``.grad`` (the caller must zero those before its own backward,
as the engine's optimizer.zero_grad does). It exists to measure what input-only gradients save.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

from advfast.ops.pgd_step import pgd_step_
from advfast.ops.pgd_step import random_start as draw_start

_NORMS = ("linf", "l2")
GRADIENT_MODES = ("input", "full")
_default_gradients = "input"  # set by attack_gradients(); read when an attack is given gradients=None


@contextlib.contextmanager
def attack_gradients(mode: str):
    """Attacks started in the block (with gradients=None) take their gradients as ``mode``:
    "input" (torch.autograd.grad w.r.t. the input only) or "full" (loss.backward(), as the official codes)."""
    global _default_gradients
    _check_gradients(mode)
    previous, _default_gradients = _default_gradients, mode
    try:
        yield
    finally:
        _default_gradients = previous


def gradient_mode(gradients: str | None = None) -> str:
    """The mode an attack given ``gradients`` uses: itself, or the ``attack_gradients`` default for None."""
    return _check_gradients(_default_gradients if gradients is None else gradients)


@contextlib.contextmanager
def input_only_gradients(module: torch.nn.Module, gradients: str | None = None):
    """Freeze ``module``'s trainable parameters for the block when the attack mode is "input".

    ``torch.autograd.grad(loss, x)`` skips weight gradients in eager mode, but a torch.compile'd
    model traces one joint forward/backward for every input that requires grad, weights included:
    its backward computes weight gradients the attack then throws away. With the weights not
    requiring grad, the compiled attack graph computes the input gradient only. "full" mode
    (the official codes' loss.backward()) leaves the parameters alone.
    """
    frozen = []
    if gradient_mode(gradients) == "input":
        frozen = [p for p in module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _check_gradients(mode) -> str:
    if mode not in GRADIENT_MODES:
        raise ValueError(f"gradients must be one of {', '.join(GRADIENT_MODES)} (or None for the current default), "
                         f"got {mode!r}")
    return mode


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


_NO_DEPENDENCE = "loss_fn's result does not depend on its input x; the closure must run the model on x"


def _scalar_loss(loss_fn, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        loss = loss_fn(x)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}; reduce it with .sum() or .mean()")
    return loss.reshape(())


def _input_grad(loss_fn, x: torch.Tensor) -> torch.Tensor:
    x.requires_grad_(True)
    loss = _scalar_loss(loss_fn, x)
    (grad,) = torch.autograd.grad(loss, (x,), allow_unused=True)
    x.requires_grad_(False)
    if grad is None:
        raise ValueError(_NO_DEPENDENCE)
    return grad


def _full_backward_grad(loss_fn, x: torch.Tensor) -> torch.Tensor:
    """The official codes' way: backward through everything, weight gradients included."""
    x.grad = None
    x.requires_grad_(True)
    loss = _scalar_loss(loss_fn, x)
    if not loss.requires_grad:
        x.requires_grad_(False)
        raise ValueError(_NO_DEPENDENCE)
    loss.backward()
    grad, x.grad = x.grad, None
    x.requires_grad_(False)
    if grad is None:
        raise ValueError(_NO_DEPENDENCE)
    return grad


def pgd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x_nat: torch.Tensor, eps, alpha, steps: int,
        norm: str = "linf", random_start: bool = True, lower: float = 0.0, upper: float = 1.0,
        generator: torch.Generator | None = None, backend: str = "auto",
        gradients: str | None = None) -> torch.Tensor:
    """Projected gradient ascent on ``loss_fn`` around ``x_nat``; returns detached adversarial images.

    eps, alpha: floats or per-sample tensors of shape (B,). ``random_start`` draws the start
    uniformly in the eps-ball (clamped to [lower, upper]) with ``generator``; otherwise the
    ascent starts at ``x_nat``. ``backend`` selects the ``ops.pgd_step_`` backend. ``gradients``:
    "input" (default), "full" (see the module docstring) or None for the ``attack_gradients`` default.
    """
    _check(loss_fn, x_nat, steps, norm)
    take_grad = _full_backward_grad if gradient_mode(gradients) == "full" else _input_grad
    x_nat = x_nat.detach()
    if x_nat.dtype not in (torch.float32, torch.float64):
        x_nat = x_nat.float()  # perturbations live in fp32 whatever precision the model runs in
    if random_start:
        x_adv = draw_start(x_nat, eps, norm=norm, lower=lower, upper=upper, generator=generator)
    else:
        x_adv = x_nat.clone()
    for _ in range(steps):
        grad = take_grad(loss_fn, x_adv)
        pgd_step_(x_adv, x_nat, grad, eps, alpha, norm=norm, lower=lower, upper=upper, backend=backend)
    return x_adv.detach()


def fgsm(loss_fn: Callable[[torch.Tensor], torch.Tensor], x_nat: torch.Tensor, eps, norm: str = "linf",
         random_start: bool = False, alpha=None, lower: float = 0.0, upper: float = 1.0,
         generator: torch.Generator | None = None, backend: str = "auto",
         gradients: str | None = None) -> torch.Tensor:
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
               generator=generator, backend=backend, gradients=gradients)


def from_config(attack) -> Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor] | None:
    """The attack an AttackConfig describes, as ``attack_fn(loss_fn, x_nat) -> x_adv``; None for kind "none".

    fgsm honours ``attack.random_start``: False is Goodfellow's single step of size eps; True is the
    random-start "fast" FGSM (step 1.25 eps).
    """
    if attack.kind == "none":
        return None
    if attack.kind == "pgd":
        return functools.partial(pgd, eps=attack.eps, alpha=attack.alpha, steps=attack.steps,
                                 norm=attack.norm, random_start=attack.random_start)
    if attack.kind == "fgsm":
        return functools.partial(fgsm, eps=attack.eps, norm=attack.norm, random_start=attack.random_start)
    raise ValueError(f"attack.kind must be pgd, fgsm or none, got {attack.kind!r}")
