"""DeACL's stage-2 distillation (Zhang et al., ECCV 2022; pantheon5100/DeACL) as its official code computes it
(``solo/methods/mocov2_distillation_AT.py: training_step, generate_training_AE``; projectors are Identity,
so everything works on the 512-d backbone features):

    t  = teacher(x)                                    eval, frozen
    x' = PGD maximising  -sum_b cos(student(x'), t) * 256   student in eval mode; 5 steps of 2/255 in 8/255
    s  = student(cat[x, x'])                           ONE train-mode forward (BN statistics over the 2B batch)
    loss = -mean cos(s_clean, t) - trades_k * mean cos(s_adv, s_clean)      trades_k = 2, nothing detached

The teacher is frozen here (:func:`freeze_teacher`, :func:`teacher_targets`): no parameter of it needs a
gradient and its forward runs under ``no_grad``. The official teacher keeps ``requires_grad=True`` and its
forward outside ``no_grad``, so every backward also runs through the teacher: the gradients are the same
(nothing of the teacher is updated), the work is wasted. The online linear probe the official step adds
(CE on detached eval-mode features) does not touch the backbone and is not part of this loss.

The ×256 of the attack objective was put there "for 16 bit training": a linf step sees only the sign,
so it changes nothing but the gradient's scale (``scale``, default 256 as coded).
Deviation of advfast's PGD: its random start is clamped to [0, 1] before the first forward (the official
start x + U(-eps, eps) is clamped only after the first step); identical when x lies in [eps, 1 - eps].
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from advfast.attacks.pgd import pgd
from advfast.ops.dtypes import upcast


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 features (autocast) compare in fp32; float64 stays float64 (fidelity checks)."""
    return upcast(t)


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients, for good (the official code sets eval at every step)."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_targets(teacher: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The teacher's features of the clean images, without a graph (the attack's and the loss's target).
    Autocast (bf16 on the GPU path) is the caller's: the features come back in the autocast dtype."""
    if isinstance(teacher, nn.Module) and teacher.training:
        teacher.eval()  # as the official step: self.momentum_backbone.eval() before every forward
    with torch.no_grad():
        return teacher(x).detach()


def attack_loss(student: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor,
                scale: float = 256.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """``loss_fn(x) = -scale * sum_b cos(student(x)_b, target_b)`` for :func:`advfast.attacks.pgd`.

    The caller puts the student in eval mode (official) for the attack; ``target`` = teacher_targets(x_nat).
    """
    if not isinstance(target, torch.Tensor) or target.dim() != 2:
        raise ValueError(f"target must be the teacher's (B, D) features, got "
                         f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}")
    target = _at_least_fp32(target.detach())

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return -F.cosine_similarity(_at_least_fp32(student(x)), target, dim=1).sum() * scale
    return loss_fn


def distillation_loss(s_clean: torch.Tensor, s_adv: torch.Tensor, target: torch.Tensor,
                      trades_k: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-mean cos(s_clean, t) - trades_k * mean cos(s_adv, s_clean); both student terms keep their gradient.
    Returns (loss, {"loss_distill", "loss_adv_consistency"}) (detached parts, for logging)."""
    if s_clean.shape != s_adv.shape or s_clean.shape != target.shape or s_clean.dim() != 2:
        raise ValueError(f"s_clean, s_adv and target must be (B, D) features of one shape, got "
                         f"{tuple(s_clean.shape)}, {tuple(s_adv.shape)}, {tuple(target.shape)}")
    s_clean, s_adv, target = _at_least_fp32(s_clean), _at_least_fp32(s_adv), _at_least_fp32(target.detach())
    distill = -F.cosine_similarity(s_clean, target).mean()
    consistency = -F.cosine_similarity(s_adv, s_clean).mean()
    loss = distill + trades_k * consistency
    return loss, {"loss_distill": distill.detach(), "loss_adv_consistency": consistency.detach()}


def deacl_step(student: nn.Module, teacher: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 5, trades_k: float = 2.0,
               attack_scale: float = 256.0, generator: torch.Generator | None = None,
               attack: Callable | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One official DeACL training step's loss (eager reference; the engine wires the same pieces through
    its graphed ``run_attack``): teacher targets, the attack in eval mode, one train-mode student forward
    of cat[x, x'], the distillation loss. ``attack(loss_fn, x) -> x_adv`` replaces the plain PGD if given.
    """
    target = teacher_targets(teacher, x)
    was_training = student.training
    student.eval()
    try:
        loss_fn = attack_loss(student, target, attack_scale)
        x_adv = attack(loss_fn, x) if attack is not None else pgd(loss_fn, x, eps, alpha, steps, generator=generator)
    finally:
        student.train(was_training)
    s = student(torch.cat([x, x_adv]))
    b = x.shape[0]
    loss, parts = distillation_loss(s[:b], s[b:], target, trades_k)
    return loss, {**parts, "x_adv": x_adv}
