"""The classifier advfast-eval scored, saved next to its results so it can be attacked or deployed as is.

Files in the evaluation's output directory:
  classifier.safetensors   SLF/ALF: the linear head (the encoder stayed frozen, so the pre-trained
                           encoder's own weights complete it); AFF: every weight of encoder + head
  classifier.json          what it is (kind, protocol, classes, BN branch, the pre-trained checkpoint
                           and its format: "advfast" or the published format it was imported with)
                           and the SHA-256 of classifier.safetensors

``advfast.eval.load_classifier(out_dir)`` rebuilds the exact model (eval mode, CPU); it needs the
pre-trained run it came from (SLF/ALF: its encoder weights; AFF: its architecture). Never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from advfast.io import atomic_write_bytes, atomic_write_json_obj, file_sha256

FORMAT = "advfast-classifier/1"
WEIGHTS, META = "classifier.safetensors", "classifier.json"


def save_classifier(model, out_dir: str, *, checkpoint: str, bn_branch: str, protocol: str,
                    num_classes: int, checkpoint_format: str = "advfast", pretrain_dataset: str | None = None,
                    keep_branches: bool = False) -> dict[str, str]:
    """Write classifier.safetensors and classifier.json into out_dir; returns their paths.
    ``checkpoint_format`` is how ``checkpoint`` is read back ("advfast" or an advfast.interop format,
    with ``pretrain_dataset``); ``keep_branches``: the encoder holds every BN branch of the file (dual-BN AFF)."""
    from safetensors.torch import save

    linear_head = bool(model.frozen)
    module = model.head if linear_head else model
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    os.makedirs(out_dir, exist_ok=True)
    weights, meta = os.path.join(out_dir, WEIGHTS), os.path.join(out_dir, META)
    atomic_write_bytes(weights, save(state))
    record = {"format": FORMAT, "kind": "linear_head" if linear_head else "full_model", "protocol": protocol,
              "num_classes": int(num_classes), "branch": model.branch, "bn_branch": bn_branch,
              "checkpoint": os.path.abspath(checkpoint), "checkpoint_format": checkpoint_format,
              "pretrain_dataset": pretrain_dataset, "keep_branches": bool(keep_branches),
              "natural_branch": getattr(model, "natural_branch", None),
              "tensors": WEIGHTS, "sha256": file_sha256(weights)}
    atomic_write_json_obj(meta, record)
    return {"weights": weights, "meta": meta}


def _read_meta(directory: Path) -> dict:
    path = directory / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: give an advfast-eval output directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is unreadable ({type(exc).__name__}); rerun advfast-eval") from None
    needed = {"format", "kind", "num_classes", "branch", "bn_branch", "checkpoint", "tensors", "sha256"}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not needed <= set(meta):
        raise ValueError(f"{path} is not an advfast classifier record ({FORMAT})")
    if meta["kind"] not in ("linear_head", "full_model") or not isinstance(meta["num_classes"], int) \
            or meta["num_classes"] < 1 or meta["tensors"] != WEIGHTS:
        raise ValueError(f"{path} has invalid fields (kind, num_classes or tensors)")
    return meta


def load_classifier(out_dir, checkpoint: str | None = None):
    """The classifier advfast-eval saved in ``out_dir`` (a Classifier in eval mode, on the CPU).
    ``checkpoint`` overrides where the pre-trained run is (when it has moved)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from advfast.eval.finetune import Classifier
    from advfast.eval.pretrained import load_pretrained

    directory = Path(out_dir)
    meta = _read_meta(directory)
    weights = directory / WEIGHTS
    try:
        data = weights.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"{weights} is missing or unreadable ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ValueError(f"{weights} does not match the SHA-256 in {META}: the file is damaged or was replaced")
    try:
        state = load(data)
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"{weights} is not a readable safetensors file ({exc})") from None
    # records written before the format was recorded are advfast checkpoints
    fmt = meta.get("checkpoint_format", "advfast")
    encoder, _ = load_pretrained(checkpoint or meta["checkpoint"], meta["bn_branch"], fmt=fmt,
                                 dataset=meta.get("pretrain_dataset"), keep_branches=bool(meta.get("keep_branches")))
    linear_head = meta["kind"] == "linear_head"
    model = Classifier(encoder, meta["num_classes"], branch=meta["branch"], frozen=linear_head,
                       natural_branch=meta.get("natural_branch"))
    try:
        (model.head if linear_head else model).load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights} does not fit the encoder of {meta['checkpoint']}: "
                         f"{str(exc).splitlines()[0]}") from None
    return model.eval()

