"""Augmentation presets: which views, and the ops of each view in order, with the official parameters.

A preset is a tuple of views; a view is a tuple of ops applied in order. Every backend runs the same
specs. View order per preset (the methods index views by position):

  simclr    [t1, t2]           ACL: RandomResizedCrop(scale 0.08-1, bicubic), flip,
                               ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2
  mocov2    [q, k]             AMOC: RandomResizedCrop(scale 0.2-1, bilinear), jitter p=0.8,
                               grayscale p=0.2, Gaussian blur sigma 0.1-2 p=0.5, flip
  advcl     [t1, t2, original] AdvCL: two SimCLR views with scale 0.2-1 (bilinear, torchvision's default
                               as in its code) and the "original" view RandomCrop(pad 4) + flip; the
                               high-frequency view is computed from view 2 on the device with
                               advfast.data.high_frequency
  rocl      [t1, t2, original] RoCL: jitter p=0.8, grayscale p=0.2, flip, then RandomResizedCrop
                               (scale 0.08-1, bilinear); original = the un-augmented image
  finetune  [x]                RandomCrop(pad 4) + flip
  none      [x]                the image as is

All crops use torchvision's aspect-ratio range 3/4-4/3. A flip commutes with every colour op and the
(symmetric, reflect-padded) blur, so where the official order puts the flip does not change the
distribution of a view; the backends fold it into the crop.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResizedCrop:
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class PadCrop:
    padding: int = 4


@dataclass(frozen=True)
class Flip:
    p: float = 0.5


@dataclass(frozen=True)
class Jitter:
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    p: float = 0.8


@dataclass(frozen=True)
class Grayscale:
    p: float = 0.2


@dataclass(frozen=True)
class Blur:
    sigma: tuple = (0.1, 2.0)
    p: float = 0.5


@dataclass(frozen=True)
class Original:
    """The image as is (resized when the preset's output size differs from the input)."""


OPS = (ResizedCrop, PadCrop, Flip, Jitter, Grayscale, Blur, Original)

_SIMCLR = (ResizedCrop((0.08, 1.0), interpolation="bicubic"), Flip(), Jitter(), Grayscale())
_MOCOV2 = (ResizedCrop((0.2, 1.0)), Jitter(), Grayscale(), Blur(), Flip())
_ADVCL = (ResizedCrop((0.2, 1.0)), Flip(), Jitter(), Grayscale())
_PADCROP = (PadCrop(4), Flip())
_ROCL = (Jitter(), Grayscale(), Flip(), ResizedCrop((0.08, 1.0)))

PRESETS = {
    "simclr": (_SIMCLR, _SIMCLR),
    "mocov2": (_MOCOV2, _MOCOV2),
    "advcl": (_ADVCL, _ADVCL, _PADCROP),
    "rocl": (_ROCL, _ROCL, (Original(),)),
    "finetune": (_PADCROP,),
    "none": ((Original(),),),
}


def resolve_views(preset) -> tuple[str, tuple]:
    """(name, views) for a preset name or a custom tuple of views (each a tuple of ops)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            from advfast.config import closest

            raise ValueError(f"unknown augmentation preset {preset!r}{closest(preset, PRESETS)}; "
                             f"choose one of {', '.join(PRESETS)}")
        return preset, PRESETS[preset]
    views = tuple(tuple(v) for v in preset)
    if not views:
        raise ValueError("a custom preset needs at least one view")
    for view in views:
        kinds = [type(op) for op in view]
        if not view or any(k not in OPS for k in kinds):
            raise TypeError(f"a view is a non-empty tuple of {', '.join(k.__name__ for k in OPS)}; got {view!r}")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"a view may hold each kind of op once; got {view!r}")
        if ResizedCrop in kinds and PadCrop in kinds:
            raise ValueError("a view holds either ResizedCrop or PadCrop, not both")
    return "custom", views


def geometric_op(view):
    for op in view:
        if isinstance(op, (ResizedCrop, PadCrop, Original)):
            return op
    return None
