"""Tiled Triton kernels for contrastive losses: the row-wise log-sum-exp of scaled similarities.

One core serves info_nce and nt_xent. Queries Q (M, D), keys K (N, D), s_rc = scale * q_r . k_c:

    lse_r = log sum_{c valid} exp(s_rc)        valid: c < N, and c != r when mask_diag (NT-Xent)
    pos_r = sum_{c in P(r)} s_rc               (pos_mode 1, for "mean_log_prob")
          = log sum_{c in P(r)} exp(s_rc)      (pos_mode 2, for "sum_in_numerator")
    P(r)  = {c valid : c % period == r % period}   (row r of a view-major batch is instance r % B)

Forward: a program owns a tile of queries and walks a contiguous slice ("split") of the keys tile by
tile with a running max and sum, so only per-row statistics reach memory (never M x N). Splitting the
keys keeps the GPU busy when M is a few hundred rows and N is a 65536-key queue; the per-split partial
log-sum-exps (S, M) are merged in torch.

Backward: with upstream g_lse, g_pos the gradient of the scores is
    dS_rc = g_lse_r exp(s_rc - lse_r) + g_pos_r w_rc,   w_rc = [c in P(r)]  or  [c in P(r)] exp(s_rc - pos_r)
and dQ = scale dS K, dK = scale dS^T Q. Both kernels recompute the score tiles instead of storing them;
dK is only launched when the keys need a gradient (not for a MoCo queue). Each program writes its own
partial sum (no atomics, so results are deterministic); torch adds the partials.

Low-precision inputs (bf16, fp16) are multiplied on tensor cores with fp32 accumulation; every
softmax statistic is fp32. Logits are kept in base 2 (exp2/log2 are the native instructions).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# tl.constexpr: compiled kernels may only read constexpr globals (the interpreter does not check).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
_NEG_BIG = tl.constexpr(-1.0e30)  # running-max start: finite, so fully masked tiles never give inf - inf

# Bytes one backward launch may spend on per-split partial gradients before it stops splitting.
_PARTIAL_BUDGET = 8 << 20


@triton.jit
def _scores(Q, K, rows, cols, M, N, D, stride_q, stride_k,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Raw dot products q_r . k_c for a (BLOCK_M, BLOCK_N) tile, fp32, walking D in chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_ok = rows < M
    col_ok = cols < N
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        q = tl.load(Q + rows[:, None] * stride_q + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(K + cols[:, None] * stride_k + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        k = k.to(q.dtype)  # a queue may be stored in another floating dtype than the queries
        if UPCAST:  # the interpreter cannot multiply bf16 blocks; fp32 products of bf16 values are exact
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        acc += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    return acc


@triton.jit
def _tile_masks(rows, cols, M, col_end, period, MASK_DIAG: tl.constexpr, POS_MODE: tl.constexpr):
    valid = (rows < M)[:, None] & (cols < col_end)[None, :]
    if MASK_DIAG:
        valid = valid & (rows[:, None] != cols[None, :])
    if POS_MODE != 0:
        is_pos = valid & ((cols[None, :] % period) == (rows[:, None] % period))
    else:
        is_pos = valid & False
    return valid, is_pos


@triton.jit
def _lse_fwd_kernel(Q, K, LSE_PART, POS_PART, M, N, D, stride_q, stride_k, scale_log2, period,
                    keys_per_split,
                    MASK_DIAG: tl.constexpr, POS_MODE: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_start = split * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, N)

    m_i = tl.full((BLOCK_M,), _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pm_i = tl.full((BLOCK_M,), _NEG_BIG, dtype=tl.float32)
    pl_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    psum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s = _scores(Q, K, rows, cols, M, N, D, stride_q, stride_k,
                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST) * scale_log2
        valid, is_pos = _tile_masks(rows, cols, M, n_end, period, MASK_DIAG, POS_MODE)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
        if POS_MODE == 1:
            psum += tl.sum(tl.where(is_pos, s, 0.0), axis=1)
        if POS_MODE == 2:
            sp = tl.where(is_pos, s, float("-inf"))
            pm_new = tl.maximum(pm_i, tl.max(sp, axis=1))
            pl_i = pl_i * tl.exp2(pm_i - pm_new) + tl.sum(tl.exp2(sp - pm_new[:, None]), axis=1)
            pm_i = pm_new

    row_ok = rows < M
    # An empty split (l_i == 0) gives -inf, which the merge over splits ignores.
    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.maximum(l_i, 1e-38))) * LN2, float("-inf"))
    tl.store(LSE_PART + split * M + rows, lse, mask=row_ok)
    if POS_MODE == 1:
        tl.store(POS_PART + split * M + rows, psum * LN2, mask=row_ok)
    if POS_MODE == 2:
        plse = tl.where(pl_i > 0, (pm_i + tl.log2(tl.maximum(pl_i, 1e-38))) * LN2, float("-inf"))
        tl.store(POS_PART + split * M + rows, plse, mask=row_ok)


@triton.jit
def _score_grad(s, valid, is_pos, lse2, g, gp, plse2, POS_MODE: tl.constexpr):
    """dS for one tile (without the final factor ``scale``); s, lse2, plse2 are in base 2.
    Masked entries become -inf before exp2, so an excluded diagonal or non-positive logit far above
    the row's log-sum-exp never overflows."""
    s = tl.where(valid, s, float("-inf"))
    ds = g[:, None] * tl.exp2(s - lse2[:, None])
    if POS_MODE == 1:
        ds += tl.where(is_pos, gp[:, None], 0.0)
    if POS_MODE == 2:
        ds += gp[:, None] * tl.exp2(tl.where(is_pos, s, float("-inf")) - plse2[:, None])
    return ds


