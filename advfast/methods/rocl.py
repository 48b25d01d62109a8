"""RoCL: Robust Contrastive Learning (Kim, Tack, Hwang, NeurIPS 2020) as Kim-Minseon/RoCL runs it
(src/rocl_train.py --advtrain_type Rep --attack_to other --regularize_to other --loss_type sim).

Views (data preset "rocl"): t1, t2 (jitter, grayscale, flip, RandomResizedCrop 0.08-1); the third,
un-augmented view is not used in pre-training (as official).

Model: backbone with one BN, no input normalisation; projector Linear(512,2048)-ReLU-Linear(2048,128).

Instance-wise attack (model and projector in eval mode): start clamp(t1 + U(-eps, eps), 0, 1),
7 signed steps of 0.007 within 0.0314 of t1 on the NT-Xent 'None' loss of cat(x, t2) (positive: the
other view t2; negatives: the other images of the batch). Gradients w.r.t. the input only.

Training (train mode): loss = NT-Xent 'Rep' over [t1, t2, x_adv] (one forward of 3B: one BN batch)
+ (1/256) * NT-Xent 'None' over cat(x_adv, t2) (its own forward of 2B, done first, as official).

The NT-Xent is the official one (advfast.losses.rocl.rocl_nt_xent): the right-hand factor of the
similarity matrix is detached, and each anchor's positives are separate -log terms, summed, with a
denominator over all other rows; the total is divided by the number of anchors. This is not a
feature of the fused ops.nt_xent, and the matrix is only 3B x 3B. ``method.loss_form=paper`` uses
the paper's eq. 3 instead: ops.nt_xent(positives="sum_in_numerator"), symmetric gradients.

Two GPUs of 256 (official): the 'Rep' loss all_gathers the three views of the whole batch of 512,
but the attack and the regulariser see only their GPU's 256 images; ``method.local_batch=256`` (the
preset) reproduces that grouping, and BN runs over the whole batch (SyncBN in the official run).

Deviations: LARS comes from advfast.optim (official: torchlars), and the warmup/cosine schedule is
per iteration (official: per epoch). See docs/methods.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from advfast.losses.rocl import rocl_nt_xent
from advfast.methods import register
from advfast.methods.base import Method
from advfast.methods.options import option
from advfast.models import build_encoder, build_head
from advfast.ops.contrastive import nt_xent


def rocl_preset(dataset: str) -> dict[str, Any]:
    if dataset == "digits":
        # 16x16 digits, small convnet, batch 128: LARS with the official peak lr (0.1 x 15) scaled to
        # the batch (1.5 * 128/512), warmup over 2 of 15 epochs; attack as official but 3 steps.
        return dict(arch="convnet", image_size=16, epochs=15, batch_size=128, temperature=0.5,
                    optim=dict(name="lars", lr=0.375, momentum=0.9, weight_decay=1e-6, lars_eta=1e-3,
                               lars_exclude_bn_bias=False, schedule="cosine", warmup_epochs=2.0,
                               warmup_start_lr=0.025, min_lr=0.0),
                    attack=dict(kind="pgd", norm="linf", eps=0.0314, alpha=0.007, steps=3, random_start=True),
                    method_options=dict(head_hidden=256), log_every=10, ckpt_every=100)
    # official: LARS(SGD lr 0.1), GradualWarmup x15 over 10 epochs (0.1 -> 1.5), then cosine from 1.5
    return dict(arch="resnet18", epochs=1000, batch_size=512, temperature=0.5,
                optim=dict(name="lars", lr=1.5, momentum=0.9, weight_decay=1e-6, lars_eta=1e-3,
                           lars_exclude_bn_bias=False, schedule="cosine", warmup_epochs=10.0,
                           warmup_start_lr=0.1, min_lr=0.0),
                attack=dict(kind="pgd", norm="linf", eps=0.0314, alpha=0.007, steps=7, random_start=True),
                method_options=dict(local_batch=256))


@register
class RoCL(Method):
    name = "rocl"
    variants = ()
    default_variant = None
    augment_preset = "rocl"
    benchmarked = in_digits_table = True
    attack_graph_setups = {"rocl": {}}

    @classmethod
    def iteration_passes(cls, attack_steps):
        return 4 * attack_steps + 15  # attack on cat(x, x2): 2 + 2 per step; train 2 + 3 images x 3

    @dataclasses.dataclass
    class Options:
        # the regulariser's weight is 1/lamda (official --lamda 256)
        lamda: float = option(256.0, above=0, rule="> 0 (the regulariser weight is 1/lamda)")
        # "official" (detached right factor, separate positives) | "paper" (eq. 3)
        loss_form: str = option("official", choices=("official", "paper"))
        head_hidden: int | None = None  # projector width (None: 2048)
        normalize_input: bool = False  # the official model does not normalise its input
        loss_backend: str = "auto"  # backend of ops.nt_xent (loss_form=paper)
        # images per GPU of the official run: its attack and 1/lamda regulariser see only their GPU's
        # images as negatives (no all_gather), while the 'Rep' loss gathers the whole batch. None: one group.
        local_batch: int | None = option(None, low=1, rule="a positive int or None")

    def __init__(self, cfg, num_classes: int, mean, std):
        super().__init__(cfg, num_classes, mean, std)
        o = self.options
        self.temperature = float(cfg.temperature)
        norm = (mean, std) if o.normalize_input else (None, None)
        self.backbone = build_encoder(cfg.arch, ("normal",), *norm)
        self.head = build_head("rocl", self.backbone.feat_dim, ("normal",), hidden=o.head_hidden)

    @classmethod
    def preset(cls, dataset: str, variant: str | None = None) -> dict[str, Any]:
        cls.resolve_variant(variant)
        return rocl_preset(dataset)

    @property
    def encoder(self):
        return self.backbone

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Projector output (not normalised; the loss normalises), fp32 for the loss."""
        return self.head(self.backbone(x)).float()

    def contrastive_loss(self, z: torch.Tensor, num_views: int) -> torch.Tensor:
        if self.options.loss_form == "official":
            return rocl_nt_xent(z, num_views, self.temperature)
        return nt_xent(z, num_views, temperature=self.temperature, positives="sum_in_numerator",
                       normalize=True, backend=self.options.loss_backend)

    def pair_loss(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """NT-Xent 'None' of cat(z_a, z_b) within each group of ``local_batch`` images (one GPU's
        share in the official run), averaged over the groups as DDP averages their gradients."""
        g = self.options.local_batch or z_a.shape[0]
        losses = [self.contrastive_loss(torch.cat([z_a[s:s + g], z_b[s:s + g]]), 2) for s in range(0, z_a.shape[0], g)]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def attack(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Instance-wise attack on t1 with t2 as the positive, model and projector in eval mode."""
        with self.attack_mode():
            def make_loss(x2):
                def loss_fn(x):  # eval mode: one forward, then the groups (features do not depend on the batch)
                    z = self.embed(torch.cat([x, x2]))
                    return self.pair_loss(z[:x.shape[0]], z[x.shape[0]:])
                return loss_fn

            x_adv = self.run_attack("attack", make_loss, x1, (x2,))
        return x_adv.detach()

    def training_step(self, batch):
        x1, x2 = batch.views[0], batch.views[1]
        x_adv = self.attack(x1, x2)
        z_reg = self.embed(torch.cat([x_adv, x2]))  # one BN batch, as SyncBN over the GPUs
        loss_reg = self.pair_loss(z_reg[:x1.shape[0]], z_reg[x1.shape[0]:])
        loss_rep = self.contrastive_loss(self.embed(torch.cat([x1, x2, x_adv])), 3)
        loss = loss_rep + loss_reg / self.options.lamda
        return loss, {"loss_rep": loss_rep.detach(), "loss_adv_reg": loss_reg.detach()}
