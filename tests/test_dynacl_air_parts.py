"""DynACL / AIR building blocks against float64 transcriptions of the official code.

The ``_official_*`` functions below (and in tests/official_dynacl_step.py, tests/official_air_step.py)
are transcriptions of PKU-ML/DYNACL (train_DynACL.py: main, reload, train; kmeans_pytorch 0.3) and
GodXuxilie/Enhancing_ACL_via_AIR (pretraining.py: main, get_transform, train; AIR.py: AIR_Loss), written
independently of advfast's modules. Each was checked against the
real official code run on the CPU (docs/methods_dynacl_air.md, "Validation").
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T

from advfast.data import strength_schedule as ss
from advfast.data.presets import Flip, Grayscale, Jitter, ResizedCrop
from advfast.losses.air import air_objective, air_regularizers
from advfast.methods import lp_post_settings as lps
from advfast.methods.lp_pseudo_labels import cluster_pseudo_labels, within_cluster_ss
from advfast.pseudo_labels.kmeans import _kmeans_pp
from advfast.ops import nt_xent

# ---- transcriptions: schedules ---------------------------------------------------------------------


def _official_dynacl_run(epochs, k, swap_param=2 / 3, resume_from=None):
    """{epoch: (strength, weight_adv)} of train_DynACL.main's loop (reload + train's weight_adv)."""
    resume = resume_from is not None
    start = 1 if resume_from is None else resume_from
    out, strength = {}, None
    for epoch in range(start, epochs + 1):
        if epoch % k == 1 or resume or k == 1:
            resume = False
            strength = 1 - (epoch - 1) / epochs
        weight_adv = min(1.0 + (epoch // k) * (k / epochs) * swap_param, 2)
        out[epoch] = (strength, weight_adv)
    return out


def _official_air_run(epochs, dyn_aug, lam=2 / 3):
    """{epoch: (strength, weight)} of pretraining.main (K = 50 hard-coded) and train."""
    out = {}
    for epoch in range(1, epochs + 1):
        if dyn_aug:
            K = 50
            strength = 1 - int((epoch - 1) / K) * K / epochs
        else:
            strength = 1
        out[epoch] = (strength, lam * (1 - strength) if dyn_aug else 0)
    return out


def _official_reload_transform(strength, interpolation=None):
    """train_DynACL.reload / pretraining.get_transform, built with torchvision as the official code."""
    crop_kw = {} if interpolation is None else {"interpolation": interpolation}
    return T.Compose([
        T.RandomResizedCrop(32, scale=(1.0 - 0.9 * strength, 1.0), **crop_kw),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(0.4 * strength, 0.4 * strength, 0.4 * strength, 0.1 * strength)],
                      p=0.8 * strength),
        T.RandomGrayscale(p=0.2 * strength),
        T.ToTensor(),
    ])


BOUNDARY_EPOCHS = (1, 2, 49, 50, 51, 52, 99, 100, 101, 500, 501, 949, 950, 951, 999, 1000)


@pytest.mark.parametrize("epoch", BOUNDARY_EPOCHS)
def test_dynacl_schedule_matches_official_at_cifar_length(epoch):
    strength, weight = _official_dynacl_run(1000, 50)[epoch]
    assert ss.dynacl_strength(epoch, 1000, 50) == strength  # same float expression: bit-equal
    assert ss.dynacl_adv_weight(epoch, 1000, 50) == weight
    c, a = ss.dynacl_clean_adv_factors(epoch, 1000, 50)
    assert (c, a) == pytest.approx(((2 - weight) / 2, weight / 2), abs=1e-15)


def test_dynacl_schedule_levels_and_offset():
    run = _official_dynacl_run(1000, 50)
    assert run[50] == (1.0, pytest.approx(1 + 1 / 30)) and run[51][0] == pytest.approx(0.95)
    assert run[1000] == (pytest.approx(0.05), pytest.approx(1 + 2 / 3))
    # the weight steps one epoch before the strength (epoch // K vs (epoch - 1) // K)
    assert ss.dynacl_adv_weight(50, 1000) > ss.dynacl_adv_weight(49, 1000)
    assert ss.dynacl_strength(50, 1000) == ss.dynacl_strength(49, 1000) > ss.dynacl_strength(51, 1000)


def test_aligned_weight_is_air_weight_in_dynacl_form():
    # AIR/RCS align the weight with the strength; in DynACL's form w = 1 + air_adv_weight(s)
    air = _official_air_run(1000, True)
    for epoch in BOUNDARY_EPOCHS:
        aligned = 1 + ss.air_adv_weight(ss.dynacl_strength(epoch, 1000, 50))
        assert aligned == pytest.approx(1 + air[epoch][1], abs=1e-15)
        if epoch % 50 == 0:  # DynACL's own weight is one step ahead exactly there
            assert ss.dynacl_adv_weight(epoch, 1000, 50) == pytest.approx(aligned + (50 / 1000) * (2 / 3))
        else:
            assert ss.dynacl_adv_weight(epoch, 1000, 50) == pytest.approx(aligned)


@pytest.mark.parametrize("epochs,levels", [(10, 5), (12, 5), (7, 3), (10, 20), (30, 20)])
def test_scaled_step_schedules_match_official_loop(epochs, levels):
    k = ss.scaled_step(epochs, levels)
    assert 1 <= k <= epochs
    run = _official_dynacl_run(epochs, k)
    for epoch, (strength, weight) in run.items():
        assert ss.dynacl_strength(epoch, epochs, k) == strength
        assert ss.dynacl_adv_weight(epoch, epochs, k) == weight
    if epochs // k >= 2:  # steps several times within the run
        assert len({s for s, _ in run.values()}) >= 2 and len({w for _, w in run.values()}) >= 2


def test_digits_step_keeps_official_end_weight():
    k = ss.scaled_step(10, 5)
    assert k == 2
    assert ss.dynacl_adv_weight(10, 10, k) == pytest.approx(ss.dynacl_adv_weight(1000, 1000, 50))


@pytest.mark.parametrize("resume_from", [74, 101, 150, 199])
def test_dynacl_resume_reanchors_like_official(resume_from):
    run = _official_dynacl_run(200, 50, resume_from=resume_from)
    for epoch, (strength, _) in run.items():
        assert ss.dynacl_strength(epoch, 200, 50, resumed_at=resume_from) == strength


@pytest.mark.parametrize("epoch", BOUNDARY_EPOCHS)
@pytest.mark.parametrize("dyn_aug", [True, False])
def test_air_schedule_matches_official(epoch, dyn_aug):
    strength, weight = _official_air_run(1000, dyn_aug)[epoch]
    s = ss.air_strength(epoch, 1000, dyn_aug)
    assert s == strength and ss.air_adv_weight(s) == weight
    assert ss.air_clean_adv_factors(s) == pytest.approx((1 - weight, 1 + weight), abs=1e-15)


def _ops_of(compose):
    crop, flip, jitter_apply, gray, _ = compose.transforms
    jit = jitter_apply.transforms[0]
    return crop, flip, jitter_apply, jit, gray


@pytest.mark.parametrize("strength", [1.0, 0.95, 0.5, 0.05])
@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_strength_view_matches_official_transforms(strength, interp):
    official = _official_reload_transform(strength, None if interp == "bilinear" else 3)
    crop, flip, jitter_apply, jit, gray = _ops_of(official)
    view = ss.strength_view(strength, interp)
    assert [type(op) for op in view] == [ResizedCrop, Flip, Jitter, Grayscale]
    c, f, j, g = view
    assert c.scale == pytest.approx(crop.scale, abs=1e-15) and c.ratio == pytest.approx(crop.ratio)
    assert c.interpolation == crop.interpolation.value
    assert f.p == flip.p and j.p == pytest.approx(jitter_apply.p, abs=1e-15) and g.p == pytest.approx(gray.p, abs=1e-15)
    # ColorJitter stores [1 - b, 1 + b] (b clipped at 1) and [-h, h]
    for ours, theirs in ((j.brightness, jit.brightness), (j.contrast, jit.contrast), (j.saturation, jit.saturation)):
        assert (1 - ours, 1 + ours) == pytest.approx(tuple(theirs), abs=1e-15)
    assert (-j.hue, j.hue) == pytest.approx(tuple(jit.hue), abs=1e-15)
    assert ss.strength_views(strength, interp) == (view, view)


@pytest.mark.parametrize("backend", ["torch", "torchvision"])
def test_strength_views_drive_the_augmentation_backends(backend):
    from advfast.data.augment import build_augment

    n = 1024 if backend == "torch" else 256  # torchvision samples image by image
    shape = (n, 3, 32, 32)
    for strength, jitter_p, gray_p in ((1.0, 0.8, 0.2), (0.05, 0.04, 0.01)):
        aug = build_augment(ss.strength_views(strength, "bicubic"), backend)
        params = aug.sample_params(n, shape, torch.Generator().manual_seed(0))
        assert len(params) == 2
        for p in params:
            area = (p["box"][:, 2] * p["box"][:, 3]).double() / (32 * 32)
            lo = 1 - 0.9 * strength
            assert area.min() >= lo - 0.05 and area.max() <= 1.0  # crop areas in the scale range (+ rounding)
            if strength < 1:
                assert area.mean() > lo
            # seeded draws: the binomial tolerances (> 5 sigma) never fail by chance
            assert abs(p["jitter"].double().mean().item() - jitter_p) < 5 * math.sqrt(jitter_p * (1 - jitter_p) / n) + 1e-3
            assert abs(p["gray"].double().mean().item() - gray_p) < 5 * math.sqrt(gray_p * (1 - gray_p) / n) + 1e-3
            f = p["factors"]
            assert f[:, 0].min() >= 1 - 0.4 * strength - 1e-6 and f[:, 0].max() <= 1 + 0.4 * strength + 1e-6
            assert f[:, 3].abs().max() <= 0.1 * strength + 1e-6
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        views = aug(images, torch.Generator().manual_seed(1))
        assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2


def test_full_strength_view_is_simclr_cifar():
    p = ss.strength_params(1.0)
    assert p["crop_scale"] == pytest.approx((0.1, 1.0)) and p["jitter_p"] == 0.8 and p["gray_p"] == 0.2


@pytest.mark.parametrize("call,match", [
    (lambda: ss.dynacl_strength(0, 10, 2), "1-based"),
    (lambda: ss.dynacl_strength(11, 10, 2), "1-based"),
    (lambda: ss.dynacl_adv_weight(1, 10, 0), "step must be >= 1"),
    (lambda: ss.dynacl_strength(1.0, 10, 2), "must be an int"),
    (lambda: ss.strength_params(1.5), r"strength must be in \[0, 1\]"),
    (lambda: ss.scaled_step(0, 5), "epochs and levels"),
])
def test_schedule_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---- transcription: AIR_Loss -----------------------------------------------------------------------


def _load_helper(name):
    """A transcription module next to this file (tests/official_*.py, not collected by pytest)."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_official_air_loss = _load_helper("official_air_step").official_air_loss


