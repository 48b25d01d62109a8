"""ClusterFit pseudo labels for AdvCL, which the official code ships only as a pickle for CIFAR-10.

The official labels come from k-means over features of an ImageNet contrastive model that was never
published. This module rebuilds the procedure: features of a given encoder (an advfast run dir's
``encoder.safetensors`` + ``encoder.json``, e.g. a SimCLR run) over the training set, L2-normalised,
k-means for each K (a batched torch k-means on the device with k-means++ init and a fixed seed, or
scikit-learn's KMeans on the CPU), saved as safetensors of int64 vectors ``pseudo_train_{K}`` indexed
by dataset index, plus a JSON sidecar (same stem) that records the encoder file's sha256, the
dataset, the K list and the seed. A matching sidecar makes the file a cache hit.

``source="raw_pixels"`` clusters the raw images instead: a demo-only stand-in for the digits
preset (no encoder is needed, and on 8x8 digits pixel clusters are meaningful); not ClusterFit.

The official pickle is read by a restricted unpickler that only rebuilds numpy arrays.

CLI::

    python -m advfast.methods.pseudo_labels --encoder RUN_DIR --dataset cifar10 --out FILE
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from advfast.io import file_sha256

DEFAULT_KS = (2, 10, 50, 100, 500)
FORMAT = "advfast-pseudo-labels/1"


def generator_command(dataset: str = "cifar10", out: str = "pseudo_labels.safetensors") -> str:
    """The exact command that produces a labels file (quoted by errors that need one)."""
    return f"python -m advfast.methods.pseudo_labels --encoder RUN_DIR --dataset {dataset} --out {out}"


# ---- k-means -------------------------------------------------------------------------------------
@dataclass
class KMeansResult:
    labels: torch.Tensor  # int64 (N,)
    centers: torch.Tensor  # (k, D)
    inertia: float  # sum of squared distances to the assigned centre
    iterations: int


def _sq_dists(x: torch.Tensor, c: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    # ||x||^2 - 2 x.c + ||c||^2, clamped: the expansion can dip below 0 by rounding
    return (x_sq[:, None] - 2.0 * (x @ c.t()) + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def _assign(x, c, x_sq, chunk):
    """Nearest centre and its squared distance, chunk by chunk (never N x k at once for big N)."""
    labels, dist = [], []
    for s in range(0, x.shape[0], chunk):
        d = _sq_dists(x[s:s + chunk], c, x_sq[s:s + chunk])
        m, i = d.min(1)
        labels.append(i)
        dist.append(m)
    return torch.cat(labels), torch.cat(dist)


def _kmeans_pp(x, k, x_sq, gen, chunk):
    """Greedy k-means++ (as scikit-learn: 2 + log k candidate draws per centre, keep the best)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = torch.randint(n, (1,), generator=gen, device="cpu").item()
    centers = [x[first]]
    closest = _sq_dists(x, x[first:first + 1], x_sq)[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: any point will do
            cand = torch.randint(n, (trials,), generator=gen, device="cpu").to(x.device)
        else:
            probs = (closest / total).double().cpu()
            cand = torch.multinomial(probs, trials, replacement=True, generator=gen).to(x.device)
        d_cand = torch.cat([_sq_dists(x[s:s + chunk], x[cand], x_sq[s:s + chunk])
                            for s in range(0, n, chunk)])  # (n, trials)
        new_closest = torch.minimum(closest[:, None], d_cand)
        best = new_closest.sum(0).argmin()
        centers.append(x[cand[best]])
        closest = new_closest[:, best]
    return torch.stack(centers)


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 300, tol: float = 1e-4,
           chunk: int = 16384) -> KMeansResult:
    """Lloyd's k-means on x's device, k-means++ init from ``seed``.

    Deterministic for a given seed and device: centre sums are one-hot matmuls (no atomics), and
    empty clusters are re-seeded with the points farthest from their centres (as scikit-learn).
    ``tol`` is relative to the mean per-feature variance of x (scikit-learn's convention).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating 2-D tensor (N, D), got {getattr(x, 'shape', type(x))}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    gen = torch.Generator().manual_seed(int(seed))
    x_sq = (x * x).sum(1)
    tol_abs = tol * x.var(0).mean().item()
    centers = _kmeans_pp(x, k, x_sq, gen, chunk)
    it = 0
    for it in range(1, max_iter + 1):
        labels, dist = _assign(x, centers, x_sq, chunk)
        sums = torch.zeros_like(centers)
        counts = torch.zeros(k, dtype=x.dtype, device=x.device)
        for s in range(0, n, chunk):
            onehot = torch.nn.functional.one_hot(labels[s:s + chunk], k).to(x.dtype)
            sums += onehot.t() @ x[s:s + chunk]
            counts += onehot.sum(0)
        new = sums / counts.clamp_min(1)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            far = dist.topk(empty.numel()).indices
            new[empty] = x[far]
        shift = ((new - centers) ** 2).sum().item()
        centers = new
        if shift <= tol_abs:
            break
    labels, dist = _assign(x, centers, x_sq, chunk)
    return KMeansResult(labels=labels, centers=centers, inertia=dist.sum().item(), iterations=it)


def kmeans_sklearn(x: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 300,
                   tol: float = 1e-4) -> KMeansResult:
    from sklearn.cluster import KMeans

    arr = x.detach().cpu().numpy()
    km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=max_iter, tol=tol,
                random_state=int(seed)).fit(arr)
    return KMeansResult(labels=torch.from_numpy(km.labels_.astype(np.int64)),
                        centers=torch.from_numpy(km.cluster_centers_), inertia=float(km.inertia_),
                        iterations=int(km.n_iter_))


# ---- features ------------------------------------------------------------------------------------
def load_encoder(run_dir: str | os.PathLike, device="cpu") -> torch.nn.Module:
    """The exported encoder of a run (its evaluation branch), in eval mode on ``device``."""
    from advfast.engine.export import load_encoder as load_exported

    return load_exported(run_dir)[0].to(device)


@torch.no_grad()
def encoder_features(encoder: torch.nn.Module, images: torch.Tensor, device, batch_size: int = 1024) -> torch.Tensor:
    """L2-normalised features of uint8 images (N, C, H, W) in eval mode, on ``device``."""
    encoder.eval()
    feats = []
    for s in range(0, images.shape[0], batch_size):
        x = images[s:s + batch_size].to(device).float().div_(255)
        feats.append(encoder(x).float())
    return torch.nn.functional.normalize(torch.cat(feats), dim=1)


def raw_pixel_features(images: torch.Tensor, device) -> torch.Tensor:
    """Flattened pixels in [0, 1], L2-normalised: the demo-only stand-in for encoder features."""
    x = images.reshape(images.shape[0], -1).to(device).float().div_(255)
    return torch.nn.functional.normalize(x, dim=1)


# ---- files ---------------------------------------------------------------------------------------
def sidecar_path(out: str | os.PathLike) -> Path:
    return Path(out).with_suffix(".json")


def _cache_key(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("format", "source", "encoder_sha256", "dataset", "num_images", "image_size",
                                     "ks", "seed", "kmeans")}


def save_pseudo_labels(out: str | os.PathLike, labels: dict[int, torch.Tensor], meta: dict) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"pseudo_train_{k}": v.detach().cpu().to(torch.int64).contiguous() for k, v in labels.items()}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, out)
    side = sidecar_path(out)
    side.with_name(side.name + ".tmp").write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(side.with_name(side.name + ".tmp"), side)
    return out


def read_meta(path: str | os.PathLike) -> dict | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _existing_cache_meta(out: str | os.PathLike) -> dict | None:
    """The sidecar of an advfast labels file at ``out`` (None when there is no file yet). Any other file
    there is refused: advfast overwrites only a labels file it wrote itself (sidecar of its format)."""
    out = Path(out)
    if not out.exists():
        return None
    meta = read_meta(out)
    if not out.is_file() or meta is None or meta.get("format") != FORMAT:
        raise ValueError(f"{str(out)!r} exists and is not an advfast pseudo-label file (no {sidecar_path(out).name} "
                         f"sidecar of format {FORMAT}); advfast does not overwrite it: choose another output path")
    return meta


def build_pseudo_labels(dataset, out: str | os.PathLike, *, encoder: str | os.PathLike | None = None,
                        source: str = "encoder", ks: Sequence[int] = DEFAULT_KS, seed: int = 0,
                        kmeans_backend: str = "torch", device="auto", max_iter: int = 300,
                        rebuild: bool = False, log=print) -> dict[int, torch.Tensor]:
    """Pseudo labels for ``dataset`` (an advfast ImageDataset), from the cache at ``out`` when its
    sidecar matches (same encoder sha256, dataset, size, K list, seed, k-means backend), else
    computed and written there (a mismatching cache is rebuilt and overwritten)."""
    if source not in ("encoder", "raw_pixels"):
        raise ValueError(f"source must be 'encoder' or 'raw_pixels', got {source!r}")
    if kmeans_backend not in ("torch", "sklearn"):
        raise ValueError(f"kmeans_backend must be 'torch' or 'sklearn', got {kmeans_backend!r}")
    if source == "encoder" and encoder is None:
        raise ValueError("encoder is required with source='encoder'; give an advfast run dir "
                         "(or use source='raw_pixels' for the digits demo)")
    ks = _check_ks(ks, len(dataset.labels))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if source == "encoder":
        from advfast.engine.export import encoder_files

        enc_sha = file_sha256(encoder_files(encoder)[0])
    else:
        enc_sha = None
    meta = {"format": FORMAT, "source": source, "encoder_sha256": enc_sha,
            "encoder": str(encoder) if encoder is not None else None, "dataset": dataset.name,
            "num_images": int(len(dataset.labels)), "image_size": list(dataset.images.shape[-2:]),
            "ks": list(ks), "seed": int(seed),
            "kmeans": kmeans_backend}
    old = _existing_cache_meta(out)
    if old is not None and not rebuild:
        if _cache_key(old) == _cache_key(meta):
            log(f"pseudo labels: reusing {out} (encoder sha256 and settings match)")
            return load_pseudo_labels(out, dataset_name=dataset.name, num_images=meta["num_images"], ks=ks)
        log(f"pseudo labels: {out} was made from other settings or another encoder; rebuilding it")

    if source == "encoder":
        enc = load_encoder(encoder, device)
        feats = encoder_features(enc, dataset.images, device)
        del enc
    else:
        feats = raw_pixel_features(dataset.images, device)
    labels, stats = {}, {}
    for k in ks:
        if kmeans_backend == "torch":
            res = kmeans(feats, k, seed=seed, max_iter=max_iter)
        else:
            res = kmeans_sklearn(feats, k, seed=seed, max_iter=max_iter)
        labels[k] = res.labels.cpu()
        sizes = torch.bincount(labels[k], minlength=k)
        stats[str(k)] = {"inertia": res.inertia, "iterations": res.iterations,
                         "min_size": int(sizes.min()), "max_size": int(sizes.max())}
        log(f"pseudo labels: K={k} inertia {res.inertia:.4g} after {res.iterations} iterations, "
            f"cluster sizes {int(sizes.min())}..{int(sizes.max())}")
    meta["stats"] = stats
    save_pseudo_labels(out, labels, meta)
    return labels


# ---- reading -------------------------------------------------------------------------------------
def _check_ks(ks, num_images: int) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in ks)
    except (TypeError, ValueError):
        raise ValueError(f"ks must be a list of cluster counts such as [2, 10, 50], got {ks!r}") from None
    if not ks or any(k < 2 or k > num_images for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct cluster counts in [2, {num_images}], got {list(ks)}")
    return ks


def load_pseudo_labels(path: str | os.PathLike, *, num_images: int, ks: Sequence[int],
                       dataset_name: str | None = None) -> dict[int, torch.Tensor]:
    """{K: int64 labels (num_images,)} from a generator file (.safetensors) or the official pickle
    (.pkl, read without executing pickle code). Refuses a file made for another dataset or size."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pseudo-label file {str(path)!r} does not exist; make one with: "
                         f"{generator_command(dataset_name or 'cifar10', str(path))}")
    ks = _check_ks(ks, num_images)
    if path.suffix == ".pkl":
        try:
            arrays = read_official_pickle(path)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as e:
            raise ValueError(f"pseudo-label file {str(path)!r} is not the official pickle of numpy arrays "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    else:
        from safetensors.torch import load_file

        meta = read_meta(path)
        if meta is not None and dataset_name is not None and meta.get("dataset") != dataset_name:
            raise ValueError(f"pseudo labels {str(path)!r} were made for dataset {meta.get('dataset')!r}, "
                             f"not {dataset_name!r}; regenerate them for this dataset")
        try:
            arrays = load_file(str(path))
        except Exception as e:  # safetensors' own error type: not a labels file (or a damaged one)
            raise ValueError(f"pseudo-label file {str(path)!r} is not a safetensors file of labels "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); give a generator "
                             f".safetensors or the official .pkl") from None
    out = {}
    for k in ks:
        key = f"pseudo_train_{k}"
        if key not in arrays:
            have = sorted(a for a in arrays if a.startswith("pseudo_train_"))
            raise ValueError(f"{str(path)!r} has no {key}; it holds {have}: set method.cluster_ks to a subset")
        v = torch.as_tensor(arrays[key])
        if v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool:
            raise ValueError(f"{key} in {str(path)!r} holds {v.dtype} values; labels are integers")
        v = v.to(torch.int64).flatten()
        if v.numel() != num_images:
            raise ValueError(f"{key} in {str(path)!r} has {v.numel()} labels but the dataset has "
                             f"{num_images} images; regenerate them for this dataset")
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= k):
            raise ValueError(f"{key} in {str(path)!r} has labels outside [0, {k})")
        out[k] = v
    return out


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else: any other global (os.system, builtins.eval, ...)
    is refused before it is looked up, so no code named by the file ever runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        try:  # numpy >= 2 moved numpy.core to numpy._core (the old path warns)
            from numpy._core import multiarray
        except ImportError:  # pragma: no cover - numpy < 2
            from numpy.core import multiarray
        return getattr(multiarray, name)


