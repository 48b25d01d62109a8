"""The solo-learn CIFAR ResNet-18 (DeACL's and solo-learn's backbone) as an advfast encoder.

solo-learn replaces torchvision's stem for CIFAR by ``Conv2d(3, 64, 3, stride=1, padding=2)``
(solo/methods/base.py), so its feature maps are 34x34, then 17, 9, 5: the weights have the same
shapes as advfast's ResNet-18 but a padding-1 stem would compute something else. This registers
the variant as the arch "resnet18_solo" (importing advfast.interop registers it).
"""

from __future__ import annotations

import torch
from torch import nn

from advfast.models.encoder import register_arch
from advfast.models.resnet import ResNet18


@register_arch("resnet18_solo")
class SoloResNet18(ResNet18):
    """advfast's CIFAR ResNet-18 with solo-learn's padding-2 stem."""

    def __init__(self, bn_branches=("normal",), mean=None, std=None, in_channels=None):
        super().__init__(bn_branches, mean, std, in_channels)
        weight = self.conv1.weight
        self.conv1 = nn.Conv2d(self.in_channels, 64, kernel_size=3, stride=1, padding=2, bias=False)
        with torch.no_grad():  # keep the kaiming init the parent drew
            self.conv1.weight.copy_(weight)
