"""Encoders, multi-branch BatchNorm, projection heads and single-branch conversion."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advfast.models import (HEAD_KINDS, MultiBatchNorm1d, MultiBatchNorm2d, NormalizeByChannelMeanStd,
                            available_archs, build_encoder, build_head, load_single_branch, single_branch_state_dict,
                            to_single_branch)

BRANCHES = ("normal", "pgd", "pgd_ce")
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _randomise_bn(module: nn.Module) -> None:
    """Give every BN distinct affine parameters and running statistics, so branches differ."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)


def test_archs_listed():
    assert set(available_archs()) == {"resnet18", "resnet18_solo", "resnet50", "wrn34_10", "convnet"}


@pytest.mark.parametrize("arch,feat_dim", [("resnet18", 512), ("convnet", 128)])
@pytest.mark.parametrize("branches", [("normal",), BRANCHES])
def test_output_shape_small_archs(arch, feat_dim, branches):
    enc = build_encoder(arch, branches, MEAN, STD)
    assert enc.feat_dim == feat_dim and enc.branches == branches
    x = torch.rand(3, 3, 32, 32)
    for branch in branches:
        out = enc(x, branch)
        assert out.shape == (3, feat_dim) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch,feat_dim,params_m", [("resnet50", 2048, 23.5), ("wrn34_10", 640, 46.2)])
def test_output_shape_large_archs(arch, feat_dim, params_m):
    enc = build_encoder(arch, ("normal", "pgd")).eval()
    # the single-BN size: every parameter but the second branch's BN affine weights
    single = sum(p.numel() for name, p in enc.named_parameters() if ".bns.pgd." not in name)
    assert abs(single / 1e6 - params_m) < 0.1  # the published sizes (no fc)
    with torch.no_grad():
        out = enc(torch.rand(1, 3, 32, 32), "pgd")
    assert out.shape == (1, feat_dim) and enc.feat_dim == feat_dim


def test_resnet18_torchvision_layout():
    keys = list(build_encoder("resnet18").state_dict())
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                        "bn1.num_batches_tracked"]
    assert "layer2.0.downsample.0.weight" in keys and "layer2.0.downsample.1.running_var" in keys
    assert "layer1.0.downsample.0.weight" not in keys
    assert sum(p.numel() for p in build_encoder("resnet18").parameters()) == 11_168_832  # torchvision resnet18 - fc - 7x7 stem + 3x3 stem
    enc = build_encoder("resnet18", in_channels=1)
    assert enc.conv1.weight.shape == (64, 1, 3, 3)


def test_single_branch_model_uses_plain_batchnorm():
    enc = build_encoder("convnet")
    assert not any(isinstance(m, (MultiBatchNorm1d, MultiBatchNorm2d)) for m in enc.modules())
    assert enc._branch_switch.multi_bns == ()
    head = build_head("acl", 128, ("normal",))
    assert not any(isinstance(m, MultiBatchNorm1d) for m in head.modules())


def test_branches_keep_separate_running_statistics():
    enc = build_encoder("convnet", ("normal", "pgd"), MEAN, STD)
    head = build_head("acl", enc.feat_dim, ("normal", "pgd"), hidden=64)
    model = nn.ModuleDict(dict(enc=enc, head=head))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(8, 3, 16, 16)
    loss = head(enc(x, "pgd"), "pgd").square().mean()
    loss.backward()
    opt.step()
    after = model.state_dict()
    for key, value in after.items():
        if ".bns.normal." in key:
            assert torch.equal(value, before[key]), f"{key} changed by a step on the pgd branch"
        elif ".bns.pgd." in key and ("running_mean" in key or "num_batches_tracked" in key):
            assert not torch.equal(value, before[key]), f"{key} was not updated"
    for name, p in model.named_parameters():
        if ".bns.normal." in name:
            assert p.grad is None
        else:
            assert p.grad is not None, name
    # the two branches now compute different functions; each call uses the branch it names
    model.eval()
    assert not torch.allclose(enc(x, "normal"), enc(x, "pgd"))
    torch.testing.assert_close(enc(x, "normal"), enc(x, "normal"))


