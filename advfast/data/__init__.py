"""Datasets, augmentation backends and the device loader (contract: docs/ARCHITECTURE.md, "Data").

  load_dataset(name, root=None, split="train", download=False, **kw) -> ImageDataset
  build_augment(preset, backend="torch", size=None) -> Augment;  Augment(images_uint8, generator)
  high_frequency(x, radius=8)      AdvCL's high-frequency view, batched on the device
  DeviceLoader(dataset, batch_size, augment, device, seed, rank=0, world_size=1, drop_last=True)

Presets and their view order: advfast.data.presets.
"""

from advfast.data.augment import BACKENDS, Augment, TorchAugment, build_augment
from advfast.data.datasets import DATASETS, ImageDataset, load_dataset
from advfast.data.hfc import high_frequency
from advfast.data.loader import Batch, DeviceLoader
from advfast.data.presets import PRESETS

__all__ = ["Augment", "BACKENDS", "Batch", "DATASETS", "DeviceLoader", "ImageDataset", "PRESETS",
           "TorchAugment", "build_augment", "high_frequency", "load_dataset"]
