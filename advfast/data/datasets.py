"""Datasets held as one uint8 tensor (N, C, H, W) plus int64 labels.

``load_dataset(name, root=None, split="train", download=False, **kw)`` is the one entry point.
Index i of a dataset is its position in ``images``. Nothing is ever written into ``root`` except by
an explicit ``download=True`` (which hands over to torchvision's downloader).

  cifar10, cifar100  torchvision's on-disk python format under root/cifar-10-batches-py or
                     root/cifar-100-python; splits train, test
  stl10              root/stl10_binary; splits train, test, unlabeled (labels -1), train+unlabeled
  digits             scikit-learn's bundled 8x8 digits (1797 real images, no download): a fixed
                     seeded 80/20 train/test split, upscaled (bilinear) to ``size`` (default 32, so
                     the CIFAR presets - pad-4 crops, the AdvCL radius-8 high-frequency mask - keep
                     their meaning; pass size=16 for a 4x cheaper CPU demo), grey copied to 3 channels
  synthetic          seeded random uint8 images: num_samples, image_size, channels, num_classes, seed
  imagefolder        root/<split>/<class>/*.png|jpg|... when root/<split> exists, else root/<class>/...;
                     every image must share one size unless ``size`` is given (then resized to it)

``write_official_format(name, root)`` writes seeded random cifar10 / cifar100 / stl10 files in the official
layout, and ``write_corruptions(dir, names)`` a CIFAR-10-C style folder, for runs without the real data.

``root`` defaults to $ADVFAST_DATA, else ./data.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, replace

import numpy as np
import torch

# Per-channel statistics of the training splits (the values the official codes normalise with).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageDataset:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,); -1 where unlabelled
    mean: tuple
    std: tuple
    num_classes: int
    name: str

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"ImageDataset.images must be uint8 (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"ImageDataset.labels must be int64 of shape ({self.images.shape[0]},), got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}")
        c = self.images.shape[1]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"ImageDataset.mean/std need {c} values (one per channel)")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def to(self, device) -> "ImageDataset":
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))


def channel_stats(images: torch.Tensor) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (float64, chunked to bound memory)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).div_(255).transpose(0, 1).reshape(c, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(0).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(max(float(v), 1e-4), 4) for v in std)


def default_root() -> str:
    return os.environ.get("ADVFAST_DATA", "data")


def _missing(name: str, path: str, root: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} not found at {path}; pass download=True (CLI: --download) to fetch it into {root}, "
        f"or point root/--data-dir at an existing copy")


def _check_split(name: str, split: str, splits: tuple) -> None:
    if split not in splits:
        raise ValueError(f"{name}: unknown split {split!r}; choose one of {', '.join(splits)}")


def _no_kwargs(name: str, kw: dict) -> None:
    if kw:
        raise TypeError(f"load_dataset({name!r}) got unexpected option(s) {', '.join(sorted(kw))}")


# --- CIFAR ------------------------------------------------------------------------------------------

class _CifarUnpickler(pickle.Unpickler):
    """Only what a CIFAR python batch holds: builtin containers and numpy arrays (no code execution)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _read_cifar_file(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated or not a CIFAR batch
        raise ValueError(f"cannot read CIFAR batch {path}: {type(exc).__name__}: {exc} "
                         f"(truncated or corrupt; delete it and re-download)") from None
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        raise ValueError(f"CIFAR batch {path} lacks the 'data'/{label_key!r} entries; not a CIFAR python batch")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(f"CIFAR batch {path} holds data {data.dtype} {data.shape} and labels {labels.shape}; "
                         f"expected uint8 (N, 3072) and N labels")
    if labels.dtype.kind not in "iu":  # floats would be truncated, strings fail somewhere later
        raise ValueError(f"CIFAR batch {path} has {labels.dtype} labels; expected integers (truncated or corrupt)")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load_cifar(name: str, root: str, split: str, download: bool) -> ImageDataset:
    _check_split(name, split, ("train", "test"))
    if name == "cifar10":
        folder, label_key, num_classes = "cifar-10-batches-py", "labels", 10
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        folder, label_key, num_classes = "cifar-100-python", "fine_labels", 100
        files = [split]
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    base = os.path.join(root, folder)
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(root, train=split == "train", download=True)
    parts = []
    for fname in files:
        path = os.path.join(base, fname)
        if not os.path.isfile(path):
            raise _missing(name, path, root)
        parts.append(_read_cifar_file(path, label_key))
    for fname, (_, part_labels) in zip(files, parts):
        bad = (part_labels < 0) | (part_labels >= num_classes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}: {os.path.join(base, fname)} has label {int(part_labels[i])} at index {i}, "
                             f"outside 0..{num_classes - 1} (corrupt file; delete it and re-download)")
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageDataset(images.contiguous(), labels, mean, std, num_classes, name)


