"""The switches the benchmarks turn optimisations off with: ops.auto_backend and attacks.attack_gradients."""

import pytest
import torch
from torch import nn

from advfast import attacks, ops
from advfast.attacks import ce_loss
from advfast.ops import _dispatch


def _classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 5)).double().eval()


def test_auto_backend_redirects_auto_only_and_restores():
    cpu = torch.device("cpu")
    implemented = ("cuda", "triton", "cpp", "torch")
    normal = _dispatch.resolve("pgd_step", "auto", cpu, implemented)
    with ops.auto_backend("torch"):
        assert _dispatch.resolve("pgd_step", "auto", cpu, implemented) == "torch"
        # a name asked for explicitly is honoured
        assert _dispatch.resolve("pgd_step", "torch", cpu, implemented) == "torch"
        # an op without the override backend keeps its own auto choice
        assert _dispatch.resolve("x", "auto", cpu, ("cuda", "cpp")) in ("cpp", "torch")
        with ops.auto_backend("torch-chunked"):
            assert _dispatch.resolve("nt_xent", "auto", cpu, ("triton", "torch-chunked", "torch")) == "torch-chunked"
        assert _dispatch.resolve("pgd_step", "auto", cpu, implemented) == "torch"
    assert _dispatch.resolve("pgd_step", "auto", cpu, implemented) == normal
    with pytest.raises(RuntimeError):
        with ops.auto_backend("torch"):
            raise RuntimeError("boom")
    assert _dispatch._auto_override is None


def test_auto_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="auto_backend"):
        with ops.auto_backend("cudnn"):
            pass


def test_auto_backend_results_match_the_fused_default():
    x_nat = torch.rand(5, 3, 7, 9)
    grad = torch.randn_like(x_nat)
    fused = ops.pgd_step(x_nat.clone(), x_nat, grad, 8 / 255, 2 / 255)
    with ops.auto_backend("torch"):
        plain = ops.pgd_step(x_nat.clone(), x_nat, grad, 8 / 255, 2 / 255)
    torch.testing.assert_close(plain, fused)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_full_backward_gives_the_same_attack_as_input_only(norm):
    model = _classifier()
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    eps, alpha = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.1)
    g = torch.Generator().manual_seed(3)
    x_input = attacks.pgd(ce_loss(model, y), x, eps, alpha, 3, norm=norm, generator=g)
    assert all(p.grad is None for p in model.parameters())
    g = torch.Generator().manual_seed(3)
    x_full = attacks.pgd(ce_loss(model, y), x, eps, alpha, 3, norm=norm, generator=g, gradients="full")
    torch.testing.assert_close(x_full, x_input, rtol=0, atol=1e-12)


def test_full_backward_fills_parameter_grads_like_the_official_codes():
    model = _classifier()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    steps = 2
    with attacks.attack_gradients("full"):
        x_adv = attacks.pgd(ce_loss(model, y), x, 8 / 255, 2 / 255, steps, random_start=False)
    assert not x_adv.requires_grad and x_adv.grad is None
    # the accumulated weight gradient is the sum of the per-step gradients: recompute them
    expected = torch.zeros_like(model[0].weight)
    x_step = x.clone()
    for _ in range(steps):
        x_step.requires_grad_(True)
        loss = ce_loss(model, y)(x_step)
        gw, gx = torch.autograd.grad(loss, (model[0].weight, x_step))
        expected += gw
        x_step = ops.pgd_step(x_step.detach(), x, gx, 8 / 255, 2 / 255)
    torch.testing.assert_close(model[0].weight.grad, expected)
    # outside the block the default is input-only again
    model.zero_grad(set_to_none=True)
    attacks.pgd(ce_loss(model, y), x, 8 / 255, 2 / 255, 1)
    assert model[0].weight.grad is None


def test_full_backward_rejects_closures_that_ignore_x():
    model = _classifier()
    fixed = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not depend"):
        attacks.pgd(lambda x: model(fixed).sum(), fixed.clone(), 8 / 255, 2 / 255, 1, gradients="full")
    with pytest.raises(ValueError, match="does not depend"):
        attacks.pgd(lambda x: fixed.sum(), fixed.clone(), 8 / 255, 2 / 255, 1, gradients="full")


def test_gradient_mode_errors():
    with pytest.raises(ValueError, match="gradients must be one of"):
        attacks.pgd(lambda x: x.sum(), torch.rand(2, 3), 0.1, 0.1, 1, gradients="weights")
    with pytest.raises(ValueError, match="gradients must be one of"):
        with attacks.attack_gradients("both"):
            pass
