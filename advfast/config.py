"""Typed training configuration.

A run's configuration is a TrainConfig; a method's preset (its official code's defaults, or a
size that suits the digits demo) is a nested dict of overrides applied on top, and the CLI's
--config FILE.yaml and --set key=value are applied after that. Method-specific knobs live in the
method's own ``Options`` dataclass and are reached as ``method.<field>`` (e.g. ``method.queue_size``).

Config files and --set values are untrusted text (``load_yaml``): UTF-8, at most 64 KiB, at most
100,000 values once aliases are expanded and 32 levels deep, no merge keys; booleans are YAML 1.2's
(true/false only), so ``channels_last: off`` is the string "off" while bool settings still take
yes/no/on/off. ``validate`` checks a whole TrainConfig (every option, backend name and path) before
anything touches the disk.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Image sides any run accepts (cfg.image_size, and an image folder's own size when it is not resized).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 4, 1024
# Every int setting must fit torch's int64 (seeds, step counts); epochs past this are a typo, not a plan.
INT64_MAX = 2**63 - 1
MAX_EPOCHS = 1_000_000
# A config file or --set value larger or more deeply expanded than this is refused, not parsed.
MAX_YAML_BYTES = 64 * 1024  # parsing is ~10 us a value: 64 KiB parse in well under a second
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 32


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
    schedule: str = "cosine"  # "cosine" | "constant" | "step" (x gamma every step_epochs epochs, torch StepLR)
    warmup_epochs: float = 10.0
    warmup_start_lr: float = 0.0
    min_lr: float = 0.0
    step_every: str = "iteration"  # "iteration" | "epoch" (lr constant inside an epoch, as a per-epoch LambdaLR)
    warmup_point: str = "start"  # "start": warmup unit i at i/warmup of the ramp | "end": (i+1)/warmup (DynACL)
    step_epochs: int = 0  # schedule "step": epochs between lr steps (>= 1)
    gamma: float = 0.1  # schedule "step": the lr factor of each step


@dataclass
class RCSConfig:
    """RCS coreset selection (``coreset: rcs``; advfast.methods.coreset_rcs): the official flags of
    GodXuxilie/Efficient_ACL_via_RCS. Defaults are the CIFAR ones; the digits preset scales the schedule."""
    fraction: float = 0.2  # --fraction: share of the selection pool trained on after the warm-up
    warmup_epochs: int = 100  # --warmup: full-data epochs before the first selection
    interval: int = 20  # --fre: epochs between selections
    lr: float = 0.01  # --Coreset_lr: the projection-head step between greedy picks
    step_repeats: int = 2  # the official head step is applied twice per pick (effective lr 2 * lr)
    val_steps: int = 3  # --Coreset_pgd_iter: PGD steps of the validation attack
    val_fraction: float = 0.01  # the held-out validation share (official: a random 1%)
    batch_size: int | None = None  # Coreset_bs (undefined in the official code): None = the training batch


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
    coreset: str = "none"  # "none" | "rcs": train on a robustness-aware coreset after a warm-up (acl, dynacl)
    rcs: RCSConfig = field(default_factory=RCSConfig)
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


def show(value: Any, limit: int = 80) -> str:
    """repr() for messages, bounded in work and length: a huge or alias-expanded value never reaches a
    message whole (reprlib stops at a few levels and items; the result is cut to ``limit``)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxtuple, r.maxset, r.maxstring, r.maxother = 3, 6, 6, 6, 6, limit, limit
    r.maxlong = 40
    text = r.repr(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
        raise ValueError(f"{where} must be a mapping of keys to values, got {show(overrides)}")
    hints = _type_hints(type(obj)) if not isinstance(obj, dict) else {}
    for key, value in overrides.items():
        if not isinstance(key, str):  # YAML keys may be numbers, null or dates
            raise ValueError(f"{where} has a key {show(key)} that is not a name; keys are setting names such as epochs")
        if isinstance(obj, dict):
            obj[key] = value
            continue
        names = field_names(type(obj))
        if key not in names:
            raise ValueError(f"unknown {where} key {show(key)}{closest(key, names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) or isinstance(current, dict):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key} is a section; give it as a mapping, not {show(value)}")
            apply_overrides(current, value, f"{where}.{key}")
        else:
            if key in _ON_OFF and isinstance(value, bool):  # channels_last: false means "off"
                value = "on" if value else "off"
            setattr(obj, key, coerce(value, hints.get(key), f"{where}.{key}"))
    return obj


# string options whose values include "on"/"off": a YAML true/false given for them means that word
_ON_OFF = ("channels_last",)


def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_number(text: str) -> float | int | None:
    """'8/255' -> 0.0313..., '1e-6' -> 1e-06, '3' -> 3; None when ``text`` is not a number."""
    m = _FRACTION.fullmatch(text.strip())
    if m:
        den = float(m.group(2))
        if den == 0:
            return None
        try:
            return float(m.group(1)) / den
        except OverflowError:
            return math.inf
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
    """Coerce ``value`` to the annotated type ``hint`` (bool, int, float, str, or X | None).

    Ints must fit int64; floats may be inf or nan here (validate() names the key that must be finite)."""
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
        raise ValueError(f"{where} must be true or false, got {show(value)}")
    if hint is int:
        if isinstance(value, str):
            number = parse_number(value)
            value = number if number is not None else value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {show(value)}")
        if not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ValueError(f"{where} is too large for an integer setting (|value| < 2**63), got {show(value)}")
        return value
    if hint is float:
        if isinstance(value, str):
            number = parse_number(value)
            value = number if number is not None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number (e.g. 0.5 or 8/255), got {show(value)}")
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range (10**400)
            raise ValueError(f"{where} is too large for a number setting, got {show(value)}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {show(value)} (quote it in YAML)")
        return value
    return value


# ---- YAML (config files and --set values) -----------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _yaml_loader():
    """A SafeLoader with YAML 1.2 booleans (only true/false: on/off/yes/no stay the strings written, so
    ``channels_last: off`` means "off") and no merge keys (``<<`` can expand exponentially)."""
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present: several times faster

    class Loader(base):
        pass

    bool_tag, merge_tag = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:merge"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (bool_tag, merge_tag)]
        for first, resolvers in base.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    return Loader


def load_yaml(text: str | bytes, where: str, invalid_as_text: bool = False) -> Any:
    """Parse one YAML document from an untrusted source (a config file, a --set value), or raise a
    one-line ValueError naming ``where``: at most MAX_YAML_BYTES, at most MAX_YAML_NODES values once
    aliases are expanded and MAX_YAML_DEPTH levels deep (an alias bomb is refused, never expanded).
    ``invalid_as_text``: text that is not YAML is returned as it is (a --set value)."""
    import yaml

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where} is not UTF-8 text (byte {e.start} is {text[e.start:e.start + 1]!r}); "
                             f"save it as UTF-8") from None
    try:  # a command line in another encoding reaches Python as lone surrogates
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} is not UTF-8 text (character {e.start} is {text[e.start]!r}); "
                         f"write it in UTF-8") from None
    if size > MAX_YAML_BYTES:
        raise ValueError(f"{where} is larger than {MAX_YAML_BYTES // 1024} KiB; a config holds a few settings")
    _check_flow_depth(text, where)
    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        if invalid_as_text:  # a --set value that is not YAML is the text itself
            return text
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{where} is not valid YAML ({first[:120]}{at})") from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be a config") from None
    if isinstance(data, dict) and "<<" in data:
        raise ValueError(f"{where} uses a YAML merge key (<<), which config files do not support; write the keys out")
    _check_expansion(data, where)
    return data


