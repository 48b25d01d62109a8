"""Loading a pre-trained encoder exported by advfast-train for evaluation."""

from __future__ import annotations

from pathlib import Path

from advfast.models.export import load_encoder


def load_pretrained(path: str, bn_branch: str | None = None):
    """(encoder in eval mode, metadata) from a run directory or a file inside it; the metadata also
    names the run's training log (metrics.jsonl) when there is one, for the training-curve plot."""
    encoder, meta = load_encoder(path, bn_branch)
    metrics = Path(meta["run_dir"]) / "metrics.jsonl"
    if metrics.is_file():
        meta["metrics_path"] = str(metrics)
    return encoder, meta
