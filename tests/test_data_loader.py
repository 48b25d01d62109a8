"""DeviceLoader: per-epoch shuffling, drop_last, determinism, disjoint covering shards, classic path."""

import pytest
import torch

from advfast.data import Batch, DeviceLoader, build_augment, load_dataset


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", num_samples=50, image_size=8, num_classes=5, seed=2)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_batches_shuffle_and_drop_last(data):
    loader = DeviceLoader(data, 8, build_augment("simclr"), "cpu", seed=1)
    assert len(loader) == 6
    batches = _epoch(loader, 0)
    assert len(batches) == 6 and isinstance(batches[0], Batch)
    b = batches[0]
    assert len(b.views) == 2 and b.views[0].shape == (8, 3, 8, 8) and b.views[0].dtype == torch.float32
    assert torch.equal(b.labels, data.labels[b.indices])
    seen = torch.cat([x.indices for x in batches])
    assert len(seen.unique()) == 48  # no repeats; the 2 left over are dropped
    again = torch.cat([x.indices for x in _epoch(loader, 0)])
    other = torch.cat([x.indices for x in _epoch(loader, 1)])
    assert torch.equal(seen, again) and not torch.equal(seen, other)
    # the views are exactly the indexed images ("none" preset)
    plain = DeviceLoader(data, 8, build_augment("none"), "cpu", seed=1, drop_last=False)
    assert len(plain) == 7
    last = _epoch(plain, 0)
    assert sum(len(x.indices) for x in last) == 50
    for x in last:
        assert torch.equal(x.views[0], data.images[x.indices].float() / 255)


def test_deterministic_for_seed(data):
    def run(seed):
        loader = DeviceLoader(data, 10, build_augment("mocov2"), "cpu", seed=seed)
        return [v for b in _epoch(loader, 3) for v in b.views]
    a, b, c = run(4), run(4), run(5)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_disjoint_and_cover(data, drop_last):
    ws = 3
    loaders = [DeviceLoader(data, 4, build_augment("none"), "cpu", seed=7, rank=r, world_size=ws,
                            drop_last=drop_last) for r in range(ws)]
    shards = [torch.cat([b.indices for b in _epoch(ld, 2)]) for ld in loaders]
    union = torch.cat(shards)
    assert len(union.unique()) == len(union)  # disjoint
    if drop_last:
        assert len({len(ld) for ld in loaders}) == 1 and all(len(s) == 16 for s in shards)
    else:
        assert sorted(union.tolist()) == list(range(50))  # cover the epoch
    # the augmentation differs per rank (not just the images)
    views = [_epoch(DeviceLoader(data, 4, build_augment("simclr"), "cpu", seed=7, rank=r, world_size=2), 0)[0]
             for r in range(2)]
    assert not torch.equal(views[0].views[0], views[1].views[0])


def test_no_per_image_python(data, monkeypatch):
    # the hot loop gathers and augments whole batches: one augment call per batch, no indexing per image
    calls = []
    aug = build_augment("simclr")
    original = type(aug).__call__
    monkeypatch.setattr(type(aug), "__call__", lambda self, x, g=None: calls.append(len(x)) or original(self, x, g))
    _epoch(DeviceLoader(data, 16, aug, "cpu", seed=0), 0)
    assert calls == [16, 16, 16]


def test_classic_torchvision_path_with_workers(data):
    aug = build_augment("simclr", "torchvision")
    loader = DeviceLoader(data, 10, aug, "cpu", seed=3, num_workers=2)
    a = _epoch(loader, 0)
    b = _epoch(DeviceLoader(data, 10, aug, "cpu", seed=3, num_workers=0), 0)
    assert len(a) == 5 and a[0].views[0].shape == (10, 3, 8, 8)
    for x, y in zip(a, b):  # seeded per batch: independent of the number of workers
        assert torch.equal(x.indices, y.indices) and all(torch.equal(u, v) for u, v in zip(x.views, y.views))


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(data, 0, build_augment("none"), "cpu", seed=0)
    with pytest.raises(ValueError, match="larger than the 25 images per rank"):
        DeviceLoader(data, 30, build_augment("none"), "cpu", seed=0, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(data, 4, build_augment("none"), "cpu", seed=0, rank=2, world_size=2)
