"""ACL: Adversarial Contrastive Learning (Jiang et al., NeurIPS 2020), variants A2A, A2S and DS.

DS (the default, the only variant the authors released) follows VITA-Group/Adversarial-Contrastive-
Learning, train_simCLR.py --ACL_DS:
    backbone and ACL projection head with dual BN ["normal", "pgd"], ImageNet mean/std inside the
            model (method.input_stats, from simclr);
    x_adv = PGD (eps 8/255, alpha 2/255, 5 steps, uniform start) on both views jointly, maximising the
            NT-Xent of the adversarial views through the "pgd" BN with the model in eval mode
            (here the gradient is taken w.r.t. the input only; the official code back-propagates into
            the weights too and discards those gradients);
    loss  = (NT-Xent(clean views, "normal" BN) + NT-Xent(adversarial views, "pgd" BN)) / 2, train mode;
    the "pgd" branch is the one kept for fine-tuning and evaluation (official --bnNameCnt 1).

A2A and A2S exist only in the paper (section 2.2, Fig. 1); as defined there:
    A2A: both views attacked, one BN shared by everything, loss = NT-Xent(adv view 1, adv view 2).
    A2S: view 1 attacked, view 2 clean, dual BN (adversarial view through "pgd", clean view through
         "normal"), loss = NT-Xent(adv view 1, clean view 2). The attack maximises that same loss with
         the clean view's features held fixed (computed once, eval mode). Evaluated on "pgd".
``method.dual_bn`` overrides the BN choice (the paper's table 4 ablates single BN for A2S and DS).

Row layout: the official code puts an image's two views in adjacent rows (2i, 2i+1); advfast's
nt_xent takes them view-major (i, i+B). NT-Xent is a mean over every anchor of a function of the
anchor's row and its partner, so the two layouts give the same loss.

Random start: ops.random_start clamps x + delta to [0, 1] before the first step; the official
code clamps only after it. The first forward therefore sees a valid image here; from the first
step on the two are the same.

``method.air=true`` (DS only): AIR (Xu et al., NeurIPS 2023), GodXuxilie/Enhancing_ACL_via_AIR @15cf0a7,
``pretraining.py --ACL_DS`` (ACL-AIR; DynACL-AIR with ``--DynAug`` is ``--method dynacl``, which reuses
``_air_epoch_start`` / ``_air_training_step`` with ``dyn_aug = True``). A third view, the un-augmented
image, goes through "normal" in train mode; the attack stays ACL's; the loss is
``(1 - w) L_nat + (1 + w) L_adv + lambda_sir SIR + lambda_air AIR`` (advfast.losses.air, no 1/2), w = 0
for ACL-AIR. The views are AIR's (bicubic crop, scale (0.1, 1) at strength 1), set every epoch.
docs/methods_air.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from advfast.config import coerce
from advfast.data.presets import Original
from advfast.data.strength_schedule import OFFICIAL_STEP, air_adv_weight, air_strength, scaled_step, strength_views
from advfast.dist import gather_views, gather_with_grad
from advfast.losses.air import KL_MODES, LAMBDA_AIR, LAMBDA_SIR, air_objective, air_regularizers
from advfast.methods import register
from advfast.methods.options import option
from advfast.methods.simclr import SimCLR, acl_code_preset
from advfast.ops.contrastive import nt_xent

AIR_SEED = 1  # pretraining.py --seed 1 (AIR's setup_seed)
AIR_DIGITS_LEVELS = 5  # strength levels of a digits DynACL-AIR run (scaled_step; the official run has 20)


def air_views(strength: float = 1.0) -> tuple:
    """AIR's views at augmentation strength s: two ``get_transform(s)`` views (bicubic crop, scale
    (1 - 0.9 s, 1)) and the un-augmented image (``ori_transfor``, ToTensor only)."""
    return (*strength_views(strength, "bicubic"), (Original(),))


def air_preset(dataset: str, dyn_aug: bool) -> dict[str, Any]:
    """The training settings of AIR's ``pretraining.py E --ACL_DS`` (ACL-AIR, ``dyn_aug=False``) and
    ``--ACL_DS --DynAug`` (DynACL-AIR, run.sh): ACL's code settings (ResNet-18 dual BN + ACL head, batch
    512, 1000 epochs, LARS lr 5.0 wd 1e-6 over all parameters, per-iteration cosine to 1e-6 with a
    10-epoch linear warm-up whose iteration i runs at (i + 1) / warmup of the peak, PGD-5 8/255 2/255,
    T 0.5) with seed 1. digits: ACL's digits preset; DynACL-AIR's strength steps every ``scaled_step(epochs, 5)``
    epochs there (K = 50 never steps in 10 epochs). ``method.air`` is on in both."""
    preset = acl_code_preset(dataset)
    # train() calls scheduler.step() before the optimizer step: iteration i runs at cosine_annealing(i + 1),
    # so the warm-up ramp is (i + 1) / warmup (exact here); the cosine then lags one iteration (docs)
    preset["optim"] = dict(preset["optim"], warmup_point="end")
    options = dict(preset.get("method_options", {}), air=True)
    if dyn_aug and dataset == "digits":  # DynACL's method.step (K); its EMA view is off with air by default
        options["step"] = scaled_step(preset["epochs"], AIR_DIGITS_LEVELS)
    preset["method_options"] = options
    if dataset != "digits":
        preset["seed"] = AIR_SEED
    return preset


def air_requested(options) -> bool:
    """``method.air`` from the options the user set (a raw dict, values as given) or parsed Options."""
    if options is None:
        return False
    value = options.get("air", False) if isinstance(options, Mapping) else getattr(options, "air", False)
    return coerce(value, bool, "method.air")


@register
class ACL(SimCLR):
    name = "acl"
    variants = ("a2a", "a2s", "ds")
    default_variant = "ds"
    augment_preset = "simclr"
    attack_graph_setups = {"acl": {}, "acl-a2s": {"variant": "a2s"},
                           "acl-air": {"method_options": {"air": True}, "views": 3}}
    preset_options = {"air": (True,)}  # AIR's own script (air_preset)
    digits_table_rows = {"acl-air": ("method.air=true",), "acl-rcs": ("coreset=rcs",)}
    # AIR's --DynAug: the strength (and w) annealed per epoch; False: ACL-AIR (s = 1, w = 0). DynACL sets True.
    dyn_aug: ClassVar[bool] = False

    @classmethod
    def iteration_passes(cls, attack_steps):
        # DS: attack on 2 views (1 + 1 per step each); train 4 views (clean + adv) x 3
        return 4 * attack_steps + 12

    @dataclasses.dataclass
    class Options(SimCLR.Options):
        dual_bn: bool | None = None  # None: the variant's own choice (ds, a2s: dual; a2a: single)
        loss_weight_adv: float = 1.0  # DS only: alpha of Algorithm 1; loss = (clean + alpha * adv) / 2
        air: bool = False  # AIR's SIR + AIR regularisers and its views (DS only; docs/methods_air.md)
        air_kl: str = option("code", choices=KL_MODES)  # "code": sum q (log q - p) as coded; "paper": KL
        air_lambda_sir: float = option(LAMBDA_SIR, low=0, rule=">= 0 (the official --lambda1 is 0.5)")
        air_lambda_air: float = option(LAMBDA_AIR, low=0, rule=">= 0 (the official --lambda2 is 0.5)")

    def __init__(self, cfg, num_classes: int, mean, std):
        super().__init__(cfg, num_classes, mean, std)
        self._check_air(self.options, self.variant)
        self.adv_branch = "pgd" if self.dual else "normal"
        self.eval_branch = self.adv_branch
        # AIR's strength and w of the current epoch (on_epoch_start); epoch 1's values until then
        self.air_strength, self.air_weight = 1.0, 0.0

    @classmethod
    def check_options(cls, options, cfg) -> None:
        super().check_options(options, cfg)
        cls._check_air(options, cls.resolve_variant(cfg.variant))

    @classmethod
    def _check_air(cls, options, variant: str | None) -> None:
        if options.air:
            if variant in ("a2a", "a2s"):
                raise ValueError(f"method.air=true needs variant ds (AIR regularises ACL-DS), got --variant {variant}")
            if options.loss_weight_adv != 1.0:
                raise ValueError("method.loss_weight_adv does not apply with method.air=true (AIR weights the "
                                 "terms by its own schedule); drop it")
            return
        defaults = cls.Options()
        for name in ("air_kl", "air_lambda_sir", "air_lambda_air"):
            if getattr(options, name) != getattr(defaults, name):
                raise ValueError(f"method.{name} applies only with method.air=true; add --set method.air=true or drop it")

    @property
    def dual(self) -> bool:
        if self.options.dual_bn is not None:
            return self.options.dual_bn
        return self.variant in ("ds", "a2s")

    def branches(self) -> tuple[str, ...]:
        return ("normal", "pgd") if self.dual else ("normal",)

    # where coreset=rcs draws from: "holdout" (ACL_RCS.py: the training set minus the validation share)
    coreset_pool: ClassVar[str] = "holdout"

    def coreset_objective(self):
        """coreset=rcs (ACL_RCS.py): ACL-DS's NT-Xent, its projection head and dual BN, drawn from
        ``coreset_pool``. None (refused) for the paper-only variants a2a/a2s or without dual BN."""
        from advfast.methods.coreset_rcs import CoresetObjective

        if self.variant in ("a2a", "a2s") or not self.dual:
            return None
        return CoresetObjective(self.backbone, self.head, "normal", "pgd", self.temperature, pool=self.coreset_pool)

    @classmethod
    def preset(cls, dataset: str, variant: str | None = None) -> dict[str, Any]:
        cls.resolve_variant(variant)
        return acl_code_preset(dataset)

    @classmethod
    def preset_for(cls, dataset: str, variant: str | None, options: dict[str, Any]) -> dict[str, Any]:
        """``method.air=true``: AIR's pretraining.py settings (``air_preset``, with ``cls.dyn_aug``)."""
        if air_requested(options):
            cls.resolve_variant(variant)
            return air_preset(dataset, cls.dyn_aug)
        return cls.preset(dataset, variant)

    @classmethod
    def augment_for(cls, variant: str | None, options=None):
        """ACL's SimCLR views; with ``method.air`` in ``options`` (raw or parsed) AIR's three views at
        strength 1 (on_epoch_start sets each epoch's)."""
        if air_requested(options):
            return air_views(1.0)
        return super().augment_for(variant)

    # ---- attacks (model in eval mode, as the official PGD_contrastive) ------------------------------
    def _attack(self, site: str, make_loss, x: torch.Tensor, context=()) -> torch.Tensor:
        with self.attack_mode():
            return self.run_attack(site, make_loss, x, context).detach()

    def attack_both(self, x: torch.Tensor) -> torch.Tensor:
        """Both views (stacked view-major in ``x``) attacked jointly on the adversarial branch."""
        return self._attack("both", lambda: lambda xa: self.contrastive_loss(self.embed(xa, self.adv_branch)), x)

    def attack_first(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """View 1 attacked against the fixed clean features of view 2 (A2S)."""
        with self.attack_mode(), torch.no_grad():
            z2 = self.embed(x2, "normal")
        return self._attack("first", lambda z2: lambda xa: self.contrastive_loss(
            torch.cat([self.embed(xa, self.adv_branch), z2])), x1, (z2,))

    # ---- AIR (method.air=true): also DynACL-AIR's, through dynacl.py ---------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        if self.options.air:
            self._air_epoch_start(epoch)

    def _air_epoch_start(self, epoch: int, dyn_aug: bool | None = None, step: int | None = None) -> None:
        """Engine epoch ``epoch`` (0-based) -> AIR's strength s (``air_strength(epoch + 1, E, dyn_aug, step)``),
        its views (``air_views(s)``) and w (``air_adv_weight(s)``), as ``get_trainset``/``train`` per epoch.
        ``dyn_aug`` None: the class's ``dyn_aug``; ``step`` (K) None: DynACL's ``method.step`` where the
        options have one, else the official hard-coded 50."""
        dyn_aug = self.dyn_aug if dyn_aug is None else dyn_aug
        step = getattr(self.options, "step", OFFICIAL_STEP) if step is None else step
        s = air_strength(epoch + 1, int(self.cfg.epochs), dyn_aug, step)
        self.air_strength, self.air_weight = s, air_adv_weight(s)  # floats: nothing to checkpoint
        if self.augment is None:  # no engine (a method built by hand): the caller supplies the views
            return
        if self.augment.num_views != 3:
            raise RuntimeError(f"method.air=true needs AIR's 3 views, the run's augmentation makes "
                               f"{self.augment.num_views}: the engine must build it from "
                               f"augment_for(variant, method_options)")
        views = air_views(s)
        if tuple(self.augment.views) != views:  # unchanged (ACL-AIR, within a level): no DALI rebuild
            self.augment.set_views(views)

    def _air_training_step(self, batch):
        """One iteration of AIR's ``train`` (--ACL_DS): ACL's joint attack on both views ("pgd", eval
        mode, plain NT-Xent), then train-mode forwards adversarial ("pgd"), clean and un-augmented
        ("normal", in this order, as the BN statistics are updated), and ``air_objective`` with this
        epoch's w. Under torchrun the five blocks are gathered before the batch softmax of SIR/AIR."""
        if len(batch.views) < 3:
            raise ValueError(f"method.air=true needs 3 views (two augmented, the original image), got "
                             f"{len(batch.views)}")
        x1, x2, x_orig = batch.views[0], batch.views[1], batch.views[2]
        x = torch.cat([x1, x2])
        x_adv = self.attack_both(x)
        z_adv = gather_views(self.embed(x_adv, self.adv_branch), 2)
        z = gather_views(self.embed(x, "normal"), 2)
        z_orig = gather_with_grad(self.embed(x_orig, "normal"))
        b = z_orig.shape[0]  # the global batch
        kw = dict(temperature=self.temperature, backend=self.options.loss_backend)
        loss_nat, loss_adv = nt_xent(z, 2, **kw), nt_xent(z_adv, 2, **kw)
        sir, air = air_regularizers(z[:b], z[b:], z_orig, z_adv[:b], z_adv[b:], temperature=self.temperature,
                                    kl=self.options.air_kl)
        o = self.options
        loss = air_objective(loss_nat, loss_adv, sir, air, weight=self.air_weight, lambda_sir=o.air_lambda_sir,
                             lambda_air=o.air_lambda_air)
        return loss, {"loss_nat": loss_nat.detach(), "loss_adv": loss_adv.detach(), "loss_sir": sir.detach(),
                      "loss_air": air.detach()}

    # ---- the recipe ------------------------------------------------------------------------------
    def training_step(self, batch):
        if self.options.air:
            return self._air_training_step(batch)
        x1, x2 = batch.views[0], batch.views[1]
        if self.variant == "a2s":
            x1_adv = self.attack_first(x1, x2)
            loss = self.contrastive_loss(torch.cat([self.embed(x1_adv, self.adv_branch), self.embed(x2, "normal")]))
            return loss, {"loss_a2s": loss.detach()}
        x = torch.cat([x1, x2])
        x_adv = self.attack_both(x)
        loss_adv = self.contrastive_loss(self.embed(x_adv, self.adv_branch))
        if self.variant == "a2a":
            return loss_adv, {"loss_adv": loss_adv.detach()}
        loss_clean = self.contrastive_loss(self.embed(x, "normal"))
        loss = (loss_clean + self.options.loss_weight_adv * loss_adv) / 2
        return loss, {"loss_clean": loss_clean.detach(), "loss_adv": loss_adv.detach()}
