"""Optimisers (SGD, LARS) and per-iteration warmup + cosine schedules."""

from advfast.optim.build import OPTIMIZERS, build_optimizer, build_scheduler
from advfast.optim.lars import LARS
from advfast.optim.schedule import SCHEDULES, WarmupCosineLR, lr_at

__all__ = ["LARS", "OPTIMIZERS", "SCHEDULES", "WarmupCosineLR", "build_optimizer", "build_scheduler", "lr_at"]
