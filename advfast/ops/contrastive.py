"""Contrastive losses as fused ops: InfoNCE against a key queue (MoCo) and multi-view NT-Xent.

Both reduce to one core, the per-row log-sum-exp of scaled similarities between queries and keys
(plus, for NT-Xent, a per-row statistic over the positives), which three backends compute:

  torch          the plain reference: materialises the full logits matrix (any device)
  torch-chunked  walks the keys in chunks with an online log-sum-exp, forward and backward, so memory
                 stays O(rows * D + rows * chunk) at any number of keys (any device)
  triton         kernels/contrastive.py: the same walk in tiles on the GPU (CPU under TRITON_INTERPRET=1)
                 and registered as custom ops (contrastive_triton_op), so torch.compile keeps one graph

"auto" takes triton on CUDA, torch-chunked when the logits would be large, else torch. The L2
normalisation runs in torch before the core (it is O(rows * D) and differentiable as is).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from advfast.ops._dispatch import resolve
from advfast.ops.dtypes import compute_dtype

IMPLEMENTED = ("triton", "torch-chunked", "torch")
POSITIVE_MODES = ("mean_log_prob", "sum_in_numerator")

# "auto" on CPU switches to the chunked walk once the logits matrix would hold this many elements.
CHUNKED_AUTO_MIN_LOGITS = 1 << 22
# Elements of one (rows x chunk) score block in the torch-chunked backend.
CHUNK_ELEMENTS = 1 << 20

_POS_MODE = {"mean_log_prob": 1, "sum_in_numerator": 2}


# ----------------------------------------------------------------------------------------------
# Argument checks: one line each, naming the argument and the fix.


def _check_matrix(op: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{op}: {name} must have at least one row and one column, got shape {tuple(x.shape)}")


def _check_temperature(op: str, temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{op}: temperature must be a positive number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"{op}: temperature must be a positive finite number, got {temperature}")
    return t


def _check_flag(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")


def _pick_backend(op: str, backend, device: torch.device, logits: int, dtype: torch.dtype) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a string (one of {', '.join(IMPLEMENTED)}, auto), got {backend!r}")
    order = ("triton", "torch-chunked", "torch") if logits >= CHUNKED_AUTO_MIN_LOGITS else ("triton", "torch")
    implemented = IMPLEMENTED
    if dtype == torch.float64:  # the kernels accumulate in float32 (and do not compile for float64 dots)
        if backend == "triton":
            raise TypeError(f"{op}: the triton backend takes float32, bfloat16 or float16 inputs, got float64; "
                            f"use backend='torch' or 'torch-chunked'")
        implemented = tuple(b for b in IMPLEMENTED if b != "triton")
    return resolve(op, backend, device, implemented, order)


# ----------------------------------------------------------------------------------------------
# References (the "torch" backend): what the papers write, with the logits materialised.


def info_nce_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None,
                       temperature: float = 0.2, normalize: bool = True) -> torch.Tensor:
    """MoCo's InfoNCE as eager torch computes it: matmul, cat, cross_entropy."""
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    if queue is None:
        logits = q @ k.T / temperature
        labels = torch.arange(q.shape[0], device=q.device)
    else:
        pos = (q * k).sum(dim=1, keepdim=True)
        neg = q @ queue.detach().to(q.dtype).T
        logits = torch.cat([pos, neg], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def nt_xent_reference(z: torch.Tensor, num_views: int, temperature: float = 0.5,
                      positives: str = "mean_log_prob", normalize: bool = True) -> torch.Tensor:
    """Multi-view NT-Xent on the masked (V*B) x (V*B) similarity matrix."""
    if normalize:
        z = F.normalize(z, dim=1)
    n = z.shape[0]
    batch = n // num_views
    sim = z @ z.T / temperature
    idx = torch.arange(n, device=z.device)
    self_mask = idx[:, None] == idx[None, :]
    pos_mask = (idx[:, None] % batch == idx[None, :] % batch) & ~self_mask
    sim = sim.masked_fill(self_mask, float("-inf"))
    lse = torch.logsumexp(sim, dim=1)
    if positives == "mean_log_prob":
        pos_term = sim.masked_fill(~pos_mask, 0.0).sum(dim=1) / (num_views - 1)
    else:
        pos_term = torch.logsumexp(sim.masked_fill(~pos_mask, float("-inf")), dim=1)
    return (lse - pos_term).mean()


# ----------------------------------------------------------------------------------------------
# torch-chunked core: the kernels' algorithm in plain torch, one block of keys at a time.


def _chunk_masks(rows: torch.Tensor, cols: torch.Tensor, mask_diag: bool, period: int, pos_mode: int):
    self_hit = rows[:, None] == cols[None, :] if mask_diag else None
    is_pos = None
    if pos_mode:
        is_pos = rows[:, None] % period == cols[None, :] % period
        if self_hit is not None:
            is_pos &= ~self_hit
    return self_hit, is_pos


def _chunks(q: torch.Tensor, keys: torch.Tensor):
    """Yield (c0, cols, fp32 key block) so that rows x block stays within CHUNK_ELEMENTS; c0 is the
    block's first key as a python int (slicing with a device tensor would read it back to the host)."""
    step = max(1, CHUNK_ELEMENTS // q.shape[0])
    for c0 in range(0, keys.shape[0], step):
        block = keys[c0:c0 + step].to(compute_dtype(q.dtype))
        yield c0, torch.arange(c0, c0 + block.shape[0], device=keys.device), block


def _chunked_forward(q, keys, scale, mask_diag, period, pos_mode):
    qf = q.to(compute_dtype(q.dtype))
    rows = torch.arange(q.shape[0], device=q.device)
    lse = torch.full((q.shape[0],), float("-inf"), device=q.device, dtype=qf.dtype)
    pos = None
    if pos_mode == 1:
        pos = torch.zeros_like(lse)
    elif pos_mode == 2:
        pos = torch.full_like(lse, float("-inf"))
    for _, cols, kb in _chunks(q, keys):
        s = (qf @ kb.T).mul_(scale)
        self_hit, is_pos = _chunk_masks(rows, cols, mask_diag, period, pos_mode)
        if self_hit is not None:
            s.masked_fill_(self_hit, float("-inf"))
        lse = torch.logaddexp(lse, torch.logsumexp(s, dim=1))
        if pos_mode == 1:
            pos += torch.where(is_pos, s, 0.0).sum(dim=1)
        elif pos_mode == 2:
            pos = torch.logaddexp(pos, torch.logsumexp(s.masked_fill(~is_pos, float("-inf")), dim=1))
    return lse, pos


def _chunked_backward(q, keys, scale, lse, g_lse, pos, g_pos, mask_diag, period, pos_mode, need_dq, need_dk):
    qf = q.to(compute_dtype(q.dtype))
    rows = torch.arange(q.shape[0], device=q.device)
    dq = torch.zeros_like(qf) if need_dq else None
    dk = torch.empty(keys.shape, device=keys.device, dtype=qf.dtype) if need_dk else None
    for c0, cols, kb in _chunks(q, keys):
        s = (qf @ kb.T).mul_(scale)
        self_hit, is_pos = _chunk_masks(rows, cols, mask_diag, period, pos_mode)
        if self_hit is not None:
            s.masked_fill_(self_hit, float("-inf"))
        ds = torch.exp(s - lse[:, None]).mul_(g_lse[:, None])
        if pos_mode == 1:
            ds += torch.where(is_pos, g_pos[:, None], 0.0)
        elif pos_mode == 2:
            ds += torch.exp(s.masked_fill(~is_pos, float("-inf")) - pos[:, None]) * g_pos[:, None]
        ds.mul_(scale)
        if need_dq:
            dq.addmm_(ds, kb)
        if need_dk:
            dk[c0:c0 + cols.shape[0]] = ds.T @ qf
    return dq, dk


class _RowLogSumExp(torch.autograd.Function):
    """(lse, pos) per query row on the torch-chunked backend; see kernels/contrastive.py for the definitions."""

    @staticmethod
    def forward(ctx, q, keys, scale, mask_diag, period, pos_mode):
        lse, pos = _chunked_forward(q, keys, scale, mask_diag, period, pos_mode)
        if pos is None:
            pos = torch.zeros_like(lse)
            ctx.mark_non_differentiable(pos)
        ctx.save_for_backward(q, keys, lse, pos)
        ctx.args = (scale, mask_diag, period, pos_mode)
        return lse, pos

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lse, g_pos):
        q, keys, lse, pos = ctx.saved_tensors
        scale, mask_diag, period, pos_mode = ctx.args
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_lse is None:
            g_lse = torch.zeros_like(lse)
        if g_pos is None or pos_mode == 0:
            g_pos = torch.zeros_like(lse)
        dq, dk = _chunked_backward(q, keys, scale, lse, g_lse.to(lse.dtype), pos, g_pos.to(lse.dtype),
                                   mask_diag, period, pos_mode, need_dq, need_dk)
        dq = dq.to(q.dtype) if dq is not None else None
        dk = dk.to(keys.dtype) if dk is not None else None
        return dq, dk, None, None, None, None


def _row_lse(q, keys, scale, mask_diag, period, pos_mode, backend):
    """(lse, pos) per row on the triton backend (a registered custom op: no graph break under
    torch.compile, see contrastive_triton_op) or the torch-chunked one."""
    if backend == "triton":
        from advfast.ops.contrastive_triton_op import row_lse

        return row_lse(q, keys, float(scale), bool(mask_diag), int(period), int(pos_mode))
    return _RowLogSumExp.apply(q, keys, scale, mask_diag, period, pos_mode)


# ----------------------------------------------------------------------------------------------
# Public ops


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None, temperature: float = 0.2,
             normalize: bool = True, backend: str = "auto") -> torch.Tensor:
    """MoCo's InfoNCE loss (a scalar in q's dtype).

    q, k: (B, D) queries and their positive keys. Row i has the positive logit q_i.k_i / T and, as
    negatives, q_i.queue_j / T for every row j of ``queue`` (K, D). With ``queue=None`` the negatives
    are the other keys of the batch, q_i.k_j / T for j != i (the in-batch form of MoCo v3 and CLIP).
    loss = mean_i [logsumexp(row i) - positive logit].

    normalize=True L2-normalises q and k (differentiably); the queue is used as given. Gradients
    reach q and k, never the queue. Statistics accumulate in float32 (float64 for float64 inputs, which
    the triton backend does not take).
    backend: "auto", "triton", "torch-chunked" or "torch" (see the module docstring).
    """
    op = "info_nce"
    _check_matrix(op, "q", q)
    _check_matrix(op, "k", k)
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.device != q.device:
        raise ValueError(f"{op}: k is on {k.device} but q is on {q.device}; move both to one device")
    if queue is not None:
        _check_matrix(op, "queue", queue)
        if queue.shape[1] != q.shape[1]:
            raise ValueError(f"{op}: queue must be (K, {q.shape[1]}) to match q's feature dim, "
                             f"got {tuple(queue.shape)}")
        if queue.device != q.device:
            raise ValueError(f"{op}: queue is on {queue.device} but q is on {q.device}; move it to q's device")
        queue = queue.detach()
    t = _check_temperature(op, temperature)
    _check_flag(op, "normalize", normalize)
    num_keys = q.shape[0] if queue is None else queue.shape[0] + 1
    backend = _pick_backend(op, backend, q.device, q.shape[0] * num_keys, q.dtype)
    if backend == "torch":
        return info_nce_reference(q, k, queue, t, normalize)

    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    scale = 1.0 / t
    acc = compute_dtype(q.dtype)
    pos = (q.to(acc) * k.to(acc)).sum(dim=1) * scale
    if queue is None:
        lse, _ = _row_lse(q, k, scale, False, 1, 0, backend)
    else:
        lse_neg, _ = _row_lse(q, queue, scale, False, 1, 0, backend)
        lse = torch.logaddexp(pos, lse_neg)
    return (lse - pos).mean().to(q.dtype)