def _check_flow_depth(text: str, where: str) -> None:
    """Refuse deeply nested [ and { before parsing: PyYAML's scanner is quadratic in flow depth (10,000
    levels take seconds). Brackets inside quoted strings count too: a config needs few of either."""
    if text.count("[") + text.count("{") <= MAX_YAML_DEPTH:
        return
    depth = 0
    for m in re.finditer(r"[\[\]{}]", text):
        depth += 1 if m.group() in "[{" else -1
        if depth > MAX_YAML_DEPTH:
            raise ValueError(f"{where} is nested deeper than {MAX_YAML_DEPTH} levels")


def _check_expansion(data: Any, where: str) -> None:
    """Walk ``data`` as a consumer would (aliases visited once per reference), within the caps."""
    stack, seen = [(data, 1)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise ValueError(f"{where} expands to more than {MAX_YAML_NODES} values (YAML aliases?); "
                             f"a config holds a few settings")
        if depth > MAX_YAML_DEPTH:
            raise ValueError(f"{where} is nested deeper than {MAX_YAML_DEPTH} levels (or refers to itself)")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node)
        elif isinstance(node, (list, tuple, set)):
            stack.extend((v, depth + 1) for v in node)


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
    "optim.schedule": ("cosine", "constant", "step"),
    "optim.step_every": ("iteration", "epoch"),
    "optim.warmup_point": ("start", "end"),
    "augment_backend": ("auto", "torch", "dali", "torchvision"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "channels_last": ("auto", "on", "off"),
}


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject values no run can use, with one line naming the key and the fix: every option, every
    backend name, every path the run reads or writes. Runs before anything touches the disk."""
    for key, options in _CHOICES.items():
        value = _get(cfg, key)
        if not isinstance(value, str) or value not in options:
            raise ValueError(f"{key} must be one of {', '.join(options)}, got {show(value)}"
                             f"{closest(str(value), options) if isinstance(value, str) else ''}")

    def check(key, ok, need):
        value = _get(cfg, key)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and ok(value)):
            raise ValueError(f"{key} must be {need}, got {show(value)}")

    check("epochs", lambda v: 1 <= v <= MAX_EPOCHS, f"a positive integer (at most {MAX_EPOCHS})")
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
    if cfg.optim.step_every == "epoch":
        check("optim.warmup_epochs", lambda v: v == int(v), "a whole number of epochs with optim.step_every=epoch")
    check("optim.min_lr", lambda v: 0 <= v <= cfg.optim.lr, f"between 0 and optim.lr ({cfg.optim.lr})")
    check("optim.warmup_start_lr", lambda v: 0 <= v <= cfg.optim.lr, f"between 0 and optim.lr ({cfg.optim.lr})")
    check("optim.lars_eta", lambda v: v > 0, "positive")
    check("optim.gamma", lambda v: 0 < v <= 1, "in (0, 1]")
    if cfg.optim.schedule == "step":
        check("optim.step_epochs", lambda v: v >= 1, "a positive number of epochs with optim.schedule=step")
    if cfg.attack.kind != "none":
        # eps in [0, 1] image units: above 1 the ball holds every image and the attack is meaningless
        bound = 1.0 if cfg.attack.norm == "linf" else 64.0
        check("attack.eps", lambda v: 0 <= v <= bound, f"in [0, {bound:g}] (image scale [0, 1]; e.g. 8/255)")
        check("attack.alpha", lambda v: 0 <= v <= bound, f"in [0, {bound:g}] (e.g. 2/255)")
        check("attack.steps", lambda v: v >= 1, "a positive integer")
    if cfg.image_size is not None:
        check("image_size", lambda v: MIN_IMAGE_SIZE <= v <= MAX_IMAGE_SIZE,
              f"between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels")
    if cfg.max_steps is not None:
        check("max_steps", lambda v: v >= 1, "a positive integer")
    _check_numbers(cfg)  # whatever the checks above do not name: finite floats, int64 ints
    if not (isinstance(cfg.device, str) and (cfg.device in ("auto", "cpu", "cuda")
                                             or re.fullmatch(r"cuda:\d{1,4}", cfg.device))):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {show(cfg.device)}")
    if cfg.cuda_graph_attack and cfg.device == "cpu":
        raise ValueError("cuda_graph_attack captures CUDA graphs and needs a CUDA device, got device cpu; "
                         "leave it off on the CPU")
    if cfg.cuda_graph_attack and cfg.compile:
        raise ValueError("cuda_graph_attack and compile are not supported together (a compiled encoder "
                         "inside a hand-captured graph is untested); choose one")
    if cfg.compile:
        _check_compile_backend(cfg.compile_backend)
    _check_names(cfg)
    check_out_path(cfg.out)
    if cfg.data_dir is not None:
        check_path_text(cfg.data_dir, "data_dir (--data-dir)")
    _validate_method(cfg)
    _validate_coreset(cfg)
    return cfg


def _validate_coreset(cfg) -> None:
    """``coreset`` and its ``rcs.*`` settings; only methods that declare a selection objective take it."""
    if cfg.coreset not in ("none", "rcs"):
        raise ValueError(f"coreset must be one of none, rcs, got {show(cfg.coreset)}"
                         f"{closest(str(cfg.coreset), ('none', 'rcs')) if isinstance(cfg.coreset, str) else ''}")
    r = cfg.rcs
    for name in ("fraction", "lr", "val_fraction"):
        _check_number(f"rcs.{name}", getattr(r, name))
    rules = (("fraction", 0 < r.fraction <= 1, "in (0, 1]"), ("lr", r.lr >= 0, "non-negative"),
             ("val_fraction", 0 < r.val_fraction < 1, "in (0, 1) (the held-out validation share)"),
             ("warmup_epochs", isinstance(r.warmup_epochs, int) and 0 <= r.warmup_epochs <= MAX_EPOCHS,
              "a non-negative integer"),
             ("interval", isinstance(r.interval, int) and 1 <= r.interval <= MAX_EPOCHS, "a positive integer"),
             ("step_repeats", isinstance(r.step_repeats, int) and 1 <= r.step_repeats <= 1000, "an integer in [1, 1000]"),
             ("val_steps", isinstance(r.val_steps, int) and 0 <= r.val_steps <= 10_000, "an integer in [0, 10000]"),
             ("batch_size", r.batch_size is None or (isinstance(r.batch_size, int) and r.batch_size >= 1),
              "a positive integer or null (the training batch)"))
    for name, ok, need in rules:
        if not ok:
            raise ValueError(f"rcs.{name} must be {need}, got {show(getattr(r, name))}")
    if cfg.coreset == "none":
        return
    if r.warmup_epochs % r.interval:  # else the first coreset epoch would come before the first selection
        raise ValueError(f"rcs.warmup_epochs ({r.warmup_epochs}) must be a multiple of rcs.interval ({r.interval}): "
                         f"the first selection is at epoch warmup_epochs + 1")
    from advfast.methods import METHODS
    from advfast.methods.base import Method

    if METHODS[cfg.method].coreset_objective is Method.coreset_objective:
        with_rcs = sorted(n for n, c in METHODS.items() if c.coreset_objective is not Method.coreset_objective)
        raise ValueError(f"coreset=rcs needs a selection objective, which method {cfg.method} does not define; "
                         f"use it with {', '.join(with_rcs)} or drop --set coreset=rcs")


def _check_numbers(cfg) -> None:
    """Every float field finite, every int field within int64, in every section."""
    for section, prefix in ((cfg, ""), (cfg.attack, "attack."), (cfg.optim, "optim.")):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            _check_number(f"{prefix}{f.name}", value)


def _check_number(key: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value}")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise ValueError(f"{key} is too large for an integer setting (|value| < 2**63), got {show(value)}")


def _check_compile_backend(name: Any) -> None:
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if not isinstance(name, str) or name not in known:
        raise ValueError(f"compile_backend {show(name)} is not a torch.compile backend"
                         f"{closest(str(name), known)}; e.g. inductor (the default) or aot_eager")


def _check_names(cfg) -> None:
    """The dataset and architecture exist (before any data is read: a typo should not wait for a download)."""
    from advfast.data.datasets import DATASETS
    from advfast.models import available_archs

    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {show(cfg.dataset)}{closest(str(cfg.dataset), DATASETS)}; "
                         f"choose from {', '.join(DATASETS)}")
    archs = available_archs()
    if cfg.arch not in archs:
        raise ValueError(f"unknown arch {show(cfg.arch)}{closest(str(cfg.arch), archs)}; "
                         f"choose from {', '.join(archs)}")


# the longest path and path component Linux file systems take (PATH_MAX, NAME_MAX)
_PATH_MAX, _NAME_MAX = 4096, 255


def check_path_text(path: Any, what: str) -> bytes:
    """A path given as text: no control characters (they would break one-line messages, and NUL
    cannot reach the OS), within PATH_MAX and NAME_MAX. Returns its bytes."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{what} must be a path, got {show(path)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ValueError(f"{what} must not contain control characters (NUL, newline, ...), got {show(path)}")
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:
        raise ValueError(f"{what} cannot be encoded for the file system, got {show(path)}") from None
    if len(raw) >= _PATH_MAX:
        raise ValueError(f"{what} is {len(raw)} bytes long; paths are limited to {_PATH_MAX - 1}: "
                         f"choose a shorter one ({show(path, 60)})")
    for part in raw.split(b"/"):
        if len(part) > _NAME_MAX:
            raise ValueError(f"{what} has a name of {len(part)} bytes ({show(os.fsdecode(part), 40)}); "
                             f"file systems allow {_NAME_MAX}: choose a shorter one")
    return raw


