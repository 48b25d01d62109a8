"""A float64 transcription of AIR's loss and of one official AIR training iteration (ACL-AIR and
DynACL-AIR), for the step-fidelity test of ``method.air=true`` (issue 16). Not a test module itself.

GodXuxilie/Enhancing_ACL_via_AIR @15cf0a7, ``AIR.py: AIR_Loss``, ``pretraining.py: train,
PGD_contrastive, nt_xent``. Validated against the real code on the CPU by
docs/official_checks/dynacl_air_validate_air.py (the loss) and dynacl_air_validate_air_step.py (the
iteration); docs/methods_dynacl_air.md. Rows are the official layout: 2i and 2i+1 are the two views
of image i. ``model(x, bn_name)`` is the dual-BN encoder + projection head (no EMA copy in AIR's code);
``delta0`` the attack's uniform start. The per-iteration LR step (``scheduler.step()`` before the
optimizer step) is the caller's business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def official_air_loss(zi, zj, z_orig, zi_adv, zj_adv, weight=0.0, temperature=0.5, lambda1=0.5, lambda2=0.5):
    """AIR_Loss.forward (normalize=True): (total, nat, adv, SIR, AIR)."""
    bs = zi.shape[0]
    labels = torch.zeros((2 * bs,), dtype=torch.long, device=zi.device)
    mask = torch.ones((bs, bs), dtype=bool).fill_diagonal_(0)
    zi, zj, zo, zia, zja = (F.normalize(z, p=2, dim=-1) for z in (zi, zj, z_orig, zi_adv, zj_adv))

    def contrastive(a, b):
        ii, ij, ji, jj = (torch.mm(u, v.t()) / temperature for u, v in ((a, a), (a, b), (b, a), (b, b)))
        pos = torch.cat((ij[~mask], ji[~mask]), 0).unsqueeze(1)
        neg = torch.cat((torch.cat((ii[mask].reshape(bs, -1), ij[mask].reshape(bs, -1)), 1),
                         torch.cat((ji[mask].reshape(bs, -1), jj[mask].reshape(bs, -1)), 1)), 0)
        return F.cross_entropy(torch.cat((pos, neg), 1), labels)

    nat, adv = contrastive(zi, zj), contrastive(zia, zja)
    p_io = F.softmax((torch.mm(zi, zo.t()) / temperature)[~mask], -1)
    lp_jo = F.log_softmax((torch.mm(zj, zo.t()) / temperature)[~mask], -1)
    sir = F.kl_div(p_io, lp_jo, log_target=True, reduction="sum")  # probabilities as input: the code's quirk
    c_i = F.softmax((torch.mm(zia, zi.t()) / temperature)[~mask], -1)
    c_j = F.softmax((torch.mm(zja, zj.t()) / temperature)[~mask], -1)
    a_i = F.softmax((torch.mm(zia, zo.t()) / temperature)[~mask], -1) * c_i
    a_j = F.softmax((torch.mm(zja, zo.t()) / temperature)[~mask], -1) * c_j
    air = F.kl_div(a_i, torch.log(a_j), log_target=True, reduction="sum")
    total = nat * (1 - weight) + adv * (1 + weight) + lambda1 * sir + lambda2 * air
    return total, nat, adv, sir, air


def official_nt_xent(x: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """pretraining.nt_xent (ACL's): adjacent pairs, self term removed by subtracting e^{1/t}."""
    n = x.norm(p=2, dim=1, keepdim=True)
    x = torch.exp(((x @ x.t()) / (n * n.t()).clamp(min=1e-8)) / t)
    idx = torch.arange(x.size()[0])
    idx[::2] += 1
    idx[1::2] -= 1
    x = x[idx]
    x = x.diag() / (x.sum(0) - torch.exp(torch.tensor(1 / t, dtype=x.dtype)))
    return -torch.log(x).mean()


def official_pgd_contrastive(model, x, delta0, eps=8 / 255, alpha=2 / 255, iters=5):
    """PGD_contrastive (singleImg=False): eval mode, 'pgd' branch, plain NT-Xent."""
    model.eval()
    delta = delta0.clone()
    for _ in range(iters):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(official_nt_xent(model(x + delta, "pgd")), delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def official_air_step(model, x, x_orig, delta0, strength: float = 1.0, dyn_aug: bool = False, lam: float = 2 / 3):
    """(loss, x_adv) of one iteration of train() with --ACL_DS (and --DynAug when ``dyn_aug``)."""
    x_adv = official_pgd_contrastive(model, x, delta0)
    model.train()
    features_adv = model(x_adv, "pgd")
    features = model(x, "normal")
    z_orig = model(x_orig, "normal")
    weight = lam * (1 - strength) if dyn_aug else 0
    loss = official_air_loss(features[0::2], features[1::2], z_orig, features_adv[0::2], features_adv[1::2], weight)[0]
    return loss, x_adv
