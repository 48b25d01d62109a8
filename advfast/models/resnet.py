"""CIFAR ResNet-18 / ResNet-50: 3x3 stride-1 stem, no max-pool, global average pool.

The layout and parameter names follow torchvision (conv1, bn1, layer1..4, blocks with
conv1/bn1/conv2/bn2[/conv3/bn3] and downsample.0/.1), as the ACL/AMOC/AdvCL code does, so a
single-branch state dict loads into any torchvision-style CIFAR ResNet; there is no fc layer.
"""

from __future__ import annotations

from torch import nn

from advfast.models.encoder import Encoder, register_arch
from advfast.models.multibn import make_bn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _downsample(in_planes: int, out_planes: int, stride: int, branches):
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), make_bn(out_planes, branches))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, branches):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = make_bn(planes, branches)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = make_bn(planes, branches)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes, stride, branches)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, branches):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = make_bn(planes, branches)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = make_bn(planes, branches)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = make_bn(out_planes, branches)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, out_planes, stride, branches)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class CifarResNet(Encoder):
    block: type[nn.Module] = BasicBlock
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    stem_padding: int = 1  # the 3x3 stem's padding (solo-learn's CIFAR stem uses 2)

    def __init__(self, bn_branches=("normal",), mean=None, std=None, in_channels=None):
        super().__init__(bn_branches, mean, std, in_channels)
        branches = self.branches
        self.conv1 = nn.Conv2d(self.in_channels, 64, kernel_size=3, stride=1, padding=self.stem_padding, bias=False)
        self.bn1 = make_bn(64, branches)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), self.depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(self.block(in_planes, planes, stride, branches))
                in_planes = planes * self.block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self._finish(in_planes)

    def features(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


@register_arch("resnet18")
class ResNet18(CifarResNet):
    block = BasicBlock
    depths = (2, 2, 2, 2)


@register_arch("resnet18_solo")
class SoloResNet18(ResNet18):
    """ResNet-18 with solo-learn's CIFAR stem, ``Conv2d(3, 64, 3, stride=1, padding=2)`` (solo/methods/base.py;
    DeACL's and solo-learn's SimCLR backbone): the weights have ResNet-18's shapes, but the feature maps are
    34x34, 17, 9, 5, so a padding-1 stem would compute something else (advfast.interop loads these files)."""

    stem_padding = 2


@register_arch("resnet50")
class ResNet50(CifarResNet):
    block = Bottleneck
    depths = (3, 4, 6, 3)
