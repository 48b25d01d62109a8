"""ema_update_: every available backend against the float64 reference, on mixed lists of tensors.

That the Triton kernel also compiles for a GPU is checked, without one, by
tests/test_ops_pgd_step.py::test_triton_kernels_compile_for_sm90 (one process compiles both kernel files),
and its registers, spills and shared memory on sm_80 and sm_90 by tests/test_triton_aot.py.
"""

import math

import pytest
import torch

from advfast.ops import _dispatch, ema_update_

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch", "triton", "cpp", "cuda"]
# (atol, rtol) by dtype. Half precision: one ulp relative, because Triton's interpreter truncates
# float32 -> bfloat16 (a GPU rounds to nearest even: half an ulp).
# float64 must keep float64 accuracy (a momentum passed to a kernel as fp32 errs by ~1e-8).
TOL = {torch.float64: (1e-12, 0), torch.float32: (1e-6, 1e-6), torch.bfloat16: (1e-6, 2 ** -7),
       torch.float16: (1e-6, 2 ** -10)}


def need(backend):
    reason = _dispatch.unavailable_reason(backend, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    return backend


def model_like_pairs():
    """(ema, src) lists of mixed shapes and dtypes, the way a model's state looks (plus odd cases)."""
    specs = [((16, 3, 3, 3), torch.float32), ((16,), torch.float32), ((1000,), torch.float32),
             ((4097,), torch.float32), ((3, 5, 7), torch.float32), ((10, 33), torch.bfloat16),
             ((257,), torch.float16), ((6, 7), torch.float64), ((1,), torch.float32), ((), torch.float32)]
    ema = [torch.randn(s, device=DEVICE).to(d) for s, d in specs]
    src = [torch.randn(s, device=DEVICE).to(d) for s, d in specs]
    # channels_last conv weights on both sides
    ema.append(torch.randn(4, 3, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last))
    src.append(torch.randn(4, 3, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last))
    # a transposed view paired with a contiguous tensor: not addressable as one flat array
    ema.append(torch.randn(9, 6, device=DEVICE).t())
    src.append(torch.randn(6, 9, device=DEVICE))
    # BatchNorm's counter: copied, not averaged; an empty tensor
    ema.append(torch.tensor(3, device=DEVICE))
    src.append(torch.tensor(11, device=DEVICE))
    ema.append(torch.empty(0, 4, device=DEVICE))
    src.append(torch.empty(0, 4, device=DEVICE))
    return ema, src


def expected(ema, src, m):
    return [m * e.double() + (1 - m) * s.double() if e.is_floating_point() else s.clone()
            for e, s in zip(ema, src)]


def assert_matches(ema, want):
    for i, (e, w) in enumerate(zip(ema, want)):
        if e.is_floating_point():
            atol, rtol = TOL[e.dtype]
            torch.testing.assert_close(e.double(), w, atol=atol, rtol=rtol, msg=f"tensor {i}")
        else:
            assert torch.equal(e, w), f"tensor {i}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.9, 0.999, 0.37])
def test_matches_float64_reference(backend, momentum):
    need(backend)
    ema, src = model_like_pairs()
    want = expected(ema, src, momentum)
    src_before = [s.clone() for s in src]
    ema_update_(ema, src, momentum, backend=backend)
    assert_matches(ema, want)
    assert all(torch.equal(a, b) for a, b in zip(src, src_before)), "src must not change"
    assert ema[-4].is_contiguous(memory_format=torch.channels_last)
    # a second update goes through the cached pointer table (triton) and must still be right
    want = expected(ema, src, momentum)
    ema_update_(tuple(ema), tuple(src), momentum, backend=backend)
    assert_matches(ema, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_zero_copies_and_one_keeps(backend):
    need(backend)
    ema, src = model_like_pairs()
    before = [e.clone() for e in ema]
    ema_update_(ema, src, 1.0, backend=backend)
    for e, b in zip(ema[:-2], before[:-2]):  # the counter is copied whatever the momentum
        assert torch.equal(e, b)
    assert torch.equal(ema[-2], src[-2])
    ema_update_(ema, src, 0.0, backend=backend)
    for e, s in zip(ema, src):
        assert torch.equal(e, s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_parameters_and_buffers(backend):
    """The momentum-encoder use: parameters that require grad, BN buffers, generators of tensors."""
    need(backend)
    online = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(5, 2)).to(DEVICE)
    target = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(5, 2)).to(DEVICE)
    online[1].num_batches_tracked.fill_(42)
    online[1].running_mean.normal_()
    ema = list(target.parameters()) + list(target.buffers())
    src = list(online.parameters()) + list(online.buffers())
    want = expected(ema, src, 0.99)
    ema_update_(target.parameters(), online.parameters(), 0.99, backend=backend)
    ema_update_(target.buffers(), online.buffers(), 0.99, backend=backend)
    assert_matches(ema, want)
    assert int(target[1].num_batches_tracked) == 42
    assert all(p.grad is None for p in target.parameters())


def test_triton_launches_once_per_dtype_group(monkeypatch):
    need("triton")
    from advfast.kernels import ema_update as kernels

    launches = []
    real = kernels._ema_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(kernels, "_ema_kernel", Counting())
    ema, src = model_like_pairs()
    want = expected(ema, src, 0.5)
    ema_update_(ema, src, 0.5, backend="triton")
    assert_matches(ema, want)
    assert len(launches) == 4  # float32, bfloat16, float16, float64

    # groups larger than the per-launch cap are split, still correct
    monkeypatch.setattr(kernels, "MAX_TENSORS_PER_LAUNCH", 2)
    launches.clear()
    ema = [torch.randn(n, device=DEVICE) for n in (5, 4096, 4097, 3, 70)]
    src = [torch.randn(n, device=DEVICE) for n in (5, 4096, 4097, 3, 70)]
    want = expected(ema, src, 0.25)
    ema_update_(ema, src, 0.25, backend="triton")
    assert_matches(ema, want)
    assert len(launches) == 3


def test_empty_lists_and_auto():
    ema_update_([], [], 0.5)
    e, s = [torch.zeros(3)], [torch.ones(3)]
    ema_update_(e, s, 0.75)  # auto: never the interpreter on CPU
    torch.testing.assert_close(e[0], torch.full((3,), 0.25))


def test_under_torch_compile():
    def update(ema, src):
        ema_update_(ema, src, 0.9)

    ema, src = [torch.randn(4, 3), torch.tensor(1)], [torch.randn(4, 3), torch.tensor(5)]
    want = expected(ema, src, 0.9)
    torch.compile(update, fullgraph=True, backend="aot_eager")(ema, src)
    assert_matches(ema, want)


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("ema, src, momentum, error, name", [
    ([torch.zeros(3)], [torch.zeros(3), torch.zeros(3)], 0.5, ValueError, "same length"),
    ([torch.zeros(3)], [torch.zeros(4)], 0.5, ValueError, r"tensors\[0\]"),
    ([torch.zeros(3)], [torch.zeros(3, dtype=torch.float64)], 0.5, TypeError, r"tensors\[0\]"),
    ([torch.zeros(3)], [torch.zeros(3, device="meta")], 0.5, ValueError, r"tensors\[0\]"),
    ([torch.zeros(3), torch.zeros(2, device="meta")], [torch.zeros(3), torch.zeros(2, device="meta")], 0.5,
     ValueError, r"ema_tensors\[1\]"),
    ([torch.zeros(3, dtype=torch.complex64)], [torch.zeros(3, dtype=torch.complex64)], 0.5, TypeError, "complex"),
    (torch.zeros(3), [torch.zeros(3)], 0.5, TypeError, "ema_tensors"),
    ([torch.zeros(3)], 5, 0.5, TypeError, "tensors"),
    ([torch.zeros(3)], [[0.0, 0.0, 0.0]], 0.5, TypeError, r"tensors\[0\]"),
    ([torch.zeros(3)], [torch.zeros(3)], 1.5, ValueError, "momentum"),
    ([torch.zeros(3)], [torch.zeros(3)], -0.1, ValueError, "momentum"),
    ([torch.zeros(3)], [torch.zeros(3)], math.nan, ValueError, "momentum"),
    ([torch.zeros(3)], [torch.zeros(3)], True, TypeError, "momentum"),
    ([torch.zeros(3)], [torch.zeros(3)], torch.tensor(0.5), TypeError, "momentum"),
])
def test_bad_input_names_the_argument(ema, src, momentum, error, name):
    with pytest.raises(error, match=name):
        ema_update_(ema, src, momentum)


def test_unknown_and_unavailable_backend():
    with pytest.raises(ValueError, match="backend"):
        ema_update_([torch.zeros(3)], [torch.zeros(3)], 0.5, backend="apex")
    if DEVICE.type == "cpu":
        with pytest.raises(RuntimeError, match="cuda"):
            ema_update_([torch.zeros(3)], [torch.zeros(3)], 0.5, backend="cuda")
