"""A-InfoNCE's losses against float64 transcriptions of the official code (yqy2001/A-InfoNCE @ b28763e:
Asym-AdvCL/losses.py SupConLoss / ori_SupConLoss, Asym-RoCL/loss.py NT_xent / NT_xent_HN, the adaptive degree
of pretraining_advCL.py: train). The transcriptions below keep the official in-place block writes (the w²
aliasing) and the (M,M)/(M,) broadcasts; advfast's functional form must match them in value and gradient."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advfast.losses.asymmetric_infonce import (AdaptiveStopGradDegree, asymmetric_rocl_nt_xent, asymmetric_supcon,
                                               mean_feature_distance)

D64 = torch.float64


def official_supcon(features, hn, stop_grad, sd, w, tau_plus=0.1, beta=1.0, temperature=0.5, base_t=0.07):
    """Asym-AdvCL/losses.py, labels=None, contrast_mode='all'; features [bsz, n_views, D]."""
    bsz, v = features.shape[0], features.shape[1]
    mask = torch.eye(bsz, dtype=D64)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    adc = contrast @ contrast.T / temperature
    adc_sg = contrast @ contrast.T.detach() / temperature
    mask = mask.repeat(v, v)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(bsz * v).view(-1, 1), 0)
    mask = mask * logits_mask
    n = (bsz - 1) * v

    def nll(a):
        logits = a - a.max(dim=1, keepdim=True)[0].detach()
        if not hn:
            exp_logits = torch.exp(logits) * logits_mask
            return -(logits - torch.log(exp_logits.sum(1, keepdim=True)))
        exp_logits = torch.exp(logits)
        neg = exp_logits * (1 - mask) * logits_mask
        pos = (exp_logits * mask).sum(dim=1) / mask.sum(1)
        imp = (beta * (neg + 1e-9).log()).exp()
        rw = (imp * neg) / imp.mean(dim=-1)
        ng = (-tau_plus * n * pos + rw.sum(dim=-1)) / (1 - tau_plus)
        ng = torch.clamp(ng, min=n * np.e ** (-1 / 0.5))
        return -torch.log(exp_logits / (pos + ng))

    mix = mask * nll(adc)
    tmp = mask * nll(adc_sg) if stop_grad else mix
    if stop_grad:
        ac = sd * tmp[bsz:, 0:bsz].T + (1 - sd) * tmp[0:bsz, bsz:]
    else:
        ac = tmp[0:bsz, bsz:]
    mix[0:bsz, bsz:] = ac * w
    mix[bsz:, 0:bsz] = ac.T * w
    return ((temperature / base_t) * (mix.sum(1) / mask.sum(1))).view(v, bsz).mean()


def official_rocl(outputs, adv_type, hn, stop_grad, sd, w, tau=0.1, beta=1.0, temperature=0.5):
    """Asym-RoCL/loss.py: pairwise_similarity_train + NT_xent / NT_xent_HN."""
    n2 = outputs.shape[0]
    on = outputs / (outputs.norm(dim=1).view(n2, 1) + 1e-8)
    sim = (1. / temperature) * torch.mm(on, on.transpose(0, 1).detach())
    cn = 2 if adv_type == "None" else 3
    n = n2 // cn
    e = torch.exp(sim)
    if hn:
        mask = torch.eye(n, dtype=D64).repeat(cn, cn)
        logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(n * cn).view(-1, 1), 0)
        mask = mask * logits_mask
        neg = e * (1 - mask) * logits_mask
        pos = (e * mask).sum(dim=1) / mask.sum(1)
        imp = (beta * (neg + 1e-9).log()).exp()
        rw = (imp * neg) / imp.mean(dim=-1)
        n_neg = (n - 1) * cn
        ng = torch.clamp((-tau * n_neg * pos + rw.sum(dim=-1)) / (1 - tau), min=n_neg * np.e ** (-1 / 0.5))
        L = -torch.log(e / ((pos + ng).view(n2, 1)))
    else:
        e = e * (1 - torch.eye(n2, dtype=D64))
        L = -torch.log(e / (torch.sum(e, dim=1).view(n2, 1) + 1e-8) + 1e-8)
    dg = torch.diag
    if adv_type == "None":
        return (1. / n2) * torch.sum(dg(L[0:n, n:]) + dg(L[n:, 0:n]))
    if stop_grad:
        return (1. / n2) * torch.sum(dg(L[0:n, n:2 * n]) + dg(L[n:2 * n, 0:n]) + w * (
            (dg(L[0:n, 2 * n:]) + dg(L[n:2 * n, 2 * n:])) * sd
            + (dg(L[2 * n:, 0:n]) + dg(L[2 * n:, n:2 * n])) * (1 - sd)))
    return (1. / n2) * torch.sum(dg(L[0:n, n:2 * n]) + dg(L[n:2 * n, 0:n]) + dg(L[0:n, 2 * n:]) + dg(L[2 * n:, 0:n])
                                 + dg(L[n:2 * n, 2 * n:]) + dg(L[2 * n:, n:2 * n]))


def _value_and_grad(fn, z0):
    z = z0.clone().requires_grad_(True)
    loss = fn(z)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


@pytest.mark.parametrize("hn,stop_grad", list(itertools.product([False, True], [False, True])))
@pytest.mark.parametrize("w", [1.0, 1.2])
def test_supcon_matches_official(hn, stop_grad, w):
    b, v = 5, 4
    z0 = F.normalize(torch.randn(v * b, 6, dtype=D64), dim=1)
    sd = torch.tensor(0.35, dtype=D64)  # a tensor, as the adaptive degree
    ref = _value_and_grad(lambda z: official_supcon(torch.stack(z.split(b), 1), hn, stop_grad, sd, w, tau_plus=0.12),
                          z0)
    got = _value_and_grad(lambda z: asymmetric_supcon(z, v, hard_negatives=hn, stop_grad=stop_grad, stop_grad_degree=sd,
                                                      adv_weight=w, tau_plus=0.12), z0)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)


def test_supcon_without_flags_rewrites_the_clean_to_adversarial_block():
    b, v = 4, 4
    z = F.normalize(torch.randn(v * b, 6, dtype=D64), dim=1)
    from advfast.ops.contrastive import nt_xent_reference
    plain = nt_xent_reference(z, v, 0.5, "mean_log_prob", normalize=False) * (0.5 / 0.07)
    assert not torch.allclose(asymmetric_supcon(z, v), plain)  # other denominators than LijieFan/AdvCL's SupCon
    # with one clean view, the clean anchors' terms are the adversarial anchors' ones: only those count (twice)
    z2 = F.normalize(torch.randn(2 * b, 6, dtype=D64), dim=1)
    logits = (z2 @ z2.T / 0.5).masked_fill(torch.eye(2 * b, dtype=torch.bool), -math.inf)
    adv_ce = F.cross_entropy(logits[:b], torch.arange(b, 2 * b))
    torch.testing.assert_close(asymmetric_supcon(z2, 2), adv_ce * (0.5 / 0.07))


def test_corrected_forms_differ_and_match_their_definitions():
    b, v, w = 4, 4, 1.2
    z = F.normalize(torch.randn(v * b, 6, dtype=D64), dim=1)
    coded, fixed = asymmetric_supcon(z, v, adv_weight=w), asymmetric_supcon(z, v, adv_weight=w, fix_aliasing=True)
    assert not torch.allclose(coded, fixed)
    # fix_aliasing: the lower block carries w, so the loss is linear in w around the plain terms
    l0, l1 = (asymmetric_supcon(z, v, adv_weight=x, fix_aliasing=True) for x in (0.0, 1.0))
    torch.testing.assert_close(fixed, l0 + w * (l1 - l0))
    # HCL's row-wise form: every row divided by its own statistics -> invariant to a per-row shift of the logits
    hn_row = asymmetric_supcon(z, v, hard_negatives=True, hn_rowwise=True)
    hn_col = asymmetric_supcon(z, v, hard_negatives=True)
    assert torch.isfinite(hn_row) and not torch.allclose(hn_row, hn_col)


@pytest.mark.parametrize("hn,stop_grad,views", list(itertools.product([False, True], [False, True], [2, 3])))
def test_rocl_matches_official(hn, stop_grad, views):
    z0 = torch.randn(views * 5, 6, dtype=D64)
    adv_type = "None" if views == 2 else "Rep"
    ref = _value_and_grad(lambda z: official_rocl(z, adv_type, hn, stop_grad, 0.2, 1.3, tau=0.12), z0)
    got = _value_and_grad(lambda z: asymmetric_rocl_nt_xent(z, views, hard_negatives=hn, stop_grad=stop_grad,
                                                            stop_grad_degree=0.2, adv_weight=1.3, tau=0.12), z0)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)


def test_rocl_plain_equals_advfast_rocl_loss():
    from advfast.losses.rocl import rocl_nt_xent
    z = torch.randn(15, 6, dtype=D64)
    torch.testing.assert_close(asymmetric_rocl_nt_xent(z, 3), rocl_nt_xent(z, 3, 0.5))


class _OfficialAverageMeter:
    def __init__(self):
        self.sum, self.count, self.avg = 0, 0, 0

    def update(self, val, n=1):
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def official_degree(distances, epochs, batch, stpg=0.2, adaptive=30, d_min=0.4):
    """pretraining_advCL.py: train, per iteration; epochs are 0-based there."""
    meter, out = _OfficialAverageMeter(), []
    for d, epoch in zip(distances, epochs):
        sd = stpg
        if epoch + 1 > adaptive:
            if d > meter.avg:
                pass
            elif d < d_min:
                sd = 0.5
            else:
                sd = (meter.avg - d) / (meter.avg - d_min) * (0.5 - stpg) + stpg
        else:
            meter.update(d, batch)
        out.append(float(sd))
    return out


def test_adaptive_degree_matches_official():
    rng = np.random.default_rng(0)
    epochs = [e for e in range(6) for _ in range(3)]
    distances = [torch.tensor(x, dtype=D64) for x in rng.uniform(0.2, 1.2, len(epochs))]
    ref = official_degree(distances, epochs, batch=8, adaptive=3)
    deg = AdaptiveStopGradDegree(base=0.2, warmup_epochs=3, d_min=0.4)
    got = [float(deg(d, 8, e + 1)) for d, e in zip(distances, epochs)]
    assert got == pytest.approx(ref, rel=1e-12)
    assert len(set(got[9:])) > 1  # the ramp, the floor and the cap were all exercised or at least two of them
    state = deg.state_dict()
    again = AdaptiveStopGradDegree(base=0.2, warmup_epochs=3, d_min=0.4)
    again.load_state_dict(state)
    assert float(again(distances[-1], 8, 6)) == pytest.approx(got[-1])


def test_mean_feature_distance_is_pairwise_distance():
    a, b = torch.randn(4, 5, dtype=D64), torch.randn(4, 5, dtype=D64)
    torch.testing.assert_close(mean_feature_distance(a, b), (a - b + 1e-6).norm(dim=1).mean())


def test_bad_input_one_line_errors():
    z = torch.randn(8, 4)
    with pytest.raises(ValueError, match="num_views"):
        asymmetric_supcon(z, 3)
    with pytest.raises(ValueError, match="stop_grad_degree"):
        asymmetric_supcon(z, 2, stop_grad=True, stop_grad_degree=1.5)
    with pytest.raises(ValueError, match="num_views must be 2"):
        asymmetric_rocl_nt_xent(torch.randn(8, 4), 4)
    with pytest.raises(ValueError, match="temperature"):
        asymmetric_supcon(z, 2, temperature=0.0)
    assert math.isfinite(float(asymmetric_supcon(z.half(), 2)))  # half inputs computed in fp32
