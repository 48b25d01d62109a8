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

Temperatures: the official attack and regulariser call pairwise_similarity with a literal 0.5
(src/attack_lib.py); only the 'Rep' loss reads --temperature. advfast does the same (identical at the
default 0.5); ``method.uniform_temperature=true`` uses cfg.temperature in all three.

A-InfoNCE (Yu et al., ECCV 2022; yqy2001/A-InfoNCE, Asym-RoCL): ``method.asymmetric=ip|hn|iphn`` makes
the 'Rep' loss advfast.losses.asymmetric_infonce.asymmetric_rocl_nt_xent (IP: the clean anchors'
adversarial positives weigh w*sd, the adversarial anchor's clean ones w*(1-sd); HN: HCL's reweighting),
and selects the official shells' lr (0.1 / 0.2 / 0.3, x15 at the warm-up's end as RoCL). The attack and
the regulariser stay the plain NT-Xent at 0.5, as coded. No adaptive degree (Asym-RoCL has none).

Deviations: LARS comes from advfast.optim (official: torchlars), and the warmup/cosine schedule is
per iteration (official: per epoch). See docs/methods.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from advfast.losses.asymmetric_infonce import VARIANTS, asymmetric_rocl_nt_xent, given_variant
from advfast.losses.rocl import rocl_nt_xent
from advfast.methods import register
from advfast.methods.base import Method
from advfast.methods.options import option
from advfast.models import build_encoder, build_head
from advfast.ops.contrastive import nt_xent
from advfast.ops.dtypes import upcast

# the temperature Kim-Minseon/RoCL's attack and regulariser hard-code (src/attack_lib.py)
CODED_PAIR_TEMPERATURE = 0.5
# Asym-RoCL/shell/rocl-{IP,HN,IPHN}.sh: --lr (RoCL's 0.1 for IP), --tau 0.12 with --HN
ASYM_ROCL_LR = {"ip": 0.1, "hn": 0.2, "iphn": 0.3}
ASYM_ROCL_TAU = 0.12


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


def asym_rocl_preset(dataset: str, variant: str) -> dict[str, Any]:
    """RoCL's preset with the Asym-RoCL shell's lr: LARS lr x 15 at the warm-up's end from lr, as RoCL's
    GradualWarmup (digits: scaled to the batch as RoCL's, x 128/512)."""
    preset = rocl_preset(dataset)
    lr = ASYM_ROCL_LR[variant] * (128 / 512 if dataset == "digits" else 1.0)
    preset["optim"] = dict(preset["optim"], lr=15 * lr, warmup_start_lr=lr)
    preset["method_options"] = dict(preset.get("method_options", {}), asymmetric=variant)
    return preset


@register
class RoCL(Method):
    name = "rocl"
    variants = ()
    default_variant = None
    augment_preset = "rocl"
    benchmarked = in_digits_table = True
    attack_graph_setups = {"rocl": {}, "rocl-asym-iphn": {"method_options": {"asymmetric": "iphn"}}}

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
        # the configured temperature also in the attack and the regulariser (official: a literal 0.5 there)
        uniform_temperature: bool = False
        # ---- A-InfoNCE (Asym-RoCL) on the 'Rep' loss ----
        asymmetric: str | None = option(None, choices=VARIANTS, rule="ip, hn or iphn (None: RoCL's NT-Xent)")
        adv_weight: float = option(1.0, low=0, rule=">= 0 (w; the shells keep 1)")
        stop_grad_degree: float = option(0.2, low=0, high=1, rule="in [0, 1] (the shells' --stpg_degree 0.2)")
        tau_plus: float = option(ASYM_ROCL_TAU, low=0, high=0.999, rule="in [0, 1) (the shells' --tau 0.12)")
        beta: float = option(1.0, above=0, rule="> 0 (--beta 1.0)")
        hn_clamp_temperature: float = option(0.5, above=0, rule="> 0 (the code's hard-coded 0.5)")
        hn_rowwise: bool = False  # HCL's row-wise imp.mean (the code divides column j by row j's mean)

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

    preset_options = {"asymmetric": VARIANTS}

    @classmethod
    def preset_for(cls, dataset: str, variant: str | None, options: dict[str, Any]) -> dict[str, Any]:
        """``method.asymmetric=ip|hn|iphn`` selects the Asym-RoCL shell's lr (asym_rocl_preset)."""
        cls.resolve_variant(variant)
        asym = given_variant(options)
        return rocl_preset(dataset) if asym is None else asym_rocl_preset(dataset, asym)

    @classmethod
    def check_options(cls, o, cfg) -> None:
        super().check_options(o, cfg)
        if o.asymmetric is not None and o.loss_form != "official":
            raise ValueError("method.asymmetric builds on RoCL's official loss: it cannot be combined with "
                             "method.loss_form=paper")

    @property
    def encoder(self):
        return self.backbone

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Projector output (not normalised; the loss normalises); half precision up to fp32 for the loss,
        a float64 model stays float64."""
        return upcast(self.head(self.backbone(x)))

    def contrastive_loss(self, z: torch.Tensor, num_views: int, temperature: float | None = None) -> torch.Tensor:
        """The NT-Xent of ``num_views`` stacked blocks at ``temperature`` (None: cfg.temperature)."""
        t = self.temperature if temperature is None else temperature
        if self.options.loss_form == "official":
            return rocl_nt_xent(z, num_views, t)
        return nt_xent(z, num_views, temperature=t, positives="sum_in_numerator",
                       normalize=True, backend=self.options.loss_backend)

    def rep_loss(self, z: torch.Tensor) -> torch.Tensor:
        """The 'Rep' loss over [t1, t2, x_adv] at cfg.temperature (A-InfoNCE's with ``asymmetric``)."""
        o = self.options
        if o.asymmetric is None:
            return self.contrastive_loss(z, 3)
        return asymmetric_rocl_nt_xent(
            z, 3, self.temperature, hard_negatives="hn" in o.asymmetric, stop_grad=o.asymmetric.startswith("ip"),
            stop_grad_degree=o.stop_grad_degree, adv_weight=o.adv_weight, tau=o.tau_plus, beta=o.beta,
            hn_clamp_temperature=o.hn_clamp_temperature, hn_rowwise=o.hn_rowwise)

    @property
    def pair_temperature(self) -> float:
        """The attack's and the regulariser's temperature: the code's literal 0.5 unless uniform_temperature."""
        return self.temperature if self.options.uniform_temperature else CODED_PAIR_TEMPERATURE

    def pair_loss(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """NT-Xent 'None' of cat(z_a, z_b) within each group of ``local_batch`` images (one GPU's
        share in the official run), averaged over the groups as DDP averages their gradients."""
        g = self.options.local_batch or z_a.shape[0]
        t = self.pair_temperature
        losses = [self.contrastive_loss(torch.cat([z_a[s:s + g], z_b[s:s + g]]), 2, t)
                  for s in range(0, z_a.shape[0], g)]
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
        loss_rep = self.rep_loss(self.embed(torch.cat([x1, x2, x_adv])))
        loss = loss_rep + loss_reg / self.options.lamda
        return loss, {"loss_rep": loss_rep.detach(), "loss_adv_reg": loss_reg.detach()}
