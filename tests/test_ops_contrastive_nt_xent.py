"""nt_xent on every backend against a float64 reference, forward and backward; kernel core; bad input."""

import pytest
import torch
import torch.nn.functional as F

from advfast.ops import contrastive as C
from advfast.ops.contrastive import POSITIVE_MODES, nt_xent, nt_xent_reference

BACKENDS = ["torch", "torch-chunked", "triton"]
EPS32 = torch.finfo(torch.float32).eps
# (V, D, T, arch): every V, D and T appears without the full product (the interpreter is slow); arch
# picks the triton backend's sm_80 or sm_90 configuration (kernels/configs.py).
CASES = [(2, 64, 0.05, 80), (3, 128, 0.2, 90), (4, 130, 0.5, 90), (3, 64, 1.0, 80), (2, 130, 0.2, 80)]


def loss_and_grad(fn, z):
    leaf = z.detach().clone().requires_grad_(True)
    loss = fn(leaf)
    loss.backward()
    return loss.detach().double(), leaf.grad.double()


def rel_err(out, ref):
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.fixture
def small_chunks(monkeypatch):
    """Make the torch-chunked backend walk many chunks even at test sizes."""
    monkeypatch.setattr(C, "CHUNK_ELEMENTS", 148 * 32)


def naive_nt_xent(z, V, T, positives, normalize=True):
    """The issue's definition, anchor by anchor, in float64 Python loops (checks the reference itself)."""
    if normalize:
        z = F.normalize(z, dim=1)
    n = z.shape[0]
    B = n // V
    losses = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        log_den = torch.logsumexp(torch.stack([z[i] @ z[j] / T for j in others]), 0)
        pos = [z[i] @ z[j] / T for j in others if j % B == i % B]
        if positives == "mean_log_prob":
            losses.append(torch.stack([log_den - p for p in pos]).mean())
        else:
            losses.append(log_den - torch.logsumexp(torch.stack(pos), 0))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("positives", POSITIVE_MODES)