def check_out_path(out: Any) -> None:
    """--out can become a directory: sane text, not a file, and its nearest existing ancestor is a folder."""
    check_path_text(out, "out (--out)")
    path = Path(out)
    try:
        if path.exists() and not path.is_dir():
            raise ValueError(f"output path {out} is a file; give --out a directory")
        for parent in path.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(f"output directory {out} is not writable ({parent} is a file, not a "
                                     f"directory); choose another --out")
                break
    except OSError as e:
        raise ValueError(f"output directory {out} cannot be used ({e.strerror}); choose another --out") from None


def _validate_method(cfg) -> None:
    """The method, its variant and every method.* option: types, finite numbers, backend names, then the
    method's own ``check_options`` (declared ranges and choices, files)."""
    from advfast.methods import METHODS  # here: advfast.methods imports this module

    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {show(cfg.method)}{closest(str(cfg.method), METHODS)}; "
                         f"choose from {', '.join(sorted(METHODS))}")
    cls = METHODS[cfg.method]
    cls.resolve_variant(cfg.variant)
    options = cls.parse_options(cfg.method_options)
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        _check_number(f"method.{f.name}", value)
        top = _SIZE_OPTIONS.get(f.name)
        if top is not None and value is not None and not (isinstance(value, int) and 1 <= value <= top):
            raise ValueError(f"method.{f.name} must be a positive integer (at most {top}), got {show(value)}")
        choices = _backend_choices(f.name)
        if choices and value not in choices:
            raise ValueError(f"method.{f.name} must be one of {', '.join(choices)}, got {show(value)}"
                             f"{closest(str(value), choices)}")
        if choices and f.name != "kmeans_backend" and value != "auto":
            _check_backend_runs(f"method.{f.name}", value, cfg.device)
    cls.check_options(options, cfg)


def _check_backend_runs(key: str, backend: str, device: str) -> None:
    """A backend asked for by name must run on the run's device here (not fail at step 1)."""
    import torch

    from advfast.ops._dispatch import unavailable_reason

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = unavailable_reason(backend, torch.device(device))
    if reason is not None:
        raise ValueError(f"{key}={backend} cannot run on {device} here ({reason}); use auto")


# widths and queue lengths of every method: positive, and small enough to allocate
_SIZE_OPTIONS = {"head_hidden": 1 << 16, "queue_size": 1 << 24, "queue_size_clean": 1 << 24,
                 "queue_size_adv": 1 << 24, "local_batch": 1 << 24}


def _backend_choices(option: str) -> tuple[str, ...]:
    """The names a method's ``*_backend`` option takes ("auto" first); () for other options."""
    if option == "loss_backend":
        from advfast.ops.contrastive import IMPLEMENTED

        return ("auto",) + tuple(IMPLEMENTED)
    if option == "ema_backend":
        from advfast.ops.ema_update import _IMPLEMENTED

        return ("auto",) + tuple(_IMPLEMENTED)
    if option == "kmeans_backend":
        return ("torch", "sklearn")
    return ()


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
