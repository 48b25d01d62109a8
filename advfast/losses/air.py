"""SIR and AIR, the invariance regularisers of AIR (Xu et al., NeurIPS 2023), as the official code
computes them (GodXuxilie/Enhancing_ACL_via_AIR, ``AIR.py: AIR_Loss``, after NightShade99's
Self-Supervised-Vision).

Inputs are projector outputs of one batch of B images: the two clean views z1, z2 ("normal" BN),
the un-augmented image z_orig ("normal" BN, train mode) and the two adversarial views a1, a2 ("pgd"
BN), each (B, D). All are L2-normalised; with T = 0.5 and d(u, v)_k = <u_k, v_k> / T, the per-sample
similarity of row k (a (B,) vector),

    p = softmax_k d(z1, z_orig)             q = softmax_k d(z2, z_orig)       softmax ACROSS THE BATCH
    P = softmax_k d(a1, z_orig) * softmax_k d(a1, z1)
    Q = softmax_k d(a2, z_orig) * softmax_k d(a2, z2)                         products, not renormalised
    SIR = sum_k q_k (log q_k - p_k)         AIR = sum_k Q_k (log Q_k - P_k)    kl="code" (the default)

The official code passes probabilities where ``F.kl_div`` expects log-probabilities, so it computes
sum q (log q - p), not KL(q || p) (the values can be negative). ``kl="paper"`` gives the intended
KL(q || p) = sum q (log q - log p) and KL(Q || P). Nothing is detached (every input gets gradients),
as in the code. The full objective (``air_objective``) is

    (1 - w) * L_nat + (1 + w) * L_adv + lambda1 * SIR + lambda2 * AIR,   lambda1 = lambda2 = 0.5,

with L_nat, L_adv the NT-Xent of the clean and adversarial pairs (the code's 2B-anchor cross-entropy
form equals advfast.ops.nt_xent with 2 views) and w from advfast.data.strength_schedule.air_adv_weight
(0 for ACL-AIR). Under DDP the batch softmax must see the global batch (gather the five blocks first):
the official code runs on one GPU with B = 512.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advfast.ops.dtypes import HALF, upcast

LAMBDA_SIR = 0.5  # --lambda1
LAMBDA_AIR = 0.5  # --lambda2
TEMPERATURE = 0.5
KL_MODES = ("code", "paper")


def _check(blocks: dict[str, torch.Tensor], kl: str, temperature: float) -> None:
    if kl not in KL_MODES:
        raise ValueError(f"kl must be one of {', '.join(KL_MODES)}, got {kl!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = None
    for name, z in blocks.items():
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point():
            raise ValueError(f"{name} must be a floating 2-D tensor (B, D), got {getattr(z, 'shape', type(z))}")
        if shape is None:
            shape = z.shape
        elif z.shape != shape:
            raise ValueError(f"{name} has shape {tuple(z.shape)}, expected {tuple(shape)} like the other blocks")


def _row_logits(u: torch.Tensor, v: torch.Tensor, temperature: float) -> torch.Tensor:
    """d(u, v)_k = <u_k, v_k> / T for normalised rows: the diagonal of u v^T / T."""
    return (u * v).sum(1) / temperature


def _divergence(target_log: torch.Tensor, input_prob: torch.Tensor, input_log: torch.Tensor, kl: str) -> torch.Tensor:
    """sum exp(t) (t - input): input = the probabilities (code) or their log (paper)."""
    inp = input_prob if kl == "code" else input_log
    return (target_log.exp() * (target_log - inp)).sum()


def air_regularizers(z1: torch.Tensor, z2: torch.Tensor, z_orig: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor,
                     temperature: float = TEMPERATURE, kl: str = "code") -> tuple[torch.Tensor, torch.Tensor]:
    """(SIR, AIR) of one batch; see the module docstring. Computed in float32 at least."""
    _check({"z1": z1, "z2": z2, "z_orig": z_orig, "a1": a1, "a2": a2}, kl, temperature)
    up = upcast if z1.dtype in HALF else (lambda z: z)  # z1's dtype decides for all five, as before
    z1, z2, zo, a1, a2 = (F.normalize(up(z), p=2, dim=-1) for z in (z1, z2, z_orig, a1, a2))

    log_p = F.log_softmax(_row_logits(z1, zo, temperature), 0)
    log_q = F.log_softmax(_row_logits(z2, zo, temperature), 0)
    sir = _divergence(log_q, log_p.exp(), log_p, kl)

    log_pa = F.log_softmax(_row_logits(a1, zo, temperature), 0) + F.log_softmax(_row_logits(a1, z1, temperature), 0)
    log_qa = F.log_softmax(_row_logits(a2, zo, temperature), 0) + F.log_softmax(_row_logits(a2, z2, temperature), 0)
    air = _divergence(log_qa, log_pa.exp(), log_pa, kl)
    return sir, air


def air_objective(loss_nat: torch.Tensor, loss_adv: torch.Tensor, sir: torch.Tensor, air: torch.Tensor,
                  weight: float = 0.0, lambda_sir: float = LAMBDA_SIR, lambda_air: float = LAMBDA_AIR) -> torch.Tensor:
    """(1 - w) L_nat + (1 + w) L_adv + lambda1 SIR + lambda2 AIR (no 1/2 on the contrastive terms)."""
    return loss_nat * (1 - weight) + loss_adv * (1 + weight) + lambda_sir * sir + lambda_air * air