def test_unknown_branch_and_bad_names_raise():
    enc = build_encoder("convnet", ("normal", "pgd"))
    with pytest.raises(ValueError, match="unknown BN branch 'adv'"):
        enc(torch.rand(2, 3, 8, 8), "adv")
    with pytest.raises(ValueError, match="valid branch name"):
        build_encoder("convnet", ("normal", "a.b"))
    with pytest.raises(ValueError, match="duplicates"):
        build_encoder("convnet", ("normal", "normal"))
    with pytest.raises(TypeError, match="sequence of names"):
        build_encoder("convnet", "normal")
    with pytest.raises(ValueError, match="did you mean 'resnet18'"):
        build_encoder("resnet19")
    with pytest.raises(ValueError, match="both mean and std"):
        build_encoder("convnet", mean=MEAN)
    with pytest.raises(ValueError, match="unknown head kind"):
        build_head("byol", 128)


def test_encoder_with_other_branch_names_defaults_to_first():
    enc = build_encoder("convnet", ("clean", "adv")).eval()
    _randomise_bn(enc)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(enc(x), enc(x, "clean"))
    assert not torch.allclose(enc(x), enc(x, "adv"))


@pytest.mark.parametrize("arch,size", [("convnet", 16), ("resnet18", 16)])
def test_single_branch_conversion_is_exact(arch, size):
    enc = build_encoder(arch, BRANCHES, MEAN, STD)
    _randomise_bn(enc)
    enc.eval()
    x = torch.rand(4, 3, size, size)
    plain = build_encoder(arch, mean=MEAN, std=STD).eval()  # one target for every branch (strict loads)
    plain_keys = list(plain.state_dict())
    for branch in BRANCHES:
        single = to_single_branch(enc, branch)
        assert single.branches == (branch,) and not single.training
        assert torch.equal(single(x), enc(x, branch))
        state = single_branch_state_dict(enc, branch)
        assert not any(".bns." in k for k in state)
        assert list(state) == plain_keys
        # the same conversion from a saved state dict (no module at hand)
        load_single_branch(plain, {k: v.clone() for k, v in enc.state_dict().items()}, branch)
        assert torch.equal(plain(x), enc(x, branch))


@pytest.mark.parametrize("kind", ["acl", "simclr", "advcl"])
def test_head_single_branch_conversion_is_exact(kind):
    head = build_head(kind, 32, ("normal", "pgd"), hidden=48)
    _randomise_bn(head)
    head.eval()
    h = torch.randn(5, 32)
    for branch in ("normal", "pgd"):
        single = to_single_branch(head, branch)
        assert torch.equal(single(h), head(h, branch))
        assert not any(".bns." in k for k in single.state_dict())


def test_single_branch_state_dict_rejects_unknown_branch():
    enc = build_encoder("convnet", ("normal", "pgd"))
    with pytest.raises(ValueError, match="'adv' is not one of"):
        single_branch_state_dict(enc, "adv")
    with pytest.raises(ValueError, match="no BN entries"):
        single_branch_state_dict(enc.state_dict(), "adv")


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_shapes(kind):
    in_dim = 64
    head = build_head(kind, in_dim, ("normal", "pgd"))
    expected = {"acl": 512, "amoc": 128, "advcl": 128, "rocl": 128, "moco_v1": 128, "moco_v2": 128,
                "simclr": 128}[kind]
    assert head.out_dim == expected
    h = torch.randn(6, in_dim)
    assert head(h, "pgd").shape == (6, expected)
    linear_widths = [(m.in_features, m.out_features) for m in head.modules() if isinstance(m, nn.Linear)]
    assert linear_widths == {
        "acl": [(64, 512), (512, 512), (512, 512)], "amoc": [(64, 512), (512, 128)],
        "advcl": [(64, 512), (512, 128)], "rocl": [(64, 2048), (2048, 128)], "moco_v1": [(64, 128)],
        "moco_v2": [(64, 64), (64, 128)], "simclr": [(64, 64), (64, 128)]}[kind]


