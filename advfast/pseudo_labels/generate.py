"""ClusterFit pseudo labels for AdvCL, which the official code ships only as a pickle for CIFAR-10.

The official labels come from k-means over features of an ImageNet contrastive model that was never
published. This module rebuilds the procedure: features of a given encoder (an advfast run dir's
``encoder.safetensors`` + ``encoder.json``, e.g. a SimCLR run) over the training set, L2-normalised,
k-means for each K (advfast.pseudo_labels.kmeans: a batched torch k-means on the device with
k-means++ init and a fixed seed, or scikit-learn's KMeans on the CPU), saved in the labels-file
format of advfast.pseudo_labels.files, whose sidecar records the encoder file's sha256, the dataset,
the K list and the seed. A matching sidecar makes the file a cache hit.

``source="raw_pixels"`` clusters the raw images instead: a demo-only stand-in for the digits
preset (no encoder is needed, and on 8x8 digits pixel clusters are meaningful); not ClusterFit.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from advfast.io import file_sha256
from advfast.models.export import encoder_files
from advfast.models.export import load_encoder as load_exported
from advfast.pseudo_labels.files import (DEFAULT_KS, FORMAT, check_ks, existing_cache_meta, load_pseudo_labels,
                                         save_pseudo_labels)
from advfast.pseudo_labels.kmeans import kmeans, kmeans_sklearn


# ---- features ------------------------------------------------------------------------------------
def load_encoder(run_dir: str | os.PathLike, device="cpu") -> torch.nn.Module:
    """The exported encoder of a run (its evaluation branch), in eval mode on ``device``."""
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


# ---- labels ----------------------------------------------------------------------------------------
def _cache_key(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("format", "source", "encoder_sha256", "dataset", "num_images", "image_size",
                                     "ks", "seed", "kmeans")}


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
    ks = check_ks(ks, len(dataset.labels))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if source == "encoder":
        enc_sha = file_sha256(encoder_files(encoder)[0])
    else:
        enc_sha = None
    meta = {"format": FORMAT, "source": source, "encoder_sha256": enc_sha,
            "encoder": str(encoder) if encoder is not None else None, "dataset": dataset.name,
            "num_images": int(len(dataset.labels)), "image_size": list(dataset.images.shape[-2:]),
            "ks": list(ks), "seed": int(seed),
            "kmeans": kmeans_backend}
    old = existing_cache_meta(out)
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
