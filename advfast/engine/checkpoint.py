"""Checkpoints: tensors in safetensors, everything else in JSON; loading never unpickles.

A checkpoint is the pair ``ckpt-<step>.safetensors`` + ``ckpt-<step>.json`` in ``<run>/checkpoints``.
Each file is written to a temporary name, fsynced and moved into place with os.replace, tensors
first; the JSON is written last and records the SHA-256 of the tensor file, so a checkpoint exists
only once both files are whole, and a truncated or altered one is detected by name and skipped.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from advfast.io import atomic_save_tensors, atomic_write_bytes, file_sha256

FORMAT = "advfast-checkpoint-1"
_NAME = re.compile(r"ckpt-(\d{9})\.json")
# Test-only crash hook (tests/test_reliability.py): "<step>:<stage>" SIGKILLs this process while it
# writes checkpoint <step>; stage "tensors" = tensor file written to its temporary name, not yet moved
# into place; "json" = tensor file in place, its JSON not yet written. Never set it outside tests.
KILL_HOOK_ENV = "ADVFAST_TEST_KILL_IN_CHECKPOINT"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, truncated, or from another run."""


# ---- atomic files ---------------------------------------------------------------------------------

def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


def _kill_point(step: int, stage: str) -> None:
    """The test-only crash hook (KILL_HOOK_ENV): SIGKILL leaves no chance to clean up, like a power cut."""
    if os.environ.get(KILL_HOOK_ENV) == f"{step}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---- state <-> (tensors, json) ---------------------------------------------------------------------

def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    # safetensors wants contiguous tensors that share no storage; clone() guarantees both
    return t.detach().to("cpu", copy=True).contiguous()


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (keys ``optim.<param>.<name>``) and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = _plain_tensor(value)
            else:
                plain.setdefault(str(idx), {})[name] = value
    return tensors, {"plain": plain, "param_groups": state["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["plain"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(ckpt_dir: Path, step: int, *, model_state: dict[str, torch.Tensor], optimizer_state: dict,
                    rng_tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep_last``. Returns the JSON path."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": _plain_tensor(v) for k, v in model_state.items()}
    optim_tensors, optim_meta = flatten_optimizer_state(optimizer_state)
    tensors.update(optim_tensors)
    tensors.update({f"rng.{k}": _plain_tensor(v) for k, v in rng_tensors.items()})
    stem = f"ckpt-{step:09d}"
    digest = atomic_save_tensors(ckpt_dir / f"{stem}.safetensors", tensors, metadata={"format": FORMAT},
                                 _before_replace=lambda: _kill_point(step, "tensors"))
    _remember_hash(ckpt_dir / f"{stem}.safetensors", digest)  # pruning verifies it without reading it again
    _kill_point(step, "json")
    record = dict(meta, format=FORMAT, step=step, tensors=f"{stem}.safetensors", sha256=digest, optimizer=optim_meta)
    json_path = ckpt_dir / f"{stem}.json"
    atomic_write_json(json_path, record)
    prune(ckpt_dir, keep_last)
    return json_path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """JSON files of the checkpoints in ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if _NAME.fullmatch(p.name))


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints that verify whole (sidecar + SHA-256) and everything
    newer than the oldest of them; a damaged checkpoint never counts as kept, so the last good one stays."""
    good = 0
    listed = list_checkpoints(ckpt_dir)
    cut = 0
    for i in range(len(listed) - 1, -1, -1):
        if verify_checkpoint(listed[i]) is None:
            good += 1
            if good == keep_last:
                cut = i
                break
    for json_path in listed[:cut]:
        _unlink(json_path)  # the JSON first: a half-pruned checkpoint is never mistaken for a whole one
        _unlink(json_path.with_suffix(".safetensors"))
    for tmp in Path(ckpt_dir).glob(".*.tmp"):  # leftovers of writes killed midway
        _unlink(tmp)
    kept = {p.stem for p in list_checkpoints(ckpt_dir)}
    for tensors in Path(ckpt_dir).glob("ckpt-*.safetensors"):  # killed before their JSON: never whole
        if tensors.stem not in kept:
            _unlink(tensors)


# (path, size, mtime_ns) -> sha256 of tensor files this process has hashed: pruning re-verifies the
# kept checkpoints at every save, and an unchanged file need not be read again
_HASHED: dict[tuple[str, int, int], str] = {}


def _sha256_cached(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        if len(_HASHED) > 256:
            _HASHED.clear()
        _HASHED[key] = file_sha256(path)
    return _HASHED[key]


def _remember_hash(path: Path, digest: str) -> None:
    st = path.stat()
    _HASHED[(str(path), st.st_size, st.st_mtime_ns)] = digest


def verify_checkpoint(json_path: Path) -> str | None:
    """Why checkpoint ``json_path`` is not whole (sidecar or SHA-256), or None when it is; reads no tensors."""
    try:
        meta = read_sidecar(json_path)
        tensor_path = json_path.parent / meta["tensors"]
        if _sha256_cached(tensor_path) != meta["sha256"]:
            return f"checkpoint {tensor_path} is truncated or altered (SHA-256 mismatch)"
    except CheckpointError as e:
        return str(e)
    except OSError as e:
        return f"checkpoint {json_path} is unreadable ({e})"
    return None


# what a sidecar must hold, and of which type (checked before anything in it is used)
_SIDECAR_TYPES = {"format": str, "step": int, "tensors": str, "sha256": str, "optimizer": dict, "method": str,
                  "arch": str, "epoch": int, "steps_per_epoch": int, "scheduler": dict, "scaler": dict,
                  "config": dict}
_MAX_STEP = 10 ** 12
_STAGE_TYPES = {"stage": str, "stage_index": int, "stage_step": int}  # optional: multi-stage methods only


def read_sidecar(json_path: Path) -> dict[str, Any]:
    """The JSON of a checkpoint, checked field by field; CheckpointError (one line, naming the file) when
    a key is missing, has the wrong type or an impossible value (a step that is not the file's own)."""
    json_path = Path(json_path)
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {json_path} is unreadable ({e.__class__.__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not an advfast checkpoint (format {FORMAT!r} expected)")
    for key, kind in _SIDECAR_TYPES.items():
        value = meta.get(key)
        if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            what = "lacks" if key not in meta else f"has a {type(value).__name__} for"
            raise CheckpointError(f"checkpoint {json_path} {what} {key!r} (damaged sidecar)")
    match = _NAME.fullmatch(json_path.name)
    step = meta["step"]
    if match is None or step != int(match.group(1)) or not 0 <= step <= _MAX_STEP:
        raise CheckpointError(f"checkpoint {json_path} records step {step}, not the file's own (damaged sidecar)")
    if meta["tensors"] != f"{json_path.stem}.safetensors":
        raise CheckpointError(f"checkpoint {json_path} names the tensor file {meta['tensors'][:80]!r}, not its own")
    if not re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]):
        raise CheckpointError(f"checkpoint {json_path} has no valid SHA-256 (damaged sidecar)")
    spe = meta["steps_per_epoch"]
    if not 1 <= spe <= _MAX_STEP or meta["epoch"] != step // spe:
        raise CheckpointError(f"checkpoint {json_path} has epoch {meta['epoch']} and {spe} steps per epoch "
                              f"at step {step} (damaged sidecar)")
    for key, kind in _STAGE_TYPES.items():  # written by methods with stages after pre-training
        value = meta.get(key, kind())
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or not 0 <= value <= step)):
            raise CheckpointError(f"checkpoint {json_path} has a damaged {key!r} (damaged sidecar)")
    optim = meta["optimizer"]
    if not isinstance(optim.get("plain"), dict) or not isinstance(optim.get("param_groups"), list) or \
            not all(isinstance(g, dict) for g in optim["param_groups"]):
        raise CheckpointError(f"checkpoint {json_path} has a damaged optimizer record")
    return meta