def nt_xent(z: torch.Tensor, num_views: int, temperature: float = 0.5, positives: str = "mean_log_prob",
            normalize: bool = True, backend: str = "auto") -> torch.Tensor:
    """Multi-view NT-Xent (a scalar in z's dtype).

    z: (V*B, D), view-major (rows [v*B, (v+1)*B) are view v), so rows i != j are positives when
    i % B == j % B. Each anchor's denominator runs over every other row (positives included).
    positives="mean_log_prob": mean over the anchor's V-1 positives of -log(exp(s_ip/T) / denominator)
    (SupCon, AdvCL); "sum_in_numerator": -log(sum over positives of exp(s_ip/T) / denominator)
    (RoCL eq. 3). Mean over all V*B anchors. With V=2 both are SimCLR's NT-Xent.
    normalize=True L2-normalises the rows (differentiably). backend as in info_nce.
    """
    op = "nt_xent"
    _check_matrix(op, "z", z)
    if isinstance(num_views, bool) or not isinstance(num_views, numbers.Integral):
        raise TypeError(f"{op}: num_views must be an int >= 2, got {num_views!r}")
    if num_views < 2:
        raise ValueError(f"{op}: num_views must be >= 2 (each row needs a positive), got {num_views}")
    if z.shape[0] % num_views != 0:
        raise ValueError(f"{op}: num_views={num_views} does not divide the {z.shape[0]} rows of z; "
                         f"z must be (num_views * B, D), view-major")
    if positives not in POSITIVE_MODES:
        raise ValueError(f"{op}: positives must be one of {', '.join(POSITIVE_MODES)}, got {positives!r}")
    t = _check_temperature(op, temperature)
    _check_flag(op, "normalize", normalize)
    num_views = int(num_views)
    backend = _pick_backend(op, backend, z.device, z.shape[0] * z.shape[0], z.dtype)
    if backend == "torch":
        return nt_xent_reference(z, num_views, t, positives, normalize)

    if normalize:
        z = F.normalize(z, dim=1)
    batch = z.shape[0] // num_views
    mode = _POS_MODE[positives]
    lse, pos = _row_lse(z, z, 1.0 / t, True, batch, mode, backend)
    if mode == 1:
        pos = pos / (num_views - 1)
    return (lse - pos).mean().to(z.dtype)


__all__ = ["info_nce", "nt_xent", "info_nce_reference", "nt_xent_reference", "POSITIVE_MODES"]