@pytest.mark.parametrize("num_views", [2, 3])
def test_reference_matches_the_definition(positives, num_views):
    z = torch.randn(num_views * 5, 12, dtype=torch.float64)
    got = nt_xent_reference(z, num_views, 0.3, positives)
    torch.testing.assert_close(got, naive_nt_xent(z, num_views, 0.3, positives), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_views_is_simclr_for_both_modes(backend):
    B, T = 11, 0.5
    z = torch.randn(2 * B, 32, dtype=torch.float64)
    zn = F.normalize(z, dim=1)
    logits = (zn @ zn.T / T).fill_diagonal_(float("-inf"))
    simclr = F.cross_entropy(logits, (torch.arange(2 * B) + B) % (2 * B))
    zf = z.float()
    for positives in POSITIVE_MODES:
        got = nt_xent(zf, 2, T, positives, backend=backend)
        torch.testing.assert_close(got.double(), simclr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positives", POSITIVE_MODES)
@pytest.mark.parametrize("num_views,dim,temperature,arch", CASES)
def test_matches_float64_reference(backend, positives, num_views, dim, temperature, arch, small_chunks,
                                   monkeypatch):
    monkeypatch.setenv("ADVFAST_TRITON_ARCH", str(arch))
    B = 37  # a multiple of no tile size
    z = torch.randn(num_views * B, dim)
    ref_loss, ref_grad = loss_and_grad(lambda x: nt_xent_reference(x, num_views, temperature, positives), z.double())
    loss, grad = loss_and_grad(lambda x: nt_xent(x, num_views, temperature, positives, backend=backend), z)
    tol = 32 * EPS32 / temperature  # logits of size 1/T carry float32 rounding of about eps/T
    assert abs(float(loss - ref_loss)) <= tol * max(1.0, float(ref_loss.abs())), (float(loss), float(ref_loss))
    assert rel_err(grad, ref_grad) <= tol, f"relative grad error {rel_err(grad, ref_grad):.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", ["torch-chunked", "triton"])
@pytest.mark.parametrize("positives,temperature,arch", [("mean_log_prob", 0.05, 80), ("sum_in_numerator", 0.5, 90)])
def test_bf16_within_twice_eager_error(backend, positives, temperature, arch, monkeypatch):
    monkeypatch.setenv("ADVFAST_TRITON_ARCH", str(arch))
    V, B, D = 4, 37, 128
    z = torch.randn(V * B, D)
    ref_loss, ref_grad = loss_and_grad(lambda x: nt_xent_reference(x, V, temperature, positives), z.double())
    eager_loss, eager_grad = loss_and_grad(lambda x: nt_xent_reference(x, V, temperature, positives), z.bfloat16())
    loss, grad = loss_and_grad(lambda x: nt_xent(x, V, temperature, positives, backend=backend), z.bfloat16())
    ulp = 2.0 ** -8  # the result itself is rounded to bf16, which alone can cost half an ulp
    assert abs(float(loss - ref_loss)) <= 2 * abs(float(eager_loss - ref_loss)) + ulp * float(ref_loss.abs())
    assert rel_err(grad, ref_grad) <= 2 * rel_err(eager_grad, ref_grad) + ulp, \
        (rel_err(grad, ref_grad), rel_err(eager_grad, ref_grad))


@pytest.mark.parametrize("positives", POSITIVE_MODES)
def test_float64_keeps_float64_accuracy(positives, small_chunks):
    z = torch.randn(3 * 37, 64, dtype=torch.float64)
    ref_loss, ref_grad = loss_and_grad(lambda x: nt_xent_reference(x, 3, 0.05, positives), z)
    loss, grad = loss_and_grad(lambda x: nt_xent(x, 3, 0.05, positives, backend="torch-chunked"), z)
    assert abs(float(loss - ref_loss)) <= 1e-12 * float(ref_loss.abs())
    assert rel_err(grad, ref_grad) <= 1e-12, rel_err(grad, ref_grad)
    with pytest.raises(TypeError, match="float64"):
        nt_xent(z, 3, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtype_follows_input(backend):
    z = torch.randn(3 * 5, 16, dtype=torch.bfloat16, requires_grad=True)
    loss = nt_xent(z, 3, backend=backend)
    loss.backward()
    assert loss.dtype == torch.bfloat16 and loss.dim() == 0 and z.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positives", POSITIVE_MODES)
def test_stable_for_parallel_vectors_and_huge_logits(backend, positives):
    V, B = 3, 6
    z = torch.randn(1, 64).repeat(V * B, 1)  # every similarity is exactly 1/T
    loss, grad = loss_and_grad(lambda x: nt_xent(x, V, 0.05, positives, backend=backend), z)
    ref_loss, ref_grad = loss_and_grad(lambda x: nt_xent_reference(x, V, 0.05, positives), z.double())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)

    big = 10 * torch.randn(V * B, 64)  # unnormalised: logits reach ~1e4, exp overflows without the max
    loss, grad = loss_and_grad(lambda x: nt_xent(x, V, 0.05, positives, normalize=False, backend=backend), big)
    ref_loss, ref_grad = loss_and_grad(
        lambda x: nt_xent_reference(x, V, 0.05, positives, normalize=False), big.double())
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # float32 logits of this size are only known to eps * |logit|; that bounds what any backend can do.
    tol = 16 * EPS32 * float((big.double() @ big.double().T).abs().max()) / 0.05
    assert abs(float(loss - ref_loss)) <= tol * max(1.0, float(ref_loss.abs()))
    assert rel_err(grad, ref_grad) <= tol


@pytest.mark.parametrize("pos_mode", [1, 2])
def test_kernel_core_small_tiles_many_splits(pos_mode):
    """The Triton core with diagonal masking and index-arithmetic positives, tiles far smaller than the
    problem (several row and key tiles per split, ragged D chunks), forward and both gradients."""
    from advfast.kernels import contrastive as kern

    V, B, D, scale = 3, 7, 40, 3.0
    n = V * B
    z = torch.randn(n, D)
    g_lse, g_pos = torch.rand(n), torch.randn(n)
    tiles = dict(num_splits=2, block_m=16, block_n=16, block_d=32)
    lse, pos = kern.lse_forward(z, z, scale, True, B, pos_mode, **tiles)

    s = z.double() @ z.double().T * scale
    idx = torch.arange(n)
    self_mask = idx[:, None] == idx[None, :]
    pos_mask = (idx[:, None] % B == idx[None, :] % B) & ~self_mask
    s = s.masked_fill(self_mask, float("-inf"))
    ref_lse = torch.logsumexp(s, 1)
    if pos_mode == 1:
        ref_pos = s.masked_fill(~pos_mask, 0.0).sum(1)
        w = pos_mask.double()
    else:
        ref_pos = torch.logsumexp(s.masked_fill(~pos_mask, float("-inf")), 1)
        w = torch.softmax(s.masked_fill(~pos_mask, float("-inf")), 1)
    assert rel_err(lse.double(), ref_lse) <= 1e-6 and rel_err(pos.double(), ref_pos) <= 1e-6

    dq, dk = kern.lse_backward(z, z, scale, lse, g_lse, pos, g_pos, True, B, pos_mode, need_dk=True, **tiles)
    ds = (torch.softmax(s, 1) * g_lse.double()[:, None] + w * g_pos.double()[:, None]) * scale
    assert rel_err(dq.double(), ds @ z.double()) <= 1e-5
    assert rel_err(dk.double(), ds.T @ z.double()) <= 1e-5


def test_triton_loss_compiles_without_graph_break():
    """The triton core is a registered custom op (advfast.ops.contrastive_triton_op): a compiled
    function containing both losses is one graph, and its gradients match eager."""
    from advfast.ops.contrastive import info_nce

    def step(z, q, k, queue):
        return nt_xent(z * 2.0, 2, 0.5, backend="triton") + info_nce(q, k, queue, 0.2, backend="triton")

    z, q, k, queue = torch.randn(14, 16), torch.randn(5, 16), torch.randn(5, 16), torch.randn(30, 16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(z, q, k, queue)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    leaves = [x.clone().requires_grad_(True) for x in (z, q, k)]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(*leaves, queue).backward()
    eager = [x.clone().requires_grad_(True) for x in (z, q, k)]
    step(*eager, queue).backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_triton_custom_ops_pass_opcheck():
    from advfast.ops.contrastive_triton_op import row_lse

    z = torch.randn(12, 16, requires_grad=True)
    torch.library.opcheck(row_lse, (z, z.detach(), 2.0, True, 6, 2), test_utils=("test_schema", "test_faketensor"))


_Z = torch.randn(12, 8)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(z=_Z, num_views=5), ValueError, "num_views=5 does not divide the 12 rows of z"),
    (dict(z=_Z, num_views=1), ValueError, "num_views must be >= 2"),
    (dict(z=_Z, num_views=2.0), TypeError, "num_views must be an int"),
    (dict(z=_Z, num_views=True), TypeError, "num_views must be an int"),
    (dict(z=torch.randn(12), num_views=2), ValueError, "z must be 2-D"),
    (dict(z=_Z.int(), num_views=2), TypeError, "z must be a floating-point"),
    (dict(z=_Z, num_views=2, positives="sum"), ValueError, "positives must be one of"),
    (dict(z=_Z, num_views=2, temperature=0), ValueError, "temperature must be a positive"),
    (dict(z=_Z, num_views=2, temperature=-1.0), ValueError, "temperature must be a positive"),
    (dict(z=_Z, num_views=2, temperature=float("inf")), ValueError, "temperature must be a positive"),
    (dict(z=_Z, num_views=2, normalize="yes"), TypeError, "normalize"),
    (dict(z=_Z, num_views=2, backend="flash"), ValueError, "unknown backend 'flash'"),
])
def test_bad_input_names_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        nt_xent(**kwargs)