def test_head_options():
    two = build_head("acl", 128, ("normal", "pgd"), num_layers=2)
    assert [n for n, _ in two.named_children()] == ["fc1", "bn1", "relu1", "fc2", "bn2"]
    assert two.fc1.bias is not None and two.fc2.bias is None
    small = build_head("rocl", 128, hidden=256, out_dim=64)
    assert small(torch.randn(2, 128)).shape == (2, 64) and small.fc1.out_features == 256
    shared = build_head("advcl", 128, BRANCHES)  # one BN shared by every branch
    assert isinstance(shared.bn1, nn.BatchNorm1d)
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in build_head("acl", 8, BRANCHES).modules()) == 9
    with pytest.raises(ValueError, match="num_layers"):
        build_head("amoc", 128, num_layers=2)
    with pytest.raises(ValueError, match="2 or 3"):
        build_head("acl", 128, num_layers=4)


def test_normalisation_inside_the_model():
    with_norm = build_encoder("convnet", ("normal", "pgd"), MEAN, STD).eval()
    _randomise_bn(with_norm)
    without = build_encoder("convnet", ("normal", "pgd")).eval()
    missing = without.load_state_dict(with_norm.state_dict(), strict=False)
    assert sorted(missing.unexpected_keys) == ["normalize.mean", "normalize.std"]
    x = torch.rand(3, 3, 16, 16)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(with_norm(x, "pgd"), without((x - mean) / std, "pgd"))
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        with_norm(torch.rand(3, 1, 16, 16))
    with pytest.raises(ValueError, match="positive"):
        NormalizeByChannelMeanStd((0.5,), (0.0,))


@pytest.mark.parametrize("arch", ["convnet", "resnet18"])
def test_channels_last(arch):
    enc = build_encoder(arch, ("normal", "pgd"), MEAN, STD).eval()
    _randomise_bn(enc)
    x = torch.rand(2, 3, 16, 16)
    ref = enc(x, "pgd")
    enc_cl = copy.deepcopy(enc).to(memory_format=torch.channels_last)
    x_cl = x.clone().to(memory_format=torch.channels_last).requires_grad_(True)
    out = enc_cl(x_cl, "pgd")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    (grad,) = torch.autograd.grad(out.sum(), x_cl)
    assert grad.shape == x.shape and torch.isfinite(grad).all()


def test_deepcopy_switches_its_own_branches():
    enc = build_encoder("convnet", ("normal", "pgd"))
    key = copy.deepcopy(enc)  # how momentum encoders are made
    key(torch.rand(2, 3, 8, 8), "pgd")
    assert all(m.active == "pgd" for m in key._branch_switch.multi_bns)
    assert all(m.active == "normal" for m in enc._branch_switch.multi_bns)
    assert all(any(m is k for k in key.modules()) for m in key._branch_switch.multi_bns)


def test_torch_compile_switches_branches():
    enc = build_encoder("convnet", ("normal", "pgd"), MEAN, STD).eval()
    _randomise_bn(enc)
    x = torch.rand(2, 3, 8, 8)
    ref = {b: enc(x, b) for b in ("normal", "pgd")}
    compiled = torch.compile(enc, backend="eager", fullgraph=True)
    for branch in ("normal", "pgd", "normal"):
        torch.testing.assert_close(compiled(x, branch), ref[branch])


def test_convnet_learns_digits():
    """The small encoder must be useful for the CPU demo: supervised digits in a few seconds."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    digits = sklearn_datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # native 8x8
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y))
    train, test = perm[:1400], perm[1400:]
    enc = build_encoder("convnet", mean=(0.3,), std=(0.4,))
    fc = nn.Linear(enc.feat_dim, 10)
    params = list(enc.parameters()) + list(fc.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    steps, step = 4 * 14, 0
    for _ in range(4):
        enc.train()
        for idx in train[torch.randperm(len(train))].split(100):
            for g in opt.param_groups:
                g["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(fc(enc(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    enc.eval()
    with torch.no_grad():
        acc = (fc(enc(x[test])).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.85, acc
