"""RCS's greedy selection against a float64 transcription of the official step (GodXuxilie/Efficient_ACL_via_RCS
@ 6fc9aef, ACL_RCS/small_scale_datasets/RCS.py: RCS.update_subset_indice with --CoresetLoss KL, its PGD,
PGD_contrastive, nt_xent and kl_loss), on a tiny dual-BN model. Random starts are off on both sides (the official
draw is torch.rand_like; advfast's is its generator's), so the indices and the greedy gains must agree exactly."""

import copy

import pytest
import torch
from torch import nn

from advfast.methods.coreset_rcs import RCSSettings, minmax_kl, rcs_select, val_rows_as_coded
from advfast.models import build_head

D64 = torch.float64
# the transcription calls KLDivLoss(reduction="mean") as the official code does; torch warns its meaning will change
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")


class TinyDualBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bns = nn.ModuleDict({"normal": nn.BatchNorm2d(6), "pgd": nn.BatchNorm2d(6)})
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x, branch):
        return self.pool(torch.relu(self.bns[branch](self.conv(x)))).flatten(1)


def _model():
    backbone, head = TinyDualBN().to(D64), build_head("acl", 24, ("normal", "pgd"), hidden=8).to(D64)
    with torch.no_grad():
        for m in list(backbone.modules()) + list(head.modules()):
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return backbone.eval(), head.eval()


# ---- the official code, transcribed (model(x, bn) = head(backbone(x, bn), bn), everything in eval) ----------
def off_nt_xent(x, t=0.5):
    n = x.norm(p=2, dim=1, keepdim=True)
    x = (x @ x.t()) / (n * n.t()).clamp(min=1e-8)
    x = torch.exp(x / t)
    idx = torch.arange(x.size()[0])
    idx[::2] += 1
    idx[1::2] -= 1
    x = x[idx]
    # official: torch.tensor(1 / t) in the default dtype (float32 there: exp(2) off by 1e-7, immaterial in fp32
    # training, visible at float64 precision); the float64 constant here
    x = x.diag() / (x.sum(0) - torch.exp(torch.tensor(1 / t, dtype=x.dtype)))
    return -torch.log(x)


def off_normalize(aa):
    aa -= aa.min(1, keepdim=True)[0]
    aa /= aa.max(1, keepdim=True)[0]
    return aa


def off_kl(nat, adv):
    return torch.nn.KLDivLoss(reduction="mean")(torch.log(off_normalize(adv) + 1e-8), off_normalize(nat) + 1e-8)


def off_pgd(model, inputs, eps, alpha, iters, loss_of):
    delta = torch.nn.Parameter(torch.zeros_like(inputs))  # random start off (see the module docstring)
    for _ in range(iters):
        loss = loss_of(model(inputs + delta))
        loss.backward()
        delta.data = delta.data + alpha * delta.grad.sign()
        delta.grad = None
        delta.data = torch.clamp(delta.data, min=-eps, max=eps)
        delta.data = torch.clamp(inputs + delta.data, min=0, max=1) - inputs
    return (inputs + delta).detach()


def official_select(backbone, head, items, val_items, fraction, bs, lr=0.01, pgd_iter=5, coreset_pgd_iter=3):
    """items: (N, 2, C, H, W) two views per image (loader unshuffled); val_items: (V, 2, C, H, W) two copies."""
    for p in list(backbone.parameters()) + list(head.parameters()):
        p.requires_grad = False
    fcs = [p for n, p in head.named_parameters() if "fc" in n]
    for p in fcs:
        p.requires_grad = True

    def model(x, bn):
        return head(backbone(x, bn), bn)

    def grad_val():
        feats_nat, feats_adv = [], []
        for vi in val_items.split(bs):
            d = vi.size()
            v = vi.view(d[0] * 2, d[2], d[3], d[4])[:d[0]]
            nat = model(v, "normal").detach()
            v_adv = off_pgd(lambda x: model(x, "pgd"), v, 8 / 255, (10 / 255) / coreset_pgd_iter, coreset_pgd_iter,
                            lambda f: off_kl(f, nat))
            with torch.no_grad():
                feats_adv.append(backbone(v_adv, "pgd"))
                feats_nat.append(backbone(v, "normal"))
        head.zero_grad()
        loss = off_kl(head(torch.cat(feats_adv), "pgd"), head(torch.cat(feats_nat), "normal"))
        loss.backward()
        return torch.cat([p.grad.detach().mean(dim=0).view(1, -1) for p in fcs], dim=1)

    g_val = grad_val()
    per_batch, per_batch_ori, batch_index = [], [], []
    for s in range(0, items.shape[0], bs):
        it = items[s:s + bs]
        d = it.size()
        inputs = it.view(d[0] * 2, d[2], d[3], d[4])
        inputs_adv = off_pgd(lambda x: model(x, "pgd"), inputs, 8 / 255, 2 / 255 * 5 / pgd_iter, pgd_iter,
                             lambda f: torch.mean(off_nt_xent(f)))
        with torch.no_grad():
            f_adv, f = backbone(inputs_adv, "pgd"), backbone(inputs, "normal")
        head.zero_grad()
        loss = torch.mean((off_nt_xent(head(f, "normal")) + off_nt_xent(head(f_adv, "pgd"))) / 2)
        loss.backward()
        per_batch_ori.append([p.grad.detach().clone() for p in fcs])
        per_batch.append(torch.cat([p.grad.detach().mean(dim=0).view(1, -1) for p in fcs], dim=1))
        batch_index.append(torch.arange(s, s + it.shape[0]))
    per_batch = torch.cat(per_batch)
    index_list = torch.arange(len(batch_index))
    subset, gains = [], []
    for j in range(int(int(items.shape[0] * fraction) / bs)):
        gain = torch.matmul(per_batch[index_list], g_val.reshape(-1, 1)).squeeze(1)
        r = torch.argmax(gain, dim=0)
        subset.extend(batch_index[index_list[r]].tolist())
        gains.append(gain[r].item())
        if j == int(int(items.shape[0] * fraction) / bs) - 1:
            break
        for _ in range(2):  # linear_layer and model.fc are one module: the step is applied twice
            for p, g in zip(fcs, per_batch_ori[index_list[r]]):
                p.data = p.data - lr * g
        g_val = grad_val()
        index_list = torch.cat([index_list[:r], index_list[r + 1:]])
    return subset, gains


