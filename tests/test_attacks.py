"""PGD / FGSM driven by loss closures: ascent, constraints, input-only gradients, determinism."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advfast.attacks import ce_loss, fgsm, pgd, trades_kl_loss
from advfast.models import build_encoder

EPS = {"linf": 8 / 255, "l2": 0.5}


def _classifier(in_channels=3, num_classes=5):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, num_classes)).eval()


def _batch(b=6, size=8):
    return torch.rand(b, 3, size, size), torch.randint(0, 5, (b,))


def _sample_norms(t):
    return t.flatten(1).norm(dim=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_raises_the_loss_it_attacks(norm):
    model = _classifier()
    x, y = _batch()
    loss_fn = ce_loss(model, y)
    x_adv = pgd(loss_fn, x, EPS[norm], EPS[norm] / 4, steps=10, norm=norm)
    with torch.no_grad():
        assert loss_fn(x_adv) > loss_fn(x)
        # per sample too: each image's loss goes up (the attack is per sample)
        per_sample = lambda z: F.cross_entropy(model(z), y, reduction="none")  # noqa: E731
        assert (per_sample(x_adv) > per_sample(x)).float().mean() > 0.8


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("per_sample_eps", [False, True])
def test_pgd_stays_in_the_ball_and_the_box(norm, per_sample_eps):
    model = _classifier()
    x, y = _batch()
    x[0] = 1.0  # images at the box's edge
    x[1] = 0.0
    eps = EPS[norm] * (torch.rand(x.shape[0]) + 0.5) if per_sample_eps else EPS[norm]
    x_adv = pgd(ce_loss(model, y), x, eps, 2.5 * (eps if not per_sample_eps else EPS[norm]), steps=5, norm=norm)
    radius = torch.as_tensor(eps).expand(x.shape[0])
    delta = x_adv - x
    if norm == "linf":
        assert (delta.flatten(1).abs().amax(1) <= radius + 1e-6).all()
    else:
        assert (_sample_norms(delta) <= radius * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad and x_adv.dtype == torch.float32 and x_adv.shape == x.shape


def test_no_parameter_gradients_are_computed_or_touched():
    enc = build_encoder("convnet", ("normal", "pgd")).eval()
    fc = nn.Linear(enc.feat_dim, 5)
    params = list(enc.parameters()) + list(fc.parameters())
    fired = []
    hooks = [p.register_hook(lambda g, i=i: fired.append(i)) for i, p in enumerate(params)]
    preset = {id(p): torch.randn_like(p) for p in params[::2]}
    for p in params[::2]:
        p.grad = preset[id(p)].clone()
    x, y = _batch()
    pgd(ce_loss(lambda z: fc(enc(z, "pgd")), y), x, 8 / 255, 2 / 255, steps=3)
    fgsm(ce_loss(lambda z: fc(enc(z, "pgd")), y), x, 8 / 255)
    for h in hooks:
        h.remove()
    assert fired == [], "a weight gradient was computed during the attack"
    for i, p in enumerate(params):
        if i % 2 == 0:
            assert torch.equal(p.grad, preset[id(p)])
        else:
            assert p.grad is None


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_deterministic_with_a_generator(norm):
    model = _classifier()
    x, y = _batch()

    def run(seed):
        return pgd(ce_loss(model, y), x, EPS[norm], EPS[norm] / 4, steps=2, norm=norm,
                   generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_is_one_step_of_size_eps(norm):
    model = _classifier()
    x, y = _batch()
    eps = EPS[norm]
    x_adv = fgsm(ce_loss(model, y), x, eps, norm=norm)
    # independent float64 transcription: one step of size eps from x, then clamp to [0, 1]
    x64 = x.double().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model.double()(x64), y, reduction="sum"), x64)
    model.float()
    if norm == "linf":
        step = g.sign()
    else:
        step = g / _sample_norms(g).view(-1, 1, 1, 1)
    expected = (x.double() + eps * step).clamp(0, 1)
    torch.testing.assert_close(x_adv.double(), expected, rtol=0, atol=1e-6)


def test_fgsm_random_start_is_wong_et_al():
    model = _classifier()
    x, y = _batch()
    eps = 8 / 255
    a = fgsm(ce_loss(model, y), x, eps, random_start=True, generator=torch.Generator().manual_seed(3))
    b = pgd(ce_loss(model, y), x, eps, 1.25 * eps, steps=1, random_start=True,
            generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert (a - x).abs().max() <= eps + 1e-6
    with pytest.raises(ValueError, match="alpha is only used"):
        fgsm(ce_loss(model, y), x, eps, alpha=0.01)


def test_steps_zero():
    model = _classifier()
    x, y = _batch()
    same = pgd(ce_loss(model, y), x, 0.1, 0.01, steps=0, random_start=False)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    start = pgd(ce_loss(model, y), x, 0.1, 0.01, steps=0, random_start=True)
    assert not torch.equal(start, x) and (start - x).abs().max() <= 0.1 + 1e-6


def test_perturbation_stays_fp32_under_autocast():
    model = _classifier()
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd(ce_loss(model, y), x, 8 / 255, 2 / 255, steps=2)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    # half-precision images are attacked in fp32 too
    x_adv = pgd(ce_loss(model, y), x.bfloat16(), 8 / 255, 2 / 255, steps=1)
    assert x_adv.dtype == torch.float32


def test_trades_kl_loss_matches_formula_and_is_attacked():
    model = _classifier()
    x, _ = _batch()
    with torch.no_grad():
        logits_nat = model(x)
    loss_fn = trades_kl_loss(model, logits_nat)
    x_other = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    p = F.softmax(logits_nat.double(), 1)
    with torch.no_grad():
        log_q = F.log_softmax(model(x_other).double(), 1)
    expected = (p * (p.log() - log_q)).sum()
    torch.testing.assert_close(loss_fn(x_other).double(), expected, rtol=1e-5, atol=1e-6)
    assert loss_fn(x).abs() < 1e-5
    x_adv = pgd(loss_fn, x, 8 / 255, 2 / 255, steps=5, random_start=True)
    # The KL of a tiny random model is small in absolute terms and varies with the seed, so the attack is
    # judged against a random corner of the same ball: PGD must find a clearly worse point.
    x_corner = (x + 8 / 255 * torch.randn_like(x).sign()).clamp(0, 1)
    with torch.no_grad():
        assert loss_fn(x_adv) > loss_fn(x_corner) > 0


def test_ce_loss_passes_forward_kwargs():
    enc = build_encoder("convnet", ("normal", "pgd")).eval()
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
    fc = nn.Linear(enc.feat_dim, 5)
    x, y = _batch()

    def model(z, branch="normal"):
        return fc(enc(z, branch))

    with torch.no_grad():
        got = ce_loss(model, y, branch="pgd")(x)
        torch.testing.assert_close(got, F.cross_entropy(model(x, "pgd"), y, reduction="sum"))
        assert not torch.allclose(got, ce_loss(model, y)(x))
    with pytest.raises(TypeError, match="int64"):
        ce_loss(model, y.float())


def test_bad_input_raises():
    model = _classifier()
    x, y = _batch()
    with pytest.raises(ValueError, match="scalar"):
        pgd(lambda z: model(z), x, 0.1, 0.01, steps=1)
    with pytest.raises(ValueError, match="does not depend"):
        pgd(lambda z: model(x).sum(), x, 0.1, 0.01, steps=1)
    with pytest.raises(ValueError, match="steps"):
        pgd(ce_loss(model, y), x, 0.1, 0.01, steps=-1)
    with pytest.raises(ValueError, match="norm"):
        pgd(ce_loss(model, y), x, 0.1, 0.01, steps=1, norm="l1")
    with pytest.raises(TypeError, match="callable"):
        pgd(None, x, 0.1, 0.01, steps=1)
    with pytest.raises(TypeError, match="floating-point"):
        pgd(ce_loss(model, y), (x * 255).byte(), 0.1, 0.01, steps=1)
    with pytest.raises(ValueError, match="eps"):
        pgd(ce_loss(model, y), x, -0.1, 0.01, steps=1)
