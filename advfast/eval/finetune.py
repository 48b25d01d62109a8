"""Fine-tuning a classifier on top of a pre-trained encoder: SLF, ALF and AFF (TRADES)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from advfast.attacks import pgd
from advfast.attacks.trades import gaussian_start, trades_ascent, trades_examples
from advfast.eval.protocols import ProtocolConfig
from advfast.losses.trades import trades_loss


class Classifier(nn.Module):
    """``head(encoder(x, branch))``. With ``frozen=True`` the encoder's weights take no gradient and
    its BatchNorm statistics never move: it stays in eval mode whatever ``.train()`` says."""

    def __init__(self, encoder: nn.Module, num_classes: int, branch: str = "normal", frozen: bool = True,
                 zero_init_head: bool = True, natural_branch: str | None = None):
        super().__init__()
        self.encoder = encoder
        self.branch = branch
        # dual-BN AFF (the RobustSSL benchmark's trades_loss_dual): clean inputs go through this branch
        # during fine-tuning; ``branch`` is the one attacked, trained on adversarial inputs and scored
        self.natural_branch = natural_branch
        self.frozen = frozen
        self.head = nn.Linear(encoder.feat_dim, num_classes)
        if zero_init_head:  # as ACL's and AMOC's finetuning scripts
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        if frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, self.branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def logits(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        """The head on the features of BN branch ``branch``."""
        return self.head(self.encoder(x, branch))

    def trainable_parameters(self):
        return list(self.head.parameters()) if self.frozen else list(self.parameters())


@dataclass
class FinetuneLog:
    epochs: list[dict] = field(default_factory=list)


def ce_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
              norm: str = "linf", generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD on the summed cross-entropy, model in eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        return pgd(lambda z: F.cross_entropy(model(z), y, reduction="sum"), x, eps=eps, alpha=alpha,
                   steps=steps, norm=norm, random_start=True, generator=generator)
    finally:
        model.train(was_training)


def trades_examples_dual(model: Classifier, x: torch.Tensor, eps: float, alpha: float, steps: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The inner maximisation of the RobustSSL benchmark's trades_loss_dual (utils.py): start at
    x + 0.001 N(0, 1), ascend KL(p_pgd(x') || p_normal(x)) (summed) in eval mode, where p_pgd runs BN branch
    ``model.branch`` and p_normal ``model.natural_branch``."""
    was_training = model.training
    model.eval()
    try:  # eval mode: the code's per-step recomputation of the target gives the one computed once
        return trades_ascent(lambda v: model.logits(v, model.natural_branch), lambda v: model.logits(v, model.branch),
                             x, gaussian_start(x, 0.001, generator), eps, alpha, steps)
    finally:
        model.train(was_training)


def _lr_at(cfg: ProtocolConfig, epoch: int) -> float:
    return cfg.lr * (0.1 ** sum(epoch >= m for m in cfg.milestones))


def finetune(model: Classifier, loader, cfg: ProtocolConfig, progress=None,
             generator: torch.Generator | None = None) -> FinetuneLog:
    """Train ``model`` with the protocol in ``cfg``; ``loader`` yields batches with ``views[0]``
    (images in [0, 1]) and ``labels``. Returns per-epoch mean loss and training accuracy."""
    if cfg.dual_bn and (cfg.protocol != "aff" or not model.natural_branch):
        raise ValueError("dual-BN fine-tuning is AFF with a classifier that has a natural branch "
                         "(Classifier(..., natural_branch='normal'))")
    params = model.trainable_parameters()
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov)
    log = FinetuneLog()
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=_device_of(model))
        correct = torch.zeros((), device=_device_of(model))
        seen = 0
        for batch in loader:
            x, y = batch.views[0], batch.labels
            if cfg.protocol == "alf":
                x = ce_attack(model, x, y, cfg.train_eps, cfg.train_alpha, cfg.train_steps, generator=generator)
            if cfg.protocol == "aff" and cfg.dual_bn:
                x_adv = trades_examples_dual(model, x, cfg.train_eps, cfg.train_alpha, cfg.train_steps, generator)
                logits = model.logits(x, model.natural_branch)
                loss = trades_loss(logits, model.logits(x_adv, model.branch), y, cfg.trades_beta)
            elif cfg.protocol == "aff":
                x_adv = trades_examples(model, x, cfg.train_eps, cfg.train_alpha, cfg.train_steps, generator)
                logits = model(x)
                loss = trades_loss(logits, model(x_adv), y, cfg.trades_beta)
            else:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * y.numel()
            correct += (logits.argmax(1) == y).sum()
            seen += y.numel()
        record = {"epoch": epoch + 1, "lr": _lr_at(cfg, epoch),
                  "loss": float(loss_sum) / max(seen, 1), "train_acc": float(correct) / max(seen, 1)}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"{cfg.protocol}: the fine-tuning loss became {record['loss']} in epoch "
                                     f"{epoch + 1}; lower the learning rate (--set lr=...)")
        log.epochs.append(record)
        if progress is not None:
            progress(record)
    model.eval()
    return log


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
