"""DeviceLoader: the dataset lives on the device; each epoch is one permutation drawn there, cut into
batches by slicing, gathered with one index op and augmented by the batched backend. No per-image
Python, no host sync per batch.

Determinism and sharding: the epoch permutation depends only on (seed, epoch), so every rank draws the
same one and takes its own stride ``perm[rank::world_size]`` - shards are disjoint and together cover
the epoch. With drop_last each rank keeps len(dataset) // world_size images (equal batch counts on
every rank, as DDP needs); without it each rank keeps its whole shard and a last short batch. The
augmentation randomness depends on (seed, epoch, rank).

``set_subset(indices)`` restricts the epochs to those dataset positions (a coreset, or the pool left by a
held-out split): the permutation is then drawn over the subset, cut and sharded the same way. The
indices reach the device once, when set; None returns to the whole dataset (the draws are then exactly
those of a loader that never had a subset).

With the "torchvision" backend the batches are augmented image by image in DataLoader worker
processes (``num_workers``), the classic CPU path, then moved to the device; each batch is seeded from
(seed, epoch, rank, batch number), so results do not depend on the number of workers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from advfast.data.augment_base import Augment
from advfast.data.datasets import ImageDataset


class Batch(NamedTuple):
    views: list  # V float tensors (B, C, H', W') in [0, 1]
    labels: torch.Tensor  # int64 (B,)
    indices: torch.Tensor  # int64 (B,): positions in the dataset


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), so nearby seeds give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class DeviceLoader:
    def __init__(self, dataset: ImageDataset, batch_size: int, augment: Augment, device, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, num_workers: int = 0):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if not isinstance(augment, Augment):
            raise TypeError(f"augment must come from advfast.data.build_augment, got {type(augment).__name__}")
        n = len(dataset)
        if drop_last and n // world_size < batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the {n // world_size} images per rank "
                             f"({n} images, world_size {world_size}); lower batch_size or pass drop_last=False")
        self.dataset = dataset
        self.batch_size, self.augment = batch_size, augment
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.drop_last, self.num_workers = drop_last, num_workers
        self.epoch = 0
        self.subset: torch.Tensor | None = None
        self.classic = augment.backend == "torchvision"
        home = torch.device("cpu") if self.classic else self.device
        self.images = dataset.images.to(home)
        self.labels = dataset.labels.to(home)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_subset(self, indices: torch.Tensor | None) -> None:
        """Draw the epochs from these dataset positions only (int64, any device; None: the whole dataset)."""
        if indices is None:
            self.subset = None
            return
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype != torch.int64:
            raise TypeError(f"set_subset takes a 1-d int64 tensor of dataset positions, got {indices!r:.80}")
        n = indices.numel()
        if indices.device.type == "cpu" and n and not 0 <= int(indices.min()) <= int(indices.max()) < len(self.dataset):
            raise ValueError(f"set_subset: positions must lie in [0, {len(self.dataset)})")
        if self.drop_last and n // self.world_size < self.batch_size:
            raise ValueError(f"a subset of {n} images holds less than one batch of {self.batch_size} per rank "
                             f"(world_size {self.world_size})")
        self.subset = indices.to(self.images.device)

    def num_images(self) -> int:
        """Images an epoch draws from: the subset's, else the dataset's."""
        return len(self.dataset) if self.subset is None else self.subset.numel()

    def _shard_size(self) -> int:
        n = self.num_images()
        if self.drop_last:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        m = self._shard_size()
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def epoch_indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch, in order (before cutting into batches)."""
        home = self.images.device
        g = torch.Generator(device=home).manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.num_images(), generator=g, device=home)
        if self.subset is not None:
            perm = self.subset.index_select(0, perm)
        return perm[self.rank::self.world_size][: self._shard_size()]

    def __iter__(self):
        shard = self.epoch_indices()
        starts = range(0, len(self) * self.batch_size, self.batch_size)
        if self.classic:
            yield from self._iter_classic(shard, starts)
            return
        g = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, self.epoch, self.rank, 1))
        for s in starts:
            idx = shard[s:s + self.batch_size]
            views = self.augment(self.images.index_select(0, idx), g)
            yield Batch(views, self.labels.index_select(0, idx), idx)

    def _iter_classic(self, shard, starts):
        from advfast.data.torchvision_backend import BatchViews

        items = [(shard[s:s + self.batch_size], mix_seed(self.seed, self.epoch, self.rank, 2, k))
                 for k, s in enumerate(starts)]
        loader = torch.utils.data.DataLoader(
            BatchViews(self.images, self.labels, self.augment), batch_size=None, sampler=items,
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False)
        for views, labels, idx in loader:
            yield Batch([v.to(self.device, non_blocking=True) for v in views],
                        labels.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True))
