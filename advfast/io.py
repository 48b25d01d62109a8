"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync'd, then renamed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json_obj(path, obj) -> None:
    """``obj`` as indented JSON (no NaN/Inf: they are not JSON), written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


def atomic_save_tensors(path, tensors: dict, metadata: dict[str, str] | None = None, _before_replace=None) -> str:
    """Write ``tensors`` (a dict of torch tensors) to ``path`` as safetensors, atomically; returns the
    file's SHA-256. ``_before_replace``: called between the fsync and the rename (the tests' crash hook)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_tensors_file(tensors, tmp, metadata)
        digest = file_sha256(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if _before_replace is not None:
            _before_replace()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return digest


def save_tensors_file(tensors, path, metadata) -> None:
    """safetensors' save_file, its I/O failures (disk full, file too large) raised as the OSError they are."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def file_sha256(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(directory) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
