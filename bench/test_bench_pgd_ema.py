"""pgd_step_ and ema_update_ on every backend against the eager sequences they replace.

Groups (see bench/README.md): pgd_step {linf, l2} at a CIFAR batch and a large batch; ema_update over
the CIFAR ResNet-18 parameter set. Each group has the eager baseline (what attack libraries and
momentum-encoder code run today), the device-to-device copy of the same tensor size (the bandwidth
ceiling), advfast's torch reference, and the fused backends that can run here.
"""

import pytest
import torch

from advfast.ops import ema_update_, pgd_step_

IMPLS = ["copy", "eager", "torch", "cpp", "triton", "cuda"]


def eager_linf_step(x_adv, x_nat, grad, eps, alpha):
    """The PGD step as ACL/AdvCL/torchattacks write it: 5 kernels, 4 temporaries."""
    x = x_adv + alpha * torch.sign(grad)
    x = torch.min(torch.max(x, x_nat - eps), x_nat + eps)
    return torch.clamp(x, 0, 1)


def eager_l2_step(x_adv, x_nat, grad, eps, alpha):
    """torchattacks' PGDL2 step."""
    b = x_adv.shape[0]
    grad_norms = torch.norm(grad.view(b, -1), p=2, dim=1) + 1e-10
    x = x_adv + alpha * grad / grad_norms.view(b, 1, 1, 1)
    delta = x - x_nat
    delta_norms = torch.norm(delta.view(b, -1), p=2, dim=1)
    factor = torch.min(eps / delta_norms, torch.ones_like(delta_norms))
    delta = delta * factor.view(-1, 1, 1, 1)
    return torch.clamp(x_nat + delta, 0, 1)


def cifar_resnet18_param_shapes(width: float = 1.0) -> list[tuple[int, ...]]:
    """Parameter shapes of the CIFAR ResNet-18 (3x3 stem, 10 classes): 62 tensors, 11.17M at width 1."""
    c = [max(1, int(round(64 * width * k))) for k in (1, 2, 4, 8)]
    shapes = [(c[0], 3, 3, 3), (c[0],), (c[0],)]
    cin = c[0]
    for stage, cout in enumerate(c):
        for block in range(2):
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and stage > 0:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes + [(10, cin), (10,)]


def _shape_name(shape):
    return "x".join(str(s) for s in shape)


@pytest.mark.parametrize("size", ["cifar_batch", "large_batch"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("impl", IMPLS)
def test_pgd_step(benchmark, measure, sizes, device, skip_unless_backend, size, norm, impl):
    shape = sizes[size]
    benchmark.group = f"pgd_step {norm} {size} {_shape_name(shape)}"
    eps, alpha = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.1)
    x_nat = torch.rand(shape, device=device)
    x_adv = (x_nat + (torch.rand_like(x_nat) * 2 - 1) * eps / 10).clamp(0, 1)
    grad = torch.randn(shape, device=device)
    tensor_bytes = x_nat.numel() * x_nat.element_size()
    nbytes = 4 * tensor_bytes  # read x_adv, x_nat, grad; write the result
    if impl == "copy":
        dst = torch.empty_like(x_nat)
        measure(lambda: dst.copy_(x_nat), nbytes=2 * tensor_bytes, role="copy")
    elif impl == "eager":
        step = eager_linf_step if norm == "linf" else eager_l2_step
        measure(lambda: step(x_adv, x_nat, grad, eps, alpha), nbytes=nbytes, role="baseline")
    else:
        skip_unless_backend(impl)
        measure(lambda: pgd_step_(x_adv, x_nat, grad, eps, alpha, norm=norm, backend=impl), nbytes=nbytes)


@pytest.mark.parametrize("impl", ["copy", "foreach_lerp", "torch", "cpp", "triton", "cuda"])
def test_ema_update(benchmark, measure, sizes, device, skip_unless_backend, impl):
    width = sizes["resnet18_width"]
    shapes = cifar_resnet18_param_shapes(width)
    numel = sum(torch.Size(s).numel() for s in shapes)
    assert len(shapes) == 62 and (width != 1.0 or numel == 11_173_962)
    benchmark.group = f"ema_update resnet18 x{width} ({len(shapes)} tensors, {numel / 1e6:.2f}M)"
    ema = [torch.randn(s, device=device) for s in shapes]
    src = [torch.randn(s, device=device) for s in shapes]
    m = 0.99
    if impl == "copy":
        flat_src, flat_dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
        measure(lambda: flat_dst.copy_(flat_src), nbytes=2 * 4 * numel, role="copy")
    elif impl == "foreach_lerp":
        measure(lambda: torch._foreach_lerp_(ema, src, 1 - m), nbytes=3 * 4 * numel, role="baseline")
    else:
        skip_unless_backend(impl)
        measure(lambda: ema_update_(ema, src, m, backend=impl), nbytes=3 * 4 * numel)
