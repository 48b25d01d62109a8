"""info_nce on every backend against a float64 reference, forward and backward; kernel core; bad input."""

import pytest
import torch
import torch.nn.functional as F

from advfast.ops import contrastive as C
from advfast.ops.contrastive import info_nce, info_nce_reference

BACKENDS = ["torch", "torch-chunked", "triton"]
EPS32 = torch.finfo(torch.float32).eps
# (D, T, arch) triples: every D and every T is covered without the full product (the interpreter is
# slow); arch picks the triton backend's sm_80 or sm_90 configuration (kernels/configs.py), the one
# the GPU runs and tests/test_triton_aot.py compiles.
DIM_TEMPS = [(64, 0.05, 80), (128, 0.2, 90), (130, 0.5, 80), (64, 1.0, 90), (130, 0.05, 90)]
ARCH_OF_TEMP = {0.05: 80, 0.2: 90}


def loss_and_grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach().double(), [x.grad.double() for x in leaves]


def rel_err(out, ref):
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.fixture
def small_chunks(monkeypatch):
    """Make the torch-chunked backend walk many chunks even at test sizes."""
    monkeypatch.setattr(C, "CHUNK_ELEMENTS", 37 * 128)


def naive_info_nce(q, k, queue, T, normalize=True):
    """The issue's definition row by row, in float64 Python loops (checks the reference itself)."""
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    losses = []
    for i in range(q.shape[0]):
        pos = q[i] @ k[i] / T
        negs = [q[i] @ queue[j] / T for j in range(queue.shape[0])] if queue is not None else \
            [q[i] @ k[j] / T for j in range(q.shape[0]) if j != i]
        losses.append(torch.logsumexp(torch.stack([pos] + negs), 0) - pos)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("with_queue", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_the_definition(with_queue, normalize):
    q, k = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    queue = F.normalize(torch.randn(9, 10, dtype=torch.float64), dim=1) if with_queue else None
    got = info_nce_reference(q, k, queue, 0.3, normalize)
    torch.testing.assert_close(got, naive_info_nce(q, k, queue, 0.3, normalize), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_queue", [True, False])
@pytest.mark.parametrize("dim,temperature,arch", DIM_TEMPS)
def test_matches_float64_reference(backend, with_queue, dim, temperature, arch, small_chunks, monkeypatch):
    monkeypatch.setenv("ADVFAST_TRITON_ARCH", str(arch))
    B, K = 37, (301 if backend == "triton" else 1001)  # multiples of no tile size
    q, k = torch.randn(B, dim), torch.randn(B, dim)
    queue = F.normalize(torch.randn(K, dim), dim=1) if with_queue else None
    queue64 = queue.double() if with_queue else None
    ref_loss, ref_grads = loss_and_grads(lambda a, b: info_nce_reference(a, b, queue64, temperature),
                                         q.double(), k.double())
    loss, grads = loss_and_grads(lambda a, b: info_nce(a, b, queue, temperature, backend=backend), q, k)
    # Logits of size 1/T carry float32 rounding of about eps/T; allow a few dozen of those.
    tol = 32 * EPS32 / temperature
    assert abs(float(loss - ref_loss)) <= tol * max(1.0, float(ref_loss.abs())), (float(loss), float(ref_loss))
    for name, g, r in zip(("q", "k"), grads, ref_grads):
        assert rel_err(g, r) <= tol, f"grad {name}: relative error {rel_err(g, r):.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", ["torch-chunked", "triton"])
@pytest.mark.parametrize("temperature", [0.05, 0.2])
def test_bf16_within_twice_eager_error(backend, temperature, monkeypatch):
    monkeypatch.setenv("ADVFAST_TRITON_ARCH", str(ARCH_OF_TEMP[temperature]))
    B, K, D = 37, 1001, 128
    q, k = torch.randn(B, D), torch.randn(B, D)
    queue = F.normalize(torch.randn(K, D), dim=1)
    ref_loss, ref_grads = loss_and_grads(lambda a, b: info_nce_reference(a, b, queue.double(), temperature),
                                         q.double(), k.double())
    bf = [x.bfloat16() for x in (q, k)]
    eager_loss, eager_grads = loss_and_grads(
        lambda a, b: info_nce_reference(a, b, queue.bfloat16(), temperature), *bf)
    loss, grads = loss_and_grads(lambda a, b: info_nce(a, b, queue.bfloat16(), temperature, backend=backend), *bf)
    assert loss.dtype == torch.float64 and grads[0].shape == q.shape
    ulp = 2.0 ** -8  # the result itself is rounded to bf16, which alone can cost half an ulp
    assert abs(float(loss - ref_loss)) <= 2 * abs(float(eager_loss - ref_loss)) + ulp * float(ref_loss.abs())
    for g, e, r in zip(grads, eager_grads, ref_grads):
        assert rel_err(g, r) <= 2 * rel_err(e, r) + ulp, (rel_err(g, r), rel_err(e, r))


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_tf32_configuration(arch, monkeypatch):
    """With TF32 allowed the launchers take the "tf32" tiles (on a GPU: TF32 products); the
    interpreter multiplies exactly, so this checks those tiles' indexing to float32 accuracy."""
    monkeypatch.setenv("ADVFAST_TRITON_ARCH", str(arch))
    q, k = torch.randn(37, 130), torch.randn(37, 130)
    queue = F.normalize(torch.randn(301, 130), dim=1)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        from advfast.kernels import contrastive as kern

        assert kern._precision(torch.float32, q.device) == ("tf32", "tf32")
        for keys in (queue, None):
            keys64 = keys.double() if keys is not None else None
            ref_loss, ref_grads = loss_and_grads(lambda a, b: info_nce_reference(a, b, keys64, 0.2),
                                                 q.double(), k.double())
            loss, grads = loss_and_grads(lambda a, b: info_nce(a, b, keys, 0.2, backend="triton"), q, k)
            tol = 32 * EPS32 / 0.2
            assert abs(float(loss - ref_loss)) <= tol * float(ref_loss.abs())
            assert all(rel_err(g, r) <= tol for g, r in zip(grads, ref_grads))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtype_follows_input(backend):
    q, k = torch.randn(5, 16, dtype=torch.bfloat16), torch.randn(5, 16, dtype=torch.bfloat16)
    q.requires_grad_(True)
    queue = torch.randn(40, 16)  # a float32 queue with bf16 queries is accepted
    loss = info_nce(q, k, queue, backend=backend)
    loss.backward()
    assert loss.dtype == torch.bfloat16 and loss.dim() == 0 and q.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_queue_never_gets_a_gradient(backend):
    q, k = torch.randn(9, 32, requires_grad=True), torch.randn(9, 32, requires_grad=True)
    queue = torch.randn(100, 32, requires_grad=True)
    info_nce(q, k, queue, backend=backend).backward()
    assert queue.grad is None
    assert q.grad is not None and k.grad is not None and k.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_stable_for_parallel_vectors_and_huge_logits(backend):
    # Identical rows at T=0.05, and unnormalised rows whose logits reach ~1e4: exp would overflow
    # without the running max.
    v = torch.randn(1, 64)
    q, k, queue = v.repeat(7, 1), v.repeat(7, 1), F.normalize(v, dim=1).repeat(300, 1)
    ref_loss, ref_grads = loss_and_grads(lambda a, b: info_nce_reference(a, b, queue.double(), 0.05),
                                         q.double(), k.double())
    loss, grads = loss_and_grads(lambda a, b: info_nce(a, b, queue, 0.05, backend=backend), q, k)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)

    big_q, big_k = 10 * torch.randn(7, 64), 10 * torch.randn(7, 64)
    big_queue = 10 * torch.randn(300, 64)
    ref_loss, ref_grads = loss_and_grads(
        lambda a, b: info_nce_reference(a, b, big_queue.double(), 0.05, normalize=False),
        big_q.double(), big_k.double())
    loss, grads = loss_and_grads(lambda a, b: info_nce(a, b, big_queue, 0.05, normalize=False, backend=backend),
                                 big_q, big_k)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    # float32 logits of this size are only known to eps * |logit|; that bounds what any backend can do.
    tol = 16 * EPS32 * float((big_q.double() @ big_queue.double().T).abs().max()) / 0.05
    assert abs(float(loss - ref_loss)) <= tol
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= tol


