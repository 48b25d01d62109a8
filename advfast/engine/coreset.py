"""The engine's bookkeeping for ``coreset=rcs``: the epoch layout (full-data epochs, then shorter coreset
epochs) and a run's coreset state. The Trainer builds and drives them (Trainer._build_coreset,
Trainer._coreset_epoch); the selection itself is advfast.methods.coreset_rcs."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class EpochLayout:
    """Steps of each (0-based) epoch: ``full`` per epoch, or with a coreset ``full`` for the first ``warmup``
    epochs and ``core`` after them. ``virtual_step`` maps a step to the same epoch progress on the full-data
    scale: the learning-rate schedule in epoch units (RCS's official code rebuilds its per-iteration cosine
    for each epoch's loader length and fast-forwards it, so the LR follows the epoch progress)."""
    full: int
    core: int | None = None
    warmup: int = 0

    @property
    def uniform(self) -> bool:
        return self.core is None

    def steps_in(self, epoch: int) -> int:
        return self.full if self.core is None or epoch < self.warmup else self.core

    def start(self, epoch: int) -> int:
        if self.core is None or epoch <= self.warmup:
            return epoch * self.full
        return self.warmup * self.full + (epoch - self.warmup) * self.core

    def epoch_of(self, step: int) -> int:
        if self.core is None or step < self.warmup * self.full:
            return step // self.full
        return self.warmup + (step - self.warmup * self.full) // self.core

    def progress(self, step: int) -> float:
        """Epochs done at ``step`` (fractional)."""
        if self.core is None:
            return step / self.full
        e = self.epoch_of(step)
        return e + (step - self.start(e)) / self.steps_in(e)

    def virtual_step(self, step: int) -> float:
        """``step`` as the full-data step at the same epoch progress (itself on full-data epochs)."""
        e = self.epoch_of(step)
        if self.core is None or e < self.warmup:
            return step
        return e * self.full + (step - self.start(e)) * self.full / self.core


@dataclasses.dataclass
class CoresetState:
    """A run's coreset state: what it selects with, the selection loader (``chooser``), the validation rows,
    the pool (None: the whole set), and the current selection (dataset indices) with its epoch."""
    objective: Any
    settings: Any
    chooser: Any
    val_x: torch.Tensor
    pool: torch.Tensor | None
    val_indices: torch.Tensor
    size: int
    indices: torch.Tensor | None = None
    selected_at: int = -1
