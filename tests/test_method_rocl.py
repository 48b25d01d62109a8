"""RoCL: the official loss (float64 transcription), the paper's eq. 3, the attack, training steps."""

import math

import pytest
import torch

from advfast.data import Batch
from advfast.engine import Trainer, build_config
from advfast.losses.rocl import rocl_nt_xent
from advfast.methods import METHODS
from advfast.ops.contrastive import nt_xent


# ---- float64 transcriptions, written from the official src/loss.py and the paper, not from advfast ----
def official_pairwise_similarity(outputs, temperature):
    b = outputs.shape[0]
    outputs_norm = outputs / (outputs.norm(dim=1).view(b, 1) + 1e-8)
    return (1.0 / temperature) * torch.mm(outputs_norm, outputs_norm.transpose(0, 1).detach())


def official_nt_xent(similarity_matrix, adv_type):
    n2 = len(similarity_matrix)
    n = n2 // 2 if adv_type == "None" else n2 // 3
    e = torch.exp(similarity_matrix) * (1 - torch.eye(n2, n2, dtype=similarity_matrix.dtype))
    nt = -torch.log(e / (torch.sum(e, dim=1).view(n2, 1) + 1e-8) + 1e-8)
    if adv_type == "None":
        return (1.0 / float(n2)) * torch.sum(torch.diag(nt[0:n, n:]) + torch.diag(nt[n:, 0:n]))
    return (1.0 / float(n2)) * torch.sum(
        torch.diag(nt[0:n, n:2 * n]) + torch.diag(nt[n:2 * n, 0:n]) + torch.diag(nt[0:n, 2 * n:])
        + torch.diag(nt[2 * n:, 0:n]) + torch.diag(nt[n:2 * n, 2 * n:]) + torch.diag(nt[2 * n:, n:2 * n]))


def paper_eq3(z, num_views, t):
    """-log(sum_pos exp(sim/t) / (sum_pos + sum_neg)) per anchor, averaged; a plain loop."""
    z = z / z.norm(dim=1, keepdim=True)
    n = z.shape[0] // num_views
    total = 0.0
    for i in range(z.shape[0]):
        pos = sum(torch.exp(z[i] @ z[j] / t) for j in range(z.shape[0]) if j != i and j % n == i % n)
        allo = sum(torch.exp(z[i] @ z[j] / t) for j in range(z.shape[0]) if j != i)
        total = total - torch.log(pos / allo)
    return total / z.shape[0]


@pytest.mark.parametrize("n,views,dim", [(1, 3, 4), (5, 3, 16), (7, 2, 9), (33, 3, 128)])
def test_official_loss_matches_transcription(n, views, dim):
    z = torch.randn(views * n, dim, dtype=torch.float64) * 3
    z_ref = z.clone().requires_grad_(True)
    ref = official_nt_xent(official_pairwise_similarity(z_ref, 0.5), "None" if views == 2 else "Rep")
    ref.backward()
    z_ours = z.clone().requires_grad_(True)
    ours = rocl_nt_xent(z_ours, views, 0.5)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    # the detached right factor: gradients flow through the anchor side only
    torch.testing.assert_close(z_ours.grad, z_ref.grad, rtol=1e-10, atol=1e-12)


def test_official_gradient_differs_from_symmetric():
    z = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    g_det, = torch.autograd.grad(rocl_nt_xent(z, 3, 0.5), z)
    g_sym, = torch.autograd.grad(rocl_nt_xent(z, 3, 0.5, detach_right=False), z)
    assert not torch.allclose(g_det, g_sym)


@pytest.mark.parametrize("n,views", [(3, 3), (6, 2)])
def test_paper_form_is_eq3(n, views):
    z = torch.randn(views * n, 10, dtype=torch.float64, requires_grad=True)
    ours = nt_xent(z, views, 0.5, positives="sum_in_numerator", backend="torch")
    ref = paper_eq3(z, views, 0.5)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, z)[0], torch.autograd.grad(ref, z)[0])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="not a multiple of num_views=3"):
        rocl_nt_xent(torch.randn(10, 4), 3)
    with pytest.raises(ValueError, match="num_views must be >= 2"):
        rocl_nt_xent(torch.randn(10, 4), 1)


