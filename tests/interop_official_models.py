"""Transcriptions of the official model classes whose checkpoints advfast.interop imports (test helper).

Each class keeps the official module names (so state-dict keys are the official ones) and forward
code. Sources: ACL/DynACL/RobustSSL models/resnet_multi_bn.py (batch_norm_multiple, Downsample_multiple,
proj_head, resnet18_momentum), AdvCL models/resnet_cifar_multibn_ensembleFC.py (no normalisation, heads),
the RobustSSL benchmark's / DeACL's torchvision-style models/resnet.py (+ solo-learn's padding-2 CIFAR
stem), AMOC models/resnet.py + models/base.py (TriggerBN2d), RoCL src/models/resnet.py (kuangliu).
Unused options (groups, dilation, Bottleneck) are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import contextlib

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class NormalizeByChannelMeanStd(nn.Module):  # ACL utils.py / RobustSSL utils.py
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, tensor):
        return tensor.sub(self.mean[None, :, None, None]).div(self.std[None, :, None, None])


# ---- ACL / DynACL / RobustSSL resnet_multi_bn.py, AdvCL resnet_cifar_multibn_ensembleFC.py -------------

class batch_norm_multiple(nn.Module):
    def __init__(self, norm, inplanes, bn_names=None):
        super().__init__()
        self.bn_names = bn_names
        if self.bn_names is None:
            self.bn_list = norm(inplanes)
            return
        self.bn_list = nn.ModuleList([norm(inplanes) for _ in range(len(bn_names))])
        self.bn_names_dict = {bn_name: i for i, bn_name in enumerate(bn_names)}

    def forward(self, x):
        out, name_bn = x[0], x[1]
        if name_bn is None:
            return self.bn_list(out)
        return self.bn_list[self.bn_names_dict[name_bn]](out)


class MultiBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, bn_names=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = batch_norm_multiple(nn.BatchNorm2d, planes, bn_names=bn_names)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = batch_norm_multiple(nn.BatchNorm2d, planes, bn_names=bn_names)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out, bn_name = x[0], x[1]
        out = self.relu(self.bn1([self.conv1(out), bn_name]))
        out = self.bn2([self.conv2(out), bn_name])
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity[0]
        return [self.relu(out), bn_name]


class Downsample_multiple(nn.Module):
    def __init__(self, inplanes, planes, expansion, stride, bn_names=None):
        super().__init__()
        self.conv = conv1x1(inplanes, planes * expansion, stride)
        self.bn = batch_norm_multiple(nn.BatchNorm2d, planes * expansion, bn_names=bn_names)

    def forward(self, x):
        return [self.bn([self.conv(x[0]), x[1]]), x[1]]


class proj_head(nn.Module):  # ACL's 3-layer dual-BN projection head, stored as model.fc
    def __init__(self, ch, bn_names=None):
        super().__init__()
        self.fc1 = nn.Linear(ch, ch)
        self.bn1 = batch_norm_multiple(nn.BatchNorm1d, ch, bn_names)
        self.fc2 = nn.Linear(ch, ch, bias=False)
        self.bn2 = batch_norm_multiple(nn.BatchNorm1d, ch, bn_names)
        self.fc3 = nn.Linear(ch, ch, bias=False)
        self.bn3 = batch_norm_multiple(nn.BatchNorm1d, ch, bn_names)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, bn_name):
        x = self.relu(self.bn1([self.fc1(x), bn_name]))
        x = self.relu(self.bn2([self.fc2(x), bn_name]))
        return self.bn3([self.fc3(x), bn_name])


class MultiBNResNet18(nn.Module):
    """ACL's ResNet (normalize=True, fc = proj_head) or AdvCL's (normalize=False, fc_* and head_* heads)."""

    def __init__(self, bn_names, normalize=True, heads="acl", num_classes=10):
        super().__init__()
        if normalize:
            self.normalize = NormalizeByChannelMeanStd(mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.do_normalize = normalize
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = batch_norm_multiple(nn.BatchNorm2d, 64, bn_names=bn_names)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(64, 2, 1, bn_names)
        self.layer2 = self._make_layer(128, 2, 2, bn_names)
        self.layer3 = self._make_layer(256, 2, 2, bn_names)
        self.layer4 = self._make_layer(512, 2, 2, bn_names)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        if heads == "acl":
            self.fc = proj_head(512, bn_names)
        elif heads == "advcl":
            for k in (2, 10, 50, 100, 500):
                setattr(self, f"fc_{k:03d}", nn.Linear(512, k))
            self.head_ce = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                         nn.Linear(512, 1000))
            self.head_proj = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                           nn.Linear(512, 128))
            self.head_pred = nn.Sequential(nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                           nn.Linear(128, 128))
        else:  # the benchmark's fine-tuning model
            self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, planes, blocks, stride, bn_names):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = Downsample_multiple(self.inplanes, planes, 1, stride, bn_names=bn_names)
        layers = [MultiBasicBlock(self.inplanes, planes, stride, downsample, bn_names=bn_names)]
        self.inplanes = planes
        layers += [MultiBasicBlock(planes, planes, bn_names=bn_names) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x, bn_name=None, return_features=True):
        if self.do_normalize:
            x = self.normalize(x)
        x = self.relu(self.bn1([self.conv1(x), bn_name]))
        x = self.layer4(self.layer3(self.layer2(self.layer1([self.maxpool(x), bn_name]))))
        return torch.flatten(self.avgpool(x[0]), 1)


class resnet18_momentum(nn.Module):  # DynACL
    def __init__(self, **kwargs):
        super().__init__()
        self.encoder_q = MultiBNResNet18(**kwargs)
        self.encoder_k = MultiBNResNet18(**kwargs)

    def forward(self, x, bn_name=None):
        return self.encoder_k(x, bn_name)


# ---- torchvision-style single-BN ResNet: RobustSSL models/resnet.py, DeACL, solo-learn -----------------

class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchvisionResNet18(nn.Module):
    """``mean``/``std``: normalisation inside (None: none); ``cifar_stem_padding`` 1 (benchmark) or 2
    (solo-learn: ``backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)``)."""

    def __init__(self, mean=None, std=None, cifar_stem_padding=1, num_classes=None):
        super().__init__()
        self.inplanes = 64
        if mean is not None:
            self.normalize = NormalizeByChannelMeanStd(mean=mean, std=std)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=cifar_stem_padding, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(64, 2, 1)
        self.layer2 = self._make_layer(128, 2, 2)
        self.layer3 = self._make_layer(256, 2, 2)
        self.layer4 = self._make_layer(512, 2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity() if num_classes is None else nn.Linear(512, num_classes)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x, return_features=True):
        if hasattr(self, "normalize"):
            x = self.normalize(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return x if return_features else self.fc(x)


# ---- AMOC models/base.py + models/resnet.py ---------------------------------------------------------------

class AdversarialDefensiveModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.adv_training = False

    def adv_train(self, mode=True):
        self.adv_training = mode
        for module in self.children():
            if isinstance(module, AdversarialDefensiveModel):
                module.adv_train(mode)


class Sequential(nn.Sequential, AdversarialDefensiveModel):
    pass


class TriggerBN2d(AdversarialDefensiveModel):
    def __init__(self, num_features):
        super().__init__()
        self.bn_clean = nn.BatchNorm2d(num_features)
        self.bn_adv = nn.BatchNorm2d(num_features)

    def forward(self, x):
        return self.bn_adv(x) if self.adv_training else self.bn_clean(x)


class AmocBasicBlock(AdversarialDefensiveModel):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = TriggerBN2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = TriggerBN2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class AmocResNet18(AdversarialDefensiveModel):
    def __init__(self):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = TriggerBN2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(64, 2, 1)
        self.layer2 = self._make_layer(128, 2, 2)
        self.layer3 = self._make_layer(256, 2, 2)
        self.layer4 = self._make_layer(512, 2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = Sequential(conv1x1(self.inplanes, planes, stride), TriggerBN2d(planes))
        layers = [AmocBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [AmocBasicBlock(planes, planes) for _ in range(1, blocks)]
        return Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class AmocMoCo(AdversarialDefensiveModel):  # models/builder.py: what save_checkpoint stores under "model"
    def __init__(self):
        super().__init__()
        self.encoder_q, self.encoder_k = AmocResNet18(), AmocResNet18()
        self.projector_q = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, 128))
        self.projector_k = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, 128))
        self.register_buffer("queue_clean", F.normalize(torch.randn(128, 64), dim=0))
        self.register_buffer("queue_adv", F.normalize(torch.randn(128, 64), dim=0))


# ---- RoCL src/models/resnet.py (kuangliu) -----------------------------------------------------------------

class RoclBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class RoclResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_planes = 64
        self.conv1 = conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, 2, 1)
        self.layer2 = self._make_layer(128, 2, 2)
        self.layer3 = self._make_layer(256, 2, 2)
        self.layer4 = self._make_layer(512, 2, 2)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(RoclBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return out.view(out.size(0), -1)


class RoclProjector(nn.Module):  # src/models/projector.py
    def __init__(self):
        super().__init__()
        self.linear_1 = nn.Linear(512, 2048)
        self.linear_2 = nn.Linear(2048, 128)


@contextlib.contextmanager
def no_default_init():
    """Skip conv/linear default initialisation while building (``randomize`` overwrites every weight;
    a ResNet-18's kaiming init is most of its build time on a CPU)."""
    saved = nn.Linear.reset_parameters, nn.modules.conv._ConvNd.reset_parameters
    nn.Linear.reset_parameters = nn.modules.conv._ConvNd.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.modules.conv._ConvNd.reset_parameters = saved


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics everywhere (so each BN branch computes something different), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or name.endswith(("normalize.mean", "normalize.std")) or "queue" in name:
                continue
            if t.dim() > 1:  # conv / linear: He scale
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("weight"):  # BN scale
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            else:  # BN shift, running mean, linear bias
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()  # inference: BN uses the (random) running statistics
