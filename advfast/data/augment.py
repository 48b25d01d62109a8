"""Augmentation backends behind one interface.

``build_augment(preset, backend="torch", size=None) -> Augment``;
``Augment(images_uint8, generator) -> list of V float views in [0, 1]``, each (B, C, H', W') on the
images' device; ``Augment.num_views``. Views and their order per preset: advfast.data.presets.

Every backend also splits a call into ``sample_params(batch, image_shape, generator, device)`` (one dict
of per-sample tensors per view) and ``apply(images, params)``, so tests can hold the backends to the
same parameter distributions and to each other's pixels. Parameter keys:
  box (B, 4) int64   crop (top, left, height, width) in input pixels      [ResizedCrop]
  offset (B, 2)      crop (top, left) in the zero-padded image           [PadCrop]
  flip (B,) bool                                                          [Flip]
  jitter (B,) bool, factors (B, 4) (brightness, contrast, saturation, hue), order (B, 4) [Jitter]
  gray (B,) bool                                                          [Grayscale]
  blur (B,) bool, sigma (B,)                                              [Blur]

Backends: "torch" (batched on the images' device; parameters drawn there with the generator, no host
sync), "torchvision" (per-sample CPU transforms, the classic path; DeviceLoader runs it in DataLoader
workers), "dali" (NVIDIA DALI pipelines; advfast.data.dali_backend). "auto" is "torch".
"""

from __future__ import annotations

import torch

from advfast.data import torch_ops
from advfast.data.augment_base import Augment
from advfast.data.presets import Blur, Flip, Grayscale, Jitter, Original, PadCrop, ResizedCrop
from advfast.data.sizes import blur_kernel_size, out_size

BACKENDS = ("torch", "dali", "torchvision")


class TorchAugment(Augment):
    """Batched on the images' device: each op runs once for the whole batch with per-sample parameters."""

    backend = "torch"

    def apply(self, images, params):
        self.check_images(images)
        x = images.float().div_(255)
        out = out_size(self.size, images.shape)
        return [self._apply_view(view, x, p, out) for view, p in zip(self.views, params)]

    def _apply_view(self, view, x, p, out):
        flip = p.get("flip")
        geometric_done = flipped_first = False
        for op in view:
            if isinstance(op, Flip):
                flipped_first = not geometric_done
            elif isinstance(op, ResizedCrop):
                box = p["box"]
                if flipped_first:  # crop(flip(x), box) == flip(crop(x, mirrored box))
                    box = torch.where(flip[:, None], _mirror(box, 1, 3, x.shape[-1]), box)
                x = torch_ops.resized_crop(x, box, out, op.interpolation, flip=flip)
                geometric_done = True
            elif isinstance(op, PadCrop):
                offset = p["offset"]
                if flipped_first:
                    width = torch.full_like(offset[:, :1], out[1])
                    mirrored = torch.cat((offset[:, :1], x.shape[-1] + 2 * op.padding - offset[:, 1:] - width), 1)
                    offset = torch.where(flip[:, None], mirrored, offset)
                x = torch_ops.padded_crop(x, offset, out, op.padding, flip=flip)
                geometric_done = True
            elif isinstance(op, Original):
                x = torch_ops.resize(x, out)
            elif isinstance(op, Jitter):
                x = torch_ops.color_jitter(x, p["factors"], p["order"], p["jitter"])
            elif isinstance(op, Grayscale):
                x = torch_ops.random_grayscale(x, p["gray"])
            elif isinstance(op, Blur):
                x = torch_ops.gaussian_blur(x, p["sigma"], blur_kernel_size(op.sigma[1], x.shape[-2:]), p["blur"])
        if flip is not None and not geometric_done:
            x = torch_ops.hflip(x, flip)
        return x


def _mirror(box: torch.Tensor, left: int, width: int, image_width: int) -> torch.Tensor:
    box = box.clone()
    box[:, left] = image_width - box[:, left] - box[:, width]
    return box


def build_augment(preset="simclr", backend: str = "torch", size=None) -> Augment:
    """An Augment for ``preset`` (a name in PRESETS, or a custom tuple of views) on ``backend``."""
    if backend == "auto":
        backend = "torch"
    if backend == "torch":
        return TorchAugment(preset, size)
    if backend == "torchvision":
        from advfast.data.torchvision_backend import TorchvisionAugment

        return TorchvisionAugment(preset, size)
    if backend == "dali":
        from advfast.data.dali_backend import DaliAugment

        return DaliAugment(preset, size)
    raise ValueError(f"unknown augmentation backend {backend!r}; choose one of {', '.join(BACKENDS)}, auto")
