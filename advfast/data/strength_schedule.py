"""DynACL's annealed augmentation strength and the clean/adversarial loss weights that go with it.

Pure functions of (epoch, total epochs, step length K) returning plain numbers, exactly as the
official codes compute them. ``epoch`` is 1-based here, as in both official loops
(``for epoch in range(1, E + 1)``); the engine's 0-based epoch ``e`` is ``epoch = e + 1``.

PKU-ML/DYNACL ``train_DynACL.py`` (DynACL, DynACL++):
    the loader is rebuilt when ``epoch % K == 1`` (every epoch when K == 1, and at the resume epoch)
    with ``strength = 1 - (epoch - 1) / E``, so between rebuilds
        s(epoch) = 1 - ((epoch - 1) // K) * K / E            1.0 for 1..50, 0.95 for 51..100, ... 0.05
    and the loss is ``((2 - w) * L_clean + w * L_adv) / 2`` with
        w(epoch) = min(1 + (epoch // K) * (K / E) * lambda, 2)    lambda = swap_param = 2/3
    (``epoch // K``, not ``(epoch - 1) // K``: w steps up at epochs 50, 100, ... one epoch before the
    strength steps down at 51, 101, ...).
GodXuxilie/Enhancing_ACL_via_AIR ``pretraining.py`` (ACL-AIR, DynACL-AIR):
    the same strength (``1 - int((epoch - 1) / 50) * 50 / E``, K = 50 hard-coded; 1 without
    ``--DynAug``), rebuilt every epoch, and the loss ``(1 - w) * L_nat + (1 + w) * L_adv + ...`` with
    ``w = lambda * (1 - strength)`` (aligned with the strength: no one-epoch offset; 0 for ACL-AIR).

How the strength s enters each op (``reload`` / ``get_transform``): RandomResizedCrop scale
(1 - 0.9 s, 1), ColorJitter(0.4 s, 0.4 s, 0.4 s, 0.1 s) applied with p = 0.8 s, RandomGrayscale
p = 0.2 s, the flip unchanged (p 0.5). The crop interpolation is bilinear in DynACL (torchvision's
default) and bicubic in AIR (``interpolation=3``). At s = 1 this is the SimCLR-CIFAR view.

Digits: a digits run is ~10 epochs, where K = 50 would never step. ``scaled_step(E, levels)`` keeps
the schedule's shape (``levels`` strength levels, the last weight equal to the official last weight
when K divides E); the official runs have 1000 / 50 = 20 levels.
"""

from __future__ import annotations

from advfast.data.presets import Flip, Grayscale, Jitter, ResizedCrop

OFFICIAL_STEP = 50  # --reload_frequency in DynACL; hard-coded K in AIR
OFFICIAL_EPOCHS = 1000
OFFICIAL_LEVELS = OFFICIAL_EPOCHS // OFFICIAL_STEP  # 20 strength levels
SWAP_PARAM = 2 / 3  # lambda of both loss weightings (DynACL --swap_param, AIR LAMBDA=2/3)


