"""The run directory: what a run writes there, whose it is, and the guard against clobbering it.

A directory is an advfast run when it carries the ownership marker (``.advfast-run``, written when a
run first uses it) or, for runs made before the marker existed, a ``run.json`` that parses as
advfast's. ``--overwrite`` deletes only such a directory's advfast files (see ``remove_run_files``),
never a folder that merely contains ``checkpoints/``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

from advfast.io import atomic_write_json_obj

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
STAGES = "stages"  # <run>/stages/<stage name>/encoder.*: exports after the stages of multi-stage methods
MARKER = ".advfast-run"
MARKER_FORMAT = "advfast-run-dir-1"
LOCK_FILE = ".advfast-lock"
# the files a run writes at its top level; --overwrite removes these and nothing else
RUN_FILES = (RUN_FILE, "metrics.jsonl", "metrics.csv", "encoder.safetensors", "encoder.json")
_ENCODER_BRANCH = re.compile(r"encoder-[A-Za-z0-9_.-]+\.safetensors")
_CHECKPOINT_FILE = re.compile(r"ckpt-\d{9}\.(json|safetensors)|\.ckpt-\d{9}\.(json|safetensors)\..*\.tmp")
_TB_FILE = re.compile(r"events\.out\.tfevents\..*")
_TMP_FILE = re.compile(r"\..+\.tmp")  # atomic writes killed midway (io.atomic_write_bytes, atomic_save_tensors)


class NotARunDirectory(ValueError):
    """--overwrite/--resume pointed at a directory advfast did not make."""


def holds_run(path: Path) -> bool:
    """Something in ``path`` looks like a run (advfast's or not): a new run must not start there, and a
    file of that name that advfast did not write is never replaced."""
    path = Path(path)
    return any((path / name).exists() for name in (*RUN_FILES, CHECKPOINTS, MARKER)) or \
        (path.is_dir() and any(_ENCODER_BRANCH.fullmatch(p.name) for p in path.iterdir()))


def run_file_is_advfast(path: Path) -> bool:
    """``path/run.json`` parses and has the fields advfast writes (runs made before the marker existed)."""
    try:
        data = json.loads((Path(path) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(data, dict) and isinstance(data.get("advfast_version"), str)
            and isinstance(data.get("config"), dict) and isinstance(data["config"].get("method"), str)
            and isinstance(data.get("steps_per_epoch"), int))


def is_advfast_run(path: Path) -> bool:
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT:
            return True
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    return run_file_is_advfast(path)


def check_run_dir(path: Path, resume: bool, overwrite: bool) -> None:
    """Every check of prepare_run_dir that reads only: raises a one-line ValueError, writes nothing."""
    path = Path(path)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume continues a run, overwrite discards it")
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path {path} is a file; give --out a directory")
    if not holds_run(path):
        return
    if not is_advfast_run(path):
        raise NotARunDirectory(f"{path} holds files named like a run's but is not an advfast run directory (no "
                               f"{MARKER} marker and no advfast {RUN_FILE}); advfast deletes and writes nothing "
                               f"there: choose another --out")
    if not (resume or overwrite):
        raise ValueError(f"output directory {path} already holds a run; pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out")


def prepare_run_dir(path: Path, resume: bool, overwrite: bool) -> Path:
    """Create (or reuse) the run directory, mark it as advfast's and, on overwrite, remove the old
    run's files. Call only once everything else is validated and built: this is the first write."""
    path = Path(path)
    check_run_dir(path, resume, overwrite)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"output directory {path} is not writable ({e.strerror}); choose another --out") from None
    if overwrite:
        remove_run_files(path)
    if not (path / MARKER).is_file():
        atomic_write_json_obj(path / MARKER, {"format": MARKER_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return path


def writable_dir_error(path: Path) -> str | None:
    """Why ``path`` (or the nearest existing parent it would be made in) cannot take a run; None if it can."""
    probe = Path(path)
    while not probe.exists():
        if probe.parent == probe:
            return f"output directory {path} cannot be created"
        probe = probe.parent
    if not probe.is_dir():
        return f"output path {probe} is a file; give --out a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"output directory {probe} is not writable; choose another --out"
    return None


def remove_run_files(path: Path) -> None:
    """Delete the files an advfast run wrote in ``path`` and nothing else: foreign files stay, and a
    folder (checkpoints/, tb/) is removed only once it is empty."""
    path = Path(path)
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    for child in path.iterdir():
        if child.is_file() and (_ENCODER_BRANCH.fullmatch(child.name) or _TMP_FILE.fullmatch(child.name)):
            child.unlink()
    for folder, pattern in ((path / CHECKPOINTS, _CHECKPOINT_FILE), (path / "tb", _TB_FILE)):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for child in folder.iterdir():
            if child.is_file() and not child.is_symlink() and pattern.fullmatch(child.name):
                child.unlink()
        try:
            folder.rmdir()  # only when nothing foreign is left in it
        except OSError:
            pass
    _remove_stage_exports(path / STAGES)


def _remove_stage_exports(stages: Path) -> None:
    """stages/<name>/encoder*: the exports after each stage of a multi-stage method (foreign files stay)."""
    if not stages.is_dir() or stages.is_symlink():
        return
    for folder in stages.iterdir():
        if not folder.is_dir() or folder.is_symlink():
            continue
        for child in folder.iterdir():
            if child.is_file() and not child.is_symlink() and (
                    child.name in ("encoder.safetensors", "encoder.json") or _ENCODER_BRANCH.fullmatch(child.name)
                    or _TMP_FILE.fullmatch(child.name)):
                child.unlink()
        try:
            folder.rmdir()
        except OSError:
            pass
    try:
        stages.rmdir()
    except OSError:
        pass
