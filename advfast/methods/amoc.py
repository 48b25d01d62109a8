"""AMOC: adversarial momentum contrast with two memory banks (Xu, Li, Yang; MTandHJ/amoc).

Variants are named query-key-bank (A = adversarial, C = clean), as in the paper's Table 5:

| variant | query (delta) | key (delta')            | negatives of the adversarial term          |
| ------- | ------------- | ----------------------- | ------------------------------------------ |
| acc     | x_q + delta   | clean x_k, clean BN     | queue_clean                                |
| aca     | x_q + delta   | clean x_k, clean BN     | queue_adv, filled with f_k(x_q + delta; adv BN) (ACA_PLUS) |
| aac     | x_q + delta   | x_k + delta', adv BN    | queue_clean (queue_adv still receives the adversarial keys) |
| aaa     | x_q + delta   | x_k + delta', adv BN    | queue_adv, filled with the adversarial keys |

loss = leverage * L_CCC + (1 - leverage) * L_adv, with
L_CCC = InfoNCE(f_q(x_q; clean BN), f_k(x_k; clean BN), queue_clean), the clean keys enqueued into
queue_clean. Everything below follows the official code (src/base.py ``Coach``, models/builder.py):

* Dual BN (TriggerBN) in the backbone only: branches "clean" and "adv"; the projector has no BN.
* The current keys are enqueued *before* the negatives are read, so each query's own positive (and
  the rest of the batch's keys) is among its negatives. ``enqueue_before_loss=False`` gives MoCo's
  order (enqueue after the step).
* The attack runs on cat(x_q, x_k) with the whole model in eval mode: PGD-linf (eps 8/255, step
  2/255, 5 steps, uniform random start clipped to [0, 1]) maximising the summed CE-with-label-0 of
  [q.k, q.negatives]/T. For acc/aca the key half goes through encoder_k with clean BN under no_grad,
  so only the query half moves and the positive key of the attack objective is computed on the
  randomly perturbed key view; for aac/aaa the key half goes through encoder_k with adv BN *with*
  gradient (the official CAC-style forward_k), so both halves are attacked.
* The official code computes q/sqrt(T), k/sqrt(T), queue/sqrt(T) so that q.k carries 1/T; here the
  normalised vectors go to ``ops.info_nce`` with ``temperature=T``, the same logits up to float
  rounding (one multiplication instead of two).
* ``official_aca_queue=True`` reproduces the CLI-default ``--moco_type ACA``, which never writes
  queue_adv: its negatives stay the initial Gaussian noise. The default (False) is ACA_PLUS, the
  README's command, which is what the paper describes.
* Input normalisation (CIFAR mean/std) is inside the encoder; the official normalises outside the
  model, image by image. Same function of the [0, 1] images.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from advfast.dist import all_gather
from advfast.ops.contrastive import info_nce
from advfast.losses import MemoryBank
from advfast.methods import register
from advfast.methods.base import Method
from advfast.methods.options import option
from advfast.methods.momentum import MomentumEncoder
from advfast.models import build_encoder, build_head

CLEAN, ADV = "clean", "adv"


@register
class AMOC(Method):
    name = "amoc"
    variants = ("acc", "aca", "aac", "aaa")
    default_variant = "aca"
    augment_preset = "mocov2"  # AMOC's TRANSFORMS['cifar10']['simclr'] is MoCo v2's augmentation
    benchmarked = in_digits_table = True
    queue_options = ("queue_size_clean", "queue_size_adv")
    attack_graph_setups = {
        "amoc": {"method_options": {"queue_size_clean": 24, "queue_size_adv": 24}},
        "amoc-aaa": {"variant": "aaa", "method_options": {"queue_size_clean": 24, "queue_size_adv": 24}},
    }

    @classmethod
    def iteration_passes(cls, attack_steps):
        # ACA: attack: query 1 + input backward 1 + clean key 1 per step; train: 2 queries x 3 + clean key 1
        # + momentum key of the adversarial query 1
        return 3 * attack_steps + 8

    @dataclasses.dataclass
    class Options:
        queue_size_clean: int = 32768  # K1
        queue_size_adv: int = 32768  # K2
        momentum: float = 0.999
        # lambda: weight of the clean (CCC) term
        leverage: float = option(0.5, low=0, high=1, rule="in [0, 1] (the paper uses 0.5)")
        official_aca_queue: bool = False  # aca only: the CLI-default ACA that never fills queue_adv
        enqueue_before_loss: bool = True  # official order; False: MoCo's (enqueue after the step)
        ema_backend: str = "auto"
        loss_backend: str = "auto"

    def __init__(self, cfg, num_classes: int, mean, std):
        super().__init__(cfg, num_classes, mean, std)
        o = self.options
        if o.official_aca_queue and self.variant != "aca":
            raise ValueError(f"method.official_aca_queue applies to variant 'aca' only, not {self.variant!r}")
        if cfg.attack.kind == "none":
            raise ValueError("amoc needs an attack: set attack.kind to pgd (the official) or fgsm")
        self.temperature = float(cfg.temperature)
        self.encoder_q = build_encoder(cfg.arch, (CLEAN, ADV), mean, std)
        self.head_q = build_head("amoc", self.encoder_q.feat_dim, (CLEAN, ADV))
        self.key = MomentumEncoder(self.encoder_q, self.head_q, o.momentum, backend=o.ema_backend)
        self.queue_clean = MemoryBank(o.queue_size_clean, self.head_q.out_dim)
        self.queue_adv = MemoryBank(o.queue_size_adv, self.head_q.out_dim)
        self.eval_branch = ADV  # the paper's output f_q(.; BN_adv); the official linear eval's default
        self._pending: list[tuple[MemoryBank, torch.Tensor]] = []

    @classmethod
    def preset(cls, dataset: str, variant: str | None = None) -> dict[str, Any]:
        if dataset == "digits":  # a couple of CPU minutes
            return dict(arch="convnet", image_size=16, epochs=12, batch_size=128, temperature=0.2,
                        attack=dict(kind="pgd", norm="linf", eps=8 / 255, alpha=2 / 255, steps=3, random_start=True),
                        optim=dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                                   warmup_epochs=1.0, warmup_start_lr=0.0),
                        method_options=dict(queue_size_clean=1024, queue_size_adv=1024, momentum=0.99))
        # pre_train.py defaults + the README command (ACA_PLUS, T 0.2, K1 = K2 = 32768, m 0.999, b 256).
        # Official warmup is per epoch (lr 1e-4 in epoch 0, then (e+1)/10 * 0.1); here it is per iteration.
        return dict(arch="resnet18", epochs=200, batch_size=256, temperature=0.2,
                    attack=dict(kind="pgd", norm="linf", eps=8 / 255, alpha=2 / 255, steps=5, random_start=True),
                    optim=dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                               warmup_epochs=10.0, warmup_start_lr=0.0, min_lr=0.0),
                    method_options=dict(queue_size_clean=32768, queue_size_adv=32768, momentum=0.999))

    @property
    def encoder(self):
        return self.encoder_q

    # ---- which keys and which bank, per variant ---------------------------------------------------
    @property
    def adversarial_key(self) -> bool:
        return self.variant in ("aac", "aaa")

    @property
    def negatives_bank(self) -> MemoryBank:
        return self.queue_adv if self.variant in ("aca", "aaa") else self.queue_clean

    # ---- encoders ---------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        """Query projection of images ``x`` through BN branch ``branch`` (normalised)."""
        return F.normalize(self.head_q(self.encoder_q(x, branch), branch), dim=1)

    def key_of(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return F.normalize(self.key(x, branch), dim=1)

    def _nce(self, q, k, bank: MemoryBank) -> torch.Tensor:
        return info_nce(q, k, queue=bank.keys(), temperature=self.temperature, normalize=False,
                            backend=self.options.loss_backend)

    def _store(self, bank: MemoryBank, keys: torch.Tensor) -> None:
        """Official: into the bank now, before the negatives are read. MoCo order: after the step.
        Under torchrun the keys of every rank go in (rank order), so all ranks' banks stay equal."""
        keys = all_gather(keys)
        if self.options.enqueue_before_loss:
            bank.enqueue(keys)
        else:
            self._pending.append((bank, keys))

    # ---- the attack -------------------------------------------------------------------------------
    def attack_objective(self, x: torch.Tensor) -> torch.Tensor:
        """Summed CE-0 over [q.k, q.negatives]/T of x = cat(x_q, x_k), as the official MoCoXYZ.forward
        under foolbox (the model is in eval mode; nothing is enqueued)."""
        x_q, x_k = x.chunk(2)
        q = self.embed(x_q, ADV)
        if self.adversarial_key:
            k = self.key_of(x_k, ADV)
        else:
            with torch.no_grad():
                k = self.key_of(x_k, CLEAN)
        return self._nce(q, k, self.negatives_bank) * x_q.shape[0]

    def attack(self, x_q: torch.Tensor, x_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.attack_mode():
            x_adv = self.run_attack("attack", lambda: self.attack_objective, torch.cat([x_q, x_k]))
        return x_adv.chunk(2)

    # ---- the recipe -------------------------------------------------------------------------------
    def training_step(self, batch):
        x_q, x_k = batch.views[0], batch.views[1]
        x_q_adv, x_k_adv = self.attack(x_q, x_k)

        # CCC: clean query, clean key, clean bank
        q = self.embed(x_q, CLEAN)
        with torch.no_grad():
            k = self.key_of(x_k, CLEAN)
        self._store(self.queue_clean, k)
        loss_c = self._nce(q, k, self.queue_clean)

        # the adversarial term
        q_a = self.embed(x_q_adv, ADV)
        with torch.no_grad():
            if self.adversarial_key:
                k_a = self.key_of(x_k_adv, ADV)
                self._store(self.queue_adv, k_a)
            else:
                k_a = k
                if self.variant == "aca" and not self.options.official_aca_queue:
                    # ACA_PLUS: the momentum encoding of the adversarial query fills queue_adv
                    self._store(self.queue_adv, self.key_of(x_q_adv, ADV))
        loss_a = self._nce(q_a, k_a, self.negatives_bank)

        lev = self.options.leverage
        loss = lev * loss_c + (1.0 - lev) * loss_a
        return loss, {"loss_clean": loss_c.detach(), "loss_adv": loss_a.detach()}

    def after_optimizer_step(self) -> None:
        for bank, keys in self._pending:
            bank.enqueue(keys)
        self._pending.clear()
        self.key.update_(self.encoder_q, self.head_q)
