"""The evaluation protocols and their schedules.

SLF (standard linear finetuning): a linear head on the frozen encoder, clean (augmented) data.
ALF (adversarial linear finetuning): the same head trained on PGD-10 examples of the whole model.
AFF (adversarial full finetuning): every weight fine-tuned with TRADES (beta 6, 10 attack steps),
    the head zero-initialised, as ACL's train_trades.py.

The CIFAR schedules are the official ones: SLF/ALF follow AdvCL's finetuning_advCL_SLF.py (SGD lr 0.01,
momentum 0.9, wd 2e-4, batch 512, 25 epochs, lr /10 at 15 and 20), AFF follows ACL's train_trades.py
(SGD lr 0.1, momentum 0.9, wd 2e-4, batch 128, 25 epochs with decay at 15 and 20; ``aff_long`` is its
README's 100 epochs with decay at 40 and 60). The digits schedules are shortened for a 2-core CPU and use no augmentation (see _DIGITS).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from advfast.config import closest

PROTOCOLS = ("slf", "alf", "aff")


@dataclass
class ProtocolConfig:
    protocol: str
    epochs: int
    batch_size: int
    lr: float
    milestones: tuple[int, ...]
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    # attack used to make training examples (ALF: PGD on CE; AFF: TRADES KL)
    train_eps: float = 8 / 255
    train_alpha: float = 2 / 255
    train_steps: int = 10
    trades_beta: float = 6.0
    augment: str = "finetune"
    # AFF only: the RobustSSL benchmark's trades_loss_dual (--dualBN 1): the natural term through BN branch
    # 'normal', the attack and the adversarial term through the evaluated branch ('pgd')
    dual_bn: bool = False

    @property
    def frozen_encoder(self) -> bool:
        return self.protocol in ("slf", "alf")

    @property
    def adversarial(self) -> bool:
        return self.protocol in ("alf", "aff")


_CIFAR = {
    "slf": ProtocolConfig("slf", epochs=25, batch_size=512, lr=0.01, milestones=(15, 20)),
    "alf": ProtocolConfig("alf", epochs=25, batch_size=512, lr=0.01, milestones=(15, 20)),
    "aff": ProtocolConfig("aff", epochs=25, batch_size=128, lr=0.1, milestones=(15, 20)),
    "aff_long": ProtocolConfig("aff", epochs=100, batch_size=128, lr=0.1, milestones=(40, 60)),
}

# Digits: 1438 training images; a linear head converges in a few dozen epochs at these sizes. No
# augmentation: digits are not flip-invariant, and a 4-pixel pad-crop shifts a 16x16 digit by a quarter
# of its width (with CIFAR's pad-crop + flip, SLF on a SimCLR encoder reached 57% instead of 95%).
_DIGITS = {
    "slf": ProtocolConfig("slf", epochs=30, batch_size=128, lr=0.1, milestones=(20, 25), augment="none"),
    "alf": ProtocolConfig("alf", epochs=30, batch_size=128, lr=0.1, milestones=(20, 25), augment="none"),
    "aff": ProtocolConfig("aff", epochs=10, batch_size=128, lr=0.05, milestones=(6, 8), augment="none"),
}


def protocol_preset(protocol: str, dataset: str, **overrides) -> ProtocolConfig:
    """The schedule for ``protocol`` on ``dataset`` with field overrides applied."""
    table = _DIGITS if dataset == "digits" else _CIFAR
    if protocol not in table:
        raise ValueError(f"unknown protocol {protocol!r}{closest(protocol, table)}; choose from {', '.join(table)}")
    cfg = dataclasses.replace(table[protocol])
    names = {f.name for f in dataclasses.fields(ProtocolConfig)}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"unknown protocol setting {key!r}{closest(key, names)}")
        setattr(cfg, key, value)
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ValueError(f"protocol {protocol}: epochs, batch_size and lr must be positive, got "
                         f"{cfg.epochs}, {cfg.batch_size}, {cfg.lr}")
    return cfg
