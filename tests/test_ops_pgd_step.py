"""pgd_step / pgd_step_ / random_start: every available backend against the float64 torch reference.

Without a GPU the triton backend runs under TRITON_INTERPRET=1 (set by tests/conftest.py), so the
sizes stay small; cpp and cuda skip with the reason the dispatcher gives when they cannot run.
"""

import math

import pytest
import torch

from advfast.ops import _dispatch, pgd_step, pgd_step_, random_start
from advfast.ops.pgd_step import pgd_step_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch", "triton", "cpp", "cuda"]
# (B, ...) shapes: ragged sample sizes, and 5000 > the 4096-element Triton block (several blocks per sample).
SHAPES = [(1, 3, 5, 7), (3, 3, 32, 32), (7, 1001), (3, 5000)]
# Largest error against the float64 reference, by dtype of x (half outputs: one rounding of ~[0, 1] values).
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2 ** -8 + 1e-6, torch.float16: 2 ** -11 + 1e-6}


def need(backend):
    reason = _dispatch.unavailable_reason(backend, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    return backend


def make_inputs(shape, norm, per_sample, x_dtype=torch.float32, g_dtype=torch.float32,
                memory_format=torch.contiguous_format):
    """x_nat in [0, 1]; x_adv around it (some samples outside the ball); grad with exact zeros."""
    b = shape[0]
    if norm == "linf":
        eps = torch.rand(b, device=DEVICE) * 0.1 if per_sample else 8 / 255
        alpha = torch.rand(b, device=DEVICE) * 0.05 if per_sample else 2 / 255
    else:
        eps = torch.rand(b, device=DEVICE) * 2.0 if per_sample else 0.5
        alpha = torch.rand(b, device=DEVICE) * 1.0 if per_sample else 0.3
    if per_sample and b > 1:
        eps[0] = 0.0  # a zero radius pins the sample to x_nat
        alpha[-1] = 0.0
    x_nat = torch.rand(shape, device=DEVICE, dtype=torch.float64)
    eps64 = (eps if isinstance(eps, torch.Tensor) else torch.full((b,), eps, device=DEVICE)).double()
    view = (b,) + (1,) * (len(shape) - 1)
    if norm == "linf":
        delta = (torch.rand_like(x_nat) * 2 - 1) * 1.5 * eps64.view(view)
    else:
        z = torch.randn_like(x_nat)
        delta = z / z.flatten(1).norm(dim=1).view(view) * torch.rand(view, device=DEVICE, dtype=torch.float64) \
            * 1.5 * eps64.view(view)
    x_adv = (x_nat + delta).clamp(0, 1)
    grad = torch.randn(shape, device=DEVICE, dtype=torch.float64) * 10 ** float(torch.empty(()).uniform_(-3, 1))
    grad[torch.rand(shape, device=DEVICE) < 0.1] = 0.0

    def cast(t, dtype):
        return t.to(dtype).contiguous(memory_format=memory_format)

    return cast(x_adv, x_dtype), cast(x_nat, x_dtype), cast(grad, g_dtype), eps, alpha


def reference64(x_adv, x_nat, grad, eps, alpha, norm, lower=0.0, upper=1.0):
    e = eps.double() if isinstance(eps, torch.Tensor) else eps
    a = alpha.double() if isinstance(alpha, torch.Tensor) else alpha
    return pgd_step_reference(x_adv.double(), x_nat.double(), grad.double(), e, a, norm, lower, upper)


def assert_in_ball_and_box(out, x_nat, eps, norm, lower=0.0, upper=1.0, tol=1e-6):
    b = out.shape[0]
    eps_t = (eps if isinstance(eps, torch.Tensor) else torch.full((b,), eps, device=out.device)).double()
    d = (out.double() - x_nat.double()).flatten(1)
    if norm == "linf":
        assert bool((d.abs().amax(dim=1) <= eps_t + tol).all())
    else:
        # per-element rounding of the output adds up to tol * sqrt(elements) in l2
        assert bool((d.norm(dim=1) <= eps_t * (1 + 1e-5) + tol * d.shape[1] ** 0.5).all())
    assert float(out.min()) >= lower and float(out.max()) <= upper


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_matches_float64_reference(backend, shape, norm, per_sample):
    need(backend)
    x_adv, x_nat, grad, eps, alpha = make_inputs(shape, norm, per_sample)
    ref = reference64(x_adv, x_nat, grad, eps, alpha, norm)
    before = x_adv.clone()
    out = pgd_step(x_adv, x_nat, grad, eps, alpha, norm=norm, backend=backend)
    assert torch.equal(x_adv, before), "pgd_step must not modify x_adv"
    assert out.dtype == x_adv.dtype and out.shape == x_adv.shape
    torch.testing.assert_close(out.double(), ref, atol=ATOL[torch.float32], rtol=0)
    assert_in_ball_and_box(out, x_nat, eps, norm)

    ret = pgd_step_(x_adv, x_nat, grad, eps, alpha, norm=norm, backend=backend)
    assert ret is x_adv
    torch.testing.assert_close(x_adv, out, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_dtypes(backend, x_dtype, g_dtype, norm):
    need(backend)
    x_adv, x_nat, grad, eps, alpha = make_inputs((3, 3, 9, 11), norm, per_sample=True, x_dtype=x_dtype,
                                                 g_dtype=g_dtype)
    ref = reference64(x_adv, x_nat, grad, eps, alpha, norm)
    out = pgd_step_(x_adv.clone(), x_nat, grad, eps, alpha, norm=norm, backend=backend)
    assert out.dtype == x_dtype
    torch.testing.assert_close(out.double(), ref, atol=ATOL[x_dtype], rtol=0)
    assert_in_ball_and_box(out, x_nat, eps, norm, tol=ATOL[x_dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_steps(backend):
    """Worked examples, independent of the reference (which is also the torch backend)."""
    need(backend)
    x_nat = torch.zeros(3, 2, device=DEVICE)
    x_adv = torch.tensor([[0.3, 0.4], [0.1, 0.0], [0.2, -0.1]], device=DEVICE)
    grad = torch.tensor([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]], device=DEVICE)
    free = dict(lower=-math.inf, upper=math.inf, backend=backend)
    # l2: step 0.5 along grad/|grad| = (0.6, 0.8) gives (0.6, 0.8), |.| = 1 > eps = 0.5, rescaled to
    # (0.3, 0.4); the second stays inside the ball at (0.1, 0.2); a zero gradient does not move.
    out = pgd_step(x_adv, x_nat, grad, 0.5, torch.tensor([0.5, 0.2, 0.3], device=DEVICE), norm="l2", **free)
    torch.testing.assert_close(out, torch.tensor([[0.3, 0.4], [0.1, 0.2], [0.2, -0.1]], device=DEVICE))
    # linf: +-alpha per coordinate (none where the gradient is 0), clamped to x_nat +- eps, then the box
    out = pgd_step(x_adv, x_nat, grad, 0.35, 0.1, norm="linf", **free)
    torch.testing.assert_close(out, torch.tensor([[0.35, 0.35], [0.1, 0.1], [0.2, -0.1]], device=DEVICE))
    out = pgd_step(x_adv, x_nat, -grad, 0.35, 0.1, norm="linf", lower=0.0, upper=1.0, backend=backend)
    torch.testing.assert_close(out, torch.tensor([[0.2, 0.3], [0.1, 0.0], [0.2, 0.0]], device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_float64_with_float_radii_keeps_float64_accuracy(backend, norm):
    """Python-float eps/alpha (8/255 is not a float32 number) must not be rounded to float32."""
    need(backend)
    x_adv, x_nat, grad, _, _ = make_inputs((3, 3, 9, 11), norm, per_sample=False, x_dtype=torch.float64,
                                           g_dtype=torch.float64)
    eps, alpha = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.3)
    ref = reference64(x_adv, x_nat, grad, eps, alpha, norm)
    out = pgd_step(x_adv, x_nat, grad, eps, alpha, norm=norm, backend=backend)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float64], rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
def test_channels_last_keeps_layout(backend, norm, grad_layout):
    need(backend)
    cl = torch.channels_last
    x_adv, x_nat, grad, eps, alpha = make_inputs((3, 5, 6, 7), norm, per_sample=True, memory_format=cl)
    if grad_layout == "contiguous":
        grad = grad.contiguous()
    ref = reference64(x_adv, x_nat, grad, eps, alpha, norm)
    out = pgd_step(x_adv, x_nat, grad, eps, alpha, norm=norm, backend=backend)
    assert out.is_contiguous(memory_format=cl)
    torch.testing.assert_close(out.double(), ref, atol=ATOL[torch.float32], rtol=0)
    pgd_step_(x_adv, x_nat, grad, eps, alpha, norm=norm, backend=backend)
    assert x_adv.is_contiguous(memory_format=cl)
    torch.testing.assert_close(x_adv.double(), ref, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_strided_view_in_place(backend, norm):
    """x_adv a view whose samples are not memory blocks: the step lands in the view, values exact."""
    need(backend)
    x_adv, x_nat, grad, eps, alpha = make_inputs((4, 3, 6, 5), norm, per_sample=False)
    storage = x_adv.transpose(0, 1).contiguous()  # (3, 4, 6, 5): batch is not the outer dimension
    view = storage.transpose(0, 1)
    assert view.stride(0) * view.shape[0] != view.numel()
    ref = reference64(x_adv, x_nat, grad, eps, alpha, norm)
    pgd_step_(view, x_nat, grad, eps, alpha, norm=norm, backend=backend)
    torch.testing.assert_close(view.double(), ref, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_gradient_stays_put(backend, norm):
    need(backend)
    x_adv, x_nat, _, _, _ = make_inputs((3, 2, 7, 7), norm, per_sample=False)
    eps = 10.0  # x_adv is inside this ball, so nothing may move it
    out = pgd_step(x_adv, x_nat, torch.zeros_like(x_adv), eps, 0.5, norm=norm, backend=backend)
    assert not bool(out.isnan().any())
    # torch and triton return x bit for bit; a kernel computing x_nat + (x - x_nat) may round once.
    torch.testing.assert_close(out, x_adv, atol=2 ** -23, rtol=0)


# cuda keeps float32 sums for non-double x (docs/kernels.md): a float32 |g|^2 below ~1e-45 takes no step there
@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
def test_l2_step_for_a_gradient_whose_float32_sum_of_squares_underflows(backend):
    """|g| ~ 1e-24: every g*g is below float32's smallest subnormal, yet the direction is well
    defined and every backend must take the full step alpha * g / ||g|| (no flush-to-zero norm)."""
    need(backend)
    x_nat = torch.rand(3, 2, 9, 9, device=DEVICE)
    x_adv = x_nat.clone()
    grad = torch.randn(3, 2, 9, 9, device=DEVICE) * 1e-24
    grad[1] = 0.0  # and a zero gradient next to it still stays put
    ref = pgd_step_reference(x_adv.double(), x_nat.double(), grad.double(), 0.5, 0.1, "l2", -10.0, 10.0)
    out = pgd_step(x_adv, x_nat, grad, 0.5, 0.1, norm="l2", lower=-10.0, upper=10.0, backend=backend)
    moved = (out.double() - x_adv.double()).flatten(1).norm(dim=1)
    assert torch.allclose(moved, torch.tensor([0.1, 0.0, 0.1], dtype=torch.float64, device=DEVICE), atol=1e-6)
    torch.testing.assert_close(out.double(), ref, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_custom_bounds_and_empty_batch(backend, norm):
    need(backend)
    x_adv, x_nat, grad, eps, alpha = make_inputs((3, 4, 5), norm, per_sample=True)
    lower, upper = 0.2, 0.7
    x_nat = x_nat.clamp(lower, upper)
    ref = reference64(x_adv, x_nat, grad, eps, alpha, norm, lower, upper)
    out = pgd_step(x_adv, x_nat, grad, eps, alpha, norm=norm, lower=lower, upper=upper, backend=backend)
    torch.testing.assert_close(out.double(), ref, atol=ATOL[torch.float32], rtol=0)
    assert_in_ball_and_box(out, x_nat, eps, norm, lower, upper)
    # no box at all
    ref = reference64(x_adv, x_nat, grad, eps, alpha, norm, -math.inf, math.inf)
    out = pgd_step(x_adv, x_nat, grad, eps, alpha, norm=norm, lower=-math.inf, upper=math.inf, backend=backend)
    torch.testing.assert_close(out.double(), ref, atol=ATOL[torch.float32], rtol=0)

    empty = torch.empty((0, 3, 4), device=DEVICE)
    assert pgd_step(empty, empty, empty, 0.1, 0.1, norm=norm, backend=backend).shape == (0, 3, 4)
    assert pgd_step_(empty, empty, empty, torch.empty(0, device=DEVICE), 0.1, norm=norm,
                     backend=backend) is empty


def test_auto_never_picks_the_interpreter():
    x = torch.rand(2, 3)
    out = pgd_step(x, x, torch.ones_like(x), 0.1, 0.05)  # auto on CPU: cpp or torch
    torch.testing.assert_close(out, (x + 0.05).clamp(max=1.0).clamp(max=x + 0.1))
    assert _dispatch.resolve("pgd_step", "auto", torch.device("cpu"), BACKENDS, BACKENDS) != "triton"


def test_under_torch_compile():
    """The torch path traces into one graph (fullgraph), in place and out of place."""
    def attack_step(x_adv, x_nat, grad, eps):
        pgd_step_(x_adv, x_nat, grad, eps, 0.05, norm="l2")
        return pgd_step(x_adv, x_nat, grad, eps, 2 / 255, norm="linf")

    compiled = torch.compile(attack_step, fullgraph=True, backend="aot_eager")
    x_adv, x_nat, grad, eps, _ = make_inputs((3, 3, 8, 8), "l2", per_sample=True)
    expected = attack_step(x_adv.clone(), x_nat, grad, eps)
    got = compiled(x_adv, x_nat, grad, eps)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_first_call_inside_a_cuda_graph_capture(backend):
    """A radius first seen during capture must not leave a never-filled cached vector for eager calls."""
    need(backend)
    x_adv, x_nat, grad, _, _ = make_inputs((4, 3, 8, 8), "linf", per_sample=False)
    eps = float(torch.rand(())) * 0.1 + 0.01  # a value no earlier test cached
    static = x_adv.clone()
    pgd_step(static, x_nat, grad, 2 * eps, eps, backend=backend)  # kernels loaded before the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            pgd_step_(static, x_nat, grad, eps, eps / 4, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    out = pgd_step(x_adv, x_nat, grad, eps, eps / 4, backend=backend)  # eager, before any replay
    torch.testing.assert_close(out.double(), reference64(x_adv, x_nat, grad, eps, eps / 4, "linf"),
                               atol=ATOL[torch.float32], rtol=0)


@pytest.mark.gpu
def test_triton_runs_on_a_gpu_that_is_not_the_current_one():
    """Triton launches on the current device; the ops must make the tensors' device current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from advfast.ops import ema_update_, info_nce

    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    x_adv, x_nat, grad = (torch.rand(3, 4, 5, device=dev) for _ in range(3))
    for norm in ("linf", "l2"):
        ref = reference64(x_adv, x_nat, grad, 0.1, 0.02, norm)
        out = pgd_step(x_adv, x_nat, grad, 0.1, 0.02, norm=norm, backend="triton")
        torch.testing.assert_close(out.double(), ref, atol=ATOL[torch.float32], rtol=0)
    ema, src = [torch.zeros(5000, device=dev)], [torch.ones(5000, device=dev)]
    ema_update_(ema, src, 0.25, backend="triton")
    torch.testing.assert_close(ema[0], torch.full_like(ema[0], 0.75))
    q, k, queue = torch.randn(8, 16, device=dev), torch.randn(8, 16, device=dev), torch.randn(40, 16, device=dev)
    torch.testing.assert_close(info_nce(q, k, queue, backend="triton"), info_nce(q, k, queue, backend="torch"),
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ errors

def _args():
    x = torch.rand(2, 3, 4)
    return dict(x_adv=x, x_nat=x.clone(), grad=torch.randn(2, 3, 4), eps=0.1, alpha=0.01)


@pytest.mark.parametrize("fn", [pgd_step, pgd_step_])
@pytest.mark.parametrize("change, error, name", [
    (dict(x_adv=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "x_adv"),
    (dict(x_adv=[[0.0]]), TypeError, "x_adv"),
    (dict(x_adv=torch.tensor(0.5), x_nat=torch.tensor(0.5), grad=torch.tensor(0.5)), ValueError, "x_adv"),
    (dict(x_nat=torch.rand(2, 3, 5)), ValueError, "x_nat"),
    (dict(x_nat=torch.rand(2, 3, 4, dtype=torch.float64)), TypeError, "x_nat"),
    (dict(x_nat=torch.rand(2, 3, 4, device="meta")), ValueError, "x_nat"),
    (dict(grad=torch.rand(2, 12)), ValueError, "grad"),
    (dict(grad=torch.ones(2, 3, 4, dtype=torch.int32)), TypeError, "grad"),
    (dict(grad=torch.rand(2, 3, 4, device="meta")), ValueError, "grad"),
    (dict(eps=-0.1), ValueError, "eps"),
    (dict(eps=math.nan), ValueError, "eps"),
    (dict(eps=math.inf), ValueError, "eps"),
    (dict(eps=True), TypeError, "eps"),
    (dict(eps="0.1"), TypeError, "eps"),
    (dict(eps=torch.full((3,), 0.1)), ValueError, "eps"),
    (dict(eps=torch.full((2, 1), 0.1)), ValueError, "eps"),
    (dict(eps=torch.tensor([0.1, -0.1])), ValueError, "eps"),
    (dict(eps=torch.tensor([0.1, math.inf])), ValueError, "eps"),
    (dict(eps=torch.tensor([1, 2])), TypeError, "eps"),
    (dict(eps=torch.full((2,), 0.1, device="meta")), ValueError, "eps"),
    (dict(alpha=-1e-3), ValueError, "alpha"),
    (dict(alpha=torch.tensor([0.1, -0.1])), ValueError, "alpha"),
    (dict(alpha=torch.full((5,), 0.1)), ValueError, "alpha"),
    (dict(norm="l1"), ValueError, "norm"),
    (dict(lower=1.0, upper=0.0), ValueError, "lower"),
    (dict(lower=math.nan), ValueError, "lower"),
    (dict(upper="1"), TypeError, "upper"),
    (dict(backend="cudnn"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(fn, change, error, name):
    kwargs = {**_args(), **change}
    with pytest.raises(error, match=name):
        fn(**kwargs)


def test_unavailable_backend_says_why():
    kwargs = _args()
    if DEVICE.type == "cpu":
        with pytest.raises(RuntimeError, match="cuda"):
            pgd_step(**kwargs, backend="cuda")


# ------------------------------------------------------------------------------------ random start

@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_start_in_ball_and_box(norm, per_sample, dtype):
    shape = (5, 3, 8, 8)
    x_nat = torch.rand(shape, device=DEVICE).to(dtype)
    eps = (torch.rand(5, device=DEVICE) * 0.5) if per_sample else (8 / 255 if norm == "linf" else 0.5)
    x0 = random_start(x_nat, eps, norm=norm)
    assert x0.dtype == dtype and x0.shape == x_nat.shape
    assert not torch.equal(x0, x_nat)
    assert_in_ball_and_box(x0, x_nat, eps, norm, tol=ATOL[dtype])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_deterministic_with_generator(norm):
    x_nat = torch.rand(3, 3, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    runs = [random_start(x_nat, 0.1, norm=norm, generator=torch.Generator(DEVICE).manual_seed(s))
            for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert runs[0].is_contiguous(memory_format=torch.channels_last)


def test_random_start_linf_is_uniform_in_the_cube():
    x_nat = torch.full((4, 5000), 0.5, device=DEVICE, dtype=torch.float64)
    d = (random_start(x_nat, 0.2, lower=-math.inf, upper=math.inf) - x_nat) / 0.2
    assert float(d.abs().max()) <= 1.0
    assert abs(float(d.mean())) < 0.02 and abs(float(d.abs().mean()) - 0.5) < 0.02
    assert float(d.max()) > 0.99 and float(d.min()) < -0.99


def test_random_start_l2_is_uniform_in_the_ball():
    # In 2 dimensions a uniform point of the disc has P(r < eps/2) = 1/4.
    x_nat = torch.zeros(4000, 2, device=DEVICE, dtype=torch.float64)
    r = random_start(x_nat, 1.0, norm="l2", lower=-math.inf, upper=math.inf).norm(dim=1)
    assert float(r.max()) <= 1.0 + 1e-12
    assert abs(float((r < 0.5).double().mean()) - 0.25) < 0.05
    # in high dimension the mass sits at the surface
    x_nat = torch.zeros(8, 3, 32, 32, device=DEVICE)
    r = random_start(x_nat, 0.5, norm="l2", lower=-math.inf, upper=math.inf).flatten(1).norm(dim=1)
    assert bool((r > 0.49).all()) and bool((r <= 0.5 + 1e-5).all())


def test_random_start_l2_direction_is_uniform():
    # the radius law alone passes with any direction law (e.g. z ~ U(0, 1): the positive quadrant only)
    x_nat = torch.zeros(4000, 2, device=DEVICE, dtype=torch.float64)
    d = random_start(x_nat, 1.0, norm="l2", lower=-math.inf, upper=math.inf)
    quadrant = (d[:, 0] > 0).long() * 2 + (d[:, 1] > 0).long()
    counts = torch.bincount(quadrant, minlength=4).double() / len(d)
    assert bool(((counts - 0.25).abs() < 0.035).all()), counts.tolist()  # 5 binomial standard errors


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_uses_each_samples_own_radius(norm):
    # in the ball of its own eps is not enough: a start drawn with the smallest eps passes that too
    eps = torch.tensor([0.05, 0.4, 0.2, 0.1], device=DEVICE)
    x_nat = torch.rand(4, 3, 16, 16, device=DEVICE)
    d = (random_start(x_nat, eps, norm=norm, lower=-math.inf, upper=math.inf) - x_nat).flatten(1).double()
    reach = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert bool((reach <= eps * (1 + 1e-5)).all()) and bool((reach > 0.9 * eps).all()), (reach / eps).tolist()


@pytest.mark.parametrize("change, error, name", [
    (dict(x_nat=torch.ones(2, 3, dtype=torch.uint8)), TypeError, "x_nat"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(eps=torch.full((3,), 0.1)), ValueError, "eps"),
    (dict(norm="linfty"), ValueError, "norm"),
    (dict(lower=2.0), ValueError, "lower"),
    (dict(generator=123), TypeError, "generator"),
])
def test_random_start_bad_input(change, error, name):
    kwargs = {**dict(x_nat=torch.rand(2, 3), eps=0.1), **change}
    with pytest.raises(error, match=name):
        random_start(**kwargs)


# ------------------------------------------------------------------ GPU compilation without a GPU

_COMPILE_PGD_KERNELS = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from advfast.kernels import pgd_step as k

target = GPUTarget("cuda", 90, 32)
common = dict(x_ptr="*fp32", xn_ptr="*fp32", g_ptr="*bf16", out_ptr="*fp32", eps_ptr="*fp32",
              alpha_ptr="*fp32", eps_s="fp32", alpha_s="fp32", lower="fp32", upper="fp32", N="i32",
              BLOCKS_PER_SAMPLE="i32", EPS_PER_SAMPLE="constexpr", ALPHA_PER_SAMPLE="constexpr",
              COMPUTE="constexpr", BLOCK="constexpr")
aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 10)}  # pointers and N
for per_sample in (False, True):
    for compute in (tl.float32, tl.float64):
        c = triton.compile(ASTSource(k._pgd_linf_kernel, common, dict(
            EPS_PER_SAMPLE=per_sample, ALPHA_PER_SAMPLE=per_sample, COMPUTE=compute, BLOCK=4096), aligned),
            target=target, options={"num_warps": 8})
        assert "ld.global.v4" in c.asm["ptx"], "aligned loads should vectorise"
partials = dict(x_ptr="*fp32", xn_ptr="*fp32", g_ptr="*fp16", part_ptr="*fp64", N="i32",
                BLOCKS_PER_SAMPLE="i32", COMPUTE="constexpr", BLOCK="constexpr")
triton.compile(ASTSource(k._pgd_l2_partials_kernel, partials, dict(COMPUTE=tl.float32, BLOCK=4096)),
               target=target, options={"num_warps": 8})
apply = {**common, "part_ptr": "*fp64", "PARTS": "constexpr"}
apply = {name: apply[name] for name in k._pgd_l2_apply_kernel.arg_names}
triton.compile(ASTSource(k._pgd_l2_apply_kernel, apply, dict(
    EPS_PER_SAMPLE=True, ALPHA_PER_SAMPLE=False, COMPUTE=tl.float32, BLOCK=4096, PARTS=64)),
    target=target, options={"num_warps": 8})

from advfast.kernels import ema_update as ke  # noqa: E402  (compiled here too: one process for both files)

table = dict(table_ptr="*i64", T="i32", m="fp32", m_lo="fp32", one_minus_m="fp32", one_minus_m_lo="fp32",
             DTYPE="constexpr",
             COMPUTE="constexpr", T_P2="constexpr", ALIGNED="constexpr", BLOCK="constexpr")
for dtype in (tl.float32, tl.bfloat16, tl.float16, tl.float64):
    for aligned_ptrs in (False, True):
        compute = tl.float64 if dtype == tl.float64 else tl.float32
        c = triton.compile(ASTSource(ke._ema_kernel, table, dict(
            DTYPE=dtype, COMPUTE=compute, T_P2=64, ALIGNED=aligned_ptrs, BLOCK=4096)),
            target=target, options={"num_warps": 8})
        assert aligned_ptrs == ("ld.global.v4" in c.asm["ptx"]) or dtype == tl.float64
print("compiled")
"""


def compile_offline(code: str) -> None:
    """Run ``code`` (compiling Triton kernels for sm_90) in a process without the interpreter."""
    import os
    import shutil
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and shutil.which("ptxas") is None:
        pytest.skip("no ptxas to compile Triton kernels for a GPU")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_triton_kernels_compile_for_sm90():
    """The interpreter checks the maths; this checks that the pgd_step and ema kernels also compile for
    an H100 (no GPU needed) and that aligned loads vectorise."""
    compile_offline(_COMPILE_PGD_KERNELS)
