"""Learning-rate schedules: linear warmup, then cosine decay (or constant), per iteration or per epoch.

``lr_at(step, ...)`` is the pure formula; :class:`WarmupCosineLR` applies it to an optimizer,
stepped once per iteration (``scheduler.step()`` after ``optimizer.step()``), so iteration i
(counted from 0) runs at ``lr_at(i)``:

    step < warmup:  warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup          (warmup_point "start")
                    warmup_start_lr + (base_lr - warmup_start_lr) * (step + 1) / warmup    (warmup_point "end")
    cosine:         min_lr + (base_lr - min_lr) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2
    constant:       base_lr

This is ACL's ``cosine_annealing(step, total, 1, 1e-6 / lr, warmup_steps)`` with
warmup_start_lr = 0 and min_lr = 1e-6. ``warmup_point="end"`` is PKU-ML/DYNACL's ``cosine_annealing``
(``(step + 1) / warmup``: the first warmup unit already runs at 1/warmup of the peak).

Per-epoch stepping (``steps_per_unit`` = steps per epoch, ``optim.step_every="epoch"``): the formula is
evaluated at the epoch index ``step // steps_per_unit`` with totals in epochs, so the lr is constant inside
an epoch, as a ``LambdaLR`` stepped once per epoch (DynACL's ``train_DynACL.py``). The scheduler is still
stepped per iteration, so checkpoints and resume are the same in both modes.

The other official codes step their schedules per epoch too; these presets approximate them per iteration:
- AMOC: lr 1e-4 in epoch 0, a linear per-epoch warmup to 0.1 over 10 epochs, then per-epoch
  cosine to 0 -> warmup_start_lr 1e-4, warmup 10 epochs, cosine to min_lr 0.
- AdvCL: per-iteration warmup from 0.01 over epochs 1-10 to the cosine value, per-epoch cosine
  from 0.5 to 5e-4 over all epochs -> warmup_start_lr 0.01, min_lr 5e-4 (the cosine here starts
  after the warmup instead of at epoch 0: the lr at epoch 10 is 0.5 instead of 0.4994).
- RoCL: GradualWarmup x15 over 10 epochs (0.1 -> 1.5), then cosine -> lr 1.5, warmup_start_lr 0.1.
Per-group learning rates keep their ratio to the first group's base lr (warmup_start_lr and
min_lr are scaled with it).
"""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LRScheduler

SCHEDULES = ("cosine", "constant", "step")
WARMUP_POINTS = ("start", "end")


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, warmup_start_lr: float = 0.0,
          min_lr: float = 0.0, schedule: str = "cosine", warmup_point: str = "start", step_units: int = 0,
          gamma: float = 0.1) -> float:
    """Learning rate of iteration ``step`` (0-based); past ``total_steps`` it stays at the end value.
    ``warmup_point``: warmup step i runs at the linear ramp's value at its start (i / warmup) or its end
    ((i + 1) / warmup)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_point not in WARMUP_POINTS:
        raise ValueError(f"warmup_point must be one of {WARMUP_POINTS}, got {warmup_point!r}")
    if step < 0 or total_steps < 0 or warmup_steps < 0:
        raise ValueError(f"step, total_steps and warmup_steps must be >= 0, got {step}, {total_steps}, {warmup_steps}")
    if schedule == "step" and step_units < 1:
        raise ValueError(f"schedule 'step' needs step_units >= 1 (the units between lr steps), got {step_units}")
    if step < warmup_steps:
        done = step + 1 if warmup_point == "end" else step
        return warmup_start_lr + (base_lr - warmup_start_lr) * done / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "step":  # torch StepLR: x gamma every step_units units after the warmup
        return base_lr * gamma ** ((step - warmup_steps) // step_units)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(LRScheduler):
    """``lr_at`` applied to every parameter group, stepped once per iteration (see the module docstring).

    ``total_steps`` and ``warmup_steps`` count units of ``steps_per_unit`` iterations: 1 (the default) for
    a per-iteration schedule, the steps per epoch for a per-epoch one (the lr of iteration i is then
    ``lr_at(i // steps_per_unit)``)."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, warmup_start_lr: float = 0.0,
                 min_lr: float = 0.0, schedule: str = "cosine", last_epoch: int = -1, warmup_point: str = "start",
                 steps_per_unit: int = 1, step_units: int = 0, gamma: float = 0.1):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if warmup_point not in WARMUP_POINTS:
            raise ValueError(f"warmup_point must be one of {WARMUP_POINTS}, got {warmup_point!r}")
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                             f"got {total_steps} and {warmup_steps}")
        if isinstance(steps_per_unit, bool) or not isinstance(steps_per_unit, int) or steps_per_unit < 1:
            raise ValueError(f"steps_per_unit must be an int >= 1, got {steps_per_unit!r}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_lr = float(warmup_start_lr)
        self.min_lr = float(min_lr)
        self.schedule = schedule
        self.warmup_point = warmup_point
        self.steps_per_unit = steps_per_unit
        if schedule == "step" and step_units < 1:
            raise ValueError(f"schedule 'step' needs step_units >= 1, got {step_units}")
        self.step_units, self.gamma = int(step_units), float(gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        ref = self.base_lrs[0]
        unit = self.last_epoch // self.steps_per_unit
        lrs = []
        for base in self.base_lrs:
            scale = base / ref if ref else 1.0
            lrs.append(lr_at(unit, base, self.total_steps, self.warmup_steps, self.warmup_start_lr * scale,
                             self.min_lr * scale, self.schedule, self.warmup_point, self.step_units, self.gamma))
        return lrs
