"""Launch configurations of the contrastive kernels, per architecture and operand kind, in one table.

The launchers, the interpreter tests on CPU and the ahead-of-time compile check (kernels/aot.py) all
take their tile shapes from ``contrastive_config``, so what CI checks for correctness is what a GPU
runs. On CPU (TRITON_INTERPRET=1) there is no device to ask: the architecture comes from
``ADVFAST_TRITON_ARCH`` (default 80), and the tests run both 80 and 90.

Kinds: "16bit" (bf16/fp16 operands, fp32 accumulation), "tf32" (fp32 operands, TF32 allowed) and
"tf32x3" (fp32 without TF32: three TF32 products per tile, hi*hi + hi*lo + lo*hi, near-fp32 accuracy).
Every entry was chosen against the per-block shared memory limit with zero register spills for every
feature dim (docs/kernels.md has the table and the roofline behind it). A feature dim up to
``resident_d`` is padded to a power of two and held whole (one dot per key tile, the query tile loaded
once per program); a larger one is walked in chunks of ``chunk_d``.
"""

from __future__ import annotations

import dataclasses
import os

import torch


@dataclasses.dataclass(frozen=True)
class TileConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int


# (arch family, kind, pass) -> (resident_d, chunk_d, BLOCK_M, BLOCK_N, num_warps, num_stages).
# pass: "fwd" (scores + running log-sum-exp), "bwd" (dQ and dK: two dots per tile and a (tile, D)
# fp32 accumulator, so 8 warps and 2 stages). A padded D <= resident_d is held whole; a wider one is
# walked in chunks of chunk_d (in the forward pass both the query and the key chunk then stream
# through the pipeline, hence half-width chunks). Families: 80 (sm_80/86/89: Ampere, Ada) and 90
# (sm_90 Hopper; later GPUs use it too). tf32x3 splits every operand into hi and lo parts, which
# triples the operand registers: its tiles are the smallest that compile without spills.
_TABLE = {
    (80, "16bit", "fwd"): (256, 128, 64, 64, 4, 3),
    (80, "16bit", "bwd"): (128, 128, 64, 64, 8, 2),
    (80, "tf32", "fwd"): (128, 64, 64, 64, 4, 3),
    (80, "tf32", "bwd"): (128, 128, 64, 32, 8, 2),
    (80, "tf32x3", "fwd"): (128, 32, 64, 32, 8, 2),
    (80, "tf32x3", "bwd"): (64, 64, 32, 16, 4, 2),
    (90, "16bit", "fwd"): (256, 128, 128, 64, 8, 3),
    (90, "16bit", "bwd"): (128, 128, 64, 64, 8, 2),
    (90, "tf32", "fwd"): (128, 64, 128, 64, 8, 3),
    (90, "tf32", "bwd"): (128, 128, 64, 32, 8, 2),
    (90, "tf32x3", "fwd"): (128, 64, 64, 64, 4, 2),
    (90, "tf32x3", "bwd"): (64, 64, 32, 16, 8, 2),
}

ARCHS = (80, 90)


def family(arch: int) -> int:
    return 80 if arch < 90 else 90


def device_arch(device: torch.device) -> int:
    """Compute capability as major*10 + minor for a CUDA device; ADVFAST_TRITON_ARCH (default 80)
    for the CPU interpreter."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    value = os.environ.get("ADVFAST_TRITON_ARCH", "80")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"ADVFAST_TRITON_ARCH must be a compute capability like 80 or 90, got {value!r}") from None


def operand_kind(dtype: torch.dtype, tf32: bool) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    if dtype == torch.float32:
        return "tf32" if tf32 else "tf32x3"
    raise TypeError(f"contrastive Triton kernels take float32/float16/bfloat16, got {dtype}")


def padded_dim(D: int) -> int:
    """The tile width that holds a feature dim: a power of two >= 16 (tensor-core K granularity)."""
    return max(16, 1 << (max(D, 1) - 1).bit_length())


def contrastive_config(arch: int, kind: str, pass_: str, D: int) -> TileConfig:
    resident_d, chunk_d, bm, bn, warps, stages = _TABLE[(family(arch), kind, pass_)]
    width = padded_dim(D)
    return TileConfig(bm, bn, width if width <= resident_d else chunk_d, warps, stages)


__all__ = ["TileConfig", "ARCHS", "contrastive_config", "device_arch", "operand_kind", "padded_dim", "family"]
