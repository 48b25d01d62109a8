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
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from advfast.methods import register
from advfast.methods.simclr import SimCLR, acl_code_preset


@register
class ACL(SimCLR):
    name = "acl"
    variants = ("a2a", "a2s", "ds")
    default_variant = "ds"
    augment_preset = "simclr"
    attack_graph_setups = {"acl": {}, "acl-a2s": {"variant": "a2s"}}

    @classmethod
    def iteration_passes(cls, attack_steps):
        # DS: attack on 2 views (1 + 1 per step each); train 4 views (clean + adv) x 3
        return 4 * attack_steps + 12

    @dataclasses.dataclass
    class Options(SimCLR.Options):
        dual_bn: bool | None = None  # None: the variant's own choice (ds, a2s: dual; a2a: single)
        loss_weight_adv: float = 1.0  # DS only: alpha of Algorithm 1; loss = (clean + alpha * adv) / 2

    def __init__(self, cfg, num_classes: int, mean, std):
        super().__init__(cfg, num_classes, mean, std)
        self.adv_branch = "pgd" if self.dual else "normal"
        self.eval_branch = self.adv_branch

    @property
    def dual(self) -> bool:
        if self.options.dual_bn is not None:
            return self.options.dual_bn
        return self.variant in ("ds", "a2s")

    def branches(self) -> tuple[str, ...]:
        return ("normal", "pgd") if self.dual else ("normal",)

    @classmethod
    def preset(cls, dataset: str, variant: str | None = None) -> dict[str, Any]:
        cls.resolve_variant(variant)
        return acl_code_preset(dataset)

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

    # ---- the recipe ------------------------------------------------------------------------------
    def training_step(self, batch):
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