@triton.jit
def _row_stats(LSE, G_LSE, POS, G_POS, rows, M, POS_MODE: tl.constexpr):
    row_ok = rows < M
    lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * LOG2E
    g = tl.load(G_LSE + rows, mask=row_ok, other=0.0)
    if POS_MODE != 0:
        gp = tl.load(G_POS + rows, mask=row_ok, other=0.0)
    else:
        gp = g * 0.0
    if POS_MODE == 2:
        plse2 = tl.load(POS + rows, mask=row_ok, other=0.0) * LOG2E
    else:
        plse2 = lse2
    return lse2, g, gp, plse2


@triton.jit
def _lse_bwd_dq_kernel(Q, K, LSE, G_LSE, POS, G_POS, DQ_PART, M, N, D, stride_q, stride_k,
                       scale, scale_log2, period, keys_per_split,
                       MASK_DIAG: tl.constexpr, POS_MODE: tl.constexpr, PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    n_start = split * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, N)
    lse2, g, gp, plse2 = _row_stats(LSE, G_LSE, POS, G_POS, rows, M, POS_MODE)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s = _scores(Q, K, rows, cols, M, N, D, stride_q, stride_k,
                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST) * scale_log2
        valid, is_pos = _tile_masks(rows, cols, M, n_end, period, MASK_DIAG, POS_MODE)
        ds = _score_grad(s, valid, is_pos, lse2, g, gp, plse2, POS_MODE)
        k = tl.load(K + cols[:, None] * stride_k + dd[None, :], mask=(cols < N)[:, None] & d_ok[None, :], other=0.0)
        k = k.to(Q.dtype.element_ty)
        ds = ds.to(k.dtype)  # tensor-core operands; fp32 inputs keep fp32 here
        if UPCAST:
            k = k.to(tl.float32)
            ds = ds.to(tl.float32)
        acc += tl.dot(ds, k, input_precision=PRECISION)
    out = DQ_PART + split * M * D + rows[:, None] * D + dd[None, :]
    tl.store(out, acc * scale, mask=(rows < M)[:, None] & d_ok[None, :])


