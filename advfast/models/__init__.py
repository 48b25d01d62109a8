"""Encoders (CIFAR ResNet-18/50, WRN-34-10, a small convnet), multi-branch BatchNorm, projection heads.

    encoder = build_encoder("resnet18", bn_branches=("normal", "pgd"), mean=ds.mean, std=ds.std)
    head = build_head("acl", encoder.feat_dim, bn_branches=("normal", "pgd"))
    z = head(encoder(x, "pgd"), "pgd")
    plain = to_single_branch(encoder, "pgd")          # single-BN copy for evaluation / export
    state = single_branch_state_dict(encoder, "pgd")  # torchvision-style keys
"""

from advfast.models.compiled import compile_encoder
from advfast.models.encoder import Encoder, available_archs, build_encoder, to_single_branch
from advfast.models.heads import HEAD_KINDS, ProjectionHead, build_head
from advfast.models.multibn import (BranchSwitch, MultiBatchNorm1d, MultiBatchNorm2d, load_single_branch,
                                    make_bn, single_branch_state_dict)
from advfast.models.normalize import NormalizeByChannelMeanStd

__all__ = [
    "compile_encoder", "Encoder", "available_archs", "build_encoder", "to_single_branch",
    "HEAD_KINDS", "ProjectionHead", "build_head",
    "BranchSwitch", "MultiBatchNorm1d", "MultiBatchNorm2d", "load_single_branch", "make_bn",
    "single_branch_state_dict",
    "NormalizeByChannelMeanStd",
]
