"""Device, mixed precision and memory format, resolved once from the config.

bf16 autocast on a GPU by default (fp16 with a GradScaler on request), fp32 on a CPU; the
parameters stay fp32 (master weights) whatever the compute dtype.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from advfast.config import TrainConfig


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype  # compute dtype under autocast (float32: autocast off)
    channels_last: bool

    @property
    def name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self):
        """A GradScaler for fp16 (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" (a GPU when one is visible), "cpu", "cuda" or "cuda:N", checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
    return device


def resolve_precision(cfg: TrainConfig) -> Precision:
    device = resolve_device(cfg.device)
    on_gpu = device.type == "cuda"
    name = cfg.precision if cfg.precision != "auto" else ("bf16" if on_gpu else "fp32")
    if name == "fp16" and not on_gpu:
        raise ValueError("precision fp16 needs a GPU; use --set precision=bf16 or fp32 on a CPU")
    if name == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16 support; use --set precision=fp16")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and on_gpu)
    return Precision(device=device, dtype=dtype, channels_last=channels_last)


# ---- process-wide settings, scoped to training ---------------------------------------------------

@dataclass(frozen=True)
class ProcessSettings:
    """The process-wide torch settings a Trainer changes (see training_settings), captured to be put back."""
    deterministic: bool
    warn_only: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    cudnn_allow_tf32: bool
    matmul_precision: str
    cublas_workspace: str | None

    @classmethod
    def capture(cls) -> "ProcessSettings":
        return cls(torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic,
                   torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
                   torch.get_float32_matmul_precision(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))

    def restore(self) -> None:
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cudnn.allow_tf32 = self.cudnn_allow_tf32
        if torch.get_float32_matmul_precision() != self.matmul_precision:
            torch.set_float32_matmul_precision(self.matmul_precision)
        if self.cublas_workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = self.cublas_workspace


def apply_training_settings(deterministic: bool, device: torch.device) -> None:
    """Deterministic algorithms, or (on a GPU) cuDNN autotuning and TF32 matmuls."""
    if deterministic:  # cuBLAS reads this when its first handle is made
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(deterministic))
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


@contextlib.contextmanager
def training_settings(deterministic: bool, device: torch.device):
    """apply_training_settings for the duration of the block; the caller's settings come back after it,
    on an exception too, so code after training (and fp32 tests in the same process) runs as before."""
    saved = ProcessSettings.capture()
    try:
        apply_training_settings(deterministic, device)
        yield
    finally:
        saved.restore()
