"""Typed training configuration.

A run's configuration is a TrainConfig; a method's preset (its official code's defaults, or a
size that suits the digits demo) is a nested dict of overrides applied on top, and the CLI's
--config FILE.yaml and --set key=value are applied after that. Method-specific knobs live in the
method's own ``Options`` dataclass and are reached as ``method.<field>`` (e.g. ``method.queue_size``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AttackConfig:
    kind: str = "pgd"  # "pgd" | "fgsm" | "none"
    norm: str = "linf"  # "linf" | "l2"
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 5
    random_start: bool = True


@dataclass
class OptimConfig:
    name: str = "sgd"  # "sgd" | "lars"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    lars_eta: float = 1e-3
    lars_exclude_bn_bias: bool = False
    schedule: str = "cosine"  # "cosine" | "constant"
    warmup_epochs: float = 10.0
    warmup_start_lr: float = 0.0
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    method: str = "simclr"
    variant: str | None = None
    # data
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None
    augment_backend: str = "auto"  # "auto" | "torch" | "dali" | "torchvision"
    # model
    arch: str = "resnet18"
    # schedule
    epochs: int = 100
    batch_size: int = 512
    temperature: float = 0.5
    attack: AttackConfig = field(default_factory=AttackConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method_options: dict[str, Any] = field(default_factory=dict)
    # engine
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16" | "fp16"
    channels_last: str = "auto"  # "auto" (on for GPU) | "on" | "off"
    compile: bool = False
    deterministic: bool = False
    out: str = "runs/run"
    log_every: int = 50
    ckpt_every: int = 500  # steps
    keep_last: int = 3


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def closest(name: str, options) -> str:
    """' (did you mean X?)' or '' - for one-line errors on typos."""
    match = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def apply_overrides(obj, overrides: dict[str, Any], where: str = "config"):
    """Apply a nested dict of overrides onto a dataclass instance, in place; unknown keys raise
    ValueError naming the closest key. ``method_options`` is a plain dict and takes any keys:
    the method validates them against its Options dataclass."""
    for key, value in overrides.items():
        if isinstance(obj, dict):
            obj[key] = value
            continue
        names = field_names(type(obj))
        if key not in names:
            raise ValueError(f"unknown {where} key {key!r}{closest(key, names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) or isinstance(current, dict):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key} is a section; give it as a mapping, not {value!r}")
            apply_overrides(current, value, f"{where}.{key}")
        else:
            setattr(obj, key, value)
    return obj


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
