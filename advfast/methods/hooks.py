"""What a method can declare to the engine beyond its per-iteration recipe.

``Stage``: one training stage. Pre-training is stage 0 (``Method.main_stage()``); a method that trains on
after it (a pseudo-label fine-tuning, a student distilled from a teacher) returns more stages from
``Method.stages()``. The engine runs them in order with the same loop, checkpoints, resume, logging and DDP.

``EncoderInput``: a method option naming the run directory of a pre-trained advfast encoder (a teacher),
validated before the run directory is touched and handed to the method frozen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from advfast.config import OptimConfig

StepFn = Callable[[Any], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclasses.dataclass
class Stage:
    """One training stage.

    name: shown in the logs (metrics rows carry it) and checkpoints; unique within a method.
    epochs: passes over the run's loader (the same dataset and batch size as pre-training).
    training_step: ``batch -> (loss, metrics)``, run under autocast and DDP as the main step, with the
        method in train mode (a step that needs parts in eval mode sets them itself). None: the method's
        own ``training_step`` (pre-training).
    optim: the stage's optimiser and schedule (None: the run's ``cfg.optim``); a fresh optimiser is built
        when the stage starts.
    parameters: the parameters the stage trains (None: ``method.trainable_parameters()``). Under DDP every
        parameter that requires grad must take part in the loss: freeze the others in ``on_start``.
    on_start / on_end: run when the stage starts (also when a resume lands inside it, before the
        checkpoint is loaded: build state there, deterministically; the checkpoint then overwrites
        weights and RNG) and when it has trained its last step.
    on_epoch_start: ``epoch -> None`` with the stage's own 0-based epoch, before that epoch's batches are
        drawn (also for the epoch a resume lands in); e.g. new views through ``method.augment.set_views``.
    after_optimizer_step: after each optimiser step (momentum encoders, queues); None: nothing.
    export: write ``method.encoder`` (its ``eval_branch``) to ``<run>/stages/<name>/`` when the stage ends.
        The run's own ``encoder.safetensors`` is always ``method.encoder`` after the last stage.

    Modules a stage trains are created in the method's ``__init__`` (every checkpoint then has the same keys);
    ``on_start`` fills them.
    """

    name: str
    epochs: int
    training_step: StepFn | None = None
    optim: OptimConfig | None = None
    parameters: Callable[[], list] | None = None
    on_start: Callable[[], None] | None = None
    on_end: Callable[[], None] | None = None
    on_epoch_start: Callable[[int], None] | None = None
    after_optimizer_step: Callable[[], None] | None = None
    export: bool = False


@dataclasses.dataclass(frozen=True)
class EncoderInput:
    """A method option (``method.<option>=RUN_DIR``) naming a pre-trained advfast encoder.

    required: the run refuses to start without it. same_arch: the encoder's arch must be the run's
    (``cfg.arch``). The engine checks the directory (an advfast run with an exported encoder, SHA-256,
    build arguments), the image size and channels, loads it frozen (eval mode, no gradients) on the
    run's device and calls ``method.set_encoder_input(option, encoder, meta)``."""

    option: str
    required: bool = True
    same_arch: bool = True
