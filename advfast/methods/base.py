"""What every method is: a recipe of views, attack and loss. The engine owns the loop.

A method is an nn.Module holding every trainable piece (encoder, heads) and every piece the
engine must checkpoint (momentum encoders, queues as buffers). The engine calls, per iteration:

    loss, metrics = method.training_step(batch)   # under autocast; metrics stay on the device
    loss.backward(); optimizer.step()
    method.after_optimizer_step()                 # EMA of key encoders, etc.

and uses ``method.encoder`` with ``method.eval_branch`` for evaluation and export. Hooks beyond the
iteration (advfast.methods.hooks): ``on_epoch_start(epoch)`` before each epoch's batches are drawn (views
may change there through ``self.augment.set_views``), ``stages()`` for training after pre-training, and
``encoder_inputs`` for pre-trained encoders (a teacher) given as run directories.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from typing import Any, ClassVar

import torch
from torch import nn

from advfast import attacks
from advfast.config import TrainConfig, closest, coerce, field_names
from advfast.methods.hooks import EncoderInput, Stage
from advfast.methods.options import check_declared


class Method(nn.Module):
    name: ClassVar[str]
    variants: ClassVar[tuple[str, ...]] = ()
    default_variant: ClassVar[str | None] = None
    augment_preset: ClassVar[str] = "simclr"  # the data preset that produces this method's views
    attack_graphs: attacks.AttackGraphs | None = None  # set by the engine under cuda_graph_attack
    augment = None  # the run's advfast.data.Augment, set by the engine (for on_epoch_start's set_views)
    # options naming pre-trained encoders (a teacher): checked and loaded frozen by the engine
    encoder_inputs: ClassVar[tuple[EncoderInput, ...]] = ()

    # ---- per-method declarations, read outside methods/ (docs/adding_a_method.md, section 6) ---------------
    benchmarked: ClassVar[bool] = False  # in advfast-bench's method list (needs iteration_passes)
    in_digits_table: ClassVar[bool] = False  # a row of examples/digits_table.py
    # more rows of that table for the method with options set: row name -> advfast-train --set items
    digits_table_rows: ClassVar[dict[str, tuple[str, ...]]] = {}
    queue_options: ClassVar[tuple[str, ...]] = ()  # method.* queue lengths advfast-bench's CPU sizes shrink
    # tests/test_attack_graphs.py: setup name -> {"variant", "method_options", "attack", "views"} (all optional)
    attack_graph_setups: ClassVar[dict[str, dict]] = {}

    @dataclasses.dataclass
    class Options:  # method-specific knobs; subclasses replace this dataclass
        pass

    def __init__(self, cfg: TrainConfig, num_classes: int, mean, std):
        super().__init__()
        self.cfg = cfg
        self.variant = self.resolve_variant(cfg.variant)
        self.options = self.parse_options(cfg.method_options)
        check_declared(self.options)
        self.num_classes = num_classes
        self.eval_branch = "normal"

    # ---- presets -----------------------------------------------------------------------------
    @classmethod
    def preset(cls, dataset: str, variant: str | None = None) -> dict[str, Any]:
        """Overrides for TrainConfig reproducing the official code's defaults for ``dataset``
        (or a small, fast setting for the digits demo)."""
        return {}

    # option values that select another preset (preset_for), shown by --list: {"air": (True,)}
    preset_options: ClassVar[dict[str, tuple]] = {}

    @classmethod
    def preset_for(cls, dataset: str, variant: str | None, options: dict[str, Any]) -> dict[str, Any]:
        """The preset for ``dataset`` and ``variant`` given the method options the user set (raw values, as
        given: coerce before reading them). Override when an option selects other official settings (its
        own script's lr, epochs or schedule); declare those options in ``preset_options``. Default: the
        options do not matter."""
        return cls.preset(dataset, variant)

    @classmethod
    def augment_for(cls, variant: str | None, options: dict[str, Any] | None = None):
        """The data preset (or custom views) producing this method's views for ``variant``; the
        engine builds the augmentation from it. Override when the views depend on the variant or on
        ``options``: the raw ``method_options`` the run gives (None where they are not known, as in --list)."""
        return cls.augment_preset

    @classmethod
    def resolve_variant(cls, variant: str | None) -> str | None:
        if variant is None:
            return cls.default_variant
        if variant not in cls.variants:
            if not cls.variants:
                raise ValueError(f"method {cls.name!r} has no variants, got --variant {variant!r}")
            raise ValueError(f"unknown variant {variant!r} for method {cls.name!r}{closest(variant, cls.variants)}; "
                             f"choose from {', '.join(cls.variants)}")
        return variant

    @classmethod
    def parse_options(cls, given: dict[str, Any]):
        names = field_names(cls.Options)
        try:
            hints = typing.get_type_hints(cls.Options)
        except Exception:  # unresolvable annotations: take the values as given
            hints = {}
        values = {}
        for key, value in given.items():
            if key not in names:
                raise ValueError(f"unknown option method.{key} for {cls.name!r}{closest(key, names)}")
            values[key] = coerce(value, hints.get(key), f"method.{key}")
        return cls.Options(**values)

    @classmethod
    def iteration_passes(cls, attack_steps: int) -> float | None:
        """One training iteration of the default variant per image of the batch, in forward passes of the
        encoder: a forward is 1, a full backward 2, an attack's input-only backward 1 (advfast.bench.flops
        holds the counted FLOPs to it). None: no model written (the method is not benchmarked)."""
        return None

    @classmethod
    def prepare_bench_run(cls, cfg: TrainConfig, workdir) -> None:
        """Make ``cfg`` runnable on advfast-bench's synthetic images: files it must read (written under
        ``workdir``) and options pointing at them. Nothing by default."""

    @classmethod
    def check_options(cls, options, cfg: TrainConfig) -> None:
        """Every option within its declared limits (advfast.methods.options); config.validate calls this
        after its own checks. Override to add checks that need more (other options, files), calling super."""
        check_declared(options)

    # ---- the recipe ----------------------------------------------------------------------------
    def training_step(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def run_attack(self, site: str, make_loss, x_nat: torch.Tensor, context=()) -> torch.Tensor:
        """The configured attack (``cfg.attack``) maximising ``make_loss(*context)`` around ``x_nat``.

        ``site`` names the call site; ``context`` holds every per-batch tensor the loss reads besides its
        input (the other view, fixed features, targets), so that under ``cuda_graph_attack`` the captured
        graph reads them from static buffers refreshed on every call (see advfast.attacks.graphs). The
        model's mode and BN branch are the caller's business, as for any attack. The method's parameters
        do not require grad during the attack (input-only gradients, see attacks.input_only_gradients).
        """
        attack_fn = attacks.from_config(self.cfg.attack)
        if attack_fn is None:
            return x_nat
        with attacks.input_only_gradients(self):
            if self.attack_graphs is None:
                return attack_fn(make_loss(*context), x_nat)
            return self.attack_graphs.run(f"{self.name}.{site}", attack_fn, make_loss, x_nat, context)

    @contextlib.contextmanager
    def attack_mode(self, train: bool = False):
        """The method in eval mode (train mode with ``train=True``) inside the block, its previous mode
        restored after, also on an exception: the mode switch around an attack."""
        was_training = self.training
        self.train(train)
        try:
            yield
        finally:
            self.train(was_training)

    def after_optimizer_step(self) -> None:
        """Momentum encoders, queues and anything else updated after the weights change."""

    # ---- hooks beyond the iteration (advfast.methods.hooks) -----------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Called before pre-training epoch ``epoch`` (0-based) draws its batches, also for the epoch a
        resume lands in. Views may change here (``self.augment.set_views(...)``); anything it sets must be
        a function of ``epoch`` (a resume calls it again rather than restoring it)."""

    def main_stage(self, export: bool = False) -> Stage:
        """Pre-training as a stage: ``cfg.epochs`` of ``training_step`` with ``cfg.optim``."""
        # looked up at each call (not bound now): the method's own step and hooks, as they are then
        return Stage("pretrain", self.cfg.epochs, None, on_epoch_start=lambda epoch: self.on_epoch_start(epoch),
                     after_optimizer_step=lambda: self.after_optimizer_step(), export=export)

    def stages(self) -> list[Stage]:
        """The training stages in order, pre-training first. Override to add stages after it, e.g.
        ``[self.main_stage(export=True), Stage("finetune", ...)]``."""
        return [self.main_stage()]

    def set_encoder_input(self, option: str, encoder: nn.Module, meta: dict) -> None:
        """Receives each ``encoder_inputs`` encoder, frozen, on the run's device, before any stage starts.
        Kept in ``self.inputs`` (not a submodule: not in the checkpoints, the optimiser or DDP)."""
        if "inputs" not in self.__dict__:
            self.__dict__["inputs"] = {}
        self.__dict__["inputs"][option] = encoder

    def coreset_objective(self):
        """What ``coreset=rcs`` selects with (advfast.methods.coreset_rcs.CoresetObjective: the backbone and
        projection head, their clean and adversarial BN branches, the NT-Xent temperature, the selection
        pool), or None when this configuration has none (the run is then refused with one line). Methods
        that do not override it refuse ``coreset=rcs`` at config validation."""
        return None

    def compile_targets(self) -> tuple[nn.Module, ...]:
        """The encoders ``compile=true`` compiles (in place): those the training step runs. Default: the
        exported ``encoder``; override when the step runs others (DynACL: the trained encoder and its EMA copy)."""
        return (self.encoder,)

    def trainable_parameters(self):
        """Parameters the optimiser updates (momentum encoders excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def encoder(self) -> nn.Module:
        raise NotImplementedError
