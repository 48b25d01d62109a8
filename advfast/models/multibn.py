"""Multi-branch BatchNorm: one BatchNorm per named branch, every other layer shared.

Adversarial contrastive methods keep separate normalisation statistics for clean and adversarial
inputs (ACL's dual BN, AMOC's TriggerBN, AdvCL's three branches). A model built with more than one
branch holds a :class:`MultiBatchNorm1d`/:class:`MultiBatchNorm2d` wherever a BatchNorm would be;
the model's ``forward(x, branch)`` switches all of them at once through a :class:`BranchSwitch`
(a tuple of its multi-branch BNs gathered at construction), so no branch name is threaded through
the layers and the blocks stay plain ``nn.Sequential``-friendly modules. A single-branch model uses
plain ``nn.BatchNorm`` (:func:`make_bn` decides), with no switching cost at all.

State-dict keys of a multi-branch BN are ``<prefix>.bns.<branch>.<field>``;
:func:`single_branch_state_dict` maps one branch back to plain ``<prefix>.<field>`` keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn


def check_branches(branches) -> tuple[str, ...]:
    """Validate a sequence of branch names and return it as a tuple."""
    if isinstance(branches, str):
        raise TypeError(f"bn_branches must be a sequence of names such as ('normal', 'pgd'), got the string {branches!r}")
    branches = tuple(branches)
    if not branches:
        raise ValueError("bn_branches must name at least one branch, e.g. ('normal',)")
    for name in branches:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"bn_branches: {name!r} is not a valid branch name (letters, digits and _, e.g. 'pgd_ce')")
    if len(set(branches)) != len(branches):
        raise ValueError(f"bn_branches has duplicates: {branches}")
    return branches


class _MultiBatchNorm(nn.Module):
    _bn_cls: type[nn.Module]

    def __init__(self, num_features: int, branches, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True):
        super().__init__()
        self.branches = check_branches(branches)
        self.num_features = num_features
        bns = {}
        for name in self.branches:
            bns[name] = self._bn_cls(num_features, eps=eps, momentum=momentum, affine=affine,
                                     track_running_stats=track_running_stats)
        try:
            self.bns = nn.ModuleDict(bns)
        except KeyError as exc:  # a name that shadows a ModuleDict method, e.g. 'keys'
            raise ValueError(f"bn_branches: {exc.args[0]}; rename that branch") from None
        self.active = self.branches[0]

    def forward(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        # ``branch`` given: use it for this call only; else the one the owning model selected.
        return self.bns[self.active if branch is None else branch](x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, branches={self.branches}, active={self.active!r}"


class MultiBatchNorm1d(_MultiBatchNorm):
    """One ``nn.BatchNorm1d`` per named branch."""

    _bn_cls = nn.BatchNorm1d


class MultiBatchNorm2d(_MultiBatchNorm):
    """One ``nn.BatchNorm2d`` per named branch."""

    _bn_cls = nn.BatchNorm2d


def make_bn(num_features: int, branches, dim: int = 2) -> nn.Module:
    """Plain BatchNorm for one branch (no overhead), a multi-branch BN for several."""
    branches = check_branches(branches)
    if dim not in (1, 2):
        raise ValueError(f"dim must be 1 or 2, got {dim}")
    if len(branches) == 1:
        return nn.BatchNorm2d(num_features) if dim == 2 else nn.BatchNorm1d(num_features)
    return MultiBatchNorm2d(num_features, branches) if dim == 2 else MultiBatchNorm1d(num_features, branches)


class BranchSwitch:
    """Selects the active branch of every multi-branch BN inside one model.

    Built once at the end of the model's constructor; it holds a plain tuple of the model's
    multi-branch BNs (deepcopy of the model copies it consistently, since it lives in the model's
    ``__dict__``). Selecting costs one attribute write per multi-branch BN and nothing for a
    single-branch model.
    """

    def __init__(self, root: nn.Module, branches):
        self.branches = check_branches(branches)
        self.default = self.branches[0]
        self.multi_bns = tuple(m for m in root.modules() if isinstance(m, _MultiBatchNorm))
        for m in self.multi_bns:
            if m.branches != self.branches:
                raise ValueError(f"a multi-branch BN has branches {m.branches}, the model {self.branches}")

    def select(self, branch: str | None) -> None:
        if branch is None:
            branch = self.default
        if branch not in self.branches:
            raise ValueError(f"unknown BN branch {branch!r}; this model has branches {self.branches}")
        for m in self.multi_bns:
            m.active = branch


def _multi_bn_prefixes(module: nn.Module) -> dict[str, tuple[str, ...]]:
    return {name: m.branches for name, m in module.named_modules() if isinstance(m, _MultiBatchNorm)}


def _split_bn_key(key: str, prefixes) -> tuple[str, str, str] | None:
    """(prefix, branch, field) if ``key`` is a multi-branch BN entry, else None."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-2]):
        if part == "bns" and (prefixes is None or ".".join(parts[:i]) in prefixes):
            return ".".join(parts[:i]), parts[i + 1], ".".join(parts[i + 2:])
    return None


def single_branch_state_dict(module, branch: str) -> dict[str, torch.Tensor]:
    """The state dict of ``module`` as a single-BN model of ``branch`` would have it.

    ``module`` is an ``nn.Module`` (its multi-branch BNs are found by type) or a state dict saved
    from one (multi-branch BN entries are recognised by their ``.bns.<branch>.`` segment). Keys come
    out plain and torchvision-style (``bn1.weight``, ``layer1.0.bn2.running_mean``, ...); the other
    branches' entries are dropped; every other entry is passed through. Tensors are not copied.
    """
    if isinstance(module, nn.Module):
        prefixes = _multi_bn_prefixes(module)
        for name, branches in prefixes.items():
            if branch not in branches:
                raise ValueError(f"branch {branch!r} is not one of {branches} (BN at {name or 'the root'!r})")
        state = module.state_dict()
    elif isinstance(module, Mapping):
        prefixes, state = None, module
    else:
        raise TypeError(f"module must be an nn.Module or a state dict, got {type(module).__name__}")
    out: dict[str, torch.Tensor] = {}
    found = prefixes is not None and not prefixes
    for key, value in state.items():
        split = _split_bn_key(key, prefixes)
        if split is None:
            out[key] = value
            continue
        prefix, name, field = split
        if name == branch:
            found = True
            out[f"{prefix}.{field}" if prefix else field] = value
    if not found:
        raise ValueError(f"branch {branch!r} has no BN entries in the given state dict")
    return out


def load_single_branch(target: nn.Module, source, branch: str, strict: bool = True):
    """Load branch ``branch`` of ``source`` (a multi-branch module or its state dict) into
    ``target``, a single-BN model of the same architecture. Returns load_state_dict's result."""
    if not isinstance(target, nn.Module):
        raise TypeError(f"target must be an nn.Module, got {type(target).__name__}")
    return target.load_state_dict(single_branch_state_dict(source, branch), strict=strict)
