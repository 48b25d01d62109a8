"""The run directory: what a run writes there, and the guard against clobbering another run."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
# everything a run writes; --overwrite removes exactly these and nothing else
RUN_OUTPUTS = (RUN_FILE, CHECKPOINTS, "metrics.jsonl", "metrics.csv", "encoder.safetensors", "encoder.json", "tb")


def holds_run(path: Path) -> bool:
    path = Path(path)
    return any((path / name).exists() for name in (RUN_FILE, CHECKPOINTS, "metrics.jsonl"))


def prepare_run_dir(path: Path, resume: bool, overwrite: bool) -> Path:
    """Create (or reuse, on resume) the run directory; one-line ValueError when it cannot be used."""
    path = Path(path)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume continues a run, overwrite discards it")
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path {path} is a file; give --out a directory")
    if holds_run(path) and not (resume or overwrite):
        raise ValueError(f"output directory {path} already holds a run; pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"output directory {path} is not writable ({e.strerror}); choose another --out") from None
    if overwrite:
        for target in [path / name for name in RUN_OUTPUTS] + sorted(path.glob("encoder-*.safetensors")):
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return path
