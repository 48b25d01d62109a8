"""sync_bn: every BN branch becomes its own SyncBatchNorm, with nothing else changed."""

import copy

import pytest
import torch
from torch import nn

from advfast.engine import distributed
from advfast.models import build_encoder, build_head


class _EncoderAndHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = build_encoder("convnet", bn_branches=("normal", "pgd"))
        self.head = build_head("acl", self.encoder.feat_dim, ("normal", "pgd"), hidden=32)

    def forward(self, x, branch):
        return self.head(self.encoder(x, branch), branch)


def _bn_layers(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_every_branch_becomes_its_own_syncbn_and_computes_the_same_in_one_process():
    plain = _EncoderAndHead()
    synced = copy.deepcopy(plain)
    keys = list(plain.state_dict())
    distributed.convert_sync_bn(synced, torch.device("cpu"))
    layers = _bn_layers(synced)
    assert layers and all(isinstance(m, nn.SyncBatchNorm) for m in layers)
    assert len(layers) == len(_bn_layers(plain))  # one SyncBN per branch, none merged
    assert list(synced.state_dict()) == keys  # checkpoints and exports keep their keys

    x = torch.rand(8, 3, 16, 16)
    for branch in ("pgd", "normal", "pgd"):
        torch.testing.assert_close(synced(x, branch), plain(x, branch), rtol=0, atol=0)
    for (name, a), b in zip(plain.state_dict().items(), synced.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    # a forward on "pgd" leaves the "normal" statistics alone after the conversion too
    normal = {k: v.clone() for k, v in synced.state_dict().items() if ".normal." in k}
    synced(torch.rand(8, 3, 16, 16), "pgd")
    assert normal and all(torch.equal(v, synced.state_dict()[k]) for k, v in normal.items())


def test_sync_bn_on_cpu_ranks_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(distributed, "is_active", lambda: True)
    with pytest.raises(ValueError, match="needs CUDA GPUs"):
        distributed.convert_sync_bn(_EncoderAndHead(), torch.device("cpu"))
