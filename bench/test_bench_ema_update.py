"""ema_update_ on every backend against the eager sequence it replaces.

Group (see bench/README.md): ema_update over the CIFAR ResNet-18 parameter set, with the eager baseline
(``torch._foreach_lerp_``, what momentum-encoder code runs today), the device-to-device copy of the same
size (the bandwidth ceiling), advfast's torch reference, and the fused backends that can run here.
"""

import pytest
import torch

from advfast.ops import ema_update_


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
