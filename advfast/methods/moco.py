"""MoCo v1 and v2 (He et al. 2020; Chen et al. 2020), the plain momentum-contrast baseline.

Recipe (facebookresearch/moco, main_moco.py + moco/builder.py):
    q = normalize(head_q(encoder_q(x_q)))                       query view, gets the gradient
    k = normalize(head_k(encoder_k(x_k)))  (no grad)            key view, momentum encoder
    loss = InfoNCE(q, positive k, negatives = queue) / T        ops.info_nce, mean over the batch
    after the optimiser step: enqueue k, then theta_k <- m theta_k + (1 - m) theta_q

v1: linear head, T 0.07; v2: 2-layer MLP head, T 0.2, blur augmentation, cosine schedule.

Order of the queue update: the official code enqueues right after computing the logits, on a
cloned queue. Here the keys are held until ``after_optimizer_step`` (once backward has run), which
is the same sequence of queue states without the clone of a 65536 x 128 queue every step. The
official EMA runs at the start of the next forward; running it after the optimiser step is the
same order of events.

Under torchrun (DDP) the keys of every rank are gathered into the queue, so the queues of all ranks
stay identical and hold the global batch's keys; the loss is each rank's own queries against their
keys and that queue, as in the official code. The key encoder uses shuffle-BN (the official
multi-GPU key-BN trick: advfast.methods.momentum, docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from advfast.dist import all_gather
from advfast.ops.contrastive import info_nce
from advfast.data.presets import Flip, Grayscale, Jitter, ResizedCrop
from advfast.losses import MemoryBank
from advfast.methods import register
from advfast.methods.base import Method
from advfast.methods.momentum import MomentumEncoder
from advfast.models import build_encoder, build_head

# Official cifar10-scale defaults per variant (MoCo's ImageNet recipe: it has no CIFAR recipe).
_TEMPERATURE = {"v1": 0.07, "v2": 0.2}
_HEAD = {"v1": "moco_v1", "v2": "moco_v2"}

# MoCo v1's augmentation (main_moco.py without --aug-plus): crop (scale 0.2-1), grayscale p=0.2,
# ColorJitter(0.4, 0.4, 0.4, 0.4) always, flip. v2 uses the data preset "mocov2".
_MOCOV1_VIEW = (ResizedCrop((0.2, 1.0)), Grayscale(0.2), Jitter(0.4, 0.4, 0.4, 0.4, p=1.0), Flip())
MOCOV1_VIEWS = (_MOCOV1_VIEW, _MOCOV1_VIEW)


@register
class MoCo(Method):
    name = "moco"
    variants = ("v1", "v2")
    default_variant = "v2"
    augment_preset = "mocov2"
    benchmarked = in_digits_table = True
    queue_options = ("queue_size",)

    @classmethod
    def iteration_passes(cls, attack_steps):
        return 4  # query 3 + momentum key forward 1

    @dataclasses.dataclass
    class Options:
        queue_size: int = 65536  # K, keys in the queue
        momentum: float = 0.999  # m of the key encoder's EMA
        ema_backend: str = "auto"  # backend of ops.ema_update_
        loss_backend: str = "auto"  # backend of ops.info_nce

    def __init__(self, cfg, num_classes: int, mean, std):
        super().__init__(cfg, num_classes, mean, std)
        self.augment_preset = self.augment_for(self.variant)
        self.temperature = float(cfg.temperature)
        self.encoder_q = build_encoder(cfg.arch, ("normal",), mean, std)
        self.head_q = build_head(_HEAD[self.variant], self.encoder_q.feat_dim, ("normal",))
        self.key = MomentumEncoder(self.encoder_q, self.head_q, self.options.momentum,
                                   backend=self.options.ema_backend)
        self.queue = MemoryBank(self.options.queue_size, self.head_q.out_dim)
        self._pending_keys: list[torch.Tensor] = []

    @classmethod
    def augment_for(cls, variant: str | None, options: dict[str, Any] | None = None):
        """The views of ``variant``: a data preset name, or a custom tuple of views (v1)."""
        return MOCOV1_VIEWS if cls.resolve_variant(variant) == "v1" else "mocov2"

    @classmethod
    def preset(cls, dataset: str, variant: str | None = None) -> dict[str, Any]:
        variant = cls.resolve_variant(variant)
        if dataset == "digits":  # a couple of CPU minutes
            return dict(arch="convnet", image_size=16, epochs=30, batch_size=128, temperature=_TEMPERATURE[variant],
                        attack=dict(kind="none"),
                        optim=dict(name="sgd", lr=0.06, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                                   warmup_epochs=0.0),
                        method_options=dict(queue_size=1024, momentum=0.99))
        # facebookresearch/moco main_moco.py defaults (v2 adds --mlp --aug-plus --cos, T 0.2);
        # v1's step schedule (x0.1 at epochs 120, 160) is not an engine schedule: cosine for both
        return dict(arch="resnet18", epochs=200, batch_size=256, temperature=_TEMPERATURE[variant],
                    attack=dict(kind="none"),
                    optim=dict(name="sgd", lr=0.03, momentum=0.9, weight_decay=1e-4, schedule="cosine",
                               warmup_epochs=0.0),
                    method_options=dict(queue_size=65536, momentum=0.999))

    @property
    def encoder(self):
        return self.encoder_q

    # ---- pieces shared with moco-adv -------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Query projection of images ``x`` (normalised): the query encoder and its head."""
        return F.normalize(self.head_q(self.encoder_q(x)), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key(x), dim=1)

    def contrast(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Mean InfoNCE of queries ``q`` against their keys ``k`` and the queue (all normalised)."""
        return info_nce(q, k, queue=self.queue.keys(), temperature=self.temperature, normalize=False,
                            backend=self.options.loss_backend)

    # ---- the recipe ------------------------------------------------------------------------------
    def training_step(self, batch):
        x_q, x_k = batch.views[0], batch.views[1]
        q = self.embed(x_q)
        k = self.keys(x_k)
        loss = self.contrast(q, k)
        self._pending_keys.append(k)
        return loss, {"loss_moco": loss.detach(), "pos_cos": (q.detach() * k).sum(1).mean()}

    def after_optimizer_step(self) -> None:
        for k in self._pending_keys:
            self.queue.enqueue(all_gather(k))  # every rank's keys (identity in one process)
        self._pending_keys.clear()
        self.key.update_(self.encoder_q, self.head_q)
