"""The compiled extension advfast._C: loading, op registration, opcheck, torch.compile, argument
checks, and a self-check of the cpp kernels against a float64 transcription of the op semantics.

The full numerical suite over every backend lives with the Python wrappers (advfast.ops); this file
checks the raw torch.ops.advfast ops so that a build problem shows up here first.
"""

import os
import shutil
import subprocess

import pytest
import torch

from advfast import _ext

pytestmark = pytest.mark.skipif(
    not _ext.has_extension(), reason=f"advfast._C is not built: {_ext.extension_error()}"
)

LINF, L2 = 0, 1


def ops():
    return torch.ops.advfast


# --- float64 transcription of the semantics (docs/ARCHITECTURE.md, issue 2) ---------------------

def pgd_step_ref(x_adv, x_nat, grad, eps, alpha, norm, lower, upper):
    xa, xn, g = x_adv.double(), x_nat.double(), grad.double()
    view = (-1,) + (1,) * (xa.dim() - 1)
    e, a = eps.double().view(view), alpha.double().view(view)
    if norm == LINF:
        x = xa + a * g.sign()
    else:
        gn = g.flatten(1).norm(dim=1).view(view)
        x = xa + a * torch.where(gn > 0, g / gn.clamp_min(1e-300), torch.zeros_like(g))
    d = x - xn
    if norm == LINF:
        d = torch.maximum(torch.minimum(d, e), -e)
    else:
        dn = d.flatten(1).norm(dim=1).view(view)
        d = d * torch.where(dn > e, e / dn.clamp_min(1e-300), torch.ones_like(dn))
    return (xn + d).clamp(lower, upper)


def ema_ref(e, s, m):
    if not e.is_floating_point():
        return s.clone()
    return (m * e.double() + (1 - m) * s.double()).to(e.dtype)


def make_pgd_inputs(shape, x_dtype=torch.float32, g_dtype=torch.float32, channels_last=False,
                    zero_grad_rows=()):
    b = shape[0]
    x_nat = torch.rand(shape, dtype=torch.float64)
    r_dtype = torch.float64 if x_dtype == torch.float64 else torch.float32  # radii in the compute dtype
    eps = torch.rand(b, dtype=r_dtype) * 0.1 + 0.01
    alpha = eps * torch.rand(b, dtype=r_dtype)
    # start inside, on and outside the ball so both projection branches run
    x_adv = (x_nat + 0.15 * (torch.rand(shape, dtype=torch.float64) * 2 - 1)).clamp(0, 1)
    grad = torch.randn(shape, dtype=torch.float64)
    grad[grad.abs() < 0.05] = 0  # exact zeros: sign(0) = 0
    for r in zero_grad_rows:
        grad[r] = 0
    out = [x_adv.to(x_dtype), x_nat.to(x_dtype), grad.to(g_dtype)]
    if channels_last:
        out = [t.contiguous(memory_format=torch.channels_last) for t in out]
    return (*out, eps, alpha)


