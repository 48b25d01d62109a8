"""Augmentation backends: same pixels for the same parameters (torch vs torchvision), same parameter
distributions (two-sample Kolmogorov-Smirnov and binomial tests with fixed seeds), determinism.

Statistical thresholds: KS at alpha = 1e-3 (c = 1.95), rates within 4.5 binomial standard errors; the
seeds are fixed, so a pass is reproducible, and each test also checks that its test rejects a wrong
distribution (power), so it cannot pass vacuously.
"""

import math

import pytest
import torch

from advfast.data import PRESETS, build_augment, load_dataset
from advfast.data.dali_backend import dali_error
from advfast.data.presets import Flip, ResizedCrop

needs_dali = pytest.mark.skipif(dali_error() is not None, reason=str(dali_error()))


def ks(a, b) -> float:
    a, b = torch.sort(a.double().flatten())[0], torch.sort(b.double().flatten())[0]
    grid = torch.cat((a, b))
    fa = torch.searchsorted(a, grid, right=True).double() / len(a)
    fb = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((fa - fb).abs().max())


def ks_limit(n, m) -> float:
    return 1.95 * math.sqrt((n + m) / (n * m))


def assert_rate(mask, p, what):
    n = mask.numel()
    rate = float(mask.float().mean())
    assert abs(rate - p) < 4.5 * math.sqrt(p * (1 - p) / n), f"{what}: rate {rate:.4f}, expected {p}"


def images(n=12, h=24, w=20):
    return load_dataset("synthetic", num_samples=n, image_size=(h, w), seed=1).images


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("size", [None, 16])
def test_torch_equals_torchvision_on_same_params(preset, size):
    x = images()
    tv, tb = build_augment(preset, "torchvision", size), build_augment(preset, "torch", size)
    params = tv.sample_params(len(x), x.shape, torch.Generator().manual_seed(7))
    ref, got = tv.apply(x, params), tb.apply(x, params)
    assert len(got) == tb.num_views == len(PRESETS[preset])
    out = (24, 20) if size is None else (16, 16)
    for r, g in zip(ref, got):
        assert g.shape == (len(x), 3) + out and g.dtype == torch.float32
        assert 0 <= float(g.min()) and float(g.max()) <= 1
        torch.testing.assert_close(g, r, atol=2e-5, rtol=0)


def test_presets_hold_the_official_parameters():
    """The backends are compared with each other through the same presets, so the presets themselves
    are pinned here to the official transforms (shared/reference/official_code_notes.md)."""
    from advfast.data.presets import Blur, Grayscale, Jitter, Original, PadCrop

    jitter, gray, flip = Jitter(0.4, 0.4, 0.4, 0.1, p=0.8), Grayscale(p=0.2), Flip(p=0.5)
    ratio = (3 / 4, 4 / 3)
    acl = (ResizedCrop((0.08, 1.0), ratio, "bicubic"), flip, jitter, gray)  # ACL: interpolation=3
    amoc = (ResizedCrop((0.2, 1.0), ratio, "bilinear"), jitter, gray, Blur((0.1, 2.0), p=0.5), flip)
    advcl = (ResizedCrop((0.2, 1.0), ratio, "bilinear"), flip, jitter, gray)
    rocl = (jitter, gray, flip, ResizedCrop((0.08, 1.0), ratio, "bilinear"))  # RoCL: crop last
    pad_crop = (PadCrop(4), flip)
    assert PRESETS == {
        "simclr": (acl, acl), "mocov2": (amoc, amoc), "advcl": (advcl, advcl, pad_crop),
        "rocl": (rocl, rocl, (Original(),)), "finetune": (pad_crop,), "none": ((Original(),),)}
    # AMOC's PIL GaussianBlur(radius=sigma) reaches ~3 sigma: 13 taps at sigma 2 on 32x32 views
    from advfast.data.sizes import blur_kernel_size
    assert blur_kernel_size(2.0, (32, 32)) == 13


