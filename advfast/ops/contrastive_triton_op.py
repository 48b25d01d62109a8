"""The Triton contrastive core as registered custom ops, so torch.compile keeps a loss in one graph.

``torch.library.custom_op`` (torch >= 2.4, the package's floor) with a fake implementation (shapes
only, for tracing) and ``register_autograd`` (the backward is a second custom op). Dynamo and AOT
autograd treat both as opaque graph nodes: a compiled region containing info_nce or nt_xent on the
triton backend has no graph break, and the kernels run as launched eagerly. ``torch.library.triton_op``
(torch >= 2.6) would let Inductor see into the kernels, which buys nothing here: they are already
fused and their launch configuration is chosen per architecture (kernels/configs.py).
"""

from __future__ import annotations

import torch

from advfast.ops._dispatch import device_guard

_NS = "advfast_triton"


@torch.library.custom_op(f"{_NS}::row_lse", mutates_args=())
def row_lse(q: torch.Tensor, keys: torch.Tensor, scale: float, mask_diag: bool, period: int,
            pos_mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, pos) per query row in float32 (pos is zeros when pos_mode == 0)."""
    from advfast.kernels import contrastive as kern

    with device_guard(q.device):
        lse, pos = kern.lse_forward(q, keys, scale, mask_diag, period, pos_mode)
    return lse, (torch.zeros_like(lse) if pos is None else pos)


@row_lse.register_fake
def _(q, keys, scale, mask_diag, period, pos_mode):
    lse = q.new_empty((q.shape[0],), dtype=torch.float32)
    return lse, torch.empty_like(lse)


@torch.library.custom_op(f"{_NS}::row_lse_backward", mutates_args=())
def row_lse_backward(q: torch.Tensor, keys: torch.Tensor, scale: float, lse: torch.Tensor, g_lse: torch.Tensor,
                     pos: torch.Tensor, g_pos: torch.Tensor, mask_diag: bool, period: int, pos_mode: int,
                     need_dq: bool, need_dk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk) in the dtypes of q and keys; an empty tensor where not asked for."""
    from advfast.kernels import contrastive as kern

    with device_guard(q.device):
        dq, dk = kern.lse_backward(q, keys, scale, lse, g_lse, pos, g_pos, mask_diag, period, pos_mode,
                                   need_dq=need_dq, need_dk=need_dk)
    dq = dq.to(q.dtype) if dq is not None else q.new_empty((0,))
    dk = dk.to(keys.dtype) if dk is not None else keys.new_empty((0,))
    return dq, dk


@row_lse_backward.register_fake
def _(q, keys, scale, lse, g_lse, pos, g_pos, mask_diag, period, pos_mode, need_dq, need_dk):
    return (torch.empty_like(q) if need_dq else q.new_empty((0,)),
            torch.empty_like(keys) if need_dk else keys.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    q, keys, scale, mask_diag, period, pos_mode = inputs
    lse, pos = output
    ctx.save_for_backward(q, keys, lse, pos)
    ctx.args = (scale, mask_diag, period, pos_mode)


def _backward(ctx, g_lse, g_pos):
    q, keys, lse, pos = ctx.saved_tensors
    scale, mask_diag, period, pos_mode = ctx.args
    need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dq or need_dk):
        return None, None, None, None, None, None
    g_lse = torch.zeros_like(lse) if g_lse is None else g_lse
    g_pos = torch.zeros_like(lse) if g_pos is None or pos_mode == 0 else g_pos
    dq, dk = row_lse_backward(q, keys, scale, lse, g_lse, pos, g_pos, mask_diag, period, pos_mode,
                              need_dq, need_dk)
    return (dq if need_dq else None), (dk if need_dk else None), None, None, None, None


row_lse.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["row_lse", "row_lse_backward"]
