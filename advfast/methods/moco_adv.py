"""moco-adv: MoCo-PGD / MoCo-FGSM (Moshavash, Eftekhari, Bahraman, JComSec 8(1), 2021).

The paper has no public code; this is a clean-room design from its text (section 4). Every choice
is listed in docs/methods.md; in short:

    k     = normalize(f_k(x_k))                  key view, momentum encoder, clean, no gradient
    x_adv = PGD or FGSM on x_q maximising InfoNCE(f_q(x), k, queue)     (eq. 5-7; attack.kind)
    loss  = InfoNCE(f_q(x_adv), k, queue)        "pre-trained via contrastive loss of MoCo" on the
                                                 adversarial samples (sec. 4.2)
    with clean_weight = w > 0: (1 - w) * that + w * InfoNCE(f_q(x_q), k, queue). The paper pre-trains
    on the adversarial samples only, so w defaults to 0
    after the step: enqueue k, EMA of the key encoder (MoCo's order)

* The attack perturbs only the query view (sec. 4.1: "the perturbed augmentation data are fed into
  the query encoder and the others to the momentum encoder"), from a uniform random start (eq. 6).
* The key k is computed once, in train mode, and is both the attack's positive and the loss's.
* The query encoder runs in eval mode during the attack (the paper is silent; ACL, AMOC and RoCL all
  attack in eval mode, which keeps the attack's inputs out of the BN running statistics);
  ``attack_train_mode=True`` attacks in train mode instead.
* One BN (the paper has no dual BN).
* The attack ascends the summed per-query loss (CE summed, as foolbox and most PGD codes): its sign
  gradient is that of the mean.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from advfast.methods import register
from advfast.methods.moco import MoCo
from advfast.methods.options import option


@register
class MoCoAdv(MoCo):
    name = "moco-adv"
    variants = ("v1", "v2")
    default_variant = "v1"  # the paper's best setup: ResNet-50, PGD, MoCo-v1
    attack_graph_setups = {
        "moco-adv": {"method_options": {"queue_size": 24}},
        "moco-adv-fgsm": {"method_options": {"queue_size": 24}, "attack": {"kind": "fgsm"}},
    }

    @classmethod
    def iteration_passes(cls, attack_steps):
        return 2 * attack_steps + 4  # key 1; attack query 1 + 1 per step; adversarial query 3

    @dataclasses.dataclass
    class Options(MoCo.Options):
        clean_weight: float = option(0.0, low=0, high=1)  # w: loss = (1 - w) * adversarial + w * clean InfoNCE
        attack_train_mode: bool = False  # run the attack with the model in train mode

    def __init__(self, cfg, num_classes: int, mean, std):
        super().__init__(cfg, num_classes, mean, std)
        if cfg.attack.kind == "none":
            raise ValueError("moco-adv needs an attack: set attack.kind to pgd or fgsm (or use --method moco)")

    @classmethod
    def preset(cls, dataset: str, variant: str | None = None) -> dict[str, Any]:
        cls.resolve_variant(variant)
        if dataset == "digits":  # a couple of CPU minutes
            return dict(arch="convnet", image_size=16, epochs=20, batch_size=128, temperature=0.1,
                        attack=dict(kind="pgd", norm="linf", eps=8 / 255, alpha=2 / 255, steps=3, random_start=True),
                        optim=dict(name="sgd", lr=0.06, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                                   warmup_epochs=0.0),
                        method_options=dict(queue_size=1024, momentum=0.99))
        # Paper sec. 5.1: ResNet-50, batch 128, SGD momentum 0.9, lr 0.06, wd 5e-4, 200 epochs, 10 attack
        # steps, eps 8/255. lr 0.06 / wd 5e-4 / 200 epochs on Colab are exactly the official MoCo CIFAR-10
        # Colab demo's defaults, so the rest follows that demo: K 4096, m 0.99, T 0.1, cosine, no warmup.
        # The paper's "step-size of 8/255" is read as the budget; the step is the usual 2/255.
        return dict(arch="resnet50", epochs=200, batch_size=128, temperature=0.1,
                    attack=dict(kind="pgd", norm="linf", eps=8 / 255, alpha=2 / 255, steps=10, random_start=True),
                    optim=dict(name="sgd", lr=0.06, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                               warmup_epochs=0.0),
                    method_options=dict(queue_size=4096, momentum=0.99))

    def attack_objective(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Summed MoCo InfoNCE of the queries of ``x`` against their keys ``k`` and the queue."""
        return self.contrast(self.embed(x), k) * x.shape[0]

    def attack(self, x_q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        with self.attack_mode(train=self.options.attack_train_mode and self.training):
            return self.run_attack("attack", lambda k: lambda x: self.attack_objective(x, k), x_q, (k,))

    def training_step(self, batch):
        x_q, x_k = batch.views[0], batch.views[1]
        k = self.keys(x_k)
        x_adv = self.attack(x_q, k)
        q_adv = self.embed(x_adv)
        loss_adv = self.contrast(q_adv, k)
        metrics = {"loss_adv": loss_adv.detach()}
        w = self.options.clean_weight
        if w > 0:
            loss_clean = self.contrast(self.embed(x_q), k)
            loss = (1.0 - w) * loss_adv + w * loss_clean
            metrics["loss_clean"] = loss_clean.detach()
        else:
            loss = loss_adv
        self._pending_keys.append(k)
        return loss, metrics
