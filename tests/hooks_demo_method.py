"""A small method that uses every hook beyond the iteration: the worked example of docs/adding_a_method.md.

``hookdemo``: SimCLR-style pre-training whose crop strength changes per epoch (``on_epoch_start``), then a
second stage, "distill", that pulls the encoder's features of adversarial images towards a frozen teacher's
(an ``EncoderInput``: ``--set method.teacher=RUN_DIR``), with its own optimiser. Registered by the tests
(``advfast.methods.register(HookDemo)``), not by advfast: a method defined outside the package.

Views: [crop, crop, original]. Pre-training epoch 0 crops the whole image (scale and ratio 1, so view 1 is
the image itself); later epochs crop 10-20 % of it. The step logs ``view_gap``, the mean absolute pixel
difference of view 1 and the original, so a test sees the change in the batches themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from advfast.config import OptimConfig
from advfast.data.presets import Original, ResizedCrop
from advfast.methods import Method
from advfast.methods.hooks import EncoderInput, Stage
from advfast.models import build_encoder, build_head
from advfast.ops import nt_xent

WHOLE = ResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole image: view == original
SMALL = ResizedCrop(scale=(0.1, 0.2))


def views_at(epoch: int):
    crop = WHOLE if epoch == 0 else SMALL
    return ((crop,), (crop,), (Original(),))


class HookDemo(Method):
    name = "hookdemo"
    augment_preset = views_at(0)  # a custom tuple of views is a preset too
    encoder_inputs = (EncoderInput("teacher"),)

    @dataclasses.dataclass
    class Options:
        teacher: str | None = None  # run directory of an advfast encoder (the frozen teacher)
        distill_epochs: int = 2
        distill_lr: float = 0.05

    def __init__(self, cfg, num_classes, mean, std):
        super().__init__(cfg, num_classes, mean, std)
        self.backbone = build_encoder(cfg.arch, mean=mean, std=std)
        self.head = build_head("simclr", self.backbone.feat_dim, hidden=16, out_dim=8)

    @classmethod
    def preset(cls, dataset: str, variant: str | None = None) -> dict[str, Any]:
        return dict(arch="convnet", image_size=8, epochs=2, batch_size=512, optim=dict(name="sgd", lr=0.1))

    @property
    def encoder(self):
        return self.backbone

    # ---- hook 1: views per epoch ---------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        self.augment.set_views(views_at(epoch))

    # ---- pre-training (stage 0) ----------------------------------------------------------------
    def training_step(self, batch):
        x1, x2, org = batch.views
        z = self.head(self.backbone(torch.cat([x1, x2])))
        loss = nt_xent(z, 2, temperature=0.5)
        return loss, {"view_gap": (x1 - org).abs().mean().detach()}

    # ---- hook 2: a stage after pre-training -----------------------------------------------------
    def stages(self) -> list[Stage]:
        optim = OptimConfig(name="sgd", lr=self.options.distill_lr, momentum=0.9, weight_decay=0.0,
                            schedule="constant", warmup_epochs=0.0)
        return [self.main_stage(export=True),
                Stage("distill", self.options.distill_epochs, self.distill_step, optim=optim,
                      parameters=lambda: list(self.backbone.parameters()), on_start=self.start_distill,
                      export=True)]

    def start_distill(self) -> None:
        self.head.requires_grad_(False)  # the stage trains the encoder only (DDP: every trained param is used)

    def distill_step(self, batch):
        teacher = self.inputs["teacher"]  # hook 3: the frozen teacher, set by the engine
        x = batch.views[2]
        with torch.no_grad():
            target = F.normalize(teacher(x), dim=1)

        def make_loss(target):
            return lambda xa: -(F.normalize(self.backbone(xa), dim=1) * target).sum()

        with self.attack_mode():  # the attack in eval mode, train mode restored after
            x_adv = self.run_attack("distill", make_loss, x, (target,)).detach()
        s = F.normalize(self.backbone(torch.cat([x, x_adv])), dim=1)
        clean, adv = (1 - (s[:x.shape[0]] * target).sum(1)).mean(), (1 - (s[x.shape[0]:] * target).sum(1)).mean()
        return clean + adv, {"distill_clean": clean.detach(), "distill_adv": adv.detach()}


if __name__ == "__main__":  # advfast-train with hookdemo registered (the tests' subprocesses, torchrun workers)
    import sys

    from advfast.cli import train_main
    from advfast.methods import register

    register(HookDemo)
    sys.exit(train_main(sys.argv[1:]))
