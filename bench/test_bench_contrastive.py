"""info_nce and nt_xent, forward + backward, on every backend against the eager formulations they replace.

Groups: `info_nce B=.. K=.. dtype` (MoCo: queries against a key queue, D=128) and
`nt_xent V=.. B=.. dtype` (multi-view NT-Xent, D=128). Entries:
  eager          the published formulation (baseline): MoCo's einsum + cat + cross_entropy;
                 SupCon's masked similarity matrix with log_softmax
  torch-chunked  advfast's chunked autograd Function (CPU-friendly memory, not a GPU fast path)
  triton         advfast's tiled kernels (GPU; skipped on CPU, where it is only the interpreter)
Each entry records `peak_extra_bytes` in extra_info on CUDA: the peak memory above what was allocated
before one forward + backward (inputs and queue excluded), measured with torch.cuda.max_memory_allocated.
GPU sizes follow issue 3 (B in {256, 512}, K in {4096, 32768, 65536}; B=512, V in {2, 3, 4}); a CPU
runs reduced sizes so the file finishes in seconds.
"""

import pytest
import torch
import torch.nn.functional as F

from advfast.ops import info_nce, nt_xent

IMPLS = ["eager", "torch-chunked", "triton"]
DIM = 128
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def eager_moco(q, k, queue, temperature):
    """MoCo's loss as its reference code writes it."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,kc->nk", q, queue)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def eager_supcon(z, num_views, temperature):
    """SupCon / AdvCL's multi-view loss (labels=None): masked (V*B)^2 similarity matrix."""
    z = F.normalize(z, dim=1)
    n = z.shape[0]
    batch = n // num_views
    sim = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    pos_mask = torch.eye(batch, dtype=torch.bool, device=z.device).repeat(num_views, num_views) & ~self_mask
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    return -(log_prob.masked_fill(~pos_mask, 0.0).sum(1) / (num_views - 1)).mean()


def _peak_extra_bytes(step, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _fwd_bwd(loss_fn, leaves):
    def step():
        for x in leaves:
            x.grad = None
        loss_fn().backward()
    return step


def _check_dtype(on_gpu, dtype):
    if dtype == "bf16" and not on_gpu:
        pytest.skip("bf16 runs on the GPU only (CPU sizes are a smoke run)")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("keys", ["K4096", "K32768", "K65536"])
@pytest.mark.parametrize("rows", ["B256", "B512"])
@pytest.mark.parametrize("impl", IMPLS)
def test_info_nce(benchmark, measure, pick, device, on_gpu, skip_unless_backend, impl, rows, keys, dtype):
    _check_dtype(on_gpu, dtype)
    B = pick(gpu=int(rows[1:]), cpu=int(rows[1:]) // 16)
    K = pick(gpu=int(keys[1:]), cpu=int(keys[1:]) // 32)
    benchmark.group = f"info_nce B={B} K={K} D={DIM} {dtype}"
    dt = DTYPES[dtype]
    q = torch.randn(B, DIM, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(B, DIM, device=device, dtype=dt, requires_grad=True)
    queue = F.normalize(torch.randn(K, DIM, device=device), dim=1).to(dt)
    if impl == "eager":
        step = _fwd_bwd(lambda: eager_moco(q, k, queue, 0.2), [q, k])
    else:
        skip_unless_backend(impl)
        step = _fwd_bwd(lambda: info_nce(q, k, queue, 0.2, backend=impl), [q, k])
    step()  # compile / warm up before measuring memory
    benchmark.extra_info["peak_extra_bytes"] = _peak_extra_bytes(step, device)
    # bytes one step must touch at least: read the queue twice (forward, backward) and q, k, grads
    nbytes = 2 * queue.numel() * queue.element_size() + 6 * q.numel() * q.element_size()
    measure(step, nbytes=nbytes, role="baseline" if impl == "eager" else None)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("num_views", [2, 3, 4])
@pytest.mark.parametrize("impl", IMPLS)
def test_nt_xent(benchmark, measure, pick, device, on_gpu, skip_unless_backend, impl, num_views, dtype):
    _check_dtype(on_gpu, dtype)
    B = pick(gpu=512, cpu=64)
    benchmark.group = f"nt_xent V={num_views} B={B} D={DIM} {dtype}"
    z = torch.randn(num_views * B, DIM, device=device, dtype=DTYPES[dtype], requires_grad=True)
    if impl == "eager":
        step = _fwd_bwd(lambda: eager_supcon(z, num_views, 0.5), [z])
    else:
        skip_unless_backend(impl)
        step = _fwd_bwd(lambda: nt_xent(z, num_views, 0.5, "mean_log_prob", backend=impl), [z])
    step()
    benchmark.extra_info["peak_extra_bytes"] = _peak_extra_bytes(step, device)
    measure(step, nbytes=3 * z.numel() * z.element_size(), role="baseline" if impl == "eager" else None)


@pytest.mark.parametrize("num_views", [2, 4])
def test_eager_baselines_compute_the_same_losses(device, num_views):
    """The baselines are the losses the ops compute (else the speed-ups would compare different work)."""
    q, k = torch.randn(16, DIM, device=device), torch.randn(16, DIM, device=device)
    queue = F.normalize(torch.randn(100, DIM, device=device), dim=1)
    torch.testing.assert_close(eager_moco(q, k, queue, 0.2), info_nce(q, k, queue, 0.2, backend="torch"))
    z = torch.randn(num_views * 16, DIM, device=device)
    torch.testing.assert_close(eager_supcon(z, num_views, 0.5), nt_xent(z, num_views, 0.5, backend="torch"))
