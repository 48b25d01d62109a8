"""Triton kernels for one PGD step: ascent, projection onto the eps-ball around x_nat, box clamp.

The tensors are treated as B samples of N elements each in memory order: that holds for contiguous
and channels_last tensors (the batch dimension is outermost in memory), so channels_last inputs are
processed in place without a layout change. Programs are laid out as B * blocks_per_sample, so a
program knows its sample without a per-element division and reads eps/alpha once.

  linf: one elementwise pass (3 reads, 1 write).
  l2:   a reduction pass writing per-(sample, block) partial sums of g*g, d*g and d*d (d = x - x_nat),
        then the elementwise pass, which sums the partials of its sample. The norm of the delta after
        the step follows from ||d + s*g||^2 = d.d + 2s d.g + s^2 g.g (s = alpha/||g||), so the step is
        never written out and re-read: 6 reads + 1 write in two launches, deterministic (no atomics).
        The partial sums and the per-sample radii are float64 with correctly rounded sqrt/division,
        like the C++ and CUDA kernels: a gradient whose float32 sum of squares underflows still steps.

Half-precision x is computed in float32 and rounded once on the store (to nearest even on a GPU;
Triton's CPU interpreter truncates instead, which the tests allow for).

Launchers take arbitrary tensors (the checks live in advfast.ops.pgd_step) and fall back to contiguous
copies when the layouts differ or are not batch-major dense.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

@triton.jit
def _load_radius(ptr, scalar, b, PER_SAMPLE: tl.constexpr, COMPUTE: tl.constexpr):
    if PER_SAMPLE:
        return tl.load(ptr + b).to(COMPUTE)
    else:
        return tl.cast(scalar, COMPUTE)


@triton.jit
def _sample_block(N, BLOCKS_PER_SAMPLE, BLOCK: tl.constexpr):
    """This program's sample b, block j of it, element offsets and mask, and the sample's base offset."""
    pid = tl.program_id(0)
    b = pid // BLOCKS_PER_SAMPLE
    j = pid - b * BLOCKS_PER_SAMPLE
    offs = j * BLOCK + tl.arange(0, BLOCK)
    return b, j, offs, offs < N, b.to(tl.int64) * N


@triton.jit
def _load_block(x_ptr, xn_ptr, g_ptr, base, offs, mask, COMPUTE: tl.constexpr):
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE)
    xn = tl.load(xn_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(COMPUTE)  # as the reference: grad.to(compute)
    return x, xn, g


@triton.jit
def _pgd_linf_kernel(x_ptr, xn_ptr, g_ptr, out_ptr, eps_ptr, alpha_ptr, eps_s, alpha_s, lower, upper,
                     N, BLOCKS_PER_SAMPLE,
                     EPS_PER_SAMPLE: tl.constexpr, ALPHA_PER_SAMPLE: tl.constexpr,
                     COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    b, j, offs, mask, base = _sample_block(N, BLOCKS_PER_SAMPLE, BLOCK)
    eps = _load_radius(eps_ptr, eps_s, b, EPS_PER_SAMPLE, COMPUTE)
    alpha = _load_radius(alpha_ptr, alpha_s, b, ALPHA_PER_SAMPLE, COMPUTE)
    x, xn, g = _load_block(x_ptr, xn_ptr, g_ptr, base, offs, mask, COMPUTE)
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)).to(COMPUTE)
    y = x + alpha * sign
    y = tl.minimum(tl.maximum(y, xn - eps), xn + eps)
    y = tl.minimum(tl.maximum(y, tl.cast(lower, COMPUTE)), tl.cast(upper, COMPUTE))
    tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_l2_partials_kernel(x_ptr, xn_ptr, g_ptr, part_ptr, N, BLOCKS_PER_SAMPLE,
                            COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    # part is (B, 3, BLOCKS_PER_SAMPLE), float64: sums of g*g, d*g, d*d over this program's block.
    # float64 products of float32 values are exact and never subnormal, so a gradient whose float32
    # sum of squares would underflow (|g| ~ 1e-23) still has a norm, as in the C++/CUDA kernels.
    b, j, offs, mask, base = _sample_block(N, BLOCKS_PER_SAMPLE, BLOCK)
    x, xn, g = _load_block(x_ptr, xn_ptr, g_ptr, base, offs, mask, COMPUTE)
    g = g.to(tl.float64)
    d = (x - xn).to(tl.float64)  # the delta as the reference forms it, in the compute dtype
    row = part_ptr + b.to(tl.int64) * 3 * BLOCKS_PER_SAMPLE + j
    tl.store(row, tl.sum(g * g, axis=0))
    tl.store(row + BLOCKS_PER_SAMPLE, tl.sum(d * g, axis=0))
    tl.store(row + 2 * BLOCKS_PER_SAMPLE, tl.sum(d * d, axis=0))


@triton.jit
def _pgd_l2_apply_kernel(x_ptr, xn_ptr, g_ptr, out_ptr, part_ptr, eps_ptr, alpha_ptr, eps_s, alpha_s,
                         lower, upper, N, BLOCKS_PER_SAMPLE,
                         EPS_PER_SAMPLE: tl.constexpr, ALPHA_PER_SAMPLE: tl.constexpr,
                         COMPUTE: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr):
    b, j, offs, mask, base = _sample_block(N, BLOCKS_PER_SAMPLE, BLOCK)
    eps = _load_radius(eps_ptr, eps_s, b, EPS_PER_SAMPLE, COMPUTE).to(tl.float64)
    alpha = _load_radius(alpha_ptr, alpha_s, b, ALPHA_PER_SAMPLE, COMPUTE).to(tl.float64)

    # Every program of a sample sums that sample's partials (a few floats, served from L2). The
    # per-sample radii are float64 with correctly rounded sqrt and division (no approximate,
    # flush-to-zero fp32 instructions): the same numbers as the C++ and CUDA kernels.
    p = tl.arange(0, PARTS)
    pmask = p < BLOCKS_PER_SAMPLE
    row = part_ptr + b.to(tl.int64) * 3 * BLOCKS_PER_SAMPLE + p
    gg = tl.sum(tl.load(row, mask=pmask, other=0.0), axis=0)
    dg = tl.sum(tl.load(row + BLOCKS_PER_SAMPLE, mask=pmask, other=0.0), axis=0)
    dd = tl.sum(tl.load(row + 2 * BLOCKS_PER_SAMPLE, mask=pmask, other=0.0), axis=0)
    # (float64 sqrt and division are IEEE round-to-nearest in PTX: sqrt.rn.f64, div.rn.f64)
    gnorm = tl.sqrt(gg)
    step64 = tl.where(gnorm > 0, alpha / tl.where(gnorm > 0, gnorm, 1.0), 0.0)  # zero gradient: no move
    dnorm = tl.sqrt(tl.maximum(dd + 2.0 * step64 * dg + step64 * step64 * gg, 0.0))
    outside = dnorm > eps
    shrink = (eps / tl.where(outside, dnorm, 1.0)).to(COMPUTE)
    step = step64.to(COMPUTE)

    x, xn, g = _load_block(x_ptr, xn_ptr, g_ptr, base, offs, mask, COMPUTE)
    y = x + step * g
    y = tl.where(outside, xn + (y - xn) * shrink, y)  # inside the ball: y itself, bit for bit
    y = tl.minimum(tl.maximum(y, tl.cast(lower, COMPUTE)), tl.cast(upper, COMPUTE))
    tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _batch_major_dense(t: torch.Tensor) -> bool:
    """True when memory holds sample after sample, densely (contiguous or channels_last)."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Strides of size-1 dimensions do not affect the memory order.
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _in_layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if _same_layout(t, ref):
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _block_size(n: int) -> tuple[int, int]:
    block = min(4096, max(256, triton.next_power_of_2(n)))
    return block, (8 if block >= 2048 else 4)