def test_param_distributions_torch_vs_torchvision():
    n = 2500
    shape = (n, 3, 32, 32)
    pt = build_augment("simclr", "torch").sample_params(n, shape, torch.Generator().manual_seed(0))[0]
    pv = build_augment("simclr", "torchvision").sample_params(n, shape, torch.Generator().manual_seed(0))[0]
    wrong = build_augment("advcl", "torch").sample_params(n, shape, torch.Generator().manual_seed(1))[0]
    lim = ks_limit(n, n)

    def area(p):
        return p["box"][:, 2] * p["box"][:, 3] / 1024.0

    def aspect(p):
        return (p["box"][:, 3] / p["box"][:, 2]).log()

    assert ks(area(pt), area(pv)) < lim and ks(aspect(pt), aspect(pv)) < lim
    assert ks(area(pt), area(wrong)) > lim  # scale 0.2-1 vs 0.08-1 is caught
    for key, p in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2)):
        assert_rate(pt[key], p, f"torch {key}")
        assert_rate(pv[key], p, f"torchvision {key}")
    on_t, on_v = pt["factors"][pt["jitter"]], pv["factors"][pv["jitter"]]
    for k in range(4):
        assert ks(on_t[:, k], on_v[:, k]) < ks_limit(len(on_t), len(on_v))
    for k in range(4):  # each op first equally often, in both
        assert_rate(pt["order"][pt["jitter"], 0] == k, 0.25, "torch order")
        assert_rate(pv["order"][pv["jitter"], 0] == k, 0.25, "torchvision order")
    assert torch.equal(pt["order"].sort(1)[0], torch.arange(4).expand(n, 4))

    mt = build_augment("mocov2", "torch").sample_params(n, shape, torch.Generator().manual_seed(2))[0]
    mv = build_augment("mocov2", "torchvision").sample_params(n, shape, torch.Generator().manual_seed(2))[0]
    assert_rate(mt["blur"], 0.5, "torch blur")
    assert_rate(mv["blur"], 0.5, "torchvision blur")
    assert ks(mt["sigma"][mt["blur"]], mv["sigma"][mv["blur"]]) < ks_limit(int(mt["blur"].sum()), int(mv["blur"].sum()))
    ft = build_augment("finetune", "torch").sample_params(n, shape, torch.Generator().manual_seed(3))[0]
    fv = build_augment("finetune", "torchvision").sample_params(n, shape, torch.Generator().manual_seed(3))[0]
    for k in range(2):
        assert ks(ft["offset"][:, k], fv["offset"][:, k]) < lim
        assert int(ft["offset"][:, k].min()) == 0 and int(ft["offset"][:, k].max()) == 8


def test_crop_fallback_on_extreme_ratio():
    def boxes(backend, shape, seed=0):
        aug = build_augment("simclr", backend)
        return aug.sample_params(shape[0], shape, torch.Generator().manual_seed(seed))[0]["box"]

    # 1x64 images: no try can fit, so every box is torchvision's ratio-clamped centre crop
    fallback = torch.tensor([0, 31, 1, 1])
    assert (boxes("torch", (50, 3, 1, 64)) == fallback).all()
    assert (boxes("torchvision", (50, 3, 1, 64)) == fallback).all()
    # 4x64: a mix of fitting tries and fallbacks, in the same proportions
    bt, bv = boxes("torch", (800, 3, 4, 64)), boxes("torchvision", (800, 3, 4, 64))
    centre = torch.tensor([0, 29, 4, 5])
    rate_t, rate_v = float((bt == centre).all(1).float().mean()), float((bv == centre).all(1).float().mean())
    assert 0.5 < rate_t < 0.99 and abs(rate_t - rate_v) < 4.5 * math.sqrt(2 * rate_t * (1 - rate_t) / 800)
    assert ks(bt[:, 3], bv[:, 3]) < ks_limit(800, 800)


@pytest.mark.parametrize("backend", ["torch", "torchvision"])
def test_deterministic_for_a_seed(backend):
    x = images(6)
    aug = build_augment("mocov2", backend)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])


def test_bad_input():
    with pytest.raises(ValueError, match="unknown augmentation preset 'simclrr'.*did you mean 'simclr'"):
        build_augment("simclrr")
    with pytest.raises(ValueError, match="unknown augmentation backend"):
        build_augment("simclr", "pil")
    with pytest.raises(TypeError, match="uint8"):
        build_augment("simclr")(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="larger than"):
        build_augment("finetune", size=40)(images(2))
    assert build_augment("simclr", "auto").backend == "torch"


# --- DALI (CPU operators here, GPU operators on a GPU) ----------------------------------------------