def read_official_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The official ``imagenet_clPretrain_pseudo_labels.pkl`` (a dict of numpy int arrays)."""
    data = Path(path).read_bytes()
    obj = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                            for k, v in obj.items()):
        raise ValueError(f"{str(path)!r} is not a dict of numpy arrays (the official pseudo-label format)")
    return obj


# ---- CLI -----------------------------------------------------------------------------------------
class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not the usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
    p = _OneLineParser(prog="python -m advfast.methods.pseudo_labels",
                                description="ClusterFit pseudo labels for AdvCL: k-means over encoder features.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--encoder", help="advfast run dir holding encoder.safetensors + encoder.json")
    src.add_argument("--raw-pixels", action="store_true", help="cluster raw pixels (demo-only stand-in)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--image-size", type=int, default=None,
                   help="as advfast-train --image-size (digits, imagefolder, synthetic): use the training run's size")
    p.add_argument("--out", required=True, help="output .safetensors (a .json sidecar is written beside it)")
    p.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="comma-separated cluster counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kmeans", choices=("torch", "sklearn"), default="torch")
    p.add_argument("--max-iter", type=int, default=300)
    p.add_argument("--device", default="auto")
    p.add_argument("--rebuild", action="store_true", help="ignore a matching cache")
    a = p.parse_args(argv)
    from types import SimpleNamespace

    from advfast.data import load_dataset
    from advfast.data.build import dataset_kwargs

    try:
        ks = [int(k) for k in a.ks.split(",") if k.strip()]
    except ValueError:
        p.error(f"--ks must be comma-separated integers such as 2,10,50, got {a.ks[:80]!r}")
    if not 0 <= a.seed < 2**63:
        p.error(f"--seed must be a non-negative integer below 2**63, got {a.seed}")
    if a.max_iter < 1:
        p.error(f"--max-iter must be at least 1, got {a.max_iter}")
    size_kw = dataset_kwargs(SimpleNamespace(dataset=a.dataset, image_size=a.image_size))
    try:
        ds = load_dataset(a.dataset, root=a.data_dir, split="train", download=a.download, **size_kw)
        build_pseudo_labels(ds, a.out, encoder=a.encoder, source="raw_pixels" if a.raw_pixels else "encoder",
                            ks=ks, seed=a.seed, kmeans_backend=a.kmeans, device=a.device, max_iter=a.max_iter,
                            rebuild=a.rebuild, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, TypeError, OSError, pickle.UnpicklingError) as e:  # bad input: one line, exit 2
        if os.environ.get("ADVFAST_DEBUG"):
            raise
        print(f"{p.prog}: error: {(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
