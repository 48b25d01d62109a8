"""Loss building blocks on top of advfast.ops: the key queue (MemoryBank) and losses that are
method-specific enough not to be fused ops (RoCL's official NT-Xent)."""

from advfast.losses.memory_bank import MemoryBank

__all__ = ["MemoryBank"]