def _data(n, n_val):
    return torch.rand(n, 2, 3, 6, 6, dtype=D64), torch.rand(n_val, 3, 6, 6, dtype=D64)


def test_selection_matches_official():
    backbone, head = _model()
    items, val = _data(20, 5)
    bs, fraction = 4, 0.6  # 5 batches, 3 selected
    ref_idx, ref_gains = official_select(copy.deepcopy(backbone), copy.deepcopy(head), items,
                                         torch.stack([val, val], 1), fraction, bs)
    head_before = copy.deepcopy(head.state_dict())
    batches = [(torch.arange(s, s + bs), items[s:s + bs, 0], items[s:s + bs, 1]) for s in range(0, 20, bs)]
    sel = rcs_select(backbone, head, batches, val_rows_as_coded(val, bs), 20,
                     RCSSettings(fraction=fraction, batch_size=bs, random_start=False))
    assert sel.indices.tolist() == ref_idx
    assert sel.gains.tolist() == pytest.approx(ref_gains, rel=1e-9, abs=1e-15)
    assert len(set(sel.batches.tolist())) == 3
    for k, v in head.state_dict().items():  # the model is left as it was
        assert torch.equal(v, head_before[k])
    assert not head.training and not backbone.training


def test_val_rows_as_coded_and_settings():
    v = torch.arange(5.0).view(5, 1)
    assert val_rows_as_coded(v, 512).view(-1).tolist() == [0, 0, 1, 1, 2]
    assert val_rows_as_coded(v, 2).view(-1).tolist() == [0, 0, 2, 2, 4]
    s = RCSSettings()
    assert s.num_batches(49500) == 19 and s.num_batches(50000) == 19  # 19 * 512 = 9728 images at 0.2
    assert [e for e in range(1, 200) if s.is_selection_epoch(e)] == [101, 121, 141, 161, 181]
    assert not s.uses_coreset(100) and s.uses_coreset(101)
    assert s.val_alpha == pytest.approx(10 / 255 / 3) and s.train_alpha == pytest.approx(2 / 255)
    with pytest.raises(ValueError, match="fraction"):
        RCSSettings(fraction=0.0)


def test_minmax_kl_is_official_kl_loss():
    a, b = torch.randn(4, 7, dtype=D64), torch.randn(4, 7, dtype=D64)
    torch.testing.assert_close(minmax_kl(a, b), off_kl(a.clone(), b.clone()))


def test_random_starts_deterministic_with_a_generator_and_errors():
    backbone, head = _model()
    items, val = _data(12, 3)
    batches = [(torch.arange(s, s + 4), items[s:s + 4, 0], items[s:s + 4, 1]) for s in range(0, 12, 4)]
    settings = RCSSettings(fraction=0.67, batch_size=4)
    runs = [rcs_select(backbone, head, batches, val, 12, settings, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert runs[0].indices.tolist() == runs[1].indices.tolist() and len(runs[0].indices) == 8
    with pytest.raises(ValueError, match="less than one batch"):
        rcs_select(backbone, head, batches, val, 12, RCSSettings(fraction=0.1, batch_size=4))
