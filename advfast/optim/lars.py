"""LARS (You et al., 2017) with the semantics of ACL's optimizer/lars.py, without host syncs.

Per parameter tensor w with gradient g (weight decay wd, coefficient eta, momentum m, lr):

    trust = eta * ||w|| / (||g|| + wd * ||w||)      (1 when ||w|| or ||g|| is below 1e-15)
    buf   = m * buf + lr * trust * (g + wd * w)      (buf starts at zero)
    w     = w - buf

The learning rate sits inside the momentum buffer, as in ACL (torch's SGD instead multiplies
the buffer by the current lr). With ``exclude_bn_bias`` every 1-D tensor (BN weights and
biases, linear biases) gets no adaptation and no weight decay: buf = m * buf + lr * g.

All norms and trust ratios stay on the device (torch.where, no .item()); tensors are updated
with foreach ops per (device, dtype) group.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

_ZERO_NORM = 1e-15


class LARS(Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3,
                 exclude_bn_bias: bool = False):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("eta", eta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"LARS {name} must be a number >= 0, got {value!r}")
        defaults = dict(lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay), eta=float(eta),
                        exclude_bn_bias=bool(exclude_bn_bias))
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, tuple[list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                excluded = group["exclude_bn_bias"] and p.dim() <= 1
                ps, gs, bufs, _ = buckets.setdefault((p.device, p.dtype, excluded), ([], [], [], []))
                ps.append(p)
                gs.append(p.grad)
                bufs.append(state["momentum_buffer"])
            for (_, _, excluded), (ps, gs, bufs, _) in buckets.items():
                if excluded:
                    _plain_update(ps, gs, bufs, group["lr"], group["momentum"])
                else:
                    _lars_update(ps, gs, bufs, group["lr"], group["momentum"], group["weight_decay"], group["eta"])
        return loss


def _lars_update(ps, gs, bufs, lr: float, momentum: float, wd: float, eta: float) -> None:
    w_norm = torch.stack(torch._foreach_norm(ps))
    g_norm = torch.stack(torch._foreach_norm(gs))
    trust = eta * w_norm / (g_norm + wd * w_norm)
    trust = torch.where((w_norm < _ZERO_NORM) | (g_norm < _ZERO_NORM), torch.ones_like(trust), trust)
    scales = (trust * lr).unbind(0)
    update = torch._foreach_add(gs, ps, alpha=wd) if wd != 0 else torch._foreach_mul(gs, 1.0)
    torch._foreach_mul_(update, scales)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, update)
    torch._foreach_sub_(ps, bufs)


def _plain_update(ps, gs, bufs, lr: float, momentum: float) -> None:
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, gs, alpha=lr)
    torch._foreach_sub_(ps, bufs)
