"""In-place exponential moving average over lists of tensors (momentum encoders, EMA models).

ema_update_(ema_tensors, tensors, m):  ema = m * ema + (1 - m) * src  for every floating pair;
integer and bool pairs (BatchNorm's num_batches_tracked) are copied, since averaging counters is
meaningless. The formula is exact at the ends: m = 0 copies src, m = 1 leaves ema unchanged.

Backends: "cuda"/"cpp" call torch.ops.advfast.ema_update_ once for all pairs (the extension
groups by dtype and copies the integer ones); "triton" launches once per dtype group (kernels/ema_update.py); "torch" is the
plain per-tensor loop below, computed in float32 for half-precision tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from advfast.ops import _dispatch
from advfast.ops.dtypes import compute_dtype

_IMPLEMENTED = ("cuda", "triton", "cpp", "torch")
_AUTO_ORDER = ("cuda", "triton", "cpp", "torch")


def _as_tensor_list(name: str, tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Iterable):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(tensors).__name__}")
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return out


def _check_args(ema_tensors, tensors, momentum):
    ema = _as_tensor_list("ema_tensors", ema_tensors)
    src = _as_tensor_list("tensors", tensors)
    if len(ema) != len(src):
        raise ValueError(f"ema_tensors and tensors must have the same length, got {len(ema)} and {len(src)}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a python float in [0, 1], got {type(momentum).__name__}")
    m = float(momentum)
    if not (math.isfinite(m) and 0.0 <= m <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    device = ema[0].device if ema else None
    for i, (e, s) in enumerate(zip(ema, src)):
        if e.shape != s.shape:
            raise ValueError(f"ema_tensors[{i}] has shape {tuple(e.shape)} but tensors[{i}] has "
                             f"{tuple(s.shape)}; the lists must pair tensors of the same shape")
        if e.dtype != s.dtype:
            raise TypeError(f"ema_tensors[{i}] has dtype {e.dtype} but tensors[{i}] has {s.dtype}; "
                            "the lists must pair tensors of the same dtype")
        if e.is_complex():
            raise TypeError(f"ema_tensors[{i}] is complex ({e.dtype}); only real tensors are supported")
        if e.device != device or s.device != device:
            raise ValueError(f"ema_tensors[{i}] is on {e.device} and tensors[{i}] on {s.device}; "
                             f"all tensors must be on {device}")
    return ema, src, m


def ema_update_reference(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], momentum: float) -> None:
    """The plain loop: one blend per tensor, half precision computed in float32."""
    for e, s in zip(ema_tensors, tensors):
        if not e.is_floating_point():
            e.copy_(s)
            continue
        compute = compute_dtype(e.dtype)
        e.copy_(e.to(compute) * momentum + s.to(compute) * (1.0 - momentum))


def ema_update_(ema_tensors, tensors, momentum: float, backend: str = "auto") -> None:
    """In place ema = m*ema + (1-m)*src over two lists (or tuples, or iterables) of paired tensors.

    Integer/bool tensors are copied. Raises ValueError/TypeError for lists of different lengths,
    mismatched shapes, dtypes or devices, and momentum outside [0, 1].
    """
    ema, src, m = _check_args(ema_tensors, tensors, momentum)
    if not ema:
        return
    device = ema[0].device
    if backend == "auto" and torch.compiler.is_compiling():
        name = "torch"
    else:
        name = _dispatch.resolve("ema_update_", backend, device, _IMPLEMENTED, _AUTO_ORDER)
    with torch.no_grad():
        if name == "torch":
            ema_update_reference(ema, src, m)
            return
        if name in ("cuda", "cpp"):  # the extension copies integer tensors itself
            torch.ops.advfast.ema_update_(ema, src, m)
            return
        floats = [(e, s) for e, s in zip(ema, src) if e.is_floating_point()]
        counters = [(e, s) for e, s in zip(ema, src) if not e.is_floating_point()]
        if counters:
            torch._foreach_copy_([e for e, _ in counters], [s for _, s in counters])
        if not floats:
            return
        from advfast.kernels import ema_update as kernels

        with _dispatch.device_guard(device):
            kernels.ema_update_([e for e, _ in floats], [s for _, s in floats], m)
