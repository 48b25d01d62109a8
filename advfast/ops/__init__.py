"""Fused ops with selectable backends (see docs/ARCHITECTURE.md for the backend table)."""

from advfast.ops._dispatch import BACKENDS, available_backends

__all__ = ["BACKENDS", "available_backends"]
