"""Per-channel input normalisation as the model's first layer.

Attacks work on images in [0, 1] (the eps-ball and the clamp are defined there), so the mean/std
normalisation belongs inside the model, as ACL does, and not in the data pipeline.
"""

from __future__ import annotations

import torch
from torch import nn


class NormalizeByChannelMeanStd(nn.Module):
    """``(x - mean) / std`` per channel of an (B, C, H, W) input; mean and std are buffers."""

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() == 0 or mean.shape != std.shape:
            raise ValueError(f"mean and std must be non-empty and of the same length, got {mean.numel()} and {std.numel()}")
        if bool((std <= 0).any()):
            raise ValueError(f"std must be positive, got {std.tolist()}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.numel():
            raise ValueError(f"expected (B, {self.mean.numel()}, H, W) images, got shape {tuple(x.shape)}")
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
