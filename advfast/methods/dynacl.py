"""DynACL: Dynamic Adversarial Contrastive Learning (Luo, Wang, Wang, ICLR 2023), variants dynacl and
dynacl++ (= ``method.post_process=lp-aft``).

Follows PKU-ML/DYNACL @7d143db, ``train_DynACL.py`` (``train``, ``PGD_contrastive``, ``reload``) with
``models/resnet_multi_bn.py: resnet18_momentum``:
    ACL-DS (dual BN ["normal", "pgd"], ACL projection head, ImageNet mean/std inside the model) plus
    an EMA view encoder: view 1 of every image goes through the trained encoder q, view 2 through an
            EMA copy k (``k = 0.99 k + 0.01 q`` over parameters only, k's BN statistics its own), in the
            attack (eval mode, "pgd") and in both training forwards (train mode);
    x_adv = PGD-5 (eps 8/255, alpha 2/255, uniform start) on both views jointly, maximising the NT-Xent
            of the swapped features on "pgd" in eval mode;
    loss  = ((2 - w) NT-Xent(clean, "normal") + w NT-Xent(adv, "pgd")) / 2, w = min(1 + (e // K) K/E lambda, 2);
    views at strength s = 1 - ((e - 1) // K) K / E (crop scale (1 - 0.9 s, 1), jitter 0.4 s ... with
            p 0.8 s, grayscale p 0.2 s, bilinear crop), set per epoch (advfast.data.strength_schedule);
    the EMA encoder's "pgd" branch is the deliverable (official validation and ``model_encoder_k.pt``).
The EMA update runs inside ``training_step`` after the two training forwards, as the official order
(k takes q's pre-step weights). The swapped features stay on the input's device (the official builds
them on the CPU and runs every NT-Xent there: a performance bug, not copied). Rows are view-major
(``cat(q(x1), k(x2))``); NT-Xent does not depend on the layout (see acl.py).

``method.air=true`` (ACL.Options, AIR on DynACL: GodXuxilie/Enhancing_ACL_via_AIR ``pretraining.py
--ACL_DS --DynAug``) defers to ACL's AIR path with dynamic augmentation: no EMA view, AIR's aligned
weight and bicubic crop (its own base, not PKU's DynACL).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from advfast.data.strength_schedule import (air_adv_weight, dynacl_clean_adv_factors, dynacl_strength, scaled_step,
                                            strength_views)
from advfast.methods import register
from advfast.methods.acl import ACL
from advfast.methods.momentum import MomentumEncoder
from advfast.methods.options import option
from advfast.methods.simclr import acl_code_preset
from advfast.ops.dtypes import upcast

DIGITS_LEVELS = 5  # strength levels of a digits run (the official 1000-epoch run has 20)
# The official 0.99 averages over ~100 steps, 0.1 % of its 97,000-step run. A digits run has 110 steps, after
# which 0.99 ** 110 = 0.33 of the exported EMA encoder would still be its random initialisation (measured, seed 0:
# SLF PGD-20 accuracy 32.0 % with 0.99, 76.9 % with 0.9). 0.9 averages over ~10 steps, about one digits epoch.
DIGITS_EMA_MOMENTUM = 0.9


@register
class DynACL(ACL):
    name = "dynacl"
    variants = ("dynacl", "dynacl++")
    default_variant = "dynacl"
    augment_preset = strength_views(1.0, "bilinear")  # epoch 1's views; on_epoch_start sets each epoch's
    benchmarked = in_digits_table = True
    # coreset=rcs as DynACL_RCS.py: ACL's objective (NT-Xent without DynACL's weight, as coded) drawn from the full
    # training set, validation images included, with the epoch's strength views
    coreset_pool = "full"
    digits_table_rows = {"dynacl++": ("method.post_process=lp-aft",)}  # its LP-AFT output is the '++' row
    attack_graph_setups = {"dynacl": {}}  # method.air=true attacks exactly as acl-air (ACL's attack_both)
    # method.air=true: AIR's --DynAug (ACL.preset_for gives air_preset(dataset, dyn_aug=True), ACL's AIR path
    # anneals the strength and w per epoch)
    dyn_aug = True

    @classmethod
    def iteration_passes(cls, attack_steps):
        # attack on 2 views (1 + 1 per step each, half through q, half through k); train: 4 views forward,
        # full backward only for q's 2 (k takes no gradient); the EMA update is elementwise
        return 4 * attack_steps + 8

    @dataclasses.dataclass
    class Options(ACL.Options):
        step: int = option(50, low=1, rule=">= 1 (K: epochs per strength level; official 50)")
        swap_param: float = option(2 / 3, low=0, rule=">= 0 (lambda of the loss weight; official 2/3)")
        ema_view: bool | None = None  # None: on (PKU DynACL), off with method.air=true (AIR's DynACL)
        ema_momentum: float = option(0.99, low=0, high=1, rule="in [0, 1] (official 0.99)")
        # "dynacl": w from epoch // K as coded (one epoch ahead of the strength); "aligned": from the strength
        weight_schedule: str = option("dynacl", choices=("dynacl", "aligned"))
        # lp-aft: DynACL++ (LPAFT.py); lp-aff: DynACL-AIR++ (LP-AFF.py); variant dynacl++ picks the base's
        post_process: str = option("none", choices=("none", "lp-aft", "lp-aff"))
        # the post-processing's TRADES start: None as coded (LP-AFT: x itself; LP-AFF: 0.001 Gaussian), else its std
        lp_trades_random_start: float | None = option(None, low=0, high=1, rule="in [0, 1] (None: as coded)")
        # LP-AFF's attack KL target branch: None as coded (AIR's 'normal'), "pgd" as PKU-ML/DYNACL's trades_loss_dual
        lp_attack_target: str | None = option(None, choices=("normal", "pgd"))

    def __init__(self, cfg, num_classes: int, mean, std):
        super().__init__(cfg, num_classes, mean, std)
        if self.uses_ema:
            self.ema = MomentumEncoder(self.backbone, self.head, self.options.ema_momentum)
        self.clean_factor, self.adv_factor = self.loss_factors(1)
        if self.post_process != "none":  # last: the probe head and pseudo-label buffer the stages fill
            from advfast.methods.lp_post_stage import add_lp_modules

            add_lp_modules(self, self.post_process)

    # ---- options --------------------------------------------------------------------------------------
    @property
    def air(self) -> bool:
        return bool(getattr(self.options, "air", False))  # ACL.Options.air (AIR on ACL and DynACL)

    @property
    def uses_ema(self) -> bool:
        return not self.air if self.options.ema_view is None else self.options.ema_view

    @property
    def dual(self) -> bool:
        return True if self.options.dual_bn is None else self.options.dual_bn

    @property
    def post_process(self) -> str:
        """The post-training stages: the option, or for variant dynacl++ the base's own (LP-AFT after PKU's
        DynACL, LP-AFF after AIR's DynACL-AIR)."""
        if self.variant == "dynacl++" and self.options.post_process == "none":
            return "lp-aff" if self.air else "lp-aft"
        return self.options.post_process

    @classmethod
    def check_options(cls, options, cfg) -> None:
        super().check_options(options, cfg)
        if options.loss_weight_adv != 1.0:
            raise ValueError("method.loss_weight_adv is ACL's; DynACL weights its losses by its schedule "
                             "(method.swap_param, method.weight_schedule): drop it")
        if getattr(options, "air", False):
            if options.ema_view:
                raise ValueError("method.ema_view=true is PKU DynACL's; AIR's DynACL (method.air=true) has no EMA "
                                 "view: drop method.ema_view")
            defaults = cls.Options()
            for name in ("swap_param", "ema_momentum", "weight_schedule"):  # AIR's path has its own weight
                if getattr(options, name) != getattr(defaults, name):
                    raise ValueError(f"method.{name} is PKU DynACL's and does not apply with method.air=true; "
                                     f"drop it")
        post = options.post_process != "none" or cfg.variant == "dynacl++"
        if not post and (options.lp_trades_random_start is not None or options.lp_attack_target is not None):
            raise ValueError("method.lp_trades_random_start / method.lp_attack_target set the post-processing "
                             "stages: add --variant dynacl++ (or method.post_process=lp-aft|lp-aff), or drop them")
        lp_aff = options.post_process == "lp-aff" or (options.post_process == "none" and getattr(options, "air", False))
        if options.lp_attack_target is not None and not lp_aff:
            raise ValueError("method.lp_attack_target is LP-AFF's (DynACL-AIR++: method.air=true or "
                             "method.post_process=lp-aff); LP-AFT attacks its single-BN network: drop it")

    # ---- presets --------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, dataset: str, variant: str | None = None) -> dict[str, Any]:
        """train_DynACL.py: ACL's settings with the cosine stepped once per epoch after a 10-epoch warmup
        at (epoch_index + 1) / 10 of the peak; digits: ACL's digits preset, K = 2 (5 strength levels) and an
        EMA view encoder of momentum 0.9 (DIGITS_EMA_MOMENTUM)."""
        cls.resolve_variant(variant)
        preset = acl_code_preset(dataset)
        preset["optim"] = dict(preset["optim"], step_every="epoch", warmup_point="end")
        if dataset == "digits":
            preset["method_options"] = dict(preset["method_options"], ema_momentum=DIGITS_EMA_MOMENTUM,
                                            step=scaled_step(preset["epochs"], DIGITS_LEVELS))
        return preset

    # ---- schedules ------------------------------------------------------------------------------------
    def strength(self, epoch: int) -> float:
        """Augmentation strength of 1-based ``epoch`` (``reload``'s grid; advfast's resume keeps it)."""
        return dynacl_strength(epoch, self.cfg.epochs, self.options.step)

    def loss_factors(self, epoch: int) -> tuple[float, float]:
        """(clean, adversarial) factors of 1-based ``epoch``: ((2 - w) / 2, w / 2)."""
        if self.options.weight_schedule == "aligned":  # w from the strength in use (AIR/RCS's alignment)
            w = min(1.0 + air_adv_weight(self.strength(epoch), self.options.swap_param), 2.0)
            return (2 - w) / 2, w / 2
        return dynacl_clean_adv_factors(epoch, self.cfg.epochs, self.options.step, self.options.swap_param)

    def on_epoch_start(self, epoch: int) -> None:
        if self.air:  # AIR's strength, views (bicubic, 3 views) and w, with --DynAug
            return self._air_epoch_start(epoch, dyn_aug=True)
        self.augment.set_views(strength_views(self.strength(epoch + 1), "bilinear"))
        # Python floats: a pure function of the epoch (nothing to checkpoint), outside any attack graph
        self.clean_factor, self.adv_factor = self.loss_factors(epoch + 1)

    # ---- the recipe -----------------------------------------------------------------------------------
    def embed_k(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        """Projection of ``x`` through the EMA encoder and head (no gradient to their weights), as ``embed``."""
        return upcast(self.ema.head(self.ema.encoder(x, branch), branch))

    def swap_embed(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        """resnet18_momentum's swap forward, view-major: view 1 (first half) through q, view 2 through k;
        each encoder's BN sees its own B images, as officially."""
        if not self.uses_ema:
            return self.embed(x, branch)
        b = x.shape[0] // 2
        return torch.cat([self.embed(x[:b], branch), self.embed_k(x[b:], branch)])

    def attack_swapped(self, x: torch.Tensor) -> torch.Tensor:
        """Both views (view-major in ``x``) attacked jointly on the adversarial branch, through q and k."""
        return self._attack("both", lambda: lambda xa: self.contrastive_loss(self.swap_embed(xa, self.adv_branch)), x)

    def training_step(self, batch):
        if self.air:  # AIR's own DynACL base: ACL-DS forwards + SIR/AIR, no EMA view
            return self._air_training_step(batch)
        x = torch.cat([batch.views[0], batch.views[1]])
        x_adv = self.attack_swapped(x)
        z_adv = self.swap_embed(x_adv, self.adv_branch)
        z = self.swap_embed(x, "normal")
        if self.uses_ema:  # official order: after the forwards, before the step (k takes q's pre-step weights)
            self.ema.update_(self.backbone, self.head)
        loss_clean = self.contrastive_loss(z)
        loss_adv = self.contrastive_loss(z_adv)
        loss = self.clean_factor * loss_clean + self.adv_factor * loss_adv
        return loss, {"loss_clean": loss_clean.detach(), "loss_adv": loss_adv.detach()}

    # ---- stages and export ----------------------------------------------------------------------------
    def stages(self):
        """Pre-training; DynACL++ (-AIR++): its export, then the LP-AFT (LP-AFF) stages, whose last output is
        the run's encoder.safetensors (the leaderboard's "++" rows)."""
        if self.post_process == "none":
            return super().stages()
        from advfast.methods.lp_post_stage import lp_aff_stages, lp_aft_stages

        start = self.options.lp_trades_random_start
        if self.post_process == "lp-aft":
            post = lp_aft_stages(self, trades_random_start=start)
        else:
            post = lp_aff_stages(self, trades_random_start=start, attack_target_branch=self.options.lp_attack_target)
        return [self.main_stage(export=True)] + post

    def compile_targets(self):
        # the step runs both: view 1 through the trained encoder, view 2 through the EMA copy (the export)
        return (self.backbone, self.ema.encoder) if self.uses_ema else (self.backbone,)

    @property
    def encoder(self):
        """The EMA encoder with the EMA view (the official validation and ``model_encoder_k.pt``), else
        the trained one; advfast-eval reads its ``eval_branch`` ("pgd")."""
        return self.ema.encoder if self.uses_ema else self.backbone