def pgd_step(out: torch.Tensor, x_adv: torch.Tensor, x_nat: torch.Tensor, grad: torch.Tensor,
             eps: float | torch.Tensor, alpha: float | torch.Tensor, norm: int,
             lower: float, upper: float) -> torch.Tensor:
    """Write the PGD step of x_adv into ``out`` (which may be x_adv itself).

    eps/alpha: python floats, or per-sample tensors of shape (B,) on x's device (cast here to the
    compute dtype: float64 for float64 x, else float32). norm: 0 = linf, 1 = l2.
    """
    if out.numel() == 0:
        return out
    work = out if _batch_major_dense(out) else torch.empty_like(out, memory_format=torch.contiguous_format)
    x = _in_layout_of(x_adv, work)
    xn = _in_layout_of(x_nat, work)
    g = _in_layout_of(grad, work)

    compute_torch = torch.float64 if out.dtype == torch.float64 else torch.float32
    compute = tl.float64 if compute_torch == torch.float64 else tl.float32
    nb = out.shape[0]
    n = out.numel() // nb
    block, warps = _block_size(n)
    per_sample = triton.cdiv(n, block)
    grid = (nb * per_sample,)

    def radius(v):
        if isinstance(v, torch.Tensor):
            t = v.to(compute_torch).expand(nb).contiguous()
            return t, 0.0, True
        if compute_torch == torch.float64:  # float arguments reach kernels as fp32; float64 x needs all 53 bits
            return torch.full((nb,), float(v), dtype=torch.float64, device=out.device), 0.0, True
        return work, float(v), False  # the pointer is unused when the value is a scalar

    eps_t, eps_s, eps_ps = radius(eps)
    alpha_t, alpha_s, alpha_ps = radius(alpha)
    if norm == 0:
        _pgd_linf_kernel[grid](x, xn, g, work, eps_t, alpha_t, eps_s, alpha_s, float(lower), float(upper),
                               n, per_sample, EPS_PER_SAMPLE=eps_ps, ALPHA_PER_SAMPLE=alpha_ps,
                               COMPUTE=compute, BLOCK=block, num_warps=warps)
    elif norm == 1:
        parts = torch.empty((nb, 3, per_sample), dtype=torch.float64, device=out.device)
        _pgd_l2_partials_kernel[grid](x, xn, g, parts, n, per_sample, COMPUTE=compute, BLOCK=block,
                                      num_warps=warps)
        _pgd_l2_apply_kernel[grid](x, xn, g, work, parts, eps_t, alpha_t, eps_s, alpha_s,
                                   float(lower), float(upper), n, per_sample,
                                   EPS_PER_SAMPLE=eps_ps, ALPHA_PER_SAMPLE=alpha_ps, COMPUTE=compute,
                                   BLOCK=block, PARTS=max(2, triton.next_power_of_2(per_sample)),
                                   num_warps=warps)
    else:
        raise ValueError(f"norm must be 0 (linf) or 1 (l2), got {norm!r}")
    if work is not out:
        out.copy_(work)
    return out


