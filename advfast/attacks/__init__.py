"""Adversarial attacks driven by loss closures (input-only gradients, fused projected steps)."""

from advfast.attacks.losses import ce_loss, trades_kl_loss
from advfast.attacks.graphs import AttackGraphs
from advfast.attacks.pgd import (GRADIENT_MODES, attack_gradients, fgsm, from_config, gradient_mode,
                                 input_only_gradients, pgd)
from advfast.attacks.trades import trades_examples

__all__ = ["pgd", "fgsm", "from_config", "attack_gradients", "gradient_mode", "input_only_gradients",
           "GRADIENT_MODES", "AttackGraphs", "ce_loss", "trades_kl_loss", "trades_examples"]
