"""The engine's side of a method's stages and encoder inputs (advfast.methods.hooks).

Stages run back to back on one global step counter: stage k covers the steps
``[start_k, start_k + epochs_k * steps_per_epoch)``, so a checkpoint's step alone says where a run is, and
its sidecar records the stage (name, index, step inside it) whose optimiser state it holds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from advfast.engine.rundir import STAGES as STAGES_DIR  # <run>/stages/<name>/encoder.*: a stage's export
from advfast.methods.hooks import EncoderInput, Stage


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Where each stage starts, in steps (``starts[k]``), and where the last one ends (``total``)."""

    stages: tuple[Stage, ...]
    starts: tuple[int, ...]
    total: int

    def index_at(self, step: int) -> int:
        """The stage training step ``step`` (the last stage once all are done)."""
        for k in range(len(self.stages) - 1, -1, -1):
            if step >= self.starts[k]:
                return k
        return 0

    def end(self, k: int) -> int:
        return self.starts[k + 1] if k + 1 < len(self.stages) else self.total


def plan_stages(stages, steps_per_epoch: int, method_name: str) -> StagePlan:
    """Check a method's declared stages (names unique, whole epochs) and lay them out in steps."""
    stages = tuple(stages)
    if not stages or not all(isinstance(s, Stage) for s in stages):
        raise TypeError(f"{method_name}.stages() must return a non-empty list of advfast.methods.hooks.Stage")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"{method_name}.stages(): stage names repeat ({', '.join(names)})")
    starts, step = [], 0
    for s in stages:
        if type(s.epochs) is not int or s.epochs < 1:
            raise ValueError(f"{method_name} stage {s.name!r}: epochs must be a positive int, got {s.epochs!r}")
        starts.append(step)
        step += s.epochs * steps_per_epoch
    return StagePlan(stages, tuple(starts), step)


class StageStep(nn.Module):
    """A stage's ``training_step`` as the forward DDP wraps (advfast.engine.distributed.wrap_step calls
    ``.training_step`` of what it wraps); the method is a submodule, so its parameters are DDP's."""

    def __init__(self, method: nn.Module, step):
        super().__init__()
        self.method = method
        self._step = step

    def training_step(self, batch):
        return self._step(batch)


def load_encoder_inputs(method_cls, options, cfg) -> dict[str, tuple[nn.Module, dict]]:
    """Every ``method_cls.encoder_inputs`` encoder named in ``options``, checked and loaded on the CPU,
    frozen. Reads only; ValueError (one line) for a missing required input, a directory that is not an
    advfast run with an exported encoder, a damaged or altered export, or an incompatible encoder."""
    from advfast.models.export import load_encoder

    loaded = {}
    for spec in method_cls.encoder_inputs:
        if not isinstance(spec, EncoderInput):
            raise TypeError(f"{method_cls.__name__}.encoder_inputs holds {spec!r}, not an EncoderInput")
        path = getattr(options, spec.option, None)
        if path in (None, ""):
            if spec.required:
                raise ValueError(f"method {method_cls.name!r} needs a pre-trained encoder: give "
                                 f"--set method.{spec.option}=RUN_DIR (an advfast-train run directory)")
            continue
        where = f"method.{spec.option}={path}"
        if Path(path).is_file():  # a checkpoint published by an official code base (solo-learn's SimCLR, ...)
            encoder, meta = load_published_input(path, where)
        elif not Path(path).is_dir():
            raise ValueError(f"{where}: no such directory or file; give an advfast-train run directory or a "
                             f"published checkpoint file")
        else:
            try:
                encoder, meta = load_encoder(path)
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"{where}: {str(e).splitlines()[0]}") from None
        if spec.same_arch and meta.get("arch") != cfg.arch:
            raise ValueError(f"{where}: its encoder is a {meta.get('arch')}, this run trains a {cfg.arch}; give a "
                             f"{cfg.arch} run or --arch {meta.get('arch')}")
        if cfg.image_size is not None and meta.get("image_size") != cfg.image_size:
            raise ValueError(f"{where}: its encoder was trained on {meta.get('image_size')}px images, this run uses "
                             f"{cfg.image_size}px")
        loaded[spec.option] = (freeze(encoder), meta)
    return loaded


def load_published_input(path, where: str) -> tuple[nn.Module, dict]:
    """A published checkpoint file as an encoder input, through advfast.interop (read without running code
    from it): its format is recognised from the state dict's layout (advfast.interop.describe_layout), the
    image size is the published files' 32 px. The record is the file's path and SHA-256."""
    from advfast.interop import InteropError, load_published
    from advfast.interop.formats import describe_layout
    from advfast.interop.safe_unpickle import load_checkpoint
    from advfast.io import file_sha256

    try:
        payload = load_checkpoint(Path(path))
        fmt = describe_layout(_state_keys(payload))
        if fmt is None:
            raise InteropError("its layout is none of the published formats advfast imports (advfast-eval --from "
                               "lists them)")
        fmt = fmt.split(" ")[0]  # "advcl (or a-infonce)": the same layout
        encoder, meta = load_published(path, fmt)
    except (InteropError, OSError, ValueError) as e:
        raise ValueError(f"{where}: {str(e).splitlines()[0]}") from None
    meta = dict(meta, run_dir=str(Path(path).resolve()), sha256=file_sha256(Path(path)))
    return encoder, meta


def _state_keys(payload) -> list[str]:
    """The tensor keys of a checkpoint payload or of the first state dict nested in it (Lightning: state_dict)."""
    if not isinstance(payload, dict):
        return []
    keys = [str(k) for k, v in payload.items() if hasattr(v, "shape")]
    if keys:
        return keys
    for value in payload.values():
        if isinstance(value, dict):
            found = _state_keys(value)
            if found:
                return found
    return []


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients, for good: a frozen input is never trained."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def input_record(loaded: dict[str, tuple[nn.Module, dict]]) -> dict[str, dict]:
    """What run.json records of each encoder input, so a resume can refuse a changed one."""
    return {name: {"path": meta.get("run_dir"), "sha256": meta.get("sha256")} for name, (_, meta) in loaded.items()}


def check_same_inputs(saved: dict | None, now: dict[str, dict], run_file: Path) -> None:
    """On resume: the encoder inputs must be the ones the run started with (same weights)."""
    saved = saved or {}
    for name in sorted(set(saved) | set(now)):
        if (saved.get(name) or {}).get("sha256") != (now.get(name) or {}).get("sha256"):
            raise ValueError(f"method.{name}: the encoder differs from the one this run started with "
                             f"(recorded in {run_file}); resume with the same method.{name}")
