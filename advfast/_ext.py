"""Loading the compiled extension ``advfast._C`` (C++ CPU kernels, CUDA kernels when built with nvcc).

The extension registers its ops with ``TORCH_LIBRARY(advfast, ...)``, so once loaded they live
under ``torch.ops.advfast``. A missing extension is normal (``ADVFAST_BUILD_EXT=0``, or a source
checkout that was never built): it is reported once, at debug level, and the ``triton`` and
``torch`` backends keep working.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("advfast")


@functools.lru_cache(maxsize=None)
def extension_error() -> str | None:
    """None when ``advfast._C`` is loaded, else a one-line reason why it is not."""
    try:
        from advfast import _C  # noqa: F401  (importing registers torch.ops.advfast.*)
    except ImportError as exc:
        reason = (
            f"advfast._C is not available ({exc}); the cpp and cuda backends are off. "
            "Build it with `pip install --no-build-isolation .` (ADVFAST_BUILD_EXT unset or 1)."
        )
        log.debug(reason)
        return reason
    return None


def has_extension() -> bool:
    return extension_error() is None


@functools.lru_cache(maxsize=None)
def extension_has_cuda() -> bool:
    """True when the loaded extension was compiled with its CUDA kernels."""
    if not has_extension():
        return False
    return bool(torch.ops.advfast.built_with_cuda())
