"""The encoder base class and ``build_encoder``.

An encoder maps images in [0, 1] to features: ``encoder(x, branch) -> (B, encoder.feat_dim)``.
It normalises its input itself when built with mean/std, and selects the BN branch of every
multi-branch BatchNorm it holds before running (see :mod:`advfast.models.multibn`).
"""

from __future__ import annotations

import torch
from torch import nn

from advfast.models.multibn import BranchSwitch, check_branches, load_single_branch
from advfast.models.normalize import NormalizeByChannelMeanStd


class Encoder(nn.Module):
    """Base of every backbone. Subclasses build their layers after ``super().__init__`` and
    define ``features(x)``, then call ``self._finish(feat_dim)`` at the end of their constructor."""

    arch: str = ""

    def __init__(self, bn_branches=("normal",), mean=None, std=None, in_channels: int | None = None):
        super().__init__()
        self.branches = check_branches(bn_branches)
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std for input normalisation, or neither")
        if in_channels is None:
            in_channels = len(mean) if mean is not None else 3
        if mean is not None and len(mean) != in_channels:
            raise ValueError(f"mean has {len(mean)} channels but in_channels is {in_channels}")
        self.in_channels = int(in_channels)
        self.normalize = NormalizeByChannelMeanStd(mean, std) if mean is not None else nn.Identity()
        self.feat_dim = 0

    def _finish(self, feat_dim: int) -> None:
        self.feat_dim = int(feat_dim)
        self._branch_switch = BranchSwitch(self, self.branches)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, branch: str | None = "normal") -> torch.Tensor:
        """Features of ``x`` (images in [0, 1]) through BN branch ``branch``; ``None`` picks
        the first branch (the only one of a single-branch encoder)."""
        if branch == "normal" and "normal" not in self.branches:
            branch = None  # the contract's default name, for encoders whose branches are named otherwise
        self._branch_switch.select(branch)
        return self.features(self.normalize(x))

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, feat_dim={self.feat_dim}, branches={self.branches}"


_ARCHS: dict[str, type[Encoder]] = {}


def register_arch(name: str):
    def deco(cls):
        cls.arch = name
        _ARCHS[name] = cls
        return cls
    return deco


def available_archs() -> tuple[str, ...]:
    _import_archs()
    return tuple(sorted(_ARCHS))


def _import_archs() -> None:
    # the arch modules register themselves on import
    from advfast.models import convnet, resnet, wideresnet  # noqa: F401


def build_encoder(arch: str, bn_branches=("normal",), mean=None, std=None, in_channels: int | None = None,
                  **arch_kwargs) -> Encoder:
    """Build an encoder: "resnet18", "resnet50", "wrn34_10" (CIFAR-style) or "convnet" (small, for CPU).

    ``bn_branches`` names the BN branches (one: plain BatchNorm); ``mean``/``std`` turn on input
    normalisation inside the model; ``in_channels`` defaults to len(mean), else 3. Extra keyword
    arguments go to the architecture (e.g. ``widths`` for the convnet).
    """
    _import_archs()
    if arch not in _ARCHS:
        from advfast.config import closest
        raise ValueError(f"unknown arch {arch!r}{closest(arch, _ARCHS)}; choose from {', '.join(sorted(_ARCHS))}")
    encoder = _ARCHS[arch](bn_branches=bn_branches, mean=mean, std=std, in_channels=in_channels, **arch_kwargs)
    encoder.build_args = dict(arch=arch, bn_branches=tuple(bn_branches), mean=None if mean is None else tuple(mean),
                              std=None if std is None else tuple(std), in_channels=in_channels, **arch_kwargs)
    return encoder


def _rebuild(module: nn.Module, branch: str) -> nn.Module:
    args = getattr(module, "build_args", None)
    if args is None:
        raise TypeError(f"{type(module).__name__} was not made by build_encoder/build_head; build the single-BN "
                        "model yourself and use load_single_branch")
    args = dict(args, bn_branches=(branch,))
    if "arch" in args:
        return build_encoder(**args)
    from advfast.models.heads import build_head
    return build_head(**args)


def to_single_branch(module: nn.Module, branch: str) -> nn.Module:
    """A new single-BN copy of an encoder or head (made by build_encoder/build_head) holding the
    weights and BN statistics of ``branch``; same device, dtype and train/eval mode."""
    if branch not in getattr(module, "branches", ()):
        raise ValueError(f"branch {branch!r} is not one of {getattr(module, 'branches', ())}")
    single = _rebuild(module, branch)
    ref = next(iter(module.state_dict().values()), None)
    if ref is not None:
        single = single.to(device=ref.device)
    param = next(module.parameters(), None)
    if param is not None:
        single = single.to(dtype=param.dtype)
    load_single_branch(single, module, branch, strict=True)
    return single.train(module.training)
