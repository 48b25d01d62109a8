"""A small conv-BN-ReLU encoder for fast CPU runs (the digits demo and the test suite).

Four 3x3 conv-BN-ReLU layers (two with stride 2) and a global average pool; works at any input
size from 8x8 (scikit-learn digits) up. About 0.26M parameters at the default widths.
"""

from __future__ import annotations

from torch import nn

from advfast.models.encoder import Encoder, register_arch
from advfast.models.multibn import make_bn


@register_arch("convnet")
class ConvNet(Encoder):
    def __init__(self, bn_branches=("normal",), mean=None, std=None, in_channels=None,
                 widths=(32, 64, 128, 128), strides=(2, 2, 2, 1)):
        super().__init__(bn_branches, mean, std, in_channels)
        widths, strides = tuple(int(w) for w in widths), tuple(int(s) for s in strides)
        if len(widths) != len(strides) or not widths or min(widths) < 1 or min(strides) < 1:
            raise ValueError(f"widths and strides must be equally long lists of positive ints, got {widths} and {strides}")
        in_planes = self.in_channels
        for i, (width, stride) in enumerate(zip(widths, strides)):
            self.add_module(f"conv{i + 1}", nn.Conv2d(in_planes, width, 3, stride=stride, padding=1, bias=False))
            self.add_module(f"bn{i + 1}", make_bn(width, self.branches))
            in_planes = width
        self.num_layers = len(widths)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # names, not module references: a later module swap (e.g. SyncBatchNorm) must take effect
        self._layer_names = tuple((f"conv{i + 1}", f"bn{i + 1}") for i in range(self.num_layers))
        self._finish(in_planes)

    def features(self, x):
        for conv, bn in self._layer_names:
            x = self.relu(getattr(self, bn)(getattr(self, conv)(x)))
        return self.avgpool(x).flatten(1)