def test_kernel_core_small_tiles_many_splits():
    """The Triton core itself with tiles far smaller than the problem: many row tiles, key tiles per
    split, several splits, D walked in ragged chunks; against float64 formulas."""
    from advfast.kernels import contrastive as kern

    M, N, D, scale = 21, 50, 40, 4.0  # 2 row tiles, 4 key tiles over 2 splits, D in chunks of 32 + 8
    q, keys = torch.randn(M, D), torch.randn(N, D)
    g = torch.rand(M)
    tiles = dict(num_splits=2, block_m=16, block_n=16, block_d=32)
    lse, pos = kern.lse_forward(q, keys, scale, **tiles)
    s = q.double() @ keys.double().T * scale
    assert pos is None
    assert rel_err(lse.double(), torch.logsumexp(s, 1)) <= 1e-6
    dq, dk = kern.lse_backward(q, keys, scale, lse, g, need_dk=True, **tiles)
    ds = torch.softmax(s, 1) * g.double()[:, None] * scale
    assert rel_err(dq.double(), ds @ keys.double()) <= 1e-5
    assert rel_err(dk.double(), ds.T @ q.double()) <= 1e-5


def test_auto_picks_by_device_and_size(monkeypatch):
    f32, f64 = torch.float32, torch.float64
    assert C._pick_backend("info_nce", "auto", torch.device("cpu"), 10, f32) == "torch"
    if C.resolve("info_nce", "auto", torch.device("cuda"), C.IMPLEMENTED) == "triton":  # Triton importable
        assert C._pick_backend("info_nce", "auto", torch.device("cuda"), 10, f32) == "triton"
        # the kernels accumulate in float32 and their dots do not compile for float64 operands
        assert C._pick_backend("info_nce", "auto", torch.device("cuda"), 10, f64) == "torch"
    monkeypatch.setattr(C, "CHUNKED_AUTO_MIN_LOGITS", 100)
    assert C._pick_backend("info_nce", "auto", torch.device("cpu"), 1000, f32) == "torch-chunked"
    q, k, queue = torch.randn(4, 8), torch.randn(4, 8), torch.randn(50, 8)
    torch.testing.assert_close(info_nce(q, k, queue), info_nce(q, k, queue, backend="torch"))


