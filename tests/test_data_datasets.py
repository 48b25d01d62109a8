"""Datasets: digits, synthetic, CIFAR/STL-10 in torchvision's on-disk format (tiny fake files), image folders."""

import os
import pickle

import numpy as np
import pytest
import torch

from advfast.data import load_dataset


def _listing(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


def test_digits_split_is_fixed_disjoint_and_real():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert train.images.shape == (1438, 3, 32, 32) and test.images.shape == (359, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey replicated
    assert set(train.labels.tolist()) == set(range(10)) and train.num_classes == 10
    # the split is fixed: a second load is identical, and no test image appears in train
    again = load_dataset("digits")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    flat_train = {bytes(x.numpy()) for x in train.images[:, 0, ::4, ::4]}
    overlap = sum(bytes(x.numpy()) in flat_train for x in test.images[:, 0, ::4, ::4])
    assert overlap < 5  # only genuinely duplicate digits could collide
    small = load_dataset("digits", size=16)
    assert small.images.shape[-2:] == (16, 16) and len(small.mean) == 3


def test_synthetic_is_seeded():
    a = load_dataset("synthetic", num_samples=10, image_size=(8, 12), channels=1, num_classes=3, seed=4)
    b = load_dataset("synthetic", num_samples=10, image_size=(8, 12), channels=1, num_classes=3, seed=4)
    assert a.images.shape == (10, 1, 8, 12) and torch.equal(a.images, b.images)
    assert a.labels.max() < 3 and not torch.equal(a.images, load_dataset("synthetic", num_samples=10,
                                                                       image_size=(8, 12), channels=1, seed=5).images)
    with pytest.raises(ValueError, match="num_samples"):
        load_dataset("synthetic", num_samples=0)


def test_unknown_name_split_and_option():
    with pytest.raises(ValueError, match="did you mean 'cifar10'"):
        load_dataset("cifar1O")
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("digits", split="val")
    with pytest.raises(TypeError, match="colour"):
        load_dataset("cifar10", colour=True)


def _write_cifar(root, n=4):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)
        data[name] = entry
    return base, data


def test_cifar10_reads_torchvision_format(tmp_path):
    base, data = _write_cifar(tmp_path)
    before = _listing(tmp_path)
    train = load_dataset("cifar10", root=tmp_path)
    test = load_dataset("cifar10", root=tmp_path, split="test")
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert torch.equal(train.images[:4], torch.from_numpy(data["data_batch_1"]["data"].reshape(4, 3, 32, 32)))
    assert train.labels[4:8].tolist() == [int(v) for v in data["data_batch_2"]["labels"]]
    assert _listing(tmp_path) == before  # nothing written without download=True


def test_cifar_missing_names_path_and_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.*--download"):
        load_dataset("cifar100", root=tmp_path)
    assert _listing(tmp_path) == []


def test_cifar_truncated_and_foreign_pickles_name_the_file(tmp_path):
    base, _ = _write_cifar(tmp_path)
    path = base / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="data_batch_3.*truncated"):
        load_dataset("cifar10", root=tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))
    (base / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(ValueError, match="test_batch.*refusing"):
        load_dataset("cifar10", root=tmp_path, split="test")


def test_stl10_binary_format(tmp_path):
    base = tmp_path / "stl10_binary"
    base.mkdir()
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)
    imgs.transpose(0, 1, 3, 2).tofile(base / "train_X.bin")  # STL-10 stores column-major
    np.array([1, 10, 5], dtype=np.uint8).tofile(base / "train_y.bin")
    imgs[:2].tofile(base / "unlabeled_X.bin")
    train = load_dataset("stl10", root=tmp_path)
    assert torch.equal(train.images, torch.from_numpy(imgs)) and train.labels.tolist() == [0, 9, 4]
    both = load_dataset("stl10", root=tmp_path, split="train+unlabeled")
    assert len(both) == 5 and both.labels[3:].tolist() == [-1, -1]
    with open(base / "unlabeled_X.bin", "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(ValueError, match="unlabeled_X.bin.*truncated"):
        load_dataset("stl10", root=tmp_path, split="unlabeled")
    with pytest.raises(FileNotFoundError, match="test_X.bin.*--download"):
        load_dataset("stl10", root=tmp_path, split="test")


def _png(path, size, colour):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)


