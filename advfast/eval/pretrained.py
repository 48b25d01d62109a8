"""Loading a pre-trained encoder for evaluation: an advfast-train export, or a published checkpoint."""

from __future__ import annotations

from pathlib import Path

from advfast.models.export import load_encoder

ADVFAST = "advfast"  # the checkpoint format of advfast-train's run directories and encoder files


def load_pretrained(path: str, bn_branch: str | None = None, fmt: str | None = None, dataset: str | None = None,
                    keep_branches: bool = False):
    """(encoder in eval mode, metadata) from an advfast run directory or a file inside it (``fmt`` None or
    "advfast"), or from a checkpoint saved by a published code base (``fmt`` one of
    advfast.interop.FORMATS: acl, advcl, a-infonce, deacl, dynacl, rocl, amoc, robustssl, solo-learn).

    ``dataset`` is a published checkpoint's pre-training dataset (default cifar10; stl10 means 96 px).
    ``keep_branches`` keeps every BN branch of a multi-BN published file (dual-BN fine-tuning); an advfast
    run stores one branch per file, so it has no meaning there. The metadata says ``checkpoint_format``;
    for an advfast run it also names the training log (metrics.jsonl), for the training-curve plot."""
    if fmt is None or fmt == ADVFAST:
        if keep_branches:
            raise ValueError("an advfast run stores each BN branch in its own file; for dual-BN fine-tuning export "
                             "it with advfast-export --to robustssl and evaluate that file with --from robustssl")
        encoder, meta = load_encoder(path, bn_branch)
        metrics = Path(meta["run_dir"]) / "metrics.jsonl"
        if metrics.is_file():
            meta["metrics_path"] = str(metrics)
        meta["checkpoint_format"] = ADVFAST
        return encoder, meta
    from advfast.interop import load_published

    dataset = dataset or "cifar10"
    encoder, meta = load_published(path, fmt, bn_branch=bn_branch, dataset=dataset,
                                   image_size=96 if dataset == "stl10" else 32, keep_branches=keep_branches)
    meta["checkpoint_format"] = fmt
    return encoder, meta
