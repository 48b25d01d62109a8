"""FLOP counting for MFU.

Two counters, both analytic (from tensor shapes, nothing is sampled from hardware counters):

* ``forward_flops_per_image(module, image_shape)``: F, the forward FLOPs of one image through a
  model, summed over its Conv2d and Linear layers by forward hooks (2 x multiply-accumulates;
  BatchNorm, activations and pooling are left out, as usual for MFU).
* ``count_flops(fn)``: the FLOPs of everything ``fn`` runs, from torch.utils.flop_counter's
  per-op formulas (convolutions, matmuls and their backward ops, honouring which gradients autograd
  actually computes). The benchmarks count one training iteration of a method with it. (A small
  dispatch mode of its own: FlopCounterMode's module tracker cannot follow torch.autograd.grad
  with respect to a leaf input, which is how every attack step takes its gradient.)

The pass model the iteration count follows (per image of the batch; F = forward FLOPs of the
encoder (the projection heads, under 0.1% of a CIFAR ResNet-18 forward, are counted in the
iteration but not in F), K = attack steps): a forward is F, a full backward (input and weight gradients) is 2F, an
attack's input-only backward is F (activation gradients only). Each method writes out its iteration
in these units (``Method.iteration_passes``); tests hold the counted FLOPs to it. MFU uses the counted FLOPs of
the algorithm with input-only attack gradients in every configuration (the model FLOPs): the extra
weight gradients the "eager" attack computes are waste, not useful work.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


def forward_flops_per_image(module: nn.Module, image_shape, *args, **kwargs) -> int:
    """Forward FLOPs (2 x MACs of every Conv2d/Linear) of ``module`` on one image of ``image_shape``
    (C, H, W). Runs once in eval mode under no_grad (so BatchNorm takes a batch of one) and
    restores the module's mode; extra args go to the forward."""
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    total = 0

    def conv(m: nn.Conv2d, inputs, out):
        nonlocal total
        per_output = (m.in_channels // m.groups) * math.prod(m.kernel_size)
        total += 2 * out.numel() * per_output

    def linear(m: nn.Linear, inputs, out):
        nonlocal total
        total += 2 * out.numel() * m.in_features

    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, *image_shape, device=device), *args, **kwargs)
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()
    return total


class _FlopCounter(TorchDispatchMode):
    """Sums torch.utils.flop_counter's formula of every op that has one (mm, addmm, bmm, convolution,
    convolution_backward with its output mask, attention, ...); other ops count zero."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """(FLOPs counted while ``fn(*args, **kwargs)`` runs, its result)."""
    with _FlopCounter() as counter:
        result = fn(*args, **kwargs)
    return counter.total, result


def expected_passes(method: str, attack_steps: int) -> float | None:
    """F-equivalents per image of the batch for one training iteration of ``method``'s default
    variant: the method's own ``iteration_passes`` (see the module docstring); None for an unknown
    method or one without a written model."""
    from advfast.methods import METHODS

    cls = METHODS.get(method)
    return None if cls is None else cls.iteration_passes(attack_steps)
