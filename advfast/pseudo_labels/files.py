"""Pseudo-label files: the generator's safetensors (int64 vectors ``pseudo_train_{K}`` indexed by
dataset index) with their JSON sidecar (same stem: format, source, encoder sha256, dataset, K list,
seed, k-means backend; a matching sidecar makes the file a cache hit), and the official AdvCL pickle,
read by a restricted unpickler that only rebuilds numpy arrays.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

DEFAULT_KS = (2, 10, 50, 100, 500)
FORMAT = "advfast-pseudo-labels/1"


def generator_command(dataset: str = "cifar10", out: str = "pseudo_labels.safetensors") -> str:
    """The exact command that produces a labels file (quoted by errors that need one)."""
    return f"python -m advfast.pseudo_labels --encoder RUN_DIR --dataset {dataset} --out {out}"


def sidecar_path(out: str | os.PathLike) -> Path:
    return Path(out).with_suffix(".json")


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


def existing_cache_meta(out: str | os.PathLike) -> dict | None:
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


def check_ks(ks, num_images: int) -> tuple[int, ...]:
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
    ks = check_ks(ks, num_images)
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
