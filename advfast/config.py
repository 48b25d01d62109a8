"""Typed training configuration.

A run's configuration is a TrainConfig; a method's preset (its official code's defaults, or a
size that suits the digits demo) is a nested dict of overrides applied on top, and the CLI's
--config FILE.yaml and --set key=value are applied after that. Method-specific knobs live in the
method's own ``Options`` dataclass and are reached as ``method.<field>`` (e.g. ``method.queue_size``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
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
    compile: bool = False  # torch.compile the encoder (in place: checkpoint keys do not change)
    cuda_graph_attack: bool = False  # capture each attack (start + all steps) as a CUDA graph and replay it
    sync_bn: bool = False  # torchrun on GPUs: SyncBatchNorm, each BN branch synchronised on its own
    compile_backend: str = "inductor"  # any torch.compile backend ("aot_eager" compiles fast, for tests)
    deterministic: bool = False
    out: str = "runs/run"
    log_every: int = 50  # steps between host reads of the metrics (the only syncs of the loop)
    ckpt_every: int = 500  # steps
    keep_last: int = 3
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps; the schedule still spans `epochs`
    progress: bool = True  # tqdm progress bar on stderr


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def closest(name: str, options) -> str:
    """' (did you mean X?)' or '' - for one-line errors on typos."""
    match = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def apply_overrides(obj, overrides: dict[str, Any], where: str = "config"):
    """Apply a nested dict of overrides onto a dataclass instance, in place; unknown keys raise
    ValueError naming the closest key, and values are coerced to the field's type (so "8/255" is a
    float, "true" a bool) or rejected with one line. ``method_options`` is a plain dict and takes any
    keys: the method validates and coerces them against its Options dataclass."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {overrides!r}")
    hints = _type_hints(type(obj)) if not isinstance(obj, dict) else {}
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
            setattr(obj, key, coerce(value, hints.get(key), f"{where}.{key}"))
    return obj


def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_number(text: str) -> float | int | None:
    """'8/255' -> 0.0313..., '1e-6' -> 1e-06, '3' -> 3; None when ``text`` is not a number."""
    m = _FRACTION.fullmatch(text.strip())
    if m:
        den = float(m.group(2))
        if den == 0:
            return None
        return float(m.group(1)) / den
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


_FRACTION = re.compile(r"([-+]?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)")


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Coerce ``value`` to the annotated type ``hint`` (bool, int, float, str, or X | None)."""
    if hint is None or hint is Any:
        return value
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, str):
            value = parse_number(value) if parse_number(value) is not None else value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            value = parse_number(value) if parse_number(value) is not None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number (e.g. 0.5 or 8/255), got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    return value


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from ``to_dict`` output (a run's saved config)."""
    cfg = TrainConfig()
    apply_overrides(cfg, data)
    return cfg


_CHOICES = {
    "attack.kind": ("pgd", "fgsm", "none"),
    "attack.norm": ("linf", "l2"),
    "optim.name": ("sgd", "lars"),
    "optim.schedule": ("cosine", "constant"),
    "augment_backend": ("auto", "torch", "dali", "torchvision"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "channels_last": ("auto", "on", "off"),
}


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject values no run can use, with one line naming the key and the fix."""
    for key, options in _CHOICES.items():
        value = _get(cfg, key)
        if value not in options:
            raise ValueError(f"{key} must be one of {', '.join(options)}, got {value!r}{closest(str(value), options)}")

    def check(key, ok, need):
        value = _get(cfg, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            raise ValueError(f"{key} must be {need}, got {value!r}")

    check("epochs", lambda v: v >= 1, "a positive integer")
    check("batch_size", lambda v: v >= 2, "at least 2 (contrastive losses need negatives)")
    check("temperature", lambda v: v > 0, "positive")
    check("seed", lambda v: v >= 0, "a non-negative integer")
    check("log_every", lambda v: v >= 1, "a positive integer")
    check("ckpt_every", lambda v: v >= 1, "a positive integer")
    check("keep_last", lambda v: v >= 1, "at least 1")
    check("optim.lr", lambda v: v > 0, "positive")
    check("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)")
    check("optim.weight_decay", lambda v: v >= 0, "non-negative")
    check("optim.warmup_epochs", lambda v: v >= 0, "non-negative (a warmup longer than the run is cut to it)")
    check("optim.min_lr", lambda v: 0 <= v <= cfg.optim.lr, f"between 0 and optim.lr ({cfg.optim.lr})")
    check("optim.warmup_start_lr", lambda v: 0 <= v <= cfg.optim.lr, f"between 0 and optim.lr ({cfg.optim.lr})")
    check("optim.lars_eta", lambda v: v > 0, "positive")
    if cfg.attack.kind != "none":
        # eps in [0, 1] image units: above 1 the ball holds every image and the attack is meaningless
        bound = 1.0 if cfg.attack.norm == "linf" else 64.0
        check("attack.eps", lambda v: 0 <= v <= bound, f"in [0, {bound:g}] (image scale [0, 1]; e.g. 8/255)")
        check("attack.alpha", lambda v: 0 <= v <= bound, f"in [0, {bound:g}] (e.g. 2/255)")
        check("attack.steps", lambda v: v >= 1, "a positive integer")
    if cfg.image_size is not None:
        check("image_size", lambda v: 4 <= v <= 1024, "between 4 and 1024 pixels")
    if cfg.max_steps is not None:
        check("max_steps", lambda v: v >= 1, "a positive integer")
    if not (cfg.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", cfg.device)):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.cuda_graph_attack and cfg.device == "cpu":
        raise ValueError("cuda_graph_attack captures CUDA graphs and needs a CUDA device, got device cpu; "
                         "leave it off on the CPU")
    if cfg.cuda_graph_attack and cfg.compile:
        raise ValueError("cuda_graph_attack and compile are not supported together (a compiled encoder "
                         "inside a hand-captured graph is untested); choose one")
    return cfg


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
