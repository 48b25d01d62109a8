"""SimCLR (Chen et al. 2020) as ACL's official code runs it without --ACL_DS: the plain baseline.

Recipe: two augmented views, one encoder and projection head, NT-Xent (T 0.5) over the 2B rows.
The head is ACL's proj_head (512-512-512-512 with BN, ``--twoLayerProj`` drops the last layer),
the optimiser ACL's LARS (lr 5.0, wd 1e-6, eta 1e-3, per-iteration cosine with a 10-epoch warmup,
floor 1e-6), batch 512, 1000 epochs, input normalised inside the model with ImageNet's mean/std
as ACL's code does for every dataset (``method.input_stats=dataset``: the dataset's own): the
official baseline that ACL's table 3 compares with ("SimCLR (S2S)").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from advfast.dist import gather_views
from advfast.ops.contrastive import nt_xent
from advfast.ops.dtypes import upcast
from advfast.methods import register
from advfast.methods.base import Method
from advfast.methods.options import option
from advfast.models import build_encoder, build_head


# ACL's NormalizeByChannelMeanStd, the first op of its model's forward, for every dataset
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def acl_code_preset(dataset: str) -> dict[str, Any]:
    """The training settings of ACL's train_simCLR.py (shared by simclr and every acl variant),
    or a CPU-minutes setting for the digits demo."""
    if dataset == "digits":
        # digits at 16x16 with the small convnet: 11 steps of 128 per epoch, 10 epochs. LARS as the
        # official code, its lr scaled with the batch (5.0 * 128/512); a 2-epoch warmup for the short
        # run. eps 8/255 at 16x16: a linear probe on SimCLR features keeps ~0% under PGD-10 at 8/255,
        # on ACL DS features ~75% (docs/methods.md), so the robustness gain is plain to see.
        return dict(arch="convnet", image_size=16, epochs=10, batch_size=128, temperature=0.5,
                    optim=dict(name="lars", lr=1.25, weight_decay=1e-6, momentum=0.9, lars_eta=1e-3,
                               lars_exclude_bn_bias=False, schedule="cosine", warmup_epochs=2.0,
                               warmup_start_lr=0.0, min_lr=1e-6),
                    attack=dict(kind="pgd", norm="linf", eps=8 / 255, alpha=2 / 255, steps=5, random_start=True),
                    method_options=dict(head_hidden=128),
                    log_every=10, ckpt_every=100)
    return dict(arch="resnet18", epochs=1000, batch_size=512, temperature=0.5,
                optim=dict(name="lars", lr=5.0, weight_decay=1e-6, momentum=0.9, lars_eta=1e-3,
                           lars_exclude_bn_bias=False, schedule="cosine", warmup_epochs=10.0,
                           warmup_start_lr=0.0, min_lr=1e-6),
                attack=dict(kind="pgd", norm="linf", eps=8 / 255, alpha=2 / 255, steps=5, random_start=True))


@register
class SimCLR(Method):
    name = "simclr"
    variants = ()
    default_variant = None
    augment_preset = "simclr"
    benchmarked = in_digits_table = True

    @classmethod
    def iteration_passes(cls, attack_steps):
        return 6  # 2 views: forward 1 + full backward 2 each

    @dataclasses.dataclass
    class Options:
        head: str = "acl"  # projection head kind (advfast.models.HEAD_KINDS); "acl" as ACL's code
        head_hidden: int | None = None  # head width (None: the kind's default, 512 for "acl")
        two_layer_proj: bool = False  # ACL's --twoLayerProj: drop fc3 of the "acl" head
        loss_backend: str = "auto"  # backend of ops.nt_xent
        # normalisation inside the model: "imagenet" as ACL's code, or "dataset"
        input_stats: str = option("imagenet", choices=("imagenet", "dataset"))

    def __init__(self, cfg, num_classes: int, mean, std):
        super().__init__(cfg, num_classes, mean, std)
        self.temperature = float(cfg.temperature)
        if self.options.input_stats == "imagenet" and len(mean) == 3:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        branches = self.branches()
        self.backbone = build_encoder(cfg.arch, branches, mean, std)
        head_kw = dict(hidden=self.options.head_hidden)
        if self.options.head == "acl":
            head_kw["num_layers"] = 2 if self.options.two_layer_proj else 3
        elif self.options.two_layer_proj:
            raise ValueError("method.two_layer_proj applies to the 'acl' head only; drop it or set method.head=acl")
        self.head = build_head(self.options.head, self.backbone.feat_dim, branches, **head_kw)

    def branches(self) -> tuple[str, ...]:
        """BN branches of backbone and head (one for SimCLR)."""
        return ("normal",)

    @classmethod
    def preset(cls, dataset: str, variant: str | None = None) -> dict[str, Any]:
        preset = acl_code_preset(dataset)
        preset["attack"] = dict(preset["attack"], kind="none")  # no attack in the baseline
        return preset

    @property
    def encoder(self):
        return self.backbone

    def embed(self, x: torch.Tensor, branch: str = "normal") -> torch.Tensor:
        """Projection-head output of images ``x`` through BN branch ``branch`` (half precision up to fp32 for
        the loss; a float64 model stays float64)."""
        return upcast(self.head(self.backbone(x, branch), branch))

    def contrastive_loss(self, z: torch.Tensor) -> torch.Tensor:
        """NT-Xent of the 2B rows of ``z``, view-major (rows i and i+B are one image's two views).
        Under torchrun every rank contrasts against the global batch (advfast.dist)."""
        return nt_xent(gather_views(z, 2), 2, temperature=self.temperature, backend=self.options.loss_backend)

    def training_step(self, batch):
        x = torch.cat([batch.views[0], batch.views[1]])
        loss = self.contrastive_loss(self.embed(x))
        return loss, {"loss_nt_xent": loss.detach()}
