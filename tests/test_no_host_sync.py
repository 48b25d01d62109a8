"""The per-iteration paths of ops, data, attacks and optim never synchronise with the host.

On a GPU each host read (.item(), bool(t), slicing with a device tensor) or blocking host->device
copy (torch.tensor(list, device=...), cpu_tensor.to(device)) stalls the stream. Without a GPU the
same paths run here on the "meta" device: a host read raises there, and host->device copies are
caught by watching for CPU arrays that flow into meta results.
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from advfast.attacks import ce_loss, fgsm, pgd, trades_kl_loss
from advfast.data import PRESETS, build_augment, high_frequency
from advfast.models import build_encoder, build_head
from advfast.ops import ema_update_, info_nce, nt_xent, pgd_step, pgd_step_, random_start
from advfast.optim import LARS

META = torch.device("meta")


class _HostCopies(TorchDispatchMode):
    """Records ops that turn a CPU array (not a 0-dim scalar) into a meta tensor."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" and t.dim() > 0 for t in ins) and \
                any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tree_leaves(out)):
            self.seen.append(str(func))
        return out


@contextlib.contextmanager
def no_host_transfers(monkeypatch):
    """torch.tensor/as_tensor with a device bypass the dispatcher, so they are watched directly."""
    seen = []

    def watch(fn):
        def wrapped(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type != "cpu":
                seen.append(f"torch.{fn.__name__}(..., device={device})")
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(torch, "tensor", watch(torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", watch(torch.as_tensor))
    with _HostCopies(seen):
        yield
    assert not seen, f"host->device copies in the hot path: {seen}"


def test_the_checker_catches_copies_and_reads(monkeypatch):
    with pytest.raises(AssertionError, match="torch.tensor"):
        with no_host_transfers(monkeypatch):
            torch.tensor([1.0, 2.0], device=META)
    with pytest.raises(AssertionError, match="_to_copy"):
        with no_host_transfers(monkeypatch):
            torch.ones(3).to(META)
    with pytest.raises(RuntimeError, match="meta"):
        torch.ones(3, device=META).sum().item()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_augment(preset, monkeypatch):
    images = torch.empty(4, 3, 24, 20, dtype=torch.uint8, device=META)
    with no_host_transfers(monkeypatch):
        views = build_augment(preset, "torch", size=16)(images)
        high_frequency(views[-1], radius=4)
    assert all(v.shape == (4, 3, 16, 16) and v.device == META for v in views)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_and_random_start(norm, monkeypatch):
    x = torch.empty(4, 3, 8, 8, device=META)
    eps = torch.empty(4, device=META)
    with no_host_transfers(monkeypatch):
        random_start(x, 0.1, norm=norm)
        random_start(x, eps, norm=norm)
        pgd_step(x, x, x.bfloat16(), 0.1, 0.01, norm=norm)
        pgd_step_(x, x, x, eps, eps, norm=norm)


def test_ema_update(monkeypatch):
    ema = [torch.empty(3, 4, device=META), torch.empty(2, device=META, dtype=torch.bfloat16),
           torch.empty((), dtype=torch.int64, device=META)]
    with no_host_transfers(monkeypatch):
        ema_update_(ema, [t.clone() for t in ema], 0.99)


@pytest.mark.parametrize("backend", ["torch", "torch-chunked"])
def test_contrastive_losses_forward_and_backward(backend, monkeypatch):
    monkeypatch.setattr("advfast.ops.contrastive.CHUNK_ELEMENTS", 8 * 6)  # several chunks
    q = torch.empty(12, 16, device=META, requires_grad=True)
    k = torch.empty(12, 16, device=META, requires_grad=True)
    queue = torch.empty(50, 16, device=META)
    with no_host_transfers(monkeypatch):
        info_nce(q, k, queue, backend=backend).backward()
        info_nce(q, k, None, backend=backend).backward()
        for positives in ("mean_log_prob", "sum_in_numerator"):
            nt_xent(q, 3, positives=positives, backend=backend).backward()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attacks_and_a_training_step(norm, monkeypatch):
    encoder = build_encoder("convnet", ("normal", "pgd"), mean=(0.5,) * 3, std=(0.25,) * 3).to(META)
    head = build_head("acl", encoder.feat_dim, ("normal", "pgd"), hidden=32).to(META)
    fc = torch.nn.Linear(encoder.feat_dim, 5).to(META)
    x = torch.empty(4, 3, 8, 8, device=META)
    y = torch.empty(4, dtype=torch.int64, device=META)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = LARS(params, lr=1.0, weight_decay=1e-6, exclude_bn_bias=norm == "l2")
    with no_host_transfers(monkeypatch):
        encoder.eval()
        x_adv = pgd(ce_loss(lambda z: fc(encoder(z, "pgd")), y), x, 0.1, 0.01, steps=2, norm=norm)
        fgsm(trades_kl_loss(lambda z: fc(encoder(z, "pgd")), torch.empty(4, 5, device=META)), x, 0.1,
             norm=norm, random_start=True)
        encoder.train()
        head(encoder(x_adv, "pgd"), "pgd").sum().backward()
        optimizer.step()
        optimizer.step()
