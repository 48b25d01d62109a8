"""Export of the trained encoder for evaluation: ``encoder.safetensors`` + ``encoder.json``.

The tensors are the single-BN state dict of the method's evaluation branch (plain torchvision-style
keys, e.g. ACL DS keeps its "pgd" BN as the official --bnNameCnt 1 does); the JSON says how to
rebuild the model: ``build_encoder(**build_args)`` then ``load_state_dict``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import advfast
from advfast.io import atomic_save_tensors, atomic_write_json_obj, file_sha256

FORMAT = "advfast-encoder-1"


def branch_file(branch: str, eval_branch: str) -> str:
    """The weights file of a BN branch inside a run directory."""
    return "encoder.safetensors" if branch == eval_branch else f"encoder-{branch}.safetensors"


def export_encoder(method, cfg, out: Path, step: int, image_size: int) -> Path:
    """Write every BN branch of the encoder as a plain single-BN model (the evaluation branch as
    encoder.safetensors, the others as encoder-<branch>.safetensors) and encoder.json last."""
    from advfast.models import single_branch_state_dict

    encoder = method.encoder
    branch = method.eval_branch
    branches = tuple(getattr(encoder, "branches", ("normal",)))
    if branch not in branches:
        branch = branches[0]  # single-BN encoders name their only branch "normal" or otherwise
    out = Path(out)
    digests = {}
    for name in branches:
        state = single_branch_state_dict(encoder, name)
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        filename = branch_file(name, branch)
        digests[filename] = atomic_save_tensors(out / filename, tensors, metadata={"format": FORMAT})
    build_args = dict(getattr(encoder, "build_args", {"arch": cfg.arch}))
    build_args["bn_branches"] = [branch]
    for key in ("mean", "std"):
        if build_args.get(key) is not None:
            build_args[key] = list(build_args[key])
    info = {
        "format": FORMAT, "advfast_version": advfast.__version__,
        "arch": cfg.arch, "build_args": build_args, "bn_branch": branch, "branches": list(branches),
        "feat_dim": int(encoder.feat_dim), "mean": build_args.get("mean"), "std": build_args.get("std"),
        "method": cfg.method, "variant": method.variant, "dataset": cfg.dataset, "image_size": int(image_size),
        "num_classes": int(method.num_classes), "step": int(step),
        "sha256": digests,  # of each weights file: load_encoder verifies it
    }
    atomic_write_json_obj(out / "encoder.json", info)
    return out / "encoder.safetensors"


def encoder_files(path, branch: str | None = None) -> tuple[Path, dict, Path]:
    """(weights file of ``branch``, encoder.json metadata, run directory) of an export, checked but not
    loaded; ``path`` is a run directory or a file inside it, ``branch`` defaults to the evaluation branch."""
    run = Path(path)
    if run.is_file():
        run = run.parent
    if not run.is_dir():
        raise FileNotFoundError(f"encoder {path} does not exist (give an advfast-train run directory)")
    meta_path = run / "encoder.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run} holds no encoder.json: is it an advfast-train run directory? (the encoder "
                                "is exported when a run ends; finish an interrupted run with advfast-train --resume)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path} is unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "build_args" not in meta:
        raise ValueError(f"{meta_path} is not an advfast encoder export (format {FORMAT!r} expected)")
    branch = branch or meta["bn_branch"]
    available = meta.get("branches", [meta["bn_branch"]])
    if branch not in available:
        raise ValueError(f"BN branch {branch!r}: the encoder of {run} has the branches {', '.join(available)}")
    weights = run / branch_file(branch, meta["bn_branch"])
    if not weights.is_file():
        raise FileNotFoundError(f"{run} lists BN branch {branch!r} but holds no {weights.name}")
    check_build_args(meta["build_args"], meta_path)
    return weights, dict(meta, bn_branch=branch), run


# what encoder.json's build_args may hold, beyond the arch's own keyword arguments: the model is never
# built from arguments that were not checked (a damaged or hostile file must not allocate 10**9 channels)
_MAX_WIDTH = 16384
_MAX_LAYERS = 256


def check_build_args(args, meta_path) -> None:
    """ValueError (one line, naming the file) unless ``args`` are keyword arguments build_encoder takes,
    of sane types and sizes."""
    import inspect

    from advfast.models import available_archs
    from advfast.models.encoder import _ARCHS

    def bad(what: str):
        return ValueError(f"{meta_path} is damaged: build_args {what}; export the encoder again (advfast-train "
                          f"--resume finishes a run and exports it)")

    if not isinstance(args, dict) or not isinstance(args.get("arch"), str):
        raise bad("has no arch")
    if args["arch"] not in available_archs():
        raise bad(f"name an unknown arch {args['arch'][:40]!r}")
    params = inspect.signature(_ARCHS[args["arch"]].__init__).parameters
    allowed = {"arch"} | {n for n, p in params.items() if n != "self" and p.kind == p.POSITIONAL_OR_KEYWORD}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise bad(f"hold unknown key {unknown[0][:40]!r} (the {args['arch']} encoder takes {', '.join(sorted(allowed))})")
    for key in ("mean", "std"):
        value = args.get(key)
        if value is not None and not (isinstance(value, list) and 1 <= len(value) <= 16 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and
                (key == "mean" or v > 0) for v in value)):
            raise bad(f"{key} is not a short list of finite numbers")
    branches = args.get("bn_branches", ["normal"])
    if not (isinstance(branches, list) and branches and all(isinstance(b, str) and len(b) < 64 for b in branches)):
        raise bad("bn_branches is not a list of names")
    channels = args.get("in_channels")
    if channels is not None and not (type(channels) is int and 1 <= channels <= 64):
        raise bad("in_channels is not an int in 1..64")
    for key, value in args.items():
        if key in ("arch", "mean", "std", "bn_branches", "in_channels"):
            continue
        items = value if isinstance(value, list) else [value]
        if len(items) > _MAX_LAYERS or not all(type(v) in (int, float, str, bool) for v in items) or \
                any(type(v) is int and not 0 <= v <= _MAX_WIDTH for v in items) or \
                any(type(v) is float and not math.isfinite(v) for v in items) or \
                any(type(v) is str and len(v) > 64 for v in items):
            raise bad(f"{key} is not a plain value in range")


def verify_encoder_file(weights: Path, meta: dict) -> None:
    """The weights file's SHA-256 against encoder.json's record: ValueError when it differs; exports made
    before checksums were recorded load with a one-line note on stderr."""
    recorded = meta.get("sha256")
    if not isinstance(recorded, dict) or weights.name not in recorded:
        print(f"advfast: note: {weights} carries no checksum (exported before advfast recorded them); "
              f"loading it unverified", file=sys.stderr)
        return
    if file_sha256(weights) != recorded[weights.name]:
        raise ValueError(f"{weights} is truncated or altered (SHA-256 differs from encoder.json); export it again")


def load_encoder(path, branch: str | None = None):
    """(encoder in eval mode on the CPU, metadata) from a run directory, or a file inside it, written by
    export_encoder. ``branch`` picks a BN branch (default: the method's evaluation branch). Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from advfast.models import build_encoder

    weights, meta, run = encoder_files(path, branch)
    branch = meta["bn_branch"]
    verify_encoder_file(weights, meta)
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{weights} is unreadable or corrupt ({exc})") from None
    args = dict(meta["build_args"])
    args["bn_branches"] = (branch,)
    for key in ("mean", "std"):
        if args.get(key) is not None:
            args[key] = tuple(args[key])
    encoder = build_encoder(**args)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights} does not fit a {args['arch']} encoder: {str(exc).splitlines()[0]}") from None
    return encoder.eval(), dict(meta, bn_branch=branch, run_dir=str(run))
