"""The augmentation interface every backend implements (torch in augment.py, torchvision_backend.py,
dali_backend.py): preset bookkeeping, input checks and the batched parameter sampler. Its own module so
the backends import it without importing the factory in augment.py, which imports them."""

from __future__ import annotations

import math

import torch

from advfast.data.presets import Blur, Flip, Grayscale, Jitter, PadCrop, ResizedCrop, geometric_op, resolve_views
from advfast.data.sizes import out_size


class Augment:
    """Base: preset bookkeeping and the batched parameter sampler the torch backend uses."""

    backend = "base"

    def __init__(self, preset="simclr", size=None):
        self.preset, self.views = resolve_views(preset)
        if size is not None:
            size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        self.size = size

    @property
    def num_views(self) -> int:
        return len(self.views)

    def set_views(self, preset) -> None:
        """Replace the views (a preset name or a custom tuple of views), e.g. between epochs: the torch
        backend reads them at every call, the torchvision backend's DataLoader workers receive them with
        the next epoch's loader, DALI rebuilds its pipeline. The number of views cannot change (a method's
        step indexes them). Validated first: a bad preset leaves the old views in place."""
        name, views = resolve_views(preset)
        if len(views) != len(self.views):
            raise ValueError(f"set_views: {len(views)} views given, the augmentation makes {len(self.views)}; "
                             f"the number of views stays fixed for a run")
        self.preset, self.views = name, views
        self._views_changed()

    def _views_changed(self) -> None:
        """Backends that cache anything built from the views drop it here."""

    def __repr__(self):
        return f"{type(self).__name__}(preset={self.preset!r}, views={self.num_views}, size={self.size})"

    def check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"augment expects uint8 images (B, C, H, W), got {got}")
        out = out_size(self.size, images.shape)
        for view in self.views:
            op = geometric_op(view)
            if isinstance(op, PadCrop):
                h, w = images.shape[-2:]
                if out[0] > h + 2 * op.padding or out[1] > w + 2 * op.padding:
                    raise ValueError(f"size {out} is larger than the {h}x{w} images padded by {op.padding}")

    # -- batched sampling on the device (torch backend; DALI reuses it) ----------------------------

    def sample_params(self, batch: int, image_shape, generator: torch.Generator | None = None,
                      device=None) -> list[dict]:
        device = torch.device(device) if device is not None else (
            generator.device if generator is not None else torch.device("cpu"))
        h, w = int(image_shape[-2]), int(image_shape[-1])
        out = out_size(self.size, image_shape)
        return [self._sample_view(view, batch, h, w, out, generator, device) for view in self.views]

    @staticmethod
    def _rand(shape, generator, device):
        return torch.rand(shape, generator=generator, device=device)

    def _sample_view(self, view, b, h, w, out, g, device) -> dict:
        p = {}
        for op in view:
            if isinstance(op, ResizedCrop):
                p["box"] = sample_resized_crop(b, h, w, op.scale, op.ratio, g, device)
            elif isinstance(op, PadCrop):
                spans = (h + 2 * op.padding - out[0] + 1, w + 2 * op.padding - out[1] + 1)
                u = self._rand((b, 2), g, device)
                # python-number columns: torch.tensor(..., device=cuda) would be a blocking copy per batch
                p["offset"] = torch.stack([(u[:, k] * n).long().clamp_max(n - 1) for k, n in enumerate(spans)], 1)
            elif isinstance(op, Flip):
                p["flip"] = self._rand(b, g, device) < op.p
            elif isinstance(op, Jitter):
                p["jitter"] = self._rand(b, g, device) < op.p
                u = self._rand((b, 4), g, device)
                lo = (1 - op.brightness, 1 - op.contrast, 1 - op.saturation, -op.hue)
                hi = (1 + op.brightness, 1 + op.contrast, 1 + op.saturation, op.hue)
                p["factors"] = torch.stack([lo[k] + u[:, k] * (hi[k] - lo[k]) for k in range(4)], 1)
                p["order"] = self._rand((b, 4), g, device).argsort(1)  # a uniform random permutation
            elif isinstance(op, Grayscale):
                p["gray"] = self._rand(b, g, device) < op.p
            elif isinstance(op, Blur):
                p["blur"] = self._rand(b, g, device) < op.p
                p["sigma"] = op.sigma[0] + self._rand(b, g, device) * (op.sigma[1] - op.sigma[0])
        return p

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        self.check_images(images)
        params = self.sample_params(images.shape[0], images.shape, generator, images.device)
        return self.apply(images, params)

    def apply(self, images: torch.Tensor, params: list[dict]) -> list[torch.Tensor]:
        raise NotImplementedError


def sample_resized_crop(b: int, h: int, w: int, scale, ratio, g, device, attempts: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for a batch: up to 10 tries of (area, log-aspect)
    per sample, the first that fits wins; else the centre crop clamped to the ratio range."""
    area = h * w
    target = area * (scale[0] + torch.rand((b, attempts), generator=g, device=device) * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + torch.rand((b, attempts), generator=g, device=device) * (log_hi - log_lo))
    cw = torch.sqrt(target * aspect).round().long()  # round half to even, as Python's round
    ch = torch.sqrt(target / aspect).round().long()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.long().argmax(1, keepdim=True)  # index of the first fitting try
    any_ok = ok.any(1)
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(h * max(ratio))), h
    else:
        fw, fh = w, h
    cw = torch.where(any_ok, cw.gather(1, first).squeeze(1), fw)
    ch = torch.where(any_ok, ch.gather(1, first).squeeze(1), fh)
    u = torch.rand((b, 2), generator=g, device=device)
    top = torch.where(any_ok, (u[:, 0] * (h - ch + 1)).long().minimum(h - ch), (h - fh) // 2)
    left = torch.where(any_ok, (u[:, 1] * (w - cw + 1)).long().minimum(w - cw), (w - fw) // 2)
    return torch.stack((top, left, ch, cw), 1)