@pytest.mark.parametrize("with_queue", [True, False])
def test_float64_keeps_float64_accuracy(with_queue, small_chunks):
    q, k = torch.randn(37, 64, dtype=torch.float64), torch.randn(37, 64, dtype=torch.float64)
    queue = F.normalize(torch.randn(101, 64, dtype=torch.float64), dim=1) if with_queue else None
    ref_loss, ref_grads = loss_and_grads(lambda a, b: info_nce_reference(a, b, queue, 0.05), q, k)
    loss, grads = loss_and_grads(lambda a, b: info_nce(a, b, queue, 0.05, backend="torch-chunked"), q, k)
    assert abs(float(loss - ref_loss)) <= 1e-12 * float(ref_loss.abs())
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-12, rel_err(g, r)
    with pytest.raises(TypeError, match="float64"):
        info_nce(q, k, queue, backend="triton")


_X = torch.randn(4, 8)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=_X, k=torch.randn(5, 8)), ValueError, "k must have the shape of q"),
    (dict(q=torch.randn(8), k=torch.randn(8)), ValueError, "q must be 2-D"),
    (dict(q=_X, k=_X, queue=torch.randn(10, 9)), ValueError, "queue must be"),
    (dict(q=_X, k=_X, queue=torch.randn(10)), ValueError, "queue must be 2-D"),
    (dict(q=_X.long(), k=_X.long()), TypeError, "q must be a floating-point"),
    (dict(q=[[1.0]], k=_X), TypeError, "q must be a torch.Tensor"),
    (dict(q=_X, k=_X, temperature=0.0), ValueError, "temperature must be a positive"),
    (dict(q=_X, k=_X, temperature=-0.2), ValueError, "temperature must be a positive"),
    (dict(q=_X, k=_X, temperature=float("nan")), ValueError, "temperature must be a positive"),
    (dict(q=_X, k=_X, temperature="0.2"), TypeError, "temperature"),
    (dict(q=_X, k=_X, normalize=1), TypeError, "normalize"),
    (dict(q=_X, k=_X, backend="cuda"), ValueError, "unknown backend 'cuda'"),
    (dict(q=_X, k=_X, backend=None), TypeError, "backend must be a string"),
])
def test_bad_input_names_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        info_nce(**kwargs)


# Compilation for real GPUs (every launcher variant, sm_80 and sm_90): tests/test_triton_aot.py.


# ----------------------------------------------------------------------------------------------
# GPU: the real kernels at MoCo scale.


def _peak_extra(fn, *inputs):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = loss_and_grads(fn, *inputs)
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large_queue_accuracy_and_memory(dtype):
    B, K, D, T = 256, 65536, 128, 0.2
    q, k = torch.randn(B, D, device="cuda"), torch.randn(B, D, device="cuda")
    queue = F.normalize(torch.randn(K, D, device="cuda"), dim=1)
    ref_loss, ref_grads = loss_and_grads(lambda a, b: info_nce_reference(a, b, queue.double(), T),
                                         q.double(), k.double())
    xs, qu = [x.to(dtype) for x in (q, k)], queue.to(dtype)
    (eager_loss, eager_grads), eager_mem = _peak_extra(lambda a, b: info_nce_reference(a, b, qu, T), *xs)
    (loss, grads), mem = _peak_extra(lambda a, b: info_nce(a, b, qu, T, backend="triton"), *xs)
    if dtype == torch.float32:
        tol = 32 * EPS32 / T
        assert abs(float(loss - ref_loss)) <= tol * float(ref_loss.abs())
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) <= tol
    else:
        ulp = 2.0 ** -8
        assert abs(float(loss - ref_loss)) <= 2 * abs(float(eager_loss - ref_loss)) + ulp * float(ref_loss.abs())
        for g, e, r in zip(grads, eager_grads, ref_grads):
            assert rel_err(g, r) <= 2 * rel_err(e, r) + ulp
    assert mem <= 0.25 * eager_mem, f"peak extra memory {mem} B vs eager {eager_mem} B"


@pytest.mark.gpu
def test_gpu_in_batch_negatives_match_reference():
    B, D, T = 512, 128, 0.1
    q, k = torch.randn(B, D, device="cuda"), torch.randn(B, D, device="cuda")
    ref_loss, ref_grads = loss_and_grads(lambda a, b: info_nce_reference(a, b, None, T), q.double(), k.double())
    loss, grads = loss_and_grads(lambda a, b: info_nce(a, b, None, T, backend="triton"), q, k)
    tol = 32 * EPS32 / T
    assert abs(float(loss - ref_loss)) <= tol * float(ref_loss.abs())
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= tol