def test_imagefolder(tmp_path):
    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for k in range(2):
            _png(tmp_path / cls / f"{k}.png", (10, 8), colour)
    ds = load_dataset("imagefolder", root=tmp_path)
    assert ds.images.shape == (4, 3, 8, 10) and ds.labels.tolist() == [0, 0, 1, 1] and ds.num_classes == 2
    assert ds.images[0, 0].float().mean() == 255 and ds.images[3, 2].float().mean() == 255

    _png(tmp_path / "dog" / "2.png", (12, 12), (0, 255, 0))
    with pytest.raises(ValueError, match=r"dog/2.png is 12x12.*size="):
        load_dataset("imagefolder", root=tmp_path)
    assert load_dataset("imagefolder", root=tmp_path, size=6).images.shape == (5, 3, 6, 6)

    (tmp_path / "dog" / "3.png").write_bytes((tmp_path / "dog" / "2.png").read_bytes()[:40])
    with pytest.raises(ValueError, match="dog/3.png"):
        load_dataset("imagefolder", root=tmp_path, size=6)
    os.remove(tmp_path / "dog" / "3.png")
    (tmp_path / "bird").mkdir()
    with pytest.raises(ValueError, match="bird holds no images"):
        load_dataset("imagefolder", root=tmp_path, size=6)
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_dataset("imagefolder", root=tmp_path / "bird")


def test_labels_out_of_range_or_not_integers_name_the_file(tmp_path):
    base, _ = _write_cifar(tmp_path)
    entry = pickle.loads((base / "data_batch_4").read_bytes())
    entry["labels"][2] = 12
    (base / "data_batch_4").write_bytes(pickle.dumps(entry))
    with pytest.raises(ValueError, match=r"data_batch_4 has label 12 at index 2, outside 0\.\.9"):
        load_dataset("cifar10", root=tmp_path)
    entry["labels"] = [0.5] * len(entry["labels"])  # floats would be truncated to class 0
    (base / "data_batch_4").write_bytes(pickle.dumps(entry))
    with pytest.raises(ValueError, match="data_batch_4 has float64 labels; expected integers"):
        load_dataset("cifar10", root=tmp_path)

    stl = tmp_path / "stl10_binary"
    stl.mkdir()
    np.zeros((2, 3, 96, 96), dtype=np.uint8).tofile(stl / "train_X.bin")
    np.array([3, 11], dtype=np.uint8).tofile(stl / "train_y.bin")
    with pytest.raises(ValueError, match=r"train_y.bin hold 11 at index 1, outside 1\.\.10"):
        load_dataset("stl10", root=tmp_path)


def test_imagefolder_refuses_tiny_images_and_skips_non_files(tmp_path):
    (tmp_path / "cat").mkdir()
    for k in range(2):
        _png(tmp_path / "cat" / f"{k}.png", (3, 2), (9, 9, 9))
    with pytest.raises(ValueError, match=r"cat/0.png is 3x2; images must be between 4 and 1024 pixels a side"):
        load_dataset("imagefolder", root=tmp_path)
    assert load_dataset("imagefolder", root=tmp_path, size=4).images.shape == (2, 3, 4, 4)  # resized: fine
    os.mkfifo(tmp_path / "cat" / "fifo.png")  # would block a reader forever
    (tmp_path / "cat" / "dir.png").mkdir()
    assert len(load_dataset("imagefolder", root=tmp_path, size=4)) == 2
    with pytest.raises(ValueError, match=r"digits: size must be an int in \[4, 256\]"):
        load_dataset("digits", size=1024)
