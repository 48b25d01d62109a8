"""Projection heads as each method's official code builds them.

| kind      | layers (in = encoder feat_dim)                                       | official code            |
| --------- | -------------------------------------------------------------------- | ------------------------ |
| "acl"     | fc1 in->h (bias), BN, ReLU, fc2 h->h (no bias), BN, ReLU, fc3 h->h    | ACL proj_head, h = 512   |
|           | (no bias), BN; BN per branch; ``num_layers=2`` drops fc3 (twoLayerProj)|                          |
| "amoc"    | Linear(in, h) - ReLU - Linear(h, 128), no BN                         | AMOC projector, h = 512  |
| "advcl"   | Linear(in, h) - BN (one, shared by all branches) - ReLU - Linear(h,128)| AdvCL head_proj, h = 512 |
| "rocl"    | Linear(in, h) - ReLU - Linear(h, 128), no BN                         | RoCL projector, h = 2048 |
| "moco_v1" | Linear(in, 128)                                                      | MoCo v1                  |
| "moco_v2" | Linear(in, h) - ReLU - Linear(h, 128)                                | MoCo v2, h = in          |
| "simclr"  | Linear(in, h, no bias) - BN (per branch) - ReLU - Linear(h, 128)     | SimCLR, h = in           |

``hidden`` (h) and ``out_dim`` can be overridden, e.g. to scale the heads down for the small
convnet. Outputs are not L2-normalised (AdvCL's head normalises; its method does that in the loss).
AdvCL's pseudo-label classifiers (Linear(feat_dim, K) per K) are plain nn.Linear owned by the method.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from advfast.models.multibn import BranchSwitch, check_branches, make_bn

# kind -> (default hidden width or None for "in_dim", default out_dim or None for "hidden")
_DEFAULTS = {
    "acl": (512, None),
    "amoc": (512, 128),
    "advcl": (512, 128),
    "rocl": (2048, 128),
    "moco_v1": (None, 128),
    "moco_v2": (None, 128),
    "simclr": (None, 128),
}
HEAD_KINDS = tuple(_DEFAULTS)


class ProjectionHead(nn.Sequential):
    """A sequence of named layers (fc1, bn1, relu1, ...) with a BN branch chosen per call."""

    def __init__(self, kind: str, layers: OrderedDict, branches, out_dim: int):
        super().__init__(layers)
        self.kind = kind
        self.branches = check_branches(branches)
        self.out_dim = out_dim
        self._branch_switch = BranchSwitch(self, self.branches)

    def forward(self, h: torch.Tensor, branch: str | None = "normal") -> torch.Tensor:
        if branch == "normal" and "normal" not in self.branches:
            branch = None
        self._branch_switch.select(branch)
        for layer in self:
            h = layer(h)
        return h


def _mlp(in_dim: int, hidden: int, out_dim: int, bn_branches=None, first_bias: bool = True) -> OrderedDict:
    layers = OrderedDict(fc1=nn.Linear(in_dim, hidden, bias=first_bias))
    if bn_branches is not None:
        layers["bn1"] = make_bn(hidden, bn_branches, dim=1)
    layers["relu1"] = nn.ReLU(inplace=True)
    layers["fc2"] = nn.Linear(hidden, out_dim)
    return layers


def build_head(kind: str, in_dim: int, bn_branches=("normal",), hidden: int | None = None,
               out_dim: int | None = None, num_layers: int | None = None) -> ProjectionHead:
    """Build projection head ``kind`` (see the module table) on ``in_dim``-d encoder features."""
    if kind not in _DEFAULTS:
        from advfast.config import closest
        raise ValueError(f"unknown head kind {kind!r}{closest(kind, _DEFAULTS)}; choose from {', '.join(HEAD_KINDS)}")
    branches = check_branches(bn_branches)
    if not isinstance(in_dim, int) or in_dim < 1:
        raise ValueError(f"in_dim must be a positive int (the encoder's feat_dim), got {in_dim!r}")
    default_hidden, default_out = _DEFAULTS[kind]
    hidden = int(hidden if hidden is not None else (default_hidden or in_dim))
    if num_layers is not None and kind != "acl":
        raise ValueError(f"num_layers applies to the 'acl' head only, not {kind!r}")
    if kind == "acl" and out_dim is not None and out_dim != hidden:
        raise ValueError("the 'acl' head's output width is its hidden width; set hidden, not out_dim")
    out_dim = hidden if kind == "acl" else int(out_dim if out_dim is not None else default_out)
    if min(hidden, out_dim) < 1:
        raise ValueError(f"hidden and out_dim must be positive, got {hidden} and {out_dim}")
    if kind == "acl":
        num_layers = 3 if num_layers is None else num_layers
        if num_layers not in (2, 3):
            raise ValueError(f"num_layers for the 'acl' head must be 2 or 3 (twoLayerProj), got {num_layers}")
        layers = OrderedDict(fc1=nn.Linear(in_dim, hidden), bn1=make_bn(hidden, branches, dim=1),
                             relu1=nn.ReLU(inplace=True), fc2=nn.Linear(hidden, hidden, bias=False),
                             bn2=make_bn(hidden, branches, dim=1))
        if num_layers == 3:
            layers.update(relu2=nn.ReLU(inplace=True), fc3=nn.Linear(hidden, hidden, bias=False),
                          bn3=make_bn(hidden, branches, dim=1))
    else:
        if kind == "moco_v1":
            layers = OrderedDict(fc1=nn.Linear(in_dim, out_dim))
        elif kind in ("amoc", "rocl", "moco_v2"):
            layers = _mlp(in_dim, hidden, out_dim)
        elif kind == "advcl":  # one BN shared by every branch, as AdvCL's head_proj
            layers = _mlp(in_dim, hidden, out_dim, bn_branches=("shared",))
        else:  # simclr
            layers = _mlp(in_dim, hidden, out_dim, bn_branches=branches, first_bias=False)
    head = ProjectionHead(kind, layers, branches, out_dim)
    head.build_args = dict(kind=kind, in_dim=in_dim, bn_branches=branches, hidden=hidden,
                           out_dim=out_dim if kind != "acl" else None, num_layers=num_layers)
    return head