def _check(epoch: int, epochs: int, step: int) -> None:
    for name, v in (("epoch", epoch), ("epochs", epochs), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if epochs < 1 or step < 1:
        raise ValueError(f"epochs and step must be >= 1, got epochs={epochs}, step={step}")
    if not 1 <= epoch <= epochs:
        raise ValueError(f"epoch is 1-based and must be in [1, {epochs}], got {epoch}")


def scaled_step(epochs: int, levels: int = OFFICIAL_LEVELS) -> int:
    """Step length K giving ``levels`` strength levels over ``epochs`` (at least 1 epoch per level)."""
    if epochs < 1 or levels < 1:
        raise ValueError(f"epochs and levels must be >= 1, got epochs={epochs}, levels={levels}")
    return max(1, epochs // levels)


def reload_epoch(epoch: int, epochs: int, step: int, resumed_at: int | None = None) -> int:
    """The epoch at which DynACL last rebuilt its loader (whose strength is still in use at ``epoch``).

    ``resumed_at``: the official code also rebuilds at the epoch it resumes from (``--resume``), which
    puts the strength off the grid until the next ``epoch % K == 1``; None (advfast's resume replays
    the uninterrupted run) keeps the grid.
    """
    _check(epoch, epochs, step)
    on_grid = 1 + ((epoch - 1) // step) * step
    if resumed_at is not None and on_grid < resumed_at <= epoch:
        return resumed_at
    return on_grid


def dynacl_strength(epoch: int, epochs: int, step: int = OFFICIAL_STEP, resumed_at: int | None = None) -> float:
    """Augmentation strength s in (0, 1] in use at ``epoch`` (PKU-ML/DYNACL ``reload``)."""
    return 1 - (reload_epoch(epoch, epochs, step, resumed_at) - 1) / epochs


def air_strength(epoch: int, epochs: int, dyn_aug: bool = True, step: int = OFFICIAL_STEP) -> float:
    """AIR's strength: DynACL's grid without the resume re-anchoring; 1 for ACL-AIR (no --DynAug)."""
    _check(epoch, epochs, step)
    if not dyn_aug:
        return 1.0
    return 1 - int((epoch - 1) / step) * step / epochs


def dynacl_adv_weight(epoch: int, epochs: int, step: int = OFFICIAL_STEP, swap_param: float = SWAP_PARAM) -> float:
    """w of DynACL's ``loss = ((2 - w) * L_clean + w * L_adv) / 2``; 1 (plain ACL-DS) up to 2."""
    _check(epoch, epochs, step)
    return min(1.0 + (epoch // step) * (step / epochs) * swap_param, 2)


def air_adv_weight(strength: float, swap_param: float = SWAP_PARAM) -> float:
    """w of AIR's ``loss = (1 - w) * L_nat + (1 + w) * L_adv + ...`` (0 for ACL-AIR, where s = 1)."""
    return swap_param * (1 - strength)


def dynacl_clean_adv_factors(epoch: int, epochs: int, step: int = OFFICIAL_STEP,
                             swap_param: float = SWAP_PARAM) -> tuple[float, float]:
    """(clean, adversarial) loss factors of DynACL: ((2 - w) / 2, w / 2)."""
    w = dynacl_adv_weight(epoch, epochs, step, swap_param)
    return (2 - w) / 2, w / 2


def air_clean_adv_factors(strength: float, swap_param: float = SWAP_PARAM) -> tuple[float, float]:
    """(natural, adversarial) loss factors of AIR: (1 - w, 1 + w), no 1/2."""
    w = air_adv_weight(strength, swap_param)
    return 1 - w, 1 + w


def strength_params(strength: float) -> dict[str, float | tuple[float, float]]:
    """The op parameters at strength s, as plain numbers (``reload`` / ``get_transform``)."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    s = strength
    return {"crop_scale": (1.0 - 0.9 * s, 1.0), "brightness": 0.4 * s, "contrast": 0.4 * s,
            "saturation": 0.4 * s, "hue": 0.1 * s, "jitter_p": 0.8 * s, "gray_p": 0.2 * s, "flip_p": 0.5}


def strength_view(strength: float, interpolation: str = "bilinear") -> tuple:
    """One view at strength s as advfast preset ops (crop, flip, jitter, grayscale: the official
    order); ``interpolation`` "bilinear" for DynACL, "bicubic" for AIR."""
    p = strength_params(strength)
    return (ResizedCrop(p["crop_scale"], interpolation=interpolation), Flip(p["flip_p"]),
            Jitter(p["brightness"], p["contrast"], p["saturation"], p["hue"], p["jitter_p"]), Grayscale(p["gray_p"]))


def strength_views(strength: float, interpolation: str = "bilinear") -> tuple:
    """The two-view preset (a custom preset for ``build_augment``) at strength s."""
    view = strength_view(strength, interpolation)
    return (view, view)