# ---- the method --------------------------------------------------------------------------------------
def _method(**options):
    cfg = build_config("rocl", None, "digits", overrides=[
        {"image_size": 8, "batch_size": 16, "method_options": dict(head_hidden=32, **options)}])
    return METHODS["rocl"](cfg, 10, (0.5,) * 3, (0.25,) * 3), cfg


def _batch(b=12, size=8):
    views = [torch.rand(b, 3, size, size) for _ in range(3)]
    return Batch(views, torch.zeros(b, dtype=torch.int64), torch.arange(b))


@pytest.mark.parametrize("local_batch", [None, 4])
def test_training_step_is_the_official_recipe(local_batch):
    m, _ = _method(local_batch=local_batch)
    m.double().train()  # a float64 model stays float64 through embed: the check reaches float64 precision
    batch = _batch()
    batch.views[:] = [v.double() for v in batch.views]
    x1, x2 = batch.views[0], batch.views[1]
    x_adv = (x1 + 0.02 * torch.randn_like(x1).sign()).clamp(0, 1)
    m.attack = lambda a, b: x_adv  # fix the attack: this test is about the loss
    loss, metrics = m.training_step(batch)
    with torch.no_grad():  # train-mode forwards: each depends only on its own batch
        z_reg = m.head(m.backbone(torch.cat([x_adv, x2]))).double()
        z_rep = m.head(m.backbone(torch.cat([x1, x2, x_adv]))).double()
    # the regulariser per GPU's share of the batch (local_batch), averaged; 'Rep' over the whole batch
    g = local_batch or 12
    reg = [official_nt_xent(official_pairwise_similarity(torch.cat([z_reg[s:s + g], z_reg[12 + s:12 + s + g]]), 0.5),
                            "None") for s in range(0, 12, g)]
    expected = (official_nt_xent(official_pairwise_similarity(z_rep, 0.5), "Rep") + sum(reg) / len(reg) / 256)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert metrics["loss_adv_reg"].item() == pytest.approx((sum(reg) / len(reg)).item(), rel=1e-12)


def test_attack_raises_its_loss_in_eval_mode_and_stays_in_the_ball():
    m, cfg = _method()
    m.train()
    batch = _batch(16)
    x1, x2 = batch.views[0], batch.views[1]
    bn = next(mod for mod in m.backbone.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm))
    stats = bn.running_mean.clone()
    x_adv = m.attack(x1, x2)
    assert torch.equal(bn.running_mean, stats), "the attack must run in eval mode (no running-stat updates)"
    assert m.training, "train mode is restored after the attack"
    eps = cfg.attack.eps
    assert (x_adv - x1).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    m.eval()
    with torch.no_grad():
        def attacked(x):
            return official_nt_xent(official_pairwise_similarity(m.embed(torch.cat([x, x2])).double(), 0.5), "None")
        assert attacked(x_adv) > attacked(x1)


@pytest.mark.parametrize("loss_form", ["official", "paper"])
def test_trains_a_few_steps_with_finite_loss(tmp_path, loss_form):
    cfg = build_config("rocl", None, "digits", overrides=[{
        "image_size": 8, "batch_size": 32, "epochs": 1, "max_steps": 3, "progress": False, "out": str(tmp_path),
        "attack": {"steps": 2}, "method_options": {"head_hidden": 32, "loss_form": loss_form}}])
    summary = Trainer(cfg).fit()
    assert summary["step"] == 3 and math.isfinite(summary["last"]["loss"])
    assert (tmp_path / "encoder.safetensors").is_file()


def test_options_are_checked():
    with pytest.raises(ValueError, match="loss_form must be 'official' or 'paper'"):
        _method(loss_form="eq3")
    with pytest.raises(ValueError, match="lamda must be > 0"):
        _method(lamda=0)
    with pytest.raises(ValueError, match="local_batch must be a positive int"):
        _method(local_batch=0)
