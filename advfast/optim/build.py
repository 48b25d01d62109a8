"""Optimizer and schedule from an ``OptimConfig`` (advfast.config)."""

from __future__ import annotations

import math

import torch

from advfast.config import OptimConfig
from advfast.optim.lars import LARS
from advfast.optim.schedule import SCHEDULES, WARMUP_POINTS, WarmupCosineLR

STEP_EVERY = ("iteration", "epoch")

OPTIMIZERS = ("sgd", "lars")


def _materialise(params) -> list:
    # one-shot iterables (model.parameters(), generators inside groups) become lists: read twice
    params = [dict(item, params=list(item["params"])) if isinstance(item, dict) else item for item in params]
    if not params:
        raise ValueError("params is empty; pass the model's trainable parameters")
    return params


def _tensors(params):
    for item in params:
        if isinstance(item, dict):
            yield from item["params"]
        else:
            yield item


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (fused on CUDA) or LARS over ``params`` (tensors or param-group dicts)."""
    for key in ("lr", "momentum", "weight_decay", "lars_eta"):  # nan would train on silently, or not at all
        if not math.isfinite(getattr(cfg, key)):
            raise ValueError(f"optim.{key} must be a finite number, got {getattr(cfg, key)}")
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {cfg.name!r}")
    params = _materialise(params)
    if cfg.name == "lars":
        if cfg.nesterov:
            raise ValueError("optim.nesterov is not supported with LARS; set optim.nesterov=false")
        return LARS(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta,
                    exclude_bn_bias=cfg.lars_exclude_bn_bias)
    tensors = list(_tensors(params))
    fused = all(t.is_cuda and t.is_floating_point() for t in tensors) or None
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    epochs: int) -> WarmupCosineLR:
    """``cfg.warmup_epochs`` of linear warmup from ``cfg.warmup_start_lr`` (``cfg.warmup_point``), then
    cosine to ``cfg.min_lr`` (or constant), changing every iteration or, with ``cfg.step_every="epoch"``,
    once per epoch (then ``warmup_epochs`` must be whole). A warmup longer than the run is cut to the run."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if cfg.step_every not in STEP_EVERY:
        raise ValueError(f"optim.step_every must be one of {STEP_EVERY}, got {cfg.step_every!r}")
    if cfg.warmup_point not in WARMUP_POINTS:
        raise ValueError(f"optim.warmup_point must be one of {WARMUP_POINTS}, got {cfg.warmup_point!r}")
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"steps_per_epoch and epochs must be >= 1, got {steps_per_epoch} and {epochs}")
    if not 0 <= cfg.warmup_epochs < math.inf:
        raise ValueError(f"optim.warmup_epochs must be a finite number >= 0, got {cfg.warmup_epochs}")
    if cfg.step_every == "epoch":
        if cfg.warmup_epochs != int(cfg.warmup_epochs):
            raise ValueError(f"optim.warmup_epochs must be a whole number with optim.step_every=epoch, "
                             f"got {cfg.warmup_epochs}")
        return WarmupCosineLR(optimizer, int(epochs), int(min(cfg.warmup_epochs, epochs)), cfg.warmup_start_lr,
                              cfg.min_lr, cfg.schedule, warmup_point=cfg.warmup_point,
                              steps_per_unit=int(steps_per_epoch), step_units=cfg.step_epochs, gamma=cfg.gamma)
    total = int(steps_per_epoch) * int(epochs)
    # cut to the run before scaling: 1e308 epochs of warmup times the steps would overflow
    warmup = min(total, int(round(min(cfg.warmup_epochs, epochs) * steps_per_epoch)))
    return WarmupCosineLR(optimizer, total, warmup, cfg.warmup_start_lr, cfg.min_lr, cfg.schedule,
                          warmup_point=cfg.warmup_point, step_units=cfg.step_epochs * int(steps_per_epoch),
                          gamma=cfg.gamma)
