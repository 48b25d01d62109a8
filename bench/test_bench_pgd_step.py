"""pgd_step_ on every backend against the eager sequences it replaces.

Groups (see bench/README.md): pgd_step {linf, l2} at a CIFAR batch and a large batch. Each group has the
eager baseline (what attack libraries run today), the device-to-device copy of the same tensor size (the
bandwidth ceiling), advfast's torch reference, and the fused backends that can run here.
"""

import pytest
import torch

from advfast.ops import pgd_step_

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
