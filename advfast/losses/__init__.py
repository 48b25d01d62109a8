"""Loss building blocks on top of advfast.ops: the key queue (MemoryBank) and losses that are
method-specific enough not to be fused ops (RoCL's official NT-Xent, the TRADES objective)."""

from advfast.losses.memory_bank import MemoryBank
from advfast.losses.trades import trades_loss

__all__ = ["MemoryBank", "trades_loss"]
