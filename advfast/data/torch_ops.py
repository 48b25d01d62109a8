"""Batched image ops with per-sample parameters, on float images in [0, 1] of shape (B, C, H, W).

Each op equals torchvision's functional op (transforms.v2.functional on float tensors) applied image by
image with the same parameters; tests/test_data_torch_ops.py holds them to that. Everything stays on
the images' device and nothing reads a tensor back to the host.

Crop + resize (+ flip) is one batched op: resampling is separable, so each image's crop box and output
size become two small interpolation matrices (rows: output pixels, columns: input pixels) and
``out = Ry @ x @ Rx^T`` is two batched matmuls. The matrices carry torch's antialiased
bilinear/bicubic weights (what torchvision's resize uses by default, and for bicubic the PIL kernel
that the official codes' PIL pipelines use) with taps clipped to the crop box - exactly crop-then-
resize, which grid_sample on the whole image is not at the box edges - and a horizontal flip is the
column matrix reversed.
"""

from __future__ import annotations

import math

import torch

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


# --- crop + resize -----------------------------------------------------------------------------------

def _filter(kind: str, x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    if kind == "bilinear":
        return (1 - x).clamp_min(0)
    a = -0.5  # torch's antialiased bicubic (PIL's kernel)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                    kind: str = "bilinear", max_length: int | None = None) -> torch.Tensor:
    """(B, out_size, in_size) weights that resize the window [start, start+length) of each row to out_size.

    start, length: (B,) integer tensors. Follows aten's antialiased upsample (PIL's algorithm):
    support grows with the downscale factor, taps outside the window are dropped, weights renormalised.
    ``max_length`` bounds ``length`` (defaults to in_size) and sets the static number of taps.
    """
    if kind not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {kind!r}")
    device = start.device
    radius = 1.0 if kind == "bilinear" else 2.0
    max_length = in_size if max_length is None else max_length
    taps = int(math.ceil(2 * radius * max(max_length / out_size, 1.0))) + 2
    length_f = length.to(torch.float64)[:, None]
    scale = length_f / out_size  # (B, 1)
    support = radius * scale.clamp_min(1.0)
    invscale = torch.where(scale >= 1, 1.0 / scale, torch.ones_like(scale))
    centre = scale * (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5)  # (B, out)
    lo = (centre - support + 0.5).floor().clamp_min(0)  # aten truncates, then clamps at 0: same
    hi = torch.minimum((centre + support + 0.5).floor(), length_f)
    j = lo[..., None] + torch.arange(taps, device=device, dtype=torch.float64)  # (B, out, taps)
    w = _filter(kind, (j - centre[..., None] + 0.5) * invscale[..., None])
    w = torch.where(j < hi[..., None], w, torch.zeros_like(w))
    w = w / w.sum(-1, keepdim=True)
    cols = (j.clamp(max=in_size - 1).long() + start.long()[:, None, None]).clamp(max=in_size - 1)
    m = torch.zeros(start.shape[0], out_size, in_size, device=device, dtype=torch.float64)
    m.scatter_add_(2, cols, w)
    return m.to(torch.float32)


def resized_crop(x: torch.Tensor, box: torch.Tensor, size: tuple[int, int], kind: str = "bilinear",
                 flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop box (B, 4) = (top, left, height, width) of each image, resize to ``size``, optionally flip.

    Equals v2.functional.resized_crop(img, *box, size, kind, antialias=True) (then hflip where ``flip``).
    The result is clamped to [0, 1] (bicubic overshoots; the views must stay images).
    """
    b, c, h, w = x.shape
    ry = resample_matrix(box[:, 0], box[:, 2], h, size[0], kind)
    rx = resample_matrix(box[:, 1], box[:, 3], w, size[1], kind)
    if flip is not None:
        rx = torch.where(flip[:, None, None], rx.flip(1), rx)
    # (B, 1, Ho, H) @ (B, C, H, W) @ (B, 1, W, Wo)
    out = ry[:, None] @ x @ rx.transpose(1, 2)[:, None]
    return out.clamp_(0, 1)


def resize(x: torch.Tensor, size: tuple[int, int], kind: str = "bilinear") -> torch.Tensor:
    """Whole-image resize (the same weights for every image)."""
    b, _, h, w = x.shape
    if (h, w) == tuple(size):
        return x
    box = torch.zeros((b, 4), dtype=torch.int64, device=x.device)  # filled on the device: no host copy
    box[:, 2], box[:, 3] = h, w
    return resized_crop(x, box, size, kind)


def padded_crop(x: torch.Tensor, offset: torch.Tensor, size: tuple[int, int], padding: int,
                flip: torch.Tensor | None = None) -> torch.Tensor:
    """RandomCrop(size, padding) with zero fill: the window at offset (B, 2) = (top, left) of the padded
    image, gathered for the whole batch at once; optionally flipped."""
    b, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    rows = offset[:, 0, None] + torch.arange(size[0], device=x.device)  # (B, Ho)
    cols = offset[:, 1, None] + torch.arange(size[1], device=x.device)  # (B, Wo)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    wp = w + 2 * padding
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, -1).expand(b, c, -1)
    return xp.reshape(b, c, -1).gather(2, flat).reshape(b, c, size[0], size[1])


def hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# --- colour ------------------------------------------------------------------------------------------

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1).to(torch.float32)


def blend(x: torch.Tensor, ref: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _col(factor)
    return (f * x + (1 - f) * ref).clamp_(0, 1)


def adjust_brightness(x, factor):
    return blend(x, torch.zeros_like(x[:, :1]), factor)


def adjust_contrast(x, factor):
    if x.shape[1] != 3:
        ref = x.mean(dim=(1, 2, 3), keepdim=True)
    else:
        ref = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return blend(x, ref, factor)


def adjust_saturation(x, factor):
    if x.shape[1] != 3:
        return x  # torchvision leaves single-channel images unchanged
    return blend(x, grayscale(x), factor)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, s, v) planes, each (B, H, W), as torchvision's _rgb_to_hsv (PIL's algorithm)."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)  # elementwise: far faster than a dim-1 reduction on CPU
    minc = torch.minimum(torch.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    h = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return h, s, maxc


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) from (h, s, v) planes: channel n in (5, 3, 1) is v - v*s*clamp(min(k, 4-k), 0, 1)
    with k = (n + 6h) mod 6 - the closed form of torchvision's sextant table, without building it."""
    h6 = h * 6.0
    vs = v * s
    planes = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        planes.append((v - vs * torch.minimum(k, 4.0 - k).clamp(0, 1)).clamp(0, 1))
    return torch.stack(planes, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    h, s, v = rgb_to_hsv(x)
    h = torch.remainder(h + shift.reshape(-1, 1, 1).to(x.dtype), 1.0)
    return hsv_to_rgb(h, s, v)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 apply: torch.Tensor | None = None) -> torch.Tensor:
    """ColorJitter with per-sample factors (B, 4) = (brightness, contrast, saturation, hue shift) applied
    in per-sample order (B, 4), a permutation of 0..3 (torchvision's fn_idx), where ``apply``.

    Brightness, contrast and saturation are all ``blend(x, ref, f)`` with a different reference, so each
    of the 4 stages does one blend whose reference is picked per sample, plus hue where that stage is hue.
    """
    if apply is None:
        apply = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    # skipped samples blend with factor 1 (identity); their hue shift is never applied (is_hue below)
    factors = torch.where(apply[:, None], factors.to(torch.float32), 1.0)
    colour = x.shape[1] == 3
    for stage in range(4):
        op = order[:, stage]
        f = factors.gather(1, op[:, None].clamp(max=2)).squeeze(1)
        f = torch.where(op == 3, torch.ones_like(f), f)  # the hue stage blends with factor 1: identity
        gray = grayscale(x) if colour else x.mean(1, keepdim=True)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        op4 = op.reshape(-1, 1, 1, 1)
        if colour:
            ref = torch.where(op4 == 0, torch.zeros_like(gray), torch.where(op4 == 1, mean, gray))
        else:  # saturation leaves one channel alone
            ref = torch.where(op4 == 0, torch.zeros_like(gray), torch.where(op4 == 1, mean, x))
        x = blend(x, ref, f)
        if colour:
            is_hue = (op == 3) & apply
            x = torch.where(is_hue.reshape(-1, 1, 1, 1), adjust_hue(x, factors[:, 3]), x)
    return x


def random_grayscale(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    return torch.where(mask.reshape(-1, 1, 1, 1), grayscale(x).expand_as(x), x)


# --- blur --------------------------------------------------------------------------------------------

def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, K) normalised 1-d Gaussian kernels, as torchvision's _get_gaussian_kernel1d."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sigma.to(torch.float32)[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int,
                  apply: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample Gaussian blur (reflect padding, separable), one grouped convolution per axis."""
    b, c, h, w = x.shape
    pad = kernel_size // 2
    if pad >= min(h, w):
        raise ValueError(f"gaussian_blur: kernel_size {kernel_size} needs images larger than {pad} pixels")
    k = gaussian_kernels(sigma, kernel_size).repeat_interleave(c, 0)  # (B*C, K)
    y = torch.nn.functional.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = torch.nn.functional.conv2d(y, k[:, None, None, :], groups=b * c)
    y = torch.nn.functional.conv2d(y, k[:, None, :, None], groups=b * c)
    y = y.reshape(b, c, h, w)
    if apply is not None:
        y = torch.where(apply.reshape(-1, 1, 1, 1), y, x)
    return y
