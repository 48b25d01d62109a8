"""Triton kernel for the EMA update ema = m*ema + (1-m)*src over a list of tensors, one launch per dtype.

A launch covers a whole group of tensors of one dtype through a small int64 table on the device,
(4, T): the ema addresses, the src addresses, the element counts, and the first program id of each
tensor. Program p finds its tensor by counting the table's start ids <= p (one vector load and a
sum, no search loop), turns the addresses into typed pointers and updates one block of that tensor.
Full blocks take an unmasked path so that, with 16-byte aligned storage, loads vectorise on a GPU.

The table depends only on the addresses and sizes, which stay fixed between steps for model
parameters, so it is built once and cached (keyed by its content, hence always correct).
Tensors whose memory is not dense, or whose ema/src strides differ, cannot be addressed as flat
arrays; they are updated with torch ops (a rare case: parameters are dense).

Half-precision results are computed in float32 and rounded once on the store (to nearest even on
a GPU; Triton's CPU interpreter truncates instead, which the tests allow for).

Groups are capped at MAX_TENSORS_PER_LAUNCH tensors to keep the per-program table load small;
larger models take a few launches per dtype.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 8
MAX_TENSORS_PER_LAUNCH = 1024

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}

_table_cache: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 32


@triton.jit
def _ema_kernel(table_ptr, T, m, m_lo, one_minus_m, one_minus_m_lo, DTYPE: tl.constexpr,
                COMPUTE: tl.constexpr, T_P2: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    ids = tl.arange(0, T_P2)
    starts = tl.load(table_ptr + 3 * T + ids, mask=ids < T, other=1 << 62)
    t = tl.sum((starts <= pid).to(tl.int32), axis=0) - 1
    ema_addr = tl.load(table_ptr + t)
    src_addr = tl.load(table_ptr + T + t)
    numel = tl.load(table_ptr + 2 * T + t)
    first = tl.load(table_ptr + 3 * T + t)
    ema = ema_addr.to(tl.pointer_type(DTYPE))
    src = src_addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ema = tl.multiple_of(ema, 16)
        src = tl.multiple_of(src, 16)
    offs = (pid - first) * BLOCK + tl.arange(0, BLOCK)
    # float arguments arrive as fp32: hi + lo carries the weights to ~2^-48 for float64 tensors
    # (for float32 compute the lo part is below half an ulp of hi and adds nothing)
    mc = tl.cast(m, COMPUTE) + tl.cast(m_lo, COMPUTE)
    wc = tl.cast(one_minus_m, COMPUTE) + tl.cast(one_minus_m_lo, COMPUTE)
    if (pid - first + 1) * BLOCK <= numel:
        e = tl.load(ema + offs).to(COMPUTE)
        s = tl.load(src + offs).to(COMPUTE)
        tl.store(ema + offs, (mc * e + wc * s).to(DTYPE))
    else:
        mask = offs < numel
        e = tl.load(ema + offs, mask=mask, other=0.0).to(COMPUTE)
        s = tl.load(src + offs, mask=mask, other=0.0).to(COMPUTE)
        tl.store(ema + offs, (mc * e + wc * s).to(DTYPE), mask=mask)


def _flat_addressable(e: torch.Tensor, s: torch.Tensor) -> bool:
    """Both tensors dense in memory with the same memory order (so index i means the same element)."""
    if e.is_contiguous() and s.is_contiguous():
        return True
    dense = e.dim() == 4 and e.is_contiguous(memory_format=torch.channels_last)
    return dense and e.stride() == s.stride()


def _table(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, int]:
    ema_addrs = [e.data_ptr() for e, _ in pairs]
    src_addrs = [s.data_ptr() for _, s in pairs]
    numels = [e.numel() for e, _ in pairs]
    starts, total = [], 0
    for n in numels:
        starts.append(total)
        total += triton.cdiv(n, BLOCK)
    key = (str(device), *ema_addrs, *src_addrs, *numels)
    table = _table_cache.get(key)
    if table is None:
        table = torch.tensor([ema_addrs, src_addrs, numels, starts], dtype=torch.int64).to(device)
        _table_cache[key] = table
        if len(_table_cache) > _TABLE_CACHE_SIZE:
            _table_cache.popitem(last=False)
    else:
        _table_cache.move_to_end(key)
    return table, total


def split_fp32(value: float) -> tuple[float, float]:
    """(hi, lo), both exact float32 numbers, with hi + lo == value to ~2^-48 relative: Triton passes
    python floats to kernels as float32, which would leave float64 results float32-accurate."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, struct.unpack("f", struct.pack("f", value - hi))[0]


def ema_update_(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], momentum: float) -> None:
    """In place ema = m*ema + (1-m)*src for floating tensors (checked by advfast.ops.ema_update)."""
    groups: dict[torch.dtype, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    m = float(momentum)
    weights = (*split_fp32(m), *split_fp32(1.0 - m))
    for e, s in zip(ema_tensors, tensors):
        if e.numel() == 0:
            continue
        if _flat_addressable(e, s) and e.dtype in _TL_DTYPES:
            groups.setdefault(e.dtype, []).append((e, s))
        else:  # rare: strided views; keep the same formula in the compute dtype
            compute = torch.float64 if e.dtype == torch.float64 else torch.float32
            e.copy_(e.to(compute) * m + s.to(compute) * (1.0 - m))
    for dtype, pairs in groups.items():
        compute = tl.float64 if dtype == torch.float64 else tl.float32
        for i in range(0, len(pairs), MAX_TENSORS_PER_LAUNCH):
            chunk = pairs[i:i + MAX_TENSORS_PER_LAUNCH]
            device = chunk[0][0].device
            table, programs = _table(chunk, device)
            aligned = all(e.data_ptr() % 16 == 0 and s.data_ptr() % 16 == 0 for e, s in chunk)
            _ema_kernel[(programs,)](table, len(chunk), *weights, DTYPE=_TL_DTYPES[dtype], COMPUTE=compute,
                                     T_P2=max(2, triton.next_power_of_2(len(chunk))), ALIGNED=aligned,
                                     BLOCK=BLOCK, num_warps=NUM_WARPS)


def aot_variants(arch: int):
    """The launches ema_update_ can produce (kernels/aot.py): every dtype, aligned or not, and the
    smallest and largest tensor table (T_P2 = 2 and MAX_TENSORS_PER_LAUNCH)."""
    from advfast.kernels.aot import Variant

    names = {tl.float32: "fp32", tl.float64: "fp64", tl.bfloat16: "bf16", tl.float16: "fp16"}
    sig = dict(table_ptr="*i64", T="i32", m="fp32", m_lo="fp32", one_minus_m="fp32", one_minus_m_lo="fp32")
    signature = tuple((n, sig.get(n, "constexpr")) for n in _ema_kernel.arg_names)
    largest_grid = (triton.cdiv(2**33, BLOCK), 1, 1)  # 8.6e9 elements: a model far beyond any we train
    for dtype in _TL_DTYPES.values():
        for aligned in (False, True):
            for t_p2 in (2, MAX_TENSORS_PER_LAUNCH):
                compute = "fp64" if dtype == tl.float64 else "fp32"
                consts = dict(DTYPE=names[dtype], COMPUTE=compute, T_P2=t_p2, ALIGNED=aligned, BLOCK=BLOCK)
                yield Variant(f"{__name__}._ema_kernel", signature, tuple(sorted(consts.items())), ("table_ptr",),
                              NUM_WARPS, 3, largest_grid,
                              label=f"{names[dtype]} aligned={aligned} tensors<={t_p2}")
