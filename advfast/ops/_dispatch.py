"""Backend selection shared by every fused op.

Backends, fastest first for their device:
  cuda   - csrc/cuda kernels in advfast._C (CUDA tensors)
  triton - kernels/ (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1, which is how CI tests them)
  cpp    - csrc/cpu kernels in advfast._C (CPU tensors; vectorised, OpenMP)
  torch  - the plain PyTorch reference in advfast.ops (any device)
Each op declares which backends it implements; ``resolve`` turns "auto" or a requested name into
one that can run here, or raises a ValueError/RuntimeError that names what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from advfast import _ext

BACKENDS = ("cuda", "triton", "cpp", "torch")

# Set by ``auto_backend``: the backend "auto" resolves to while it is active (None: the fastest).
_auto_override: str | None = None


@contextlib.contextmanager
def auto_backend(name: str):
    """Within the block, "auto" resolves to ``name`` for every op that implements it and can run it
    here (ops without it keep their own choice). Backends asked for by name are unaffected.

    The benchmarks' "fused ops off" switch: ``with auto_backend("torch"):`` runs every op the
    methods call with backend="auto" on its plain PyTorch reference, as the official codes do.
    """
    global _auto_override
    if name not in BACKENDS + ("torch-chunked",):
        raise ValueError(f"auto_backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}, torch-chunked")
    previous, _auto_override = _auto_override, name
    try:
        yield
    finally:
        _auto_override = previous


@functools.lru_cache(maxsize=None)
def triton_error() -> str | None:
    """None when Triton can run kernels in this process, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    try:
        import advfast.kernels  # noqa: F401
    except ImportError as exc:
        return f"advfast.kernels is not importable ({exc}); install the package with pip"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_guard(device: torch.device):
    """Makes ``device`` current for Triton launches: Triton launches on the current CUDA device, not
    on the tensors' one, so tensors on another GPU would be read through a foreign context."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device`` here, else a one-line reason."""
    if backend in ("torch", "torch-chunked"):  # plain torch; torch-chunked: contrastive losses only
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device.type} tensors"
        return _ext.extension_error()
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors (no GPU, or tensors not moved)"
        if _ext.extension_error() is not None:
            return _ext.extension_error()
        if not _ext.extension_has_cuda():
            return "advfast._C was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
        return None
    if backend == "triton":
        if triton_error() is not None:
            return triton_error()
        if device.type == "cpu" and not triton_interpreted():
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not support {device.type} tensors"
        return None
    return f"unknown backend {backend!r}"


def resolve(op: str, backend: str, device: torch.device, implemented: tuple[str, ...],
            auto_order: tuple[str, ...] | None = None) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    ``implemented`` lists the backends this op has; ``auto_order`` (default: BACKENDS order, the
    interpreted Triton path excluded because it is a test vehicle, not a fast path) is what "auto" tries.
    """
    if backend == "auto":
        if (_auto_override is not None and _auto_override in implemented
                and unavailable_reason(_auto_override, device) is None):
            return _auto_override
        for name in auto_order or implemented:
            if name not in implemented:
                continue
            if name == "triton" and device.type == "cpu":
                continue  # the interpreter is for testing, never the fast path
            if unavailable_reason(name, device) is None:
                return name
        return "torch"
    if backend not in implemented:
        known = ", ".join(implemented)
        raise ValueError(f"{op}: unknown backend {backend!r}; this op has: {known}, auto")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is not available: {reason}")
    return backend


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """The backends that can run on ``device`` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]