def _blocks(b=6, d=5, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return [torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(5)]


def _ours_total(zi, zj, zo, zia, zja, weight, kl="code"):
    nat = nt_xent(torch.cat([zi, zj]), 2, temperature=0.5, backend="torch")
    adv = nt_xent(torch.cat([zia, zja]), 2, temperature=0.5, backend="torch")
    sir, air = air_regularizers(zi, zj, zo, zia, zja, kl=kl)
    return air_objective(nat, adv, sir, air, weight), nat, adv, sir, air


@pytest.mark.parametrize("weight", [0.0, ss.air_adv_weight(0.5)])
def test_air_loss_and_gradients_match_official(weight):
    blocks = _blocks()
    theirs = _official_air_loss(*blocks, weight=weight)
    ours = _ours_total(*blocks, weight)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    g_theirs = torch.autograd.grad(theirs[0], blocks)
    g_ours = torch.autograd.grad(ours[0], blocks)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kl", ["code", "paper"])
def test_air_regularizers_gradcheck(kl):
    blocks = _blocks(b=4, d=3)
    assert torch.autograd.gradcheck(lambda *z: air_regularizers(*z, kl=kl), blocks)


def test_paper_kl_is_the_true_kl_and_code_kl_is_not():
    zi, zj, zo, zia, zja = (z.detach() for z in _blocks())
    n = [F.normalize(z, dim=1) for z in (zi, zj, zo, zia, zja)]
    d = lambda u, v: (u * v).sum(1) / 0.5  # noqa: E731
    p, q = F.softmax(d(n[0], n[2]), 0), F.softmax(d(n[1], n[2]), 0)
    P = F.softmax(d(n[3], n[2]), 0) * F.softmax(d(n[3], n[0]), 0)
    Q = F.softmax(d(n[4], n[2]), 0) * F.softmax(d(n[4], n[1]), 0)
    sir, air = air_regularizers(zi, zj, zo, zia, zja, kl="paper")
    torch.testing.assert_close(sir, (q * (q.log() - p.log())).sum(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(air, (Q * (Q.log() - P.log())).sum(), rtol=1e-12, atol=1e-14)
    assert sir >= 0
    sir_c, air_c = air_regularizers(zi, zj, zo, zia, zja, kl="code")
    torch.testing.assert_close(sir_c, (q * (q.log() - p)).sum(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(air_c, (Q * (Q.log() - P)).sum(), rtol=1e-12, atol=1e-14)


def test_air_regularizers_bad_input():
    blocks = [b.detach() for b in _blocks()]
    with pytest.raises(ValueError, match="kl must be one of code, paper"):
        air_regularizers(*blocks, kl="true")
    with pytest.raises(ValueError, match="a2 has shape"):
        air_regularizers(*blocks[:4], blocks[4][:3])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        air_regularizers(*blocks, temperature=0.0)


# ---- transcription: kmeans_pytorch 0.3 (assign_label.py / LP-AFF.py's clustering) ------------------


def _official_kmeans_from(x, initial_state, tol=1e-4):
    """kmeans_pytorch.kmeans after its random ``initialize``: Lloyd until (sum ||shift||)^2 < tol,
    returning the assignment computed before the last centre update."""
    state = initial_state.clone()
    while True:
        dis = ((x[:, None, :] - state[None, :, :]) ** 2).sum(-1)  # pairwise_distance
        choice = torch.argmin(dis, dim=1)
        pre = state.clone()
        for index in range(state.shape[0]):
            state[index] = x[choice == index].mean(dim=0)
        shift = torch.sum(torch.sqrt(torch.sum((state - pre) ** 2, dim=1)))
        if shift ** 2 < tol:
            return choice, state


def _overlapping_blobs(k=4, dim=6, n_per=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(k, dim, generator=g, dtype=torch.float64)
    x = centers.repeat_interleave(n_per, 0) + torch.randn(k * n_per, dim, generator=g, dtype=torch.float64)
    return x[torch.randperm(x.shape[0], generator=g)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pseudo_labels_objective_matches_official_from_same_init(seed):
    k = 4
    x = _overlapping_blobs(k=k, seed=seed)
    ours = cluster_pseudo_labels(x, k, seed=seed, tol=0.0)
    # the initial centres advfast's kmeans starts from (same generator, same call)
    init = _kmeans_pp(x, k, (x * x).sum(1), torch.Generator().manual_seed(seed), 16384)
    labels, _ = _official_kmeans_from(x, init, tol=1e-20)
    assert ours.objective == pytest.approx(within_cluster_ss(x, labels, k), rel=1e-12)
    assert torch.equal(ours.labels, labels)
    assert ours.iterations >= 2


def test_within_cluster_ss_is_the_kmeans_objective():
    x = _overlapping_blobs(k=3, seed=5)
    labels = torch.arange(x.shape[0]) % 3
    manual = sum(((x[labels == j] - x[labels == j].mean(0)) ** 2).sum().item() for j in range(3))
    assert within_cluster_ss(x, labels, 3) == pytest.approx(manual, rel=1e-12)


# ---- the DynACL step transcription (tests/official_dynacl_step.py) ---------------------------------


def _load_step_transcription():
    return _load_helper("official_dynacl_step")


def test_step_transcription_nt_xent_equals_advfast_nt_xent_on_view_major_rows():
    ods = _load_step_transcription()
    z = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)  # rows 2i, 2i+1: image i
    view_major = z.view(6, 2, 5).transpose(0, 1).reshape(12, 5)
    a, b = ods.official_nt_xent(z), nt_xent(view_major, 2, temperature=0.5, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(a, z)[0], torch.autograd.grad(b, z)[0], rtol=1e-10, atol=1e-12)


def test_air_step_transcription_nt_xent_equals_advfast_nt_xent():
    oas = _load_helper("official_air_step")
    z = torch.randn(10, 4, dtype=torch.float64)
    view_major = z.view(5, 2, 4).transpose(0, 1).reshape(10, 4)
    torch.testing.assert_close(oas.official_nt_xent(z), nt_xent(view_major, 2, temperature=0.5, backend="torch"),
                               rtol=1e-12, atol=1e-12)


def test_step_transcription_swap_and_ema():
    ods = _load_step_transcription()
    q = lambda x, bn: x.flatten(1) * 2  # noqa: E731
    k = lambda x, bn: x.flatten(1) * 3  # noqa: E731
    x = torch.randn(6, 2, 1, 1, dtype=torch.float64)
    f = ods.swap_features(q, k, x, "pgd")
    torch.testing.assert_close(f[::2], 2 * x[::2].flatten(1))
    torch.testing.assert_close(f[1::2], 3 * x[1::2].flatten(1))
    mq, mk = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    expected = [0.99 * pk.detach() + 0.01 * pq.detach() for pq, pk in zip(mq.parameters(), mk.parameters())]
    ods.official_ema_update(mq, mk)
    for e, pk in zip(expected, mk.parameters()):
        torch.testing.assert_close(pk.detach(), e, rtol=0, atol=1e-15)


# ---- post-processing settings ----------------------------------------------------------------------


def test_post_processing_settings_as_coded():
    assert lps.num_clusters(lps.LP_AFT, 100) == 10  # K = 10 also for CIFAR-100 in DynACL's code
    assert lps.num_clusters(lps.LP_AFF, 100) == 100 and lps.num_clusters(lps.LP_AFF, 10) == 10
    assert (lps.LP_AFT.labels.official_tol, lps.LP_AFF.labels.official_tol) == (1e-4, 1e-5)
    for post in lps.POST_PROCESSING.values():
        assert (post.probe.epochs, post.probe.lr, post.aft.epochs, post.aft.lr) == (10, 0.01, 25, 0.1)
        assert post.aft.milestones == (10, 20) and post.aft.beta == 6.0 and post.aft.attack_steps == 10
        assert math.isclose(post.aft.step_size, 2 / 255) and math.isclose(post.aft.epsilon, 8 / 255)
    assert lps.LP_AFT.aft.trades_random_start == 0.0 and lps.LP_AFF.aft.trades_random_start == 0.001
    assert not lps.LP_AFT.aft.dual_bn and lps.LP_AFF.aft.dual_bn
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        lps.num_clusters(lps.LP_AFF, 0)