# --- STL-10 -----------------------------------------------------------------------------------------

_STL_SPLITS = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
               "unlabeled": ("unlabeled_X.bin", None)}


def _read_stl_part(base: str, root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    xname, yname = _STL_SPLITS[split]
    xpath = os.path.join(base, xname)
    if not os.path.isfile(xpath):
        raise _missing("stl10", xpath, root)
    per_image = 3 * 96 * 96
    size = os.path.getsize(xpath)
    if size == 0 or size % per_image:
        raise ValueError(f"STL-10 file {xpath} has {size} bytes, not a multiple of {per_image} "
                         f"(one 3x96x96 image); truncated or corrupt")
    # stored column-major per channel: transpose to (C, H, W) as torchvision does
    images = np.fromfile(xpath, dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    if yname is None:
        return images, np.full(len(images), -1, dtype=np.int64)
    ypath = os.path.join(base, yname)
    if not os.path.isfile(ypath):
        raise _missing("stl10", ypath, root)
    labels = np.fromfile(ypath, dtype=np.uint8).astype(np.int64) - 1
    if len(labels) != len(images):
        raise ValueError(f"STL-10 labels {ypath} do not match {xpath}: {len(labels)} labels for {len(images)} images")
    bad = (labels < 0) | (labels > 9)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"STL-10 labels {ypath} hold {int(labels[i]) + 1} at index {i}, outside 1..10 (corrupt file)")
    return images, labels


def _load_stl10(root: str, split: str, download: bool) -> ImageDataset:
    _check_split("stl10", split, ("train", "test", "unlabeled", "train+unlabeled"))
    base = os.path.join(root, "stl10_binary")
    if download:
        import torchvision

        torchvision.datasets.STL10(root, split=split, download=True)
    parts = [_read_stl_part(base, root, s) for s in split.split("+")]
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate([p[0] for p in parts])))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageDataset(images, labels, STL10_MEAN, STL10_STD, 10, "stl10")


# --- digits (scikit-learn, bundled) ------------------------------------------------------------------

DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2
DIGITS_MAX_SIZE = 256


def _digits_all(size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=size < 8)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = np.random.default_rng(DIGITS_SEED).permutation(len(labels))
    return images, labels, order


def _load_digits(split: str, size: int = 32) -> ImageDataset:
    _check_split("digits", split, ("train", "test"))
    if not isinstance(size, int) or isinstance(size, bool) or not 4 <= size <= DIGITS_MAX_SIZE:
        # the images are 8x8: far past that an upscale only costs memory (1024 would take ~13 GB)
        raise ValueError(f"digits: size must be an int in [4, {DIGITS_MAX_SIZE}] (the images are 8x8), got {size!r}")
    images, labels, order = _digits_all(size)
    n_test = int(round(len(order) * DIGITS_TEST_FRACTION))
    train_idx, test_idx = np.sort(order[n_test:]), np.sort(order[:n_test])
    idx = torch.from_numpy(train_idx if split == "train" else test_idx)
    mean, std = channel_stats(images[torch.from_numpy(train_idx)])  # train statistics for both splits
    return ImageDataset(images[idx].contiguous(), labels[idx].contiguous(), mean, std, 10, "digits")


# --- synthetic -------------------------------------------------------------------------------------

def _load_synthetic(split: str, num_samples: int = 1024, image_size=32, channels: int = 3,
                    num_classes: int = 10, seed: int = 0) -> ImageDataset:
    _check_split("synthetic", split, ("train", "test"))
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    for arg, v in (("num_samples", num_samples), ("image_size", h), ("image_size", w),
                   ("channels", channels), ("num_classes", num_classes)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"synthetic: {arg} must be a positive int, got {v!r}")
    g = torch.Generator().manual_seed(int(seed) * 2 + (split == "test"))
    images = torch.randint(0, 256, (num_samples, channels, h, w), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (num_samples,), generator=g, dtype=torch.int64)
    return ImageDataset(images, labels, (0.5,) * channels, (0.2887,) * channels, num_classes, "synthetic")


