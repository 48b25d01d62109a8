"""Output sizes shared by every augmentation backend (torch, torchvision, DALI): one module they all
import, so the backends need nothing private from augment.py."""

from __future__ import annotations

import math


def blur_kernel_size(sigma_max: float, size: tuple[int, int]) -> int:
    """Odd kernel covering +-3 sigma_max (13 taps for sigma 2), shrunk to fit reflect padding."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    return min(k, 2 * (min(size) - 1) + 1)


def out_size(size, image_shape) -> tuple[int, int]:
    """The (H, W) of the views: ``size`` when given, else the input images' own."""
    if size is None:
        return int(image_shape[-2]), int(image_shape[-1])
    return size
