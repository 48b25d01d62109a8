"""Export of the trained encoder for evaluation: ``encoder.safetensors`` + ``encoder.json``.

The tensors are the single-BN state dict of the method's evaluation branch (plain torchvision-style
keys, e.g. ACL DS keeps its "pgd" BN as the official --bnNameCnt 1 does); the JSON says how to
rebuild the model: ``build_encoder(**build_args)`` then ``load_state_dict``.
"""

from __future__ import annotations

from pathlib import Path

import advfast
from advfast.engine.checkpoint import atomic_save_tensors, atomic_write_json

FORMAT = "advfast-encoder-1"


def export_encoder(method, cfg, out: Path, step: int, image_size: int) -> Path:
    from advfast.models import single_branch_state_dict

    encoder = method.encoder
    branch = method.eval_branch
    branches = tuple(getattr(encoder, "branches", ("normal",)))
    if branch not in branches:
        branch = branches[0]  # single-BN encoders name their only branch "normal" or otherwise
    state = single_branch_state_dict(encoder, branch)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    out = Path(out)
    atomic_save_tensors(out / "encoder.safetensors", tensors, metadata={"format": FORMAT})
    build_args = dict(getattr(encoder, "build_args", {"arch": cfg.arch}))
    build_args["bn_branches"] = [branch]
    for key in ("mean", "std"):
        if build_args.get(key) is not None:
            build_args[key] = list(build_args[key])
    info = {
        "format": FORMAT, "advfast_version": advfast.__version__,
        "arch": cfg.arch, "build_args": build_args, "bn_branch": branch, "feat_dim": int(encoder.feat_dim),
        "mean": build_args.get("mean"), "std": build_args.get("std"),
        "method": cfg.method, "variant": method.variant, "dataset": cfg.dataset, "image_size": int(image_size),
        "num_classes": int(method.num_classes), "step": int(step),
    }
    atomic_write_json(out / "encoder.json", info)
    return out / "encoder.safetensors"