# ----------------------------------------------------------------------------------------------
# GPU: the real kernels at SimCLR / AdvCL scale.


@pytest.mark.gpu
@pytest.mark.parametrize("positives", POSITIVE_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_four_views_accuracy_and_memory(positives, dtype):
    V, B, D, T = 4, 512, 128, 0.5
    z = torch.randn(V * B, D, device="cuda")
    ref_loss, ref_grad = loss_and_grad(lambda x: nt_xent_reference(x, V, T, positives), z.double())
    zt = z.to(dtype)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = loss_and_grad(fn, zt)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    (eager_loss, eager_grad), eager_mem = peak(lambda x: nt_xent_reference(x, V, T, positives))
    (loss, grad), mem = peak(lambda x: nt_xent(x, V, T, positives, backend="triton"))
    if dtype == torch.float32:
        tol = 32 * EPS32 / T
        assert abs(float(loss - ref_loss)) <= tol * float(ref_loss.abs())
        assert rel_err(grad, ref_grad) <= tol
    else:
        ulp = 2.0 ** -8
        assert abs(float(loss - ref_loss)) <= 2 * abs(float(eager_loss - ref_loss)) + ulp * float(ref_loss.abs())
        assert rel_err(grad, ref_grad) <= 2 * rel_err(eager_grad, ref_grad) + ulp
    assert mem < eager_mem, f"peak extra memory {mem} B vs eager {eager_mem} B"
