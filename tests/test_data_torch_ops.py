"""Each batched op of the torch augmentation backend against torchvision's functional op (transforms.v2,
float tensors) applied image by image with the same parameters.

Tolerance 2e-5 absolute on [0, 1] images: both sides compute in float32 and differ only in summation
order (separable matmuls vs aten's two resampling passes, a closed-form HSV->RGB vs a table, the blur
as two 1-d passes vs one 2-d kernel) - a few ulps per tap. A wrong tap, weight or box moves pixels by
>= 1e-3.
"""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from advfast.data import high_frequency
from advfast.data import torch_ops as ops

TOL = 2e-5


def _images(b, h, w, c=3):
    x = torch.rand(b, c, h, w)
    x[0] = x[0].round()  # saturated pixels and grey (max == min) pixels hit the HSV edge cases
    x[1, :, : h // 2] = x[1, :1, : h // 2]
    return x


@pytest.mark.parametrize("kind", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape,out", [((32, 32), (32, 32)), ((23, 37), (17, 29)), ((96, 96), (40, 64))])
def test_resized_crop_with_flip(kind, shape, out):
    b = 6
    x = _images(b, *shape)
    h, w = shape
    g = torch.Generator().manual_seed(0)
    hh = torch.randint(1, h + 1, (b,), generator=g)
    ww = torch.randint(1, w + 1, (b,), generator=g)
    top = (torch.rand(b, generator=g) * (h - hh + 1)).long()
    left = (torch.rand(b, generator=g) * (w - ww + 1)).long()
    hh[0], ww[0], top[0], left[0] = h, w, 0, 0  # whole image: a plain resize
    box = torch.stack((top, left, hh, ww), 1)
    flip = torch.arange(b) % 2 == 1
    got = ops.resized_crop(x, box, out, kind, flip=flip)
    mode = InterpolationMode.BILINEAR if kind == "bilinear" else InterpolationMode.BICUBIC
    for n in range(b):
        ref = F.resized_crop(x[n], *box[n].tolist(), size=list(out), interpolation=mode, antialias=True).clamp(0, 1)
        ref = F.horizontal_flip(ref) if flip[n] else ref
        torch.testing.assert_close(got[n], ref, atol=TOL, rtol=0)


def test_padded_crop_and_flip():
    x = _images(5, 12, 10)
    offset = torch.tensor([[0, 0], [8, 8], [3, 5], [8, 0], [1, 7]])
    flip = torch.tensor([False, True, True, False, True])
    got = ops.padded_crop(x, offset, (12, 10), 4, flip)
    for n in range(5):
        ref = F.crop(F.pad(x[n], [4]), *offset[n].tolist(), 12, 10)
        ref = F.horizontal_flip(ref) if flip[n] else ref
        assert torch.equal(got[n], ref)
    assert torch.equal(ops.hflip(x, flip)[1], x[1].flip(-1)) and torch.equal(ops.hflip(x, flip)[0], x[0])


@pytest.mark.parametrize("c", [3, 1])
def test_colour_ops(c):
    b = 8
    x = _images(b, 9, 7, c)
    f = 0.2 + 1.6 * torch.rand(b)
    shift = torch.rand(b) - 0.5
    for name, fn, tv in (("brightness", ops.adjust_brightness, F.adjust_brightness),
                         ("contrast", ops.adjust_contrast, F.adjust_contrast),
                         ("saturation", ops.adjust_saturation, F.adjust_saturation)):
        got = fn(x, f)
        for n in range(b):
            torch.testing.assert_close(got[n], tv(x[n], float(f[n])), atol=TOL, rtol=0, msg=name)
    got = ops.adjust_hue(x, shift)
    for n in range(b):
        torch.testing.assert_close(got[n], F.adjust_hue(x[n], float(shift[n])), atol=TOL, rtol=0)
    gray = ops.random_grayscale(x, torch.arange(b) % 2 == 0)
    for n in range(b):
        ref = F.rgb_to_grayscale(x[n], num_output_channels=3) if n % 2 == 0 and c == 3 else x[n]
        torch.testing.assert_close(gray[n], ref, atol=TOL, rtol=0)


def test_color_jitter_per_sample_order():
    b = 24
    x = _images(b, 8, 8)
    g = torch.Generator().manual_seed(1)
    factors = torch.stack((0.6 + 0.8 * torch.rand(b, generator=g), 0.6 + 0.8 * torch.rand(b, generator=g),
                           0.6 + 0.8 * torch.rand(b, generator=g), 0.2 * torch.rand(b, generator=g) - 0.1), 1)
    import itertools
    order = torch.tensor(list(itertools.permutations(range(4))))  # every order once
    apply = torch.arange(b) % 5 != 0
    got = ops.color_jitter(x, factors, order, apply)
    fns = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for n in range(b):
        ref = x[n]
        if apply[n]:
            for i in order[n].tolist():
                ref = fns[i](ref, float(factors[n, i]))
        torch.testing.assert_close(got[n], ref, atol=TOL, rtol=0)


def test_gaussian_blur():
    b = 6
    x = _images(b, 16, 11)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.3, 2.0, 0.7])
    apply = torch.tensor([True, True, True, True, True, False])
    got = ops.gaussian_blur(x, sigma, 9, apply)
    for n in range(b):
        ref = F.gaussian_blur(x[n], [9, 9], [float(sigma[n])] * 2) if apply[n] else x[n]
        torch.testing.assert_close(got[n], ref, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="kernel_size"):
        ops.gaussian_blur(x[:, :, :3, :3], sigma, 9)


def _hfc_reference(x, r):
    """AdvCL's fr_util.generate_high in float64: a Python-loop mask, fftn/fftshift, real part."""
    h, w = x.shape[-2:]
    mask = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            if math.sqrt((i - h // 2) ** 2 + (j - w // 2) ** 2) < r:
                mask[i, j] = 1.0
    f = np.fft.fftshift(np.fft.fftn(x.double().numpy(), axes=(-2, -1)), axes=(-2, -1)) * (1 - mask)
    return torch.from_numpy(np.real(np.fft.ifftn(np.fft.ifftshift(f, axes=(-2, -1)), axes=(-2, -1))))


@pytest.mark.parametrize("shape,r", [((4, 3, 32, 32), 8), ((2, 3, 17, 12), 4), ((1, 1, 8, 8), 0)])
def test_high_frequency(shape, r):
    x = torch.rand(shape)
    got = high_frequency(x, r)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), _hfc_reference(x, r), atol=1e-5, rtol=0)
    if r == 0:
        torch.testing.assert_close(got, x, atol=1e-5, rtol=0)  # nothing removed
    else:
        assert got.min() < 0  # unclamped, as the official code
    with pytest.raises(TypeError, match="floating"):
        high_frequency(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.gpu
def test_high_frequency_first_call_inside_a_cuda_graph_capture():
    """A mask first built during capture must not stay cached, unfilled, for eager calls."""
    x = torch.rand(2, 3, 19, 21, device="cuda")
    torch.fft.ifft2(torch.fft.fft2(x))  # cuFFT plans made outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            high_frequency(x, 5)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(high_frequency(x, 5).cpu().double(), _hfc_reference(x.cpu(), 5), atol=1e-5, rtol=0)