def tol(x_dtype):
    return {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[x_dtype]


# --- loading and registration --------------------------------------------------------------------

def test_extension_registers_ops():
    assert _ext.extension_error() is None
    for name in ("built_with_cuda", "pgd_step_", "ema_update_"):
        assert hasattr(torch.ops.advfast, name)


def test_built_with_cuda_matches_cuda_kernel_registration():
    built = ops().built_with_cuda()
    assert isinstance(built, bool)
    assert built == torch._C._dispatch_has_kernel_for_dispatch_key("advfast::pgd_step_", "CUDA")
    assert built == torch._C._dispatch_has_kernel_for_dispatch_key("advfast::ema_update_", "CUDA")
    assert built == _ext.extension_has_cuda()


# --- numerics of the cpp kernels ------------------------------------------------------------------

CASES = [
    # shape, x dtype, grad dtype, channels_last
    ((5, 3, 7, 9), torch.float32, torch.float32, False),
    ((5, 3, 7, 9), torch.float32, torch.bfloat16, True),
    ((4, 3, 11, 13), torch.float32, torch.float16, True),
    ((3, 1037), torch.float32, torch.float32, False),
    ((2, 3, 150, 151), torch.float32, torch.bfloat16, False),  # > 1 parallel span per sample
    ((1, 2, 5, 5), torch.float32, torch.float32, True),
    ((6, 33), torch.float64, torch.float32, False),
    ((6, 3, 5, 7), torch.bfloat16, torch.bfloat16, True),
    ((6, 3, 5, 7), torch.float16, torch.float32, False),
]


@pytest.mark.parametrize("norm", [LINF, L2], ids=["linf", "l2"])
@pytest.mark.parametrize("shape,x_dtype,g_dtype,channels_last", CASES)
def test_pgd_step_matches_float64_reference(shape, x_dtype, g_dtype, channels_last, norm):
    x_adv, x_nat, grad, eps, alpha = make_pgd_inputs(shape, x_dtype, g_dtype, channels_last,
                                                     zero_grad_rows=(0,))
    expected = pgd_step_ref(x_adv, x_nat, grad, eps, alpha, norm, 0.0, 1.0)
    ptr, strides = x_adv.data_ptr(), x_adv.stride()
    ops().pgd_step_(x_adv, x_nat, grad, eps, alpha, norm, 0.0, 1.0)
    assert x_adv.data_ptr() == ptr and x_adv.stride() == strides  # in place, layout kept
    torch.testing.assert_close(x_adv.double(), expected, rtol=0, atol=tol(x_dtype))
    # properties: inside the eps-ball (up to rounding) and inside [lower, upper]
    d = (x_adv.double() - x_nat.double()).flatten(1)
    size = d.abs().amax(1) if norm == LINF else d.norm(dim=1)
    assert (size <= eps.double() * (1 + 1e-5) + tol(x_dtype)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("norm", [LINF, L2], ids=["linf", "l2"])
def test_pgd_step_non_dense_and_mixed_layouts(norm):
    # x_adv a strided view (fallback path, written back); x_nat channels_last; grad contiguous
    base = torch.rand(4, 3, 9, 22)
    x_adv = base[:, :, :, ::2]
    x_nat = (x_adv + 0.05 * torch.randn_like(x_adv)).clamp(0, 1).contiguous(
        memory_format=torch.channels_last)
    grad = torch.randn(4, 3, 9, 11)
    eps, alpha = torch.full((4,), 0.03), torch.full((4,), 0.01)
    expected = pgd_step_ref(x_adv, x_nat, grad, eps, alpha, norm, 0.1, 0.9)
    untouched = base[:, :, :, 1::2].clone()
    ops().pgd_step_(x_adv, x_nat, grad, eps, alpha, norm, 0.1, 0.9)
    torch.testing.assert_close(x_adv.double(), expected, rtol=0, atol=2e-6)
    assert torch.equal(base[:, :, :, 1::2], untouched)


def test_pgd_step_l2_zero_gradient_takes_no_step():
    x_nat = torch.rand(3, 50)
    x_adv = x_nat + 0.001 * torch.randn(3, 50)
    x_adv.clamp_(0, 1)
    start = x_adv.clone()
    ops().pgd_step_(x_adv, x_nat, torch.zeros(3, 50), torch.full((3,), 0.5), torch.full((3,), 0.1),
                    L2, 0.0, 1.0)
    assert torch.isfinite(x_adv).all()
    torch.testing.assert_close(x_adv, start, rtol=0, atol=1e-7)


def test_ema_update_matches_reference_mixed_dtypes_and_shapes():
    m = float(torch.rand(()))
    shapes = [(7,), (3, 5, 2), (1000,), (4, 4), (70001,), ()]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float32, torch.float32]
    ema = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    src = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    ema.append(torch.tensor(3, dtype=torch.int64))  # BatchNorm num_batches_tracked: copied
    src.append(torch.tensor(11, dtype=torch.int64))
    ema.append(torch.randn(6, 4).t())  # non-contiguous pair with different strides: fallback
    src.append(torch.randn(4, 6))
    ema.append(torch.zeros(0))
    src.append(torch.zeros(0))
    expected = [ema_ref(e, s, m) for e, s in zip(ema, src)]
    ops().ema_update_(ema, src, m)
    for e, x in zip(ema, expected):
        atol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(e.dtype, 1e-6)
        torch.testing.assert_close(e, x, rtol=0, atol=atol)


@pytest.mark.parametrize("m", [0.0, 1.0])
def test_ema_update_endpoints_are_exact(m):
    ema = [torch.randn(33), torch.randn(5, 5, dtype=torch.bfloat16)]
    src = [torch.randn(33), torch.randn(5, 5, dtype=torch.bfloat16)]
    expected = [s.clone() for s in src] if m == 0.0 else [e.clone() for e in ema]
    ops().ema_update_(ema, src, m)
    for e, x in zip(ema, expected):
        assert torch.equal(e, x)


# --- registration consistency: opcheck and torch.compile ------------------------------------------

@pytest.mark.parametrize("norm", [LINF, L2], ids=["linf", "l2"])
def test_opcheck_pgd_step(norm):
    x_adv, x_nat, grad, eps, alpha = make_pgd_inputs((3, 3, 5, 6), g_dtype=torch.bfloat16,
                                                     channels_last=True)
    torch.library.opcheck(ops().pgd_step_.default, (x_adv, x_nat, grad, eps, alpha, norm, 0.0, 1.0))


def test_opcheck_ema_update():
    ema = [torch.randn(4, 3), torch.randn(5, dtype=torch.float64), torch.tensor(2)]
    src = [torch.randn(4, 3), torch.randn(5, dtype=torch.float64), torch.tensor(5)]
    torch.library.opcheck(ops().ema_update_.default, (ema, src, 0.9))


def test_ops_run_under_torch_compile_fullgraph():
    torch._dynamo.reset()

    def step(x_adv, x_nat, grad, eps, alpha, ema, src):
        torch.ops.advfast.pgd_step_(x_adv, x_nat, grad, eps, alpha, 0, 0.0, 1.0)
        torch.ops.advfast.ema_update_(ema, src, 0.5)
        return x_adv * 1.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x_adv, x_nat, grad, eps, alpha = make_pgd_inputs((4, 3, 5, 5))
    ema, src = [torch.randn(6), torch.randn(2, 3)], [torch.randn(6), torch.randn(2, 3)]
    expected_x = pgd_step_ref(x_adv, x_nat, grad, eps, alpha, LINF, 0.0, 1.0)
    expected_ema = [ema_ref(e, s, 0.5) for e, s in zip(ema, src)]
    out = compiled(x_adv, x_nat, grad, eps, alpha, ema, src)
    torch.testing.assert_close(out.double(), expected_x, rtol=0, atol=2e-6)
    torch.testing.assert_close(x_adv.double(), expected_x, rtol=0, atol=2e-6)  # mutation kept
    for e, x in zip(ema, expected_ema):
        torch.testing.assert_close(e, x)


# --- argument checks -------------------------------------------------------------------------------

def _good():
    return [torch.rand(2, 3), torch.rand(2, 3), torch.randn(2, 3), torch.full((2,), 0.1),
            torch.full((2,), 0.01), 0, 0.0, 1.0]


@pytest.mark.parametrize("index,value,exc,match", [
    (1, torch.rand(2, 4), ValueError, "x_nat has shape"),
    (2, torch.rand(3, 3), ValueError, "grad has shape"),
    (1, torch.rand(2, 3, dtype=torch.float64), TypeError, "x_nat has dtype"),
    (0, torch.zeros(2, 3, dtype=torch.int64), TypeError, "x_adv must be float32"),
    (2, torch.zeros(2, 3, dtype=torch.int32), TypeError, "grad must be float32"),
    (3, torch.full((3,), 0.1), ValueError, r"eps must have shape \(B,\)"),
    (4, torch.full((2,), 1, dtype=torch.float64), TypeError, "alpha must be a torch.float32"),
    (5, 2, ValueError, "norm must be 0"),
    (7, -1.0, ValueError, "lower must be <= upper"),
])
def test_pgd_step_rejects_bad_arguments(index, value, exc, match):
    args = _good()
    args[index] = value
    with pytest.raises(exc, match=match):
        ops().pgd_step_(*args)


def test_pgd_step_radii_come_in_the_compute_dtype():
    x = [torch.rand(2, 3, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64), torch.randn(2, 3)]
    with pytest.raises(TypeError, match=r"eps must be a torch.float64 tensor of shape \(B,\) for torch.float64 x_adv"):
        ops().pgd_step_(*x, torch.full((2,), 0.1), torch.full((2,), 0.01), 0, 0.0, 1.0)
    ops().pgd_step_(*x, torch.full((2,), 0.1, dtype=torch.float64), torch.full((2,), 0.01, dtype=torch.float64),
                    0, 0.0, 1.0)


def test_pgd_step_rejects_zero_dim_and_meta_mismatch():
    with pytest.raises(ValueError, match="batch dimension"):
        ops().pgd_step_(torch.tensor(0.5), torch.tensor(0.5), torch.tensor(1.0),
                        torch.full((1,), 0.1), torch.full((1,), 0.1), 0, 0.0, 1.0)
    meta = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in _good()]
    meta[1] = torch.empty(2, 5, device="meta")
    with pytest.raises(ValueError, match="x_nat has shape"):
        ops().pgd_step_(*meta)