def aot_variants(arch: int):
    """The launches pgd_step can produce (kernels/aot.py): every image dtype, scalar or per-sample
    radii, and the block sizes of a tiny and an ImageNet (3x224x224) sample."""
    from advfast.kernels.aot import Variant

    names = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}
    batch = 4096
    for dtype, tname in names.items():
        compute = "fp64" if dtype == torch.float64 else "fp32"
        radii = [(True, True)] if dtype == torch.float64 else [(a, b) for a in (False, True) for b in (False, True)]
        for n in (100, 3 * 224 * 224):  # blocks of 256 and 4096 (CIFAR's 3072 shares the latter)
            block, warps = _block_size(n)
            per_sample = triton.cdiv(n, block)
            grid = (batch * per_sample, 1, 1)
            ints = ("N",) if n % 16 == 0 else ()
            elem = dict(x_ptr=f"*{tname}", xn_ptr=f"*{tname}", g_ptr=f"*{tname}", out_ptr=f"*{tname}",
                        part_ptr="*fp64", eps_ptr=f"*{compute}", alpha_ptr=f"*{compute}", eps_s="fp32",
                        alpha_s="fp32", lower="fp32", upper="fp32", N="i32", BLOCKS_PER_SAMPLE="i32")

            def variant(fn, label, **consts):
                signature = tuple((a, elem.get(a, "constexpr")) for a in fn.arg_names)
                ptrs = tuple(a for a, t in signature if t.startswith("*"))
                return Variant(f"{__name__}.{fn.__name__}", signature,
                               tuple(sorted(dict(consts, COMPUTE=compute, BLOCK=block).items())), ptrs + ints,
                               warps, 3, grid, label=f"{tname} n={n} {label}")

            yield variant(_pgd_l2_partials_kernel, "")
            for eps_ps, alpha_ps in radii:
                flags = dict(EPS_PER_SAMPLE=eps_ps, ALPHA_PER_SAMPLE=alpha_ps)
                label = f"eps/sample={eps_ps} alpha/sample={alpha_ps}"
                yield variant(_pgd_linf_kernel, label, **flags)
                yield variant(_pgd_l2_apply_kernel, label, PARTS=max(2, triton.next_power_of_2(per_sample)), **flags)
