"""A queue of keys on the device (MoCo's dictionary), kept as a ring buffer.

The queue and its write pointer are both buffers, so ``state_dict()`` (and so every checkpoint)
captures them, and ``enqueue`` never reads the pointer back to the host: the write positions are
computed on the device as ``(ptr + arange(B)) % K``. That keeps an iteration free of host syncs
and lets the enqueue be captured in a CUDA graph. Any batch size works, including one that does
not divide K (the write wraps around the end) and one larger than K (only the newest K keys stay).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MemoryBank(nn.Module):
    """``size`` keys of dimension ``dim``, oldest overwritten first.

    ``queue`` is (size, dim), one key per row (rows are contiguous, so a write is a row scatter).
    It starts as L2-normalised Gaussian noise, as in MoCo and AMOC.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int (the number of keys the queue holds), got {size!r}")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int (the key dimension), got {dim!r}")
        self.size = size
        self.dim = dim
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1).to(dtype))
        # the next row to write, as a 0-d device tensor: advancing it never needs the host
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (B, dim) after the newest keys, overwriting the oldest ones."""
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"keys must be a torch.Tensor of shape (B, {self.dim}), got {type(keys).__name__}")
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (B, {self.dim}), got {tuple(keys.shape)}")
        if keys.device != self.queue.device:
            raise ValueError(f"keys are on {keys.device} but the queue is on {self.queue.device}; "
                             "move the bank with .to(device) first")
        batch = keys.shape[0]
        if batch == 0:
            return
        keys = keys.detach().to(self.queue.dtype)
        if batch > self.size:
            # only the newest `size` keys would survive; writing the rest first changes nothing
            # but would make index_copy_ see duplicate rows (undefined order on CUDA)
            skipped = batch - self.size
            keys = keys[skipped:]
            self.ptr.add_(skipped).remainder_(self.size)
            batch = self.size
        rows = torch.arange(batch, device=self.queue.device).add_(self.ptr).remainder_(self.size)
        self.queue.index_copy_(0, rows, keys)
        self.ptr.add_(batch).remainder_(self.size)

    def keys(self) -> torch.Tensor:
        """The queue as negatives: detached, (size, dim). Row order is storage order, not age."""
        return self.queue.detach()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