@pytest.mark.parametrize("ema,src,m,exc,match", [
    ([torch.zeros(3)], [torch.zeros(3), torch.zeros(3)], 0.9, ValueError, "same length"),
    ([torch.zeros(3)], [torch.zeros(4)], 0.9, ValueError, r"ema\[0\] has shape"),
    ([torch.zeros(3)], [torch.zeros(3, dtype=torch.float64)], 0.9, TypeError, r"ema\[0\] has dtype"),
    ([torch.zeros(3)], [torch.zeros(3)], 1.5, ValueError, "momentum must be in"),
    ([torch.zeros(3, dtype=torch.complex64)], [torch.zeros(3, dtype=torch.complex64)], 0.9, TypeError,
     "supported are"),
])
def test_ema_update_rejects_bad_arguments(ema, src, m, exc, match):
    with pytest.raises(exc, match=match):
        ops().ema_update_(ema, src, m)


# --- what the CUDA build carries (no GPU needed) -------------------------------------------------

def _cuobjdump() -> str | None:
    """cuobjdump: on PATH, in a CUDA toolkit (CUDA_HOME, /usr/local/cuda), or the one Triton ships
    (triton/backends/nvidia/bin; a minimal toolkit may lack it, torch's Linux wheels bring Triton)."""
    import importlib.util

    triton = importlib.util.find_spec("triton")
    bundled = (os.path.join(os.path.dirname(triton.origin), "backends", "nvidia", "bin", "cuobjdump")
               if triton is not None and triton.origin else None)
    for candidate in (shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "cuobjdump"),
                      "/usr/local/cuda/bin/cuobjdump", bundled):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def test_cuda_build_carries_sass_for_sm80_sm90_and_ptx_for_newer_gpus():
    # default TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX": a GPU newer than sm_90 JIT-compiles the sm_90 PTX
    # instead of failing with "no kernel image is available"
    if not _ext.extension_has_cuda():
        pytest.skip("advfast._C was built without its CUDA kernels (no CUDA toolkit or a CPU build of torch "
                    "at build time): no device code to check")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump (CUDA toolkit or Triton) not found: put it on PATH")
    import advfast._C as ext

    def listing(flag):
        proc = subprocess.run([tool, flag, ext.__file__], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{tool} {flag} failed: {proc.stderr.strip()}"
        return proc.stdout

    ptx, elf = listing("--list-ptx"), listing("--list-elf")
    assert ".ptx" in ptx, f"advfast._C carries no PTX (rebuild with TORCH_CUDA_ARCH_LIST ending in +PTX):\n{ptx}"
    if os.environ.get("TORCH_CUDA_ARCH_LIST") is None:  # the default build
        assert "sm_90" in ptx, ptx
        assert "sm_80" in elf and "sm_90" in elf, elf


# --- CUDA kernels (run where a GPU is present) ---------------------------------------------------

needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.extension_has_cuda()),
    reason="needs a CUDA GPU and advfast._C built with its CUDA kernels")

