"""The classic per-sample CPU path: torchvision's own parameter sampling (the static ``get_params`` of
its transform classes, drawing from torch's global RNG in the same order the transforms do) and its
functional ops, image by image. It is the baseline the benchmarks compare against, and DeviceLoader
runs it inside DataLoader workers (``BatchViews``).

Images are converted to float32 first, so the pixels equal the torch backend's for the same
parameters (tests/test_data_augment.py). A call is seeded by one integer drawn from the generator, so
results are deterministic for a seed and do not touch the caller's global RNG.
"""

from __future__ import annotations

import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from advfast.data.augment_base import Augment
from advfast.data.sizes import blur_kernel_size, out_size
from advfast.data.presets import Blur, Flip, Grayscale, Jitter, Original, PadCrop, ResizedCrop

_INTERP = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
_NO_JITTER = ([0, 1, 2, 3], 1.0, 1.0, 1.0, 0.0)


def draw_seed(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


class TorchvisionAugment(Augment):
    backend = "torchvision"

    # -- one image ---------------------------------------------------------------------------------

    def _sample_one(self, view, h, w, out) -> dict:
        p = {}
        for op in view:
            if isinstance(op, ResizedCrop):
                shape_only = torch.empty(1, 1, 1).expand(1, h, w)
                p["box"] = T.RandomResizedCrop.get_params(shape_only, list(op.scale), list(op.ratio))
            elif isinstance(op, PadCrop):
                padded = torch.empty(1, 1, 1).expand(1, h + 2 * op.padding, w + 2 * op.padding)
                p["offset"] = T.RandomCrop.get_params(padded, out)[:2]
            elif isinstance(op, Flip):
                p["flip"] = bool(torch.rand(1) < op.p)  # RandomHorizontalFlip
            elif isinstance(op, Jitter):
                applied = not (op.p < torch.rand(1))  # RandomApply
                p["jitter"] = applied
                if applied:
                    fn_idx, b, c, s, hue = T.ColorJitter.get_params(
                        [1 - op.brightness, 1 + op.brightness], [1 - op.contrast, 1 + op.contrast],
                        [1 - op.saturation, 1 + op.saturation], [-op.hue, op.hue])
                    p["order"], p["factors"] = fn_idx.tolist(), (b, c, s, hue)
                else:
                    p["order"], p["factors"] = _NO_JITTER[0], _NO_JITTER[1:]
            elif isinstance(op, Grayscale):
                p["gray"] = bool(torch.rand(1) < op.p)  # RandomGrayscale
            elif isinstance(op, Blur):
                applied = not (op.p < torch.rand(1))
                p["blur"] = applied
                p["sigma"] = T.GaussianBlur.get_params(*op.sigma) if applied else 0.0
        return p

    def _apply_one(self, view, img: torch.Tensor, p: dict, out) -> torch.Tensor:
        for op in view:
            if isinstance(op, ResizedCrop):
                img = F.resized_crop(img, *p["box"], size=list(out), interpolation=_INTERP[op.interpolation],
                                     antialias=True).clamp(0, 1)
            elif isinstance(op, PadCrop):
                img = F.crop(F.pad(img, [op.padding]), *p["offset"], *out)
            elif isinstance(op, Original):
                if tuple(img.shape[-2:]) != tuple(out):
                    img = F.resize(img, list(out), antialias=True).clamp(0, 1)
            elif isinstance(op, Flip):
                if p["flip"]:
                    img = F.horizontal_flip(img)
            elif isinstance(op, Jitter):
                if p["jitter"]:
                    b, c, s, hue = p["factors"]
                    for i in p["order"]:
                        if i == 0:
                            img = F.adjust_brightness(img, b)
                        elif i == 1:
                            img = F.adjust_contrast(img, c)
                        elif i == 2:
                            img = F.adjust_saturation(img, s)
                        else:
                            img = F.adjust_hue(img, hue)
            elif isinstance(op, Grayscale):
                if p["gray"] and img.shape[0] == 3:
                    img = F.rgb_to_grayscale(img, num_output_channels=3)
            elif isinstance(op, Blur):
                if p["blur"]:
                    k = blur_kernel_size(op.sigma[1], img.shape[-2:])
                    img = F.gaussian_blur(img, [k, k], [p["sigma"], p["sigma"]])
        return img

    # -- batches -----------------------------------------------------------------------------------

    def run_seeded(self, images: torch.Tensor, seed: int, record: bool = False):
        """Views of a CPU uint8 batch, image by image, with torch's global RNG seeded to ``seed`` (the
        caller's RNG state is restored afterwards). With ``record`` also returns the parameters."""
        self.check_images(images)
        b, _, h, w = images.shape
        out = out_size(self.size, images.shape)
        x = images.cpu().float().div_(255)
        views = [[] for _ in self.views]
        params = [[] for _ in self.views]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for n in range(b):
                for v, view in enumerate(self.views):
                    p = self._sample_one(view, h, w, out)
                    views[v].append(self._apply_one(view, x[n], p, out))
                    params[v].append(p)
        stacked = [torch.stack(v) for v in views]
        return (stacked, [_stack_params(p) for p in params]) if record else stacked

    def __call__(self, images, generator=None):
        views = self.run_seeded(images, draw_seed(generator))
        return [v.to(images.device) for v in views]

    def sample_params(self, batch, image_shape, generator=None, device=None):
        h, w = int(image_shape[-2]), int(image_shape[-1])
        out = out_size(self.size, image_shape)
        params = [[] for _ in self.views]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed(generator))
            for _ in range(batch):
                for v, view in enumerate(self.views):
                    params[v].append(self._sample_one(view, h, w, out))
        return [_stack_params(p) for p in params]

    def apply(self, images, params):
        self.check_images(images)
        out = out_size(self.size, images.shape)
        x = images.cpu().float().div_(255)
        result = []
        for view, p in zip(self.views, params):
            rows = _unstack_params(p, images.shape[0])
            result.append(torch.stack([self._apply_one(view, x[n], rows[n], out) for n in range(len(rows))]))
        return [v.to(images.device) for v in result]


def _stack_params(rows: list[dict]) -> dict:
    if not rows:
        return {}
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows]
        if key in ("flip", "jitter", "gray", "blur"):
            out[key] = torch.tensor(vals, dtype=torch.bool)
        elif key in ("factors", "sigma"):
            out[key] = torch.tensor(vals, dtype=torch.float32)
        else:
            out[key] = torch.tensor(vals, dtype=torch.int64)
    return out


def _unstack_params(p: dict, batch: int) -> list[dict]:
    rows = [{} for _ in range(batch)]
    for key, val in p.items():
        val = val.cpu()
        for n in range(batch):
            v = val[n]
            if key in ("flip", "jitter", "gray", "blur"):
                rows[n][key] = bool(v)
            elif key == "sigma":
                rows[n][key] = float(v)
            elif key == "factors":
                rows[n][key] = tuple(float(t) for t in v)
            else:
                rows[n][key] = [int(t) for t in v]
    return rows


class BatchViews(torch.utils.data.Dataset):
    """Dataset for DataLoader workers: item (indices, seed) -> (views, labels, indices) of that batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: TorchvisionAugment):
        self.images, self.labels, self.augment = images.cpu(), labels.cpu(), augment

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        indices, seed = item
        views = self.augment.run_seeded(self.images[indices], seed)
        return views, self.labels[indices], indices
