"""When a non-finite loss or non-finite weights stop a run.

fp32/bf16: any NaN/Inf in the loss or in the weights stops the run (the last checkpoint, written
before, stays the last good one). fp16: the GradScaler already skips a step whose gradients overflow
and halves its scale, so a non-finite loss is a skipped step, not a failure, until the scale falls
below MIN_SCALE: a loss that still overflows at a scale under 1 is not a scaling problem but a
diverged run. Non-finite weights stop every run (the scaler never lets an overflow reach them).
"""

from __future__ import annotations

import torch

MIN_SCALE = 1.0
OK, SKIP, STOP = "ok", "skip", "stop"


def weights_finite(module: torch.nn.Module) -> torch.Tensor:
    """A 0-dim bool tensor on the module's device (no host sync): every floating parameter and buffer
    (BN running statistics included) is finite."""
    flags = [torch.isfinite(t).all() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if not flags:
        return torch.tensor(True)
    return torch.stack(flags).all()


def decide(loss_finite: bool, weights_ok: bool, scaler_enabled: bool, scale: float | None = None) -> str:
    """OK, SKIP (fp16: the scaler skipped the overflowing steps) or STOP."""
    if not weights_ok:
        return STOP
    if loss_finite:
        return OK
    if scaler_enabled and scale is not None and scale >= MIN_SCALE:
        return SKIP
    return STOP