CUDA_CASES = CASES + [
    ((3, 3, 224, 224), torch.float32, torch.bfloat16, True),  # split l2 path (> 16384 per sample)
    ((7, 3, 33, 31), torch.float32, torch.float32, False),    # sample % 4 != 0: scalar path
    ((5, 6), torch.float32, torch.float64, False),            # float64 grad is cast on the way in
]


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("norm", [LINF, L2], ids=["linf", "l2"])
@pytest.mark.parametrize("shape,x_dtype,g_dtype,channels_last", CUDA_CASES)
def test_cuda_pgd_step_matches_float64_reference(shape, x_dtype, g_dtype, channels_last, norm):
    inputs = make_pgd_inputs(shape, x_dtype, g_dtype, channels_last, zero_grad_rows=(0,))
    x_adv, x_nat, grad, eps, alpha = (t.cuda() for t in inputs)
    expected = pgd_step_ref(*inputs, norm, 0.0, 1.0)
    ops().pgd_step_(x_adv, x_nat, grad, eps, alpha, norm, 0.0, 1.0)
    torch.testing.assert_close(x_adv.double().cpu(), expected, rtol=0, atol=tol(x_dtype))


@pytest.mark.gpu
@needs_cuda_kernels
def test_cuda_pgd_step_unaligned_views_and_graph_capture():
    base = torch.rand(4 * 3 * 8 * 8 + 1, device="cuda")
    x_adv = base[1:].view(4, 3, 8, 8)  # 4-byte offset: no 128-bit loads
    x_nat = x_adv.clone()
    grad = torch.randn_like(x_adv)
    eps, alpha = torch.full((4,), 0.05, device="cuda"), torch.full((4,), 0.01, device="cuda")
    expected = pgd_step_ref(x_adv.cpu(), x_nat.cpu(), grad.cpu(), eps.cpu(), alpha.cpu(), L2, 0.0, 1.0)
    graph = torch.cuda.CUDAGraph()
    start = x_adv.clone()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        ops().pgd_step_(x_adv, x_nat, grad, eps, alpha, L2, 0.0, 1.0)
    x_adv.copy_(start)
    graph.replay()
    torch.testing.assert_close(x_adv.double().cpu(), expected, rtol=0, atol=2e-6)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("count", [5, 300], ids=["one-small-batch", "large-batch"])
def test_cuda_ema_update_matches_reference(count):
    m = 0.99
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    ema, src = [], []
    for i in range(count):
        n = int(torch.randint(1, 9000, ()))
        d = dtypes[i % 4]
        ema.append(torch.randn(n, dtype=d, device="cuda"))
        src.append(torch.randn(n, dtype=d, device="cuda"))
    ema.append(torch.tensor(4, device="cuda"))
    src.append(torch.tensor(8, device="cuda"))
    big = torch.randn(2 * 70001 + 1, device="cuda")
    ema.append(big[1:70002])  # unaligned view
    src.append(torch.randn(70001, device="cuda"))
    expected = [ema_ref(e.cpu(), s.cpu(), m) for e, s in zip(ema, src)]
    ops().ema_update_(ema, src, m)
    for e, x in zip(ema, expected):
        atol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(e.dtype, 1e-6)
        torch.testing.assert_close(e.cpu(), x, rtol=0, atol=atol)
