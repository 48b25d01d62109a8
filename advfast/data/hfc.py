"""AdvCL's high-frequency component (HFC) view, batched on the device.

As the official ``fr_util.generate_high``: ``fftshift(fft2(x)) * (1 - mask)`` -> ``ifftshift`` ->
``ifft2`` -> real part, where mask is 1 within Euclidean distance < radius of the centre frequency
(H//2, W//2; the official code's imageSize/2 for its even sizes). Not clamped: values can leave [0, 1],
as in the official code. The mask is built once per (H, W, radius, device) and cached.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=32)
def high_pass_mask(h: int, w: int, radius: float, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H, W) of ``dtype``: 0 inside the low-frequency disc, 1 outside."""
    i = torch.arange(h, device=device, dtype=torch.float32)[:, None] - h // 2
    j = torch.arange(w, device=device, dtype=torch.float32)[None, :] - w // 2
    return ((i * i + j * j).sqrt() >= radius).to(dtype)


def high_frequency(x: torch.Tensor, radius: float = 8) -> torch.Tensor:
    """High-frequency part of a batch of images (..., H, W), same shape and float dtype as ``x``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError("high_frequency expects a floating tensor (..., H, W); convert uint8 images with x.float() / 255")
    if radius < 0:
        raise ValueError(f"high_frequency: radius must be >= 0, got {radius}")
    h, w = x.shape[-2:]
    # inside a CUDA graph capture the mask's kernels run only at replay: never cache it there
    build = high_pass_mask.__wrapped__ if x.is_cuda and torch.cuda.is_current_stream_capturing() else high_pass_mask
    # float32 FFT for float32/16 images (as the official code); a float64 input stays float64 (exact checks)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    mask = build(int(h), int(w), float(radius), x.device, work)
    spec = torch.fft.fftshift(torch.fft.fft2(x.to(work)), dim=(-2, -1)) * mask
    out = torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real
    return out.to(x.dtype)
