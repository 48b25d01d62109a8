"""Pieces shared by the momentum-queue methods (moco, moco-adv, amoc).

``MomentumEncoder``, the key side: a slow copy of the query encoder and head.

At construction the key modules are deep copies of the query modules (parameters *and* buffers,
so the key BN starts from the query's running statistics, as the official codes' initial copy
does). After each optimiser step only the parameters follow the query side,

    theta_k <- m * theta_k + (1 - m) * theta_q,

through ``advfast.ops.ema_update_`` (one fused launch for every tensor). The key BN running
statistics are *not* averaged: the key encoder accumulates its own from the batches it encodes in
train mode, exactly as MoCo (facebookresearch/moco ``_momentum_update_key_encoder``) and AMOC
(``momentum_update_key_encoder``) do.

Under torchrun the key forward in train mode uses shuffle-BN (``advfast.dist.shuffled_forward``,
as the official MoCo's ``_batch_shuffle_ddp``): each rank encodes a random slice of the global key
batch. In one process (or in eval mode, e.g. inside an attack) it is the plain forward.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from advfast.dist import shuffled_forward
from advfast.ops.ema_update import ema_update_


class MomentumEncoder(nn.Module):
    """``encoder`` and ``head`` as EMA copies of the query modules given at construction.

    ``forward(x, branch)`` = ``head(encoder(x, branch), branch)``, the raw (unnormalised) key.
    The copies take no gradient and are excluded from ``Method.trainable_parameters``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, momentum: float, backend: str = "auto"):
        super().__init__()
        if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be a float in [0, 1] (MoCo uses 0.999), got {momentum!r}")
        self.momentum = float(momentum)
        self.backend = backend
        self.encoder = copy.deepcopy(encoder)
        self.head = copy.deepcopy(head)
        for p in self.parameters():
            p.requires_grad_(False)
        self._names = [name for name, _ in self._pairs_named(encoder, head)]

    @staticmethod
    def _pairs_named(encoder: nn.Module, head: nn.Module):
        yield from (("encoder." + n, p) for n, p in encoder.named_parameters())
        yield from (("head." + n, p) for n, p in head.named_parameters())

    def forward(self, x: torch.Tensor, branch: str = "normal") -> torch.Tensor:
        if self.training:  # BN uses batch statistics: shuffle-BN across ranks (identity in one process)
            return shuffled_forward(lambda xs: self.head(self.encoder(xs, branch), branch), x)
        return self.head(self.encoder(x, branch), branch)

    @torch.no_grad()
    def update_(self, encoder: nn.Module, head: nn.Module) -> None:
        """One EMA step of the key parameters towards the query ``encoder`` and ``head``."""
        src_named = list(self._pairs_named(encoder, head))
        if [n for n, _ in src_named] != self._names:
            raise ValueError("update_ needs the same query encoder and head the MomentumEncoder was built from "
                             "(their parameter names differ)")
        ema = list(self.encoder.parameters()) + list(self.head.parameters())
        src = [p.detach() for _, p in src_named]
        ema_update_(ema, src, self.momentum, backend=self.backend)

