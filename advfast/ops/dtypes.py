"""The one compute-dtype rule of advfast's ops and losses: half precision (float16, bfloat16) is computed
in float32, as the kernels do; float32 and float64 as they are (float64 keeps the fidelity checks exact)."""

from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of ``dtype`` is computed (and accumulated) in."""
    return torch.float32 if dtype in HALF else dtype


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its compute dtype (``t`` itself when that is its dtype)."""
    return t.float() if t.dtype in HALF else t