def load_checkpoint(json_path: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Read one checkpoint, verifying it whole. Returns (meta, {"model": ..., "optimizer": ..., "rng": ...});
    raises CheckpointError naming the file when it is truncated, altered, damaged or not an advfast checkpoint."""
    json_path = Path(json_path)
    meta = read_sidecar(json_path)
    tensor_path = json_path.parent / meta["tensors"]
    if not tensor_path.is_file():
        raise CheckpointError(f"checkpoint {json_path} lacks its tensor file {tensor_path.name}")
    if file_sha256(tensor_path) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {tensor_path} is truncated or altered (SHA-256 mismatch)")
    try:
        flat = load_file(tensor_path)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {tensor_path} is unreadable ({e})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optimizer": {}, "rng": {}}
    for key, value in flat.items():
        kind, _, rest = key.partition(".")
        if kind == "model":
            parts["model"][rest] = value
        elif kind == "optim":
            parts["optimizer"][key] = value
        elif kind == "rng":
            parts["rng"][rest] = value
    try:
        parts["optimizer"] = unflatten_optimizer_state(parts["optimizer"], meta["optimizer"])
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {json_path} has a damaged optimizer record ({e.__class__.__name__})") \
            from None
    return meta, parts


def latest_valid_checkpoint(ckpt_dir: Path, warn=print):
    """The newest checkpoint that loads whole, as (meta, parts); broken ones are reported through
    ``warn`` by name and skipped. None when there is none."""
    for json_path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return load_checkpoint(json_path)
        except CheckpointError as e:
            warn(f"advfast: skipping {e}")
    return None