@triton.jit
def _lse_bwd_dk_kernel(Q, K, LSE, G_LSE, POS, G_POS, DK_PART, M, N, D, stride_q, stride_k,
                       scale, scale_log2, period, rows_per_split,
                       MASK_DIAG: tl.constexpr, POS_MODE: tl.constexpr, PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)

    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        lse2, g, gp, plse2 = _row_stats(LSE, G_LSE, POS, G_POS, rows, m_end, POS_MODE)
        s = _scores(Q, K, rows, cols, m_end, N, D, stride_q, stride_k,
                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST) * scale_log2
        valid, is_pos = _tile_masks(rows, cols, m_end, N, period, MASK_DIAG, POS_MODE)
        ds = _score_grad(s, valid, is_pos, lse2, g, gp, plse2, POS_MODE)
        q = tl.load(Q + rows[:, None] * stride_q + dd[None, :], mask=(rows < m_end)[:, None] & d_ok[None, :],
                    other=0.0)
        ds = ds.to(q.dtype)
        if UPCAST:
            q = q.to(tl.float32)
            ds = ds.to(tl.float32)
        acc += tl.dot(tl.trans(ds), q, input_precision=PRECISION)
    out = DK_PART + split * N * D + cols[:, None] * D + dd[None, :]
    tl.store(out, acc * scale, mask=(cols < N)[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few splits exercise the merge path without slowing tests down


def _config(q: torch.Tensor, D: int, block_m: int | None, block_n: int | None, block_d: int | None):
    interp = _interpreted() or q.device.type == "cpu"
    # The interpreter pays per block operation, so wide tiles make it much cheaper; on the GPU,
    # 64 x 64 score tiles with D chunks of <= 128 keep registers and shared memory in budget.
    bm = block_m or 64
    bn = block_n or (256 if interp else 64)
    bd = block_d or min(256 if interp else 128, max(16, triton.next_power_of_2(D)))
    if q.dtype == torch.float32:
        # Follow eager torch.matmul: TF32 only where the user allowed it; otherwise three TF32
        # tensor-core products (hi*hi + hi*lo + lo*hi), close to fp32 accuracy, instead of "ieee"
        # FMA loops, which would leave the fused loss slower than cuBLAS SGEMM.
        allow_tf32 = q.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        precision = "tf32" if allow_tf32 else "tf32x3"
    else:
        precision = "tf32"  # ignored for 16-bit operands
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=precision, UPCAST=interp)


def _split(total: int, block: int, other_programs: int, target: int, max_splits: int | None = None):
    """Split ``total`` items into contiguous slices (multiples of ``block``) for enough programs."""
    tiles = triton.cdiv(total, block)
    splits = max(1, min(tiles, triton.cdiv(target, max(other_programs, 1))))
    if max_splits is not None:
        splits = max(1, min(splits, max_splits))
    per_split = triton.cdiv(tiles, splits) * block
    return triton.cdiv(total, per_split), per_split


def _check(q: torch.Tensor, k: torch.Tensor):
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    return q, k


def lse_forward(q: torch.Tensor, k: torch.Tensor, scale: float, mask_diag: bool = False,
                period: int = 1, pos_mode: int = 0, num_splits: int | None = None,
                block_m: int | None = None, block_n: int | None = None, block_d: int | None = None):
    """Per-row (lse, pos) in float32, each of shape (M,); pos is None when pos_mode == 0."""
    q, k = _check(q, k)
    M, D = q.shape
    N = k.shape[0]
    cfg = _config(q, D, block_m, block_n, block_d)
    row_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    if num_splits is None:
        splits, keys_per_split = _split(N, cfg["BLOCK_N"], row_tiles, _target_programs(q.device))
    else:
        splits, keys_per_split = _split(N, cfg["BLOCK_N"], 1, num_splits)
    lse_part = torch.empty((splits, M), device=q.device, dtype=torch.float32)
    pos_part = torch.empty((splits, M), device=q.device, dtype=torch.float32) if pos_mode else lse_part
    _lse_fwd_kernel[(row_tiles, splits)](
        q, k, lse_part, pos_part, M, N, D, q.stride(0), k.stride(0), scale * LOG2E.value, period, keys_per_split,
        MASK_DIAG=mask_diag, POS_MODE=pos_mode, **cfg)
    lse = torch.logsumexp(lse_part, dim=0)
    if pos_mode == 0:
        return lse, None
    pos = pos_part.sum(0) if pos_mode == 1 else torch.logsumexp(pos_part, dim=0)
    return lse, pos


def lse_backward(q: torch.Tensor, k: torch.Tensor, scale: float, lse: torch.Tensor, g_lse: torch.Tensor,
                 pos: torch.Tensor | None = None, g_pos: torch.Tensor | None = None,
                 mask_diag: bool = False, period: int = 1, pos_mode: int = 0,
                 need_dq: bool = True, need_dk: bool = False, num_splits: int | None = None,
                 block_m: int | None = None, block_n: int | None = None, block_d: int | None = None):
    """(dq, dk) in float32 (None where not asked for) for upstream gradients g_lse and g_pos."""
    q, k = _check(q, k)
    M, D = q.shape
    N = k.shape[0]
    cfg = _config(q, D, block_m, block_n, block_d)
    target = num_splits or _target_programs(q.device)
    d_tiles = triton.cdiv(D, cfg["BLOCK_D"])
    lse = lse.contiguous()
    g_lse = g_lse.to(torch.float32).contiguous()
    if pos_mode:
        g_pos = (torch.zeros_like(lse) if g_pos is None else g_pos.to(torch.float32)).contiguous()
        pos = pos.contiguous()
    else:
        g_pos = pos = lse  # unread placeholders
    common = dict(MASK_DIAG=mask_diag, POS_MODE=pos_mode, **cfg)

    dq = dk = None
    if need_dq:
        row_tiles = triton.cdiv(M, cfg["BLOCK_M"])
        cap = num_splits or max(1, _PARTIAL_BUDGET // (4 * M * D))
        splits, per_split = _split(N, cfg["BLOCK_N"], 1 if num_splits else row_tiles * d_tiles, target, cap)
        part = torch.empty((splits, M, D), device=q.device, dtype=torch.float32)
        _lse_bwd_dq_kernel[(row_tiles, d_tiles, splits)](
            q, k, lse, g_lse, pos, g_pos, part, M, N, D, q.stride(0), k.stride(0),
            scale, scale * LOG2E.value, period, per_split, **common)
        dq = part.sum(0) if splits > 1 else part[0]
    if need_dk:
        col_tiles = triton.cdiv(N, cfg["BLOCK_N"])
        cap = num_splits or max(1, _PARTIAL_BUDGET // (4 * N * D))
        splits, per_split = _split(M, cfg["BLOCK_M"], 1 if num_splits else col_tiles * d_tiles, target, cap)
        part = torch.empty((splits, N, D), device=q.device, dtype=torch.float32)
        _lse_bwd_dk_kernel[(col_tiles, d_tiles, splits)](
            q, k, lse, g_lse, pos, g_pos, part, M, N, D, q.stride(0), k.stride(0),
            scale, scale * LOG2E.value, period, per_split, **common)
        dk = part.sum(0) if splits > 1 else part[0]
    return dq, dk


__all__ = ["lse_forward", "lse_backward"]
