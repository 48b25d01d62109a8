"""WideResNet-34-10 as in TRADES (pre-activation blocks, widths 16-160-320-640, no dropout).

Parameter names follow the TRADES code (conv1, block1.layer.0.bn1, ..., convShortcut, final bn1)
so single-branch state dicts line up with TRADES-style checkpoints. TRADES also builds an unused
``sub_block1``; it is left out here (unused parameters break DDP and waste optimiser work), and
there is no fc layer. The final pooling is adaptive (an 8x8 average at 32x32, as in TRADES).
"""

from __future__ import annotations

import math

from torch import nn

from advfast.models.encoder import Encoder, register_arch
from advfast.models.multibn import make_bn


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, branches):
        super().__init__()
        self.bn1 = make_bn(in_planes, branches)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = make_bn(out_planes, branches)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        # pre-activation: when the width changes the shortcut also takes the activated input
        shortcut = x if self.equal_in_out else self.convShortcut(act)
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, depth: int, in_planes: int, out_planes: int, stride: int, branches):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, branches)
            for i in range(depth)])

    def forward(self, x):
        return self.layer(x)


@register_arch("wrn34_10")
class WideResNet34x10(Encoder):
    depth = 34
    widen = 10

    def __init__(self, bn_branches=("normal",), mean=None, std=None, in_channels=None):
        super().__init__(bn_branches, mean, std, in_channels)
        n = (self.depth - 4) // 6
        widths = (16, 16 * self.widen, 32 * self.widen, 64 * self.widen)
        self.conv1 = nn.Conv2d(self.in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, self.branches)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, self.branches)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, self.branches)
        self.bn1 = make_bn(widths[3], self.branches)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # TRADES: N(0, sqrt(2 / (k*k*out_channels)))
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        self._finish(widths[3])

    def features(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.avgpool(x).flatten(1)
