"""The training set of a run, as its config names it: one place that turns (dataset, data_dir,
download, image_size) into a loaded ImageDataset, for the engine and for every method or tool that
needs the same images (AdvCL's pseudo labels, the pseudo-label generator, the benchmarks)."""

from __future__ import annotations

from typing import Any

from advfast.data.datasets import ImageDataset, load_dataset


def dataset_kwargs(cfg) -> dict[str, Any]:
    """How each dataset takes cfg.image_size at load time (cifar/stl10 keep their size on disk).
    ``cfg``: anything with ``dataset`` and ``image_size`` (a TrainConfig or the generator's arguments)."""
    if cfg.image_size is None:
        return {}
    if cfg.dataset in ("digits", "imagefolder"):
        return {"size": cfg.image_size}
    if cfg.dataset == "synthetic":
        return {"image_size": cfg.image_size}
    return {}


def build_dataset(cfg, split: str = "train") -> ImageDataset:
    """``split`` of the dataset a TrainConfig names (its data_dir, download flag and image size)."""
    return load_dataset(cfg.dataset, cfg.data_dir, split, cfg.download, **dataset_kwargs(cfg))
