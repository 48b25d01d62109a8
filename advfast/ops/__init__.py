"""Fused ops with selectable backends (see docs/ARCHITECTURE.md for the backend table)."""

from advfast import _ext
from advfast.ops._dispatch import BACKENDS, auto_backend, available_backends
from advfast.ops.contrastive import info_nce, nt_xent
from advfast.ops.ema_update import ema_update_
from advfast.ops.pgd_step import pgd_step, pgd_step_, random_start

__all__ = [
    "BACKENDS",
    "auto_backend",
    "available_backends",
    "ema_update_",
    "info_nce",
    "nt_xent",
    "pgd_step",
    "pgd_step_",
    "random_start",
]

# Load advfast._C now, so a missing extension (ADVFAST_BUILD_EXT=0, or an unbuilt checkout) is
# reported once, at import time, at debug level; the triton and torch backends keep working.
_ext.extension_error()