def _ramp(n, s=64):
    """Images whose red channel encodes the column and green the row (4 levels per pixel)."""
    i = torch.arange(s) * 4
    x = torch.zeros(n, 3, s, s, dtype=torch.uint8)
    x[:, 0] = i[None, :].expand(s, s).to(torch.uint8)
    x[:, 1] = i[:, None].expand(s, s).to(torch.uint8)
    return x


def _measure(views, s=64, out=32):
    """Crop area fraction, log aspect and flip of each view, read back from the ramp values."""
    r, g = views[:, 0] * 255 / 4, views[:, 1] * 255 / 4
    w = (r.amax((1, 2)) - r.amin((1, 2))) * out / (out - 1)
    h = (g.amax((1, 2)) - g.amin((1, 2))) * out / (out - 1)
    flipped = views[:, 0, :, -1].mean(1) < views[:, 0, :, 0].mean(1)
    return (w + 1) * (h + 1) / (s * s), ((w + 1) / (h + 1)).log(), flipped


@needs_dali
def test_dali_crop_and_flip_distribution_measured_from_pixels():
    n = 1200
    view = ((ResizedCrop((0.08, 1.0)), Flip()),)
    x = _ramp(n)
    g = torch.Generator().manual_seed(0)
    dali = build_augment(view, "dali", size=32)
    a_d, r_d, f_d = _measure(dali(x, g)[0])
    assert torch.equal(f_d, dali.last_params[0]["flip"])  # the reported coins are the ones applied
    a_t, r_t, f_t = _measure(build_augment(view, "torch", size=32)(x, g)[0])
    lim = ks_limit(n, n)
    assert ks(a_d, a_t) < lim and ks(r_d, r_t) < lim
    assert_rate(f_d, 0.5, "dali flip") and assert_rate(f_t, 0.5, "torch flip")
    a_w, _, _ = _measure(build_augment(((ResizedCrop((0.2, 1.0)),),), "torch", size=32)(x, g)[0])
    assert ks(a_d, a_w) > lim  # power: a different scale range is detected


@needs_dali
def test_dali_colour_params_and_outputs():
    n = 1500
    x = images(n, 16, 16)
    dali = build_augment("mocov2", "dali")
    views = dali(x, torch.Generator().manual_seed(1))
    assert len(views) == 2 and views[0].shape == (n, 3, 16, 16) and views[0].dtype == torch.float32
    pd = dali.last_params[0]
    pt = build_augment("mocov2", "torch").sample_params(n, x.shape, torch.Generator().manual_seed(1))[0]
    for key, p in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)):
        assert_rate(pd[key], p, f"dali {key}")
    on_d, on_t = pd["factors"][pd["jitter"]], pt["factors"][pt["jitter"]]
    for k in range(4):
        assert ks(on_d[:, k], on_t[:, k]) < ks_limit(len(on_d), len(on_t))
    assert ks(pd["sigma"][pd["blur"]], pt["sigma"][pt["blur"]]) < ks_limit(int(pd["blur"].sum()), int(pt["blur"].sum()))
    # grayscale views are grey, as reported
    v = views[0]
    grey = (v.amax(1) - v.amin(1)).amax((1, 2)) < 2 / 255
    assert torch.equal(grey[pd["gray"]], torch.ones_like(grey[pd["gray"]]))


@needs_dali
@pytest.mark.parametrize("preset", list(PRESETS))
def test_dali_presets_shapes_and_determinism(preset):
    x = images(8)
    dali = build_augment(preset, "dali", size=16)
    a = dali(x, torch.Generator().manual_seed(3))
    b = dali(x, torch.Generator().manual_seed(3))
    assert len(a) == dali.num_views
    for u, v in zip(a, b):
        assert u.shape == (8, 3, 16, 16) and 0 <= float(u.min()) and float(u.max()) <= 1
        assert torch.equal(u, v)
    if preset == "finetune":
        off = dali.last_params[0]["offset"]
        assert int(off.min()) >= 0 and int(off.max()) <= 8 + 24 - 16
    if preset in ("rocl", "none"):  # the original view is the image itself
        same = build_augment(preset, "dali")(x, torch.Generator().manual_seed(3))[-1]
        torch.testing.assert_close(same, x.float() / 255, atol=1e-6, rtol=0)