# --- image folder ----------------------------------------------------------------------------------

_MAX_PIXELS = 64 * 1024 * 1024


def _read_image(path: str, size):
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > _MAX_PIXELS:  # from the header, before a decompression bomb is decoded
                raise ValueError(f"{w}x{h} is too large to load (at most {_MAX_PIXELS} pixels)")
            img.load()  # decodes now, so truncated files fail here with their name
            rgb = img.convert("RGB")
    except Exception as exc:
        raise ValueError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None
    if size is not None:
        rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _check_image_side(path: str, shape) -> None:
    """An image folder's own size (not resized) must be one a run takes, as --image-size must."""
    from advfast.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

    h, w = shape[:2]
    if not (MIN_IMAGE_SIZE <= h <= MAX_IMAGE_SIZE and MIN_IMAGE_SIZE <= w <= MAX_IMAGE_SIZE):
        raise ValueError(f"imagefolder: {path} is {w}x{h}; images must be between {MIN_IMAGE_SIZE} and "
                         f"{MAX_IMAGE_SIZE} pixels a side: pass size=N (CLI: --image-size N) to resize all")


def _load_imagefolder(root: str, split: str, size=None) -> ImageDataset:
    base = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
    if not os.path.isdir(base):
        raise FileNotFoundError(f"imagefolder: {base} is not a folder (expected class sub-folders of images)")
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
    classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    if not classes:
        raise ValueError(f"imagefolder: {base} has no class sub-folders")
    arrays, labels, first = [], [], None
    for label, cls in enumerate(classes):
        folder = os.path.join(base, cls)
        # regular files only: a FIFO or device named x.png would block or never end
        files = sorted(f for f in os.listdir(folder)
                       if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))
        if not files:
            raise ValueError(f"imagefolder: class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for fname in files:
            path = os.path.join(folder, fname)
            arr = _read_image(path, size)
            if first is None:
                _check_image_side(path, arr.shape)
                first = (path, arr.shape)
            elif arr.shape != first[1]:
                raise ValueError(f"imagefolder: {path} is {arr.shape[1]}x{arr.shape[0]} but {first[0]} is "
                                 f"{first[1][1]}x{first[1][0]}; pass size=N (CLI: --image-size) to resize all")
            arrays.append(arr)
            labels.append(label)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    mean, std = channel_stats(images)
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), mean, std, len(classes), "imagefolder")


