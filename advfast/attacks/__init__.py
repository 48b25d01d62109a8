"""Adversarial attacks driven by loss closures (input-only gradients, fused projected steps)."""

from advfast.attacks.losses import ce_loss, trades_kl_loss
from advfast.attacks.pgd import GRADIENT_MODES, attack_gradients, fgsm, pgd

__all__ = ["pgd", "fgsm", "attack_gradients", "GRADIENT_MODES", "ce_loss", "trades_kl_loss"]
