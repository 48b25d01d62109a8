"""Tiled Triton kernels for contrastive losses: the row-wise log-sum-exp of scaled similarities.

One core serves info_nce and nt_xent. Queries Q (M, D), keys K (N, D), s_rc = scale * q_r . k_c:

    lse_r = log sum_{c valid} exp(s_rc)        valid: c < N, and c != r when mask_diag (NT-Xent)
    pos_r = sum_{c in P(r)} s_rc               (pos_mode 1, for "mean_log_prob")
          = log sum_{c in P(r)} exp(s_rc)      (pos_mode 2, for "sum_in_numerator")
    P(r)  = {c valid : c % period == r % period}   (row r of a view-major batch is instance r % B)

Forward: a program owns a tile of queries, loads it once, and walks a contiguous slice ("split") of
the keys tile by tile with a running max and sum, so only per-row statistics reach memory (never
M x N). The key-tile loop is the innermost loop, so Triton's software pipeline prefetches the next
key tiles while the current one is multiplied. Splitting the keys keeps the GPU busy when M is a few
hundred rows and N is a 65536-key queue; the per-split partial log-sum-exps (S, M) are merged in torch.

Backward: with upstream g_lse, g_pos the gradient of the scores is
    dS_rc = g_lse_r exp(s_rc - lse_r) + g_pos_r w_rc,   w_rc = [c in P(r)]  or  [c in P(r)] exp(s_rc - pos_r)
and dQ = scale dS K, dK = scale dS^T Q. The dQ kernel holds a query tile and walks key tiles (each key
tile loaded once serves both the scores and dS K); the dK kernel holds a key tile and walks query
tiles. Both recompute the score tiles instead of storing them; dK is only launched when the keys
need a gradient (not for a MoCo queue). Each program writes its own partial sum (no atomics, so
results are deterministic); torch adds the partials.

Feature dims up to the configuration's resident width are padded (masked loads, zeros) to a power
of two and held whole (SINGLE_D); wider ones are walked in chunks inside each key tile. Tile shapes,
warps and pipeline stages come from kernels/configs.py per architecture and operand kind.

Low-precision inputs (bf16, fp16) are multiplied on tensor cores with fp32 accumulation; every
softmax statistic is fp32. Logits are kept in base 2 (exp2/log2 are the native instructions).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from advfast.kernels import configs

# tl.constexpr: compiled kernels may only read constexpr globals (the interpreter does not check).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
_NEG_BIG = tl.constexpr(-1.0e30)  # running-max start: finite, so fully masked tiles never give inf - inf

# Bytes one backward launch may spend on per-split partial gradients before it stops splitting.
_PARTIAL_BUDGET = 8 << 20


@triton.jit
def _load_rows(P, idx, n_rows, stride, d0, D, BLOCK_D: tl.constexpr):
    """Rows ``idx`` of a (n_rows, D) matrix, columns [d0, d0 + BLOCK_D), zero outside."""
    dd = d0 + tl.arange(0, BLOCK_D)
    return tl.load(P + idx[:, None] * stride + dd[None, :], mask=(idx < n_rows)[:, None] & (dd < D)[None, :],
                   other=0.0)


@triton.jit
def _mm_nt(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b^T with fp32 accumulation."""
    if UPCAST:  # the interpreter cannot multiply bf16 blocks; fp32 products of bf16 values are exact
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, tl.trans(b), input_precision=PRECISION)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; ``a`` (fp32 dS) is rounded to b's dtype for the tensor cores."""
    a = a.to(b.dtype)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _scores_chunked(Q, K, rows, cols, M, N, D, stride_q, stride_k,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """q_r . k_c for a (BLOCK_M, BLOCK_N) tile when D is wider than one tile: walk D in chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        q = _load_rows(Q, rows, M, stride_q, d0, D, BLOCK_D)
        k = _load_rows(K, cols, N, stride_k, d0, D, BLOCK_D).to(Q.dtype.element_ty)
        acc += _mm_nt(q, k, PRECISION, UPCAST)
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
                    BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_start = split * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, N)
    if SINGLE_D:
        q_tile = _load_rows(Q, rows, M, stride_q, 0, D, BLOCK_D)  # once per program

    m_i = tl.full((BLOCK_M,), _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pm_i = tl.full((BLOCK_M,), _NEG_BIG, dtype=tl.float32)
    pl_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    psum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        if SINGLE_D:
            k = _load_rows(K, cols, N, stride_k, 0, D, BLOCK_D).to(Q.dtype.element_ty)
            s = _mm_nt(q_tile, k, PRECISION, UPCAST) * scale_log2
        else:
            s = _scores_chunked(Q, K, rows, cols, M, N, D, stride_q, stride_k,
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
                       BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d0 = pid_d * BLOCK_D
    dd = d0 + tl.arange(0, BLOCK_D)
    n_start = split * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, N)
    lse2, g, gp, plse2 = _row_stats(LSE, G_LSE, POS, G_POS, rows, M, POS_MODE)
    if SINGLE_D:
        q_tile = _load_rows(Q, rows, M, stride_q, 0, D, BLOCK_D)  # once per program

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        # this program's D chunk of the key tile (all of D when SINGLE_D: the scores reuse it)
        k = _load_rows(K, cols, N, stride_k, d0, D, BLOCK_D).to(Q.dtype.element_ty)
        if SINGLE_D:
            s = _mm_nt(q_tile, k, PRECISION, UPCAST) * scale_log2
        else:
            s = _scores_chunked(Q, K, rows, cols, M, N, D, stride_q, stride_k,
                                BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST) * scale_log2
        valid, is_pos = _tile_masks(rows, cols, M, n_end, period, MASK_DIAG, POS_MODE)
        ds = _score_grad(s, valid, is_pos, lse2, g, gp, plse2, POS_MODE)
        acc += _mm(ds, k, PRECISION, UPCAST)
    out = DQ_PART + split * M * D + rows[:, None] * D + dd[None, :]
    tl.store(out, acc * scale, mask=(rows < M)[:, None] & (dd < D)[None, :])


@triton.jit
def _lse_bwd_dk_kernel(Q, K, LSE, G_LSE, POS, G_POS, DK_PART, M, N, D, stride_q, stride_k,
                       scale, scale_log2, period, rows_per_split,
                       MASK_DIAG: tl.constexpr, POS_MODE: tl.constexpr, PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d0 = pid_d * BLOCK_D
    dd = d0 + tl.arange(0, BLOCK_D)
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    if SINGLE_D:
        k_tile = _load_rows(K, cols, N, stride_k, 0, D, BLOCK_D).to(Q.dtype.element_ty)  # once per program

    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        lse2, g, gp, plse2 = _row_stats(LSE, G_LSE, POS, G_POS, rows, m_end, POS_MODE)
        q = _load_rows(Q, rows, m_end, stride_q, d0, D, BLOCK_D)
        if SINGLE_D:
            s = _mm_nt(q, k_tile, PRECISION, UPCAST) * scale_log2
        else:
            s = _scores_chunked(Q, K, rows, cols, m_end, N, D, stride_q, stride_k,
                                BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST) * scale_log2
        valid, is_pos = _tile_masks(rows, cols, m_end, N, period, MASK_DIAG, POS_MODE)
        ds = _score_grad(s, valid, is_pos, lse2, g, gp, plse2, POS_MODE)
        acc += _mm(tl.trans(ds), q, PRECISION, UPCAST)
    out = DK_PART + split * N * D + cols[:, None] * D + dd[None, :]
    tl.store(out, acc * scale, mask=(cols < N)[:, None] & (dd < D)[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration (shared by the launchers and the ahead-of-time compile check)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few splits exercise the merge path without slowing tests down


def _precision(dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    """(operand kind, tl.dot input_precision). fp32 follows eager torch.matmul: TF32 only where the
    user allowed it; otherwise three TF32 tensor-core products (hi*hi + hi*lo + lo*hi), close to fp32
    accuracy, instead of "ieee" FMA loops, which would leave the fused loss slower than cuBLAS SGEMM."""
    # (the interpreter computes every dot exactly; the flag there picks which configuration it checks)
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    kind = configs.operand_kind(dtype, tf32)
    return kind, ("tf32x3" if kind == "tf32x3" else "tf32")  # "tf32" is ignored for 16-bit operands


def launch_config(arch: int, kind: str, pass_: str, D: int, block_m=None, block_n=None, block_d=None,
                  interpreted: bool = False) -> tuple[dict, dict]:
    """(constexprs, launch options) for one kernel pass; block_* override the table (tests only)."""
    t = configs.contrastive_config(arch, kind, pass_, D)
    bm, bn, bd = block_m or t.BLOCK_M, block_n or t.BLOCK_N, block_d or t.BLOCK_D
    consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, SINGLE_D=bd >= D,
                  PRECISION="tf32x3" if kind == "tf32x3" else "tf32", UPCAST=interpreted)
    return consts, dict(num_warps=t.num_warps, num_stages=t.num_stages)


def _config(q: torch.Tensor, D: int, pass_: str, block_m, block_n, block_d, arch: int | None):
    kind, _ = _precision(q.dtype, q.device)
    arch = configs.device_arch(q.device) if arch is None else arch
    interp = _interpreted() or q.device.type == "cpu"
    consts, opts = launch_config(arch, kind, pass_, D, block_m, block_n, block_d, interp)
    return consts, ({} if interp else opts)  # the interpreter takes no launch options


def _split(total: int, block: int, other_programs: int, target: int, max_splits: int | None = None):
    """Split ``total`` items into contiguous slices (multiples of ``block``) for enough programs."""
    tiles = triton.cdiv(total, block)
    splits = max(1, min(tiles, triton.cdiv(target, max(other_programs, 1))))
    if max_splits is not None:
        splits = max(1, min(splits, max_splits))
    per_split = triton.cdiv(tiles, splits) * block
    return triton.cdiv(total, per_split), per_split


def fwd_grid(M: int, N: int, consts: dict, target: int, num_splits: int | None = None):
    """(grid, keys per split) of the forward kernel."""
    row_tiles = triton.cdiv(M, consts["BLOCK_M"])
    if num_splits is None:
        splits, per_split = _split(N, consts["BLOCK_N"], row_tiles, target)
    else:
        splits, per_split = _split(N, consts["BLOCK_N"], 1, num_splits)
    return (row_tiles, splits), per_split


def dq_grid(M: int, N: int, D: int, consts: dict, target: int, num_splits: int | None = None):
    """(grid, keys per split) of the dQ kernel."""
    row_tiles = triton.cdiv(M, consts["BLOCK_M"])
    d_tiles = triton.cdiv(D, consts["BLOCK_D"])
    cap = num_splits or max(1, _PARTIAL_BUDGET // (4 * M * D))
    splits, per_split = _split(N, consts["BLOCK_N"], 1 if num_splits else row_tiles * d_tiles,
                               num_splits or target, cap)
    return (row_tiles, d_tiles, splits), per_split


def dk_grid(M: int, N: int, D: int, consts: dict, target: int, num_splits: int | None = None):
    """(grid, query rows per split) of the dK kernel."""
    col_tiles = triton.cdiv(N, consts["BLOCK_N"])
    d_tiles = triton.cdiv(D, consts["BLOCK_D"])
    cap = num_splits or max(1, _PARTIAL_BUDGET // (4 * N * D))
    splits, per_split = _split(M, consts["BLOCK_M"], 1 if num_splits else col_tiles * d_tiles,
                               num_splits or target, cap)
    return (col_tiles, d_tiles, splits), per_split


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Unit column stride, a row stride that is a multiple of 16 and a 16-byte aligned start: the
    specialisation every launch gets (and the one the AOT check compiles), with vector loads."""
    if t.stride(-1) != 1 or t.stride(0) % 16 or t.data_ptr() % 16:
        t = t.contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return t


def _prepare(q: torch.Tensor, k: torch.Tensor):
    """Keys in the queries' dtype (a float32 queue with bf16 queries: the kernel would round each tile
    anyway) and a feature dim zero-padded to a multiple of 16 (zeros change no dot product), so
    every launch is one of the few variants kernels/aot.py compiles. O((M + N) D) extra at most."""
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    pad = -q.shape[1] % 16
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
        k = q if k is q else torch.nn.functional.pad(k, (0, pad))
    qa = _aligned(q)
    return qa, (qa if k is q else _aligned(k))


# ----------------------------------------------------------------------------------------------
# Launchers


def lse_forward(q: torch.Tensor, k: torch.Tensor, scale: float, mask_diag: bool = False,
                period: int = 1, pos_mode: int = 0, num_splits: int | None = None,
                block_m: int | None = None, block_n: int | None = None, block_d: int | None = None,
                arch: int | None = None):
    """Per-row (lse, pos) in float32, each of shape (M,); pos is None when pos_mode == 0.
    ``arch`` picks the configuration table's column (default: the device's; see kernels/configs.py)."""
    q, k = _prepare(q, k)
    M, D = q.shape
    N = k.shape[0]
    consts, opts = _config(q, D, "fwd", block_m, block_n, block_d, arch)
    grid, keys_per_split = fwd_grid(M, N, consts, _target_programs(q.device), num_splits)
    lse_part = torch.empty((grid[1], M), device=q.device, dtype=torch.float32)
    pos_part = torch.empty((grid[1], M), device=q.device, dtype=torch.float32) if pos_mode else lse_part
    _lse_fwd_kernel[grid](
        q, k, lse_part, pos_part, M, N, D, q.stride(0), k.stride(0), scale * LOG2E.value, period, keys_per_split,
        MASK_DIAG=mask_diag, POS_MODE=pos_mode, **consts, **opts)
    lse = torch.logsumexp(lse_part, dim=0)
    if pos_mode == 0:
        return lse, None
    pos = pos_part.sum(0) if pos_mode == 1 else torch.logsumexp(pos_part, dim=0)
    return lse, pos


def lse_backward(q: torch.Tensor, k: torch.Tensor, scale: float, lse: torch.Tensor, g_lse: torch.Tensor,
                 pos: torch.Tensor | None = None, g_pos: torch.Tensor | None = None,
                 mask_diag: bool = False, period: int = 1, pos_mode: int = 0,
                 need_dq: bool = True, need_dk: bool = False, num_splits: int | None = None,
                 block_m: int | None = None, block_n: int | None = None, block_d: int | None = None,
                 arch: int | None = None):
    """(dq, dk) in float32 (None where not asked for) for upstream gradients g_lse and g_pos."""
    D_in = q.shape[1]
    q, k = _prepare(q, k)
    M, D = q.shape
    N = k.shape[0]
    consts, opts = _config(q, D, "bwd", block_m, block_n, block_d, arch)
    target = _target_programs(q.device)
    lse = lse.contiguous()
    g_lse = g_lse.to(torch.float32).contiguous()
    if pos_mode:
        g_pos = (torch.zeros_like(lse) if g_pos is None else g_pos.to(torch.float32)).contiguous()
        pos = pos.contiguous()
    else:
        g_pos = pos = lse  # unread placeholders
    common = dict(MASK_DIAG=mask_diag, POS_MODE=pos_mode, **consts, **opts)

    dq = dk = None
    if need_dq:
        grid, per_split = dq_grid(M, N, D, consts, target, num_splits)
        part = torch.empty((grid[2], M, D), device=q.device, dtype=torch.float32)
        _lse_bwd_dq_kernel[grid](
            q, k, lse, g_lse, pos, g_pos, part, M, N, D, q.stride(0), k.stride(0),
            scale, scale * LOG2E.value, period, per_split, **common)
        dq = part.sum(0) if grid[2] > 1 else part[0]
    if need_dk:
        grid, per_split = dk_grid(M, N, D, consts, target, num_splits)
        part = torch.empty((grid[2], N, D), device=q.device, dtype=torch.float32)
        _lse_bwd_dk_kernel[grid](
            q, k, lse, g_lse, pos, g_pos, part, M, N, D, q.stride(0), k.stride(0),
            scale, scale * LOG2E.value, period, per_split, **common)
        dk = part.sum(0) if grid[2] > 1 else part[0]
    if D != D_in:  # drop the zero padding
        dq = dq[:, :D_in] if dq is not None else None
        dk = dk[:, :D_in] if dk is not None else None
    return dq, dk


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile variants (kernels/aot.py)

# What the losses launch: (MASK_DIAG, POS_MODE). info_nce: against a queue (no key gradient) or the
# in-batch keys; nt_xent: z against itself with both positive modes. Keys always arrive in the query
# dtype with D a multiple of 16 (_prepare), so D=130 runs as D=144.
_AOT_USES = ((False, 0), (True, 1), (True, 2))
AOT_DIMS = (64, 128, 130, 256, 512)
AOT_SIZES = dict(M=4096, N=65536, sms=132)  # the largest batch and queue the grids are checked for
_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def aot_variants(arch: int):
    """Every (kernel, specialisation, launch options) the launchers can produce for ``arch``."""
    from advfast.kernels.aot import Variant

    fwd_sig = dict(LSE_PART="*fp32", POS_PART="*fp32", M="i32", N="i32", D="i32", stride_q="i32",
                   stride_k="i32", scale_log2="fp32", period="i32", keys_per_split="i32")
    bwd_sig = dict(LSE="*fp32", G_LSE="*fp32", POS="*fp32", G_POS="*fp32", M="i32", N="i32", D="i32",
                   stride_q="i32", stride_k="i32", scale="fp32", scale_log2="fp32", period="i32")
    kernels = (("fwd", _lse_fwd_kernel, fwd_sig, fwd_grid),
               ("bwd", _lse_bwd_dq_kernel, dict(bwd_sig, DQ_PART="*fp32", keys_per_split="i32"), dq_grid),
               ("bwd", _lse_bwd_dk_kernel, dict(bwd_sig, DK_PART="*fp32", rows_per_split="i32"), dk_grid))
    M, N, target = AOT_SIZES["M"], AOT_SIZES["N"], 4 * AOT_SIZES["sms"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for tf32 in ((True, False) if dtype == torch.float32 else (False,)):
            kind = configs.operand_kind(dtype, tf32)
            for D in AOT_DIMS:
                D = D + (-D % 16)  # as _prepare pads it
                for mask_diag, pos_mode in _AOT_USES:
                    for pass_, fn, sig, grid_of in kernels:
                        consts, opts = launch_config(arch, kind, pass_, D)
                        grid, _ = grid_of(M, N, consts, target) if pass_ == "fwd" else grid_of(M, N, D, consts, target)
                        full = dict(sig, Q="*" + _TL[dtype], K="*" + _TL[dtype])
                        signature = tuple((n, full.get(n, "constexpr")) for n in fn.arg_names)
                        # _prepare/_aligned: 16-byte aligned pointers, D and row strides multiples of 16
                        divisible = tuple(n for n, t in signature if t.startswith("*")) + ("D", "stride_q", "stride_k")
                        c = dict(consts, MASK_DIAG=mask_diag, POS_MODE=pos_mode)
                        yield Variant(f"{__name__}.{fn.__name__}", signature, tuple(sorted(c.items())), divisible,
                                      opts["num_warps"], opts["num_stages"], grid,
                                      label=f"{kind} {_TL[dtype]} D={D} pos={pos_mode}")


__all__ = ["lse_forward", "lse_backward", "launch_config", "aot_variants"]
