"""What every method is: a recipe of views, attack and loss. The engine owns the loop.

A method is an nn.Module holding every trainable piece (encoder, heads) and every piece the
engine must checkpoint (momentum encoders, queues as buffers). The engine calls, per iteration:

    loss, metrics = method.training_step(batch)   # under autocast; metrics stay on the device
    loss.backward(); optimizer.step()
    method.after_optimizer_step()                 # EMA of key encoders, etc.

and uses ``method.encoder`` with ``method.eval_branch`` for evaluation and export.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

import torch
from torch import nn

from advfast import attacks
from advfast.config import TrainConfig, closest, coerce, field_names


class Method(nn.Module):
    name: ClassVar[str]
    variants: ClassVar[tuple[str, ...]] = ()
    default_variant: ClassVar[str | None] = None
    augment_preset: ClassVar[str] = "simclr"  # the data preset that produces this method's views
    attack_graphs: attacks.AttackGraphs | None = None  # set by the engine under cuda_graph_attack

    @dataclasses.dataclass
    class Options:  # method-specific knobs; subclasses replace this dataclass
        pass

    def __init__(self, cfg: TrainConfig, num_classes: int, mean, std):
        super().__init__()
        self.cfg = cfg
        self.variant = self.resolve_variant(cfg.variant)
        self.options = self.parse_options(cfg.method_options)
        self.num_classes = num_classes
        self.eval_branch = "normal"

    # ---- presets -----------------------------------------------------------------------------
    @classmethod
    def preset(cls, dataset: str, variant: str | None = None) -> dict[str, Any]:
        """Overrides for TrainConfig reproducing the official code's defaults for ``dataset``
        (or a small, fast setting for the digits demo)."""
        return {}

    @classmethod
    def augment_for(cls, variant: str | None):
        """The data preset (or custom views) producing this method's views for ``variant``; the
        engine builds the augmentation from it. Override when the views depend on the variant."""
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

    def after_optimizer_step(self) -> None:
        """Momentum encoders, queues and anything else updated after the weights change."""

    def trainable_parameters(self):
        """Parameters the optimiser updates (momentum encoders excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def encoder(self) -> nn.Module:
        raise NotImplementedError