def resized(dataset: ImageDataset, size: int) -> ImageDataset:
    """``dataset`` with every image resized to size x size: bilinear with antialiasing (what
    torchvision's ``transforms.Resize(size)`` does to a PIL image, e.g. STL-10's 96 px -> 32 px in the
    RobustSSL benchmark's transfer rows), rounded back to uint8. Unchanged when already that size."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"resized: size must be a positive int, got {size!r}")
    if tuple(dataset.images.shape[-2:]) == (size, size):
        return dataset
    parts = []
    for chunk in dataset.images.split(1024):
        x = torch.nn.functional.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
        parts.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return replace(dataset, images=torch.cat(parts).contiguous())


# --- synthetic files in the official on-disk formats ------------------------------------------------

def write_official_format(name: str, root, n_train: int = 64, n_test: int = 32, seed: int = 0) -> str:
    """Write seeded random images in ``name``'s official on-disk layout under ``root`` (what torchvision's
    downloader unpacks), so code that reads the real dataset runs on a machine without it (CI, tests).
    cifar10: cifar-10-batches-py/data_batch_1..5 (the train images split over the five), test_batch,
    batches.meta; cifar100: cifar-100-python/train, test, meta (fine and coarse labels); stl10:
    stl10_binary/{train,test}_{X,y}.bin (column-major 3x96x96 uint8, labels 1..10). Returns the folder."""
    for arg, v in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"write_official_format: {arg} must be a positive int, got {v!r}")
    rng = np.random.default_rng(seed)
    root = os.fspath(root)
    if name == "stl10":
        base = os.path.join(root, "stl10_binary")
        os.makedirs(base, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test)):
            images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
            images.transpose(0, 1, 3, 2).tofile(os.path.join(base, f"{split}_X.bin"))  # column-major per channel
            rng.integers(1, 11, n, dtype=np.uint8).tofile(os.path.join(base, f"{split}_y.bin"))
        return base
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"write_official_format: {name!r} has no official file format here; "
                         "choose cifar10, cifar100 or stl10")
    num_classes = 10 if name == "cifar10" else 100
    base = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    os.makedirs(base, exist_ok=True)

    def batch(n: int, label: str) -> dict:
        # plain lists of int labels and a uint8 (N, 3072) array, as the pickled originals hold
        entry = {"batch_label": label, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "filenames": [f"synthetic_{i:05d}.png" for i in range(n)]}
        labels = [int(v) for v in rng.integers(0, num_classes, n)]
        if name == "cifar10":
            entry["labels"] = labels
        else:
            entry["fine_labels"], entry["coarse_labels"] = labels, [v // 5 for v in labels]
        return entry

    def dump(fname: str, obj) -> None:
        with open(os.path.join(base, fname), "wb") as fh:
            pickle.dump(obj, fh, protocol=2)

    if name == "cifar10":
        if n_train < 5:
            raise ValueError(f"write_official_format: CIFAR-10's training set is five batch files; n_train must be "
                             f">= 5, got {n_train}")
        sizes = [n_train // 5 + (i < n_train % 5) for i in range(5)]
        for i, n in enumerate(sizes, 1):
            dump(f"data_batch_{i}", batch(n, f"training batch {i} of 5"))
        dump("test_batch", batch(n_test, "testing batch 1 of 1"))
        dump("batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": sizes[0],
                              "num_vis": 3072})
    else:
        dump("train", batch(n_train, "training batch 1 of 1"))
        dump("test", batch(n_test, "testing batch 1 of 1"))
        dump("meta", {"fine_label_names": [f"class{i}" for i in range(100)],
                      "coarse_label_names": [f"superclass{i}" for i in range(20)]})
    return base


def write_corruptions(directory, names, n_per_severity: int = 8, image_size: int = 32, num_classes: int = 10,
                      seed: int = 0) -> str:
    """Write a CIFAR-10-C / CIFAR-100-C style folder of seeded random images: labels.npy and one
    <corruption>.npy per name, each (5 * n_per_severity, H, W, 3) uint8 ordered by severity 1..5 (the
    layout of the released archives, which advfast.eval.robustness.corruption_accuracy reads)."""
    if not isinstance(n_per_severity, int) or n_per_severity < 1:
        raise ValueError(f"write_corruptions: n_per_severity must be a positive int, got {n_per_severity!r}")
    rng = np.random.default_rng(seed)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    labels = np.tile(rng.integers(0, num_classes, n_per_severity), 5).astype(np.int64)
    np.save(os.path.join(directory, "labels.npy"), labels)
    for corruption in names:
        np.save(os.path.join(directory, f"{corruption}.npy"),
                rng.integers(0, 256, (5 * n_per_severity, image_size, image_size, 3), dtype=np.uint8))
    return directory


DATASETS = ("cifar10", "cifar100", "stl10", "digits", "synthetic", "imagefolder")


def load_dataset(name: str, root: str | None = None, split: str = "train", download: bool = False,
                 **kw) -> ImageDataset:
    """Load a dataset into memory (see the module docstring for names, splits and options)."""
    if name not in DATASETS:
        from advfast.config import closest

        raise ValueError(f"unknown dataset {name!r}{closest(name, DATASETS)}; choose one of {', '.join(DATASETS)}")
    root = default_root() if root is None else os.fspath(root)
    if name in ("cifar10", "cifar100"):
        _no_kwargs(name, kw)
        return _load_cifar(name, root, split, download)
    if name == "stl10":
        _no_kwargs(name, kw)
        return _load_stl10(root, split, download)
    if name == "digits":  # bundled with scikit-learn: nothing to download
        return _load_digits(split, **kw)
    if name == "synthetic":
        return _load_synthetic(split, **kw)
    return _load_imagefolder(root, split, **kw)
