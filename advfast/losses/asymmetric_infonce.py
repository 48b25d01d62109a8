"""A-InfoNCE (Yu et al., ECCV 2022; yqy2001/A-InfoNCE) exactly as its official code computes it.

Two codebases, two loss functions:

* :func:`asymmetric_supcon`: ``Asym-AdvCL/losses.py`` (``ori_SupConLoss`` and, with
  ``hard_negatives=True``, ``SupConLoss``) with ``labels=None``, ``contrast_mode='all'``. ``z`` is
  AdvCL's stack of L2-normalised projections, view-major, block 0 = the adversarial view x_cl,
  blocks 1.. = the clean views (x1, x2, x_hfc). With M = V*B rows, a = z zᵀ / T, lg = a - rowmax(a):

    plain (IP/no flag):  nll_ij = -(lg_ij - log sum_{k != i} exp(lg_ik))
    HN (HCL):            e = exp(lg); neg = e * (not positive, not self); p_i = mean_{j in pos(i)} e_ij
                         imp = exp(beta * log(neg + 1e-9)); rw = imp * neg / imp.mean(-1)
                         Ng = clamp((-tau_plus * N * p + rw.sum(-1)) / (1 - tau_plus), min=N * e^(-1/0.5))
                         nll_ij = -log(e_ij / (p + Ng))                  N = (B - 1) * V
    S = pos ⊙ nll; the adversarial-row/clean-column block U = S[:B, B:] and its mirror are then rewritten:
    stop_grad (IP):  T_ = the same nll from a_sg = z z.detach()ᵀ / T (gradient only through the anchor row)
                     ac = sd * T_[B:, :B]ᵀ + (1 - sd) * T_[:B, B:];  S[:B, B:] = w * ac;  S[B:, :B] = w * acᵀ
    no stop_grad:    S[:B, B:] = w * U;  S[B:, :B] = w² * Uᵀ
    loss = (T / base_T) * mean_i( sum_j S_ij / |pos(i)| )

  Quirks of the code, kept by default (``docs/methods_deacl_ainfonce_rcs.md``):
  - HN broadcasts (M, M) / (M,) twice: ``imp.mean(-1)`` and ``(p + Ng)`` divide COLUMN j by row j's
    statistic (HCL divides each row by its own). ``hn_rowwise=True`` gives HCL's row-wise form.
  - without stop_grad the lower block is written from a view of the already-scaled upper block, so it
    carries w² (the IP variant's attack has w = 1.2). ``fix_aliasing=True`` uses w for both blocks.
  - even with no flag at all, the clean->adversarial block is replaced by the transposed
    adversarial->clean block (other denominators than LijieFan/AdvCL's SupConLoss); kept, no flag.
  - the HN clamp uses e^(-1/0.5) whatever the temperature (``hn_clamp_temperature``).

* :func:`asymmetric_rocl_nt_xent`: ``Asym-RoCL/loss.py`` (``NT_xent``, ``NT_xent_HN``) on RoCL's
  stack [x1, x2, x_adv] (or [x, x2] for V=2, the 'None' loss), with RoCL's detached right factor
  (``pairwise_similarity_train``). Its HN form divides by (p + Ng) row-wise but shares the column-wise
  ``imp.mean(-1)`` (``hn_rowwise=True`` fixes it).

Fused kernels (``backend``): the plain and IP forms (``hard_negatives=False``) are, summed over the
anchors, a weighted sum of per-row log-sum-exps minus a weighted sum of positive logits (the row max
cancels): with P = V-1 clean views and w_l = w² (w with fix_aliasing),

    plain:  (w + w_l) sum_adv LSE + (P-1)/P sum_clean LSE - (w + w_l)/P sum a(adv, clean) - 1/P sum a(clean, clean')
    IP:     (P-1)/P sum_clean LSE - 1/P sum a(clean, clean')
            + 2w [ sd/P (sum_clean LSE' - sum a'(clean, adv)) + (1-sd) (sum_adv LSE' - 1/P sum a'(adv, clean)) ]

where LSE' and a' are the same values with the keys detached (gradient through the anchor row only).
The LSEs go through ``advfast.ops.contrastive``'s row log-sum-exp (triton on CUDA, the chunked walk
for large matrices on CPU): one call with full gradients, and for IP one more with detached keys
(``need_dk`` false); the positive logits are O(M D) dot products. Nothing (M, M) is materialised.
The HN form cannot use it: it needs exp-level sums of ``imp * neg`` per row and, as coded, divides
each element by another row's statistics (two (M, M) broadcasts), so it stays the plain torch form
(the matrix is (4B)², 2048² at B = 512: 32 MB in fp32, small next to the ResNet-18 forwards).
``backend="torch"`` (or "auto" resolving to it: CPU, small matrices) materialises the matrix as the
official code. Everything computes in float32 at least (float64 stays float64).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from advfast.ops.contrastive import _pick_backend, _row_lse
from advfast.ops.dtypes import upcast


def _check_stack(op: str, z, num_views: int) -> int:
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point():
        raise ValueError(f"{op}: z must be a 2-D floating-point tensor (V*B, D), got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 2:
        raise ValueError(f"{op}: num_views must be an int >= 2, got {num_views!r}")
    if z.shape[0] % num_views or z.shape[0] // num_views < 2:
        raise ValueError(f"{op}: z has {z.shape[0]} rows, not num_views={num_views} blocks of >= 2 rows; "
                         "stack the views as cat([adv, clean_1, ...]) of equal batch size")
    return z.shape[0] // num_views


def _check_positive(op: str, **values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{op}: {name} must be a positive finite number, got {v!r}")


def _check_degree(op: str, sd) -> None:
    if isinstance(sd, torch.Tensor):
        if sd.numel() != 1:
            raise ValueError(f"{op}: stop_grad_degree must be a number or a 0-d tensor, got shape {tuple(sd.shape)}")
        return  # a device tensor (the adaptive degree): not read back, no host sync
    if isinstance(sd, bool) or not isinstance(sd, numbers.Real) or not 0.0 <= sd <= 1.0:
        raise ValueError(f"{op}: stop_grad_degree must be in [0, 1], got {sd!r}")


def _compute(z: torch.Tensor) -> torch.Tensor:
    return upcast(z)


def _masks(b: int, v: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positive, not-self, self) boolean masks of the view-major (V*B)² matrix."""
    idx = torch.arange(v * b, device=device)
    self_mask = idx[:, None] == idx[None, :]
    pos = (idx[:, None] % b == idx[None, :] % b) & ~self_mask
    return pos, ~self_mask, self_mask


def _hn_denominator(e: torch.Tensor, pos_f: torch.Tensor, not_self_f: torch.Tensor, n_neg: int,
                    tau_plus: float, beta: float, clamp_temperature: float, rowwise_mean: bool) -> torch.Tensor:
    """HCL's p + Ng per row (shape (M,)), with the official column-wise imp.mean(-1) unless rowwise_mean."""
    neg = e * (1 - pos_f) * not_self_f
    p = (e * pos_f).sum(dim=1) / pos_f.sum(dim=1)
    imp = (beta * (neg + 1e-9).log()).exp()
    imp_mean = imp.mean(dim=-1)
    rw = imp * neg / (imp_mean[:, None] if rowwise_mean else imp_mean)  # (M,M)/(M,): column j / row j's mean
    ng = (-tau_plus * n_neg * p + rw.sum(dim=-1)) / (1 - tau_plus)
    ng = torch.clamp(ng, min=n_neg * math.e ** (-1 / clamp_temperature))
    return p + ng


def _supcon_nll(a: torch.Tensor, pos_f, not_self_f, v: int, b: int, hard_negatives: bool, tau_plus: float,
                beta: float, clamp_temperature: float, hn_rowwise: bool) -> torch.Tensor:
    lg = a - a.max(dim=1, keepdim=True).values.detach()
    if not hard_negatives:  # ori_SupConLoss: log_prob = lg - log(sum of exp over k != i)
        return -(lg - torch.log((torch.exp(lg) * not_self_f).sum(dim=1, keepdim=True)))
    e = torch.exp(lg)
    den = _hn_denominator(e, pos_f, not_self_f, (b - 1) * v, tau_plus, beta, clamp_temperature, hn_rowwise)
    return -torch.log(e / (den[:, None] if hn_rowwise else den))  # official: (M,M)/(M,), column j's denominator


def asymmetric_supcon(z: torch.Tensor, num_views: int, temperature: float = 0.5, base_temperature: float = 0.07, *,
                      hard_negatives: bool = False, stop_grad: bool = False, stop_grad_degree=0.2,
                      adv_weight: float = 1.0, tau_plus: float = 0.1, beta: float = 1.0,
                      hn_clamp_temperature: float = 0.5, hn_rowwise: bool = False,
                      fix_aliasing: bool = False, backend: str = "torch") -> torch.Tensor:
    """Asym-AdvCL's SupCon over ``z`` = cat([z_adv, z_clean_1, ...]) (normalised, view-major).

    hard_negatives: ``SupConLoss`` (HN) instead of ``ori_SupConLoss``. stop_grad, stop_grad_degree (sd,
    a float or a 0-d tensor such as :class:`AdaptiveStopGradDegree`'s): the IP asymmetry. adv_weight: w.
    hn_rowwise / fix_aliasing: the corrected forms of the two slips (module docstring). backend: "torch"
    (the materialised matrix, as coded), "auto", "torch-chunked" or "triton" (the fused row log-sum-exp of
    advfast.ops, plain and IP forms only; "auto" keeps HN on "torch").
    """
    op = "asymmetric_supcon"
    b = _check_stack(op, z, num_views)
    _check_positive(op, temperature=temperature, base_temperature=base_temperature, beta=beta,
                    hn_clamp_temperature=hn_clamp_temperature)
    if isinstance(adv_weight, bool) or not isinstance(adv_weight, numbers.Real):
        raise ValueError(f"{op}: adv_weight must be a number, got {adv_weight!r}")
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"{op}: tau_plus must be in [0, 1), got {tau_plus!r}")
    if stop_grad:
        _check_degree(op, stop_grad_degree)
    z = _compute(z)
    if hard_negatives:
        if backend not in ("torch", "auto"):
            raise ValueError(f"{op}: hard_negatives needs the materialised matrix (backend 'torch' or 'auto'), "
                             f"got backend={backend!r}")
    else:
        backend = _pick_backend(op, backend, z.device, z.shape[0] * z.shape[0], z.dtype)
        if backend != "torch":
            return _fused_supcon(z, num_views, b, temperature, base_temperature, stop_grad, stop_grad_degree,
                                 adv_weight, fix_aliasing, backend)
    pos, not_self, _ = _masks(b, num_views, z.device)
    pos_f, not_self_f = pos.to(z.dtype), not_self.to(z.dtype)
    hn = (hard_negatives, tau_plus, beta, hn_clamp_temperature, hn_rowwise)

    s = pos_f * _supcon_nll(z @ z.T / temperature, pos_f, not_self_f, num_views, b, *hn)
    upper = s[:b, b:]
    if stop_grad:
        t_ = pos_f * _supcon_nll(z @ z.detach().T / temperature, pos_f, not_self_f, num_views, b, *hn)
        ac = stop_grad_degree * t_[b:, :b].T + (1 - stop_grad_degree) * t_[:b, b:]
        new_upper, new_lower = adv_weight * ac, adv_weight * ac.T
    else:  # the official in-place write makes the lower block read the already-scaled upper one: w²
        new_upper = adv_weight * upper
        new_lower = (adv_weight if fix_aliasing else adv_weight * adv_weight) * upper.T
    s = torch.cat([torch.cat([s[:b, :b], new_upper], dim=1), torch.cat([new_lower, s[b:, b:]], dim=1)], dim=0)
    per_anchor = s.sum(dim=1) / pos_f.sum(dim=1)
    return (temperature / base_temperature) * per_anchor.mean()


def _fused_supcon(z, v: int, b: int, temperature: float, base_temperature: float, stop_grad: bool, sd,
                  w: float, fix_aliasing: bool, backend: str) -> torch.Tensor:
    """The plain / IP forms from per-row log-sum-exps (module docstring), nothing (M, M) materialised."""
    scale, p = 1.0 / temperature, v - 1
    zb = z.view(v, b, -1)
    adv, clean = zb[0], zb[1:]
    clean_sum = clean.sum(dim=0)
    # sum over samples and ordered pairs u != u' of clean logits: |sum_u z_u|² - sum_u |z_u|² per sample
    cc = ((clean_sum * clean_sum).sum() - (clean * clean).sum()) * scale
    lse, _ = _row_lse(z, z, scale, True, b, 0, backend)  # self excluded, gradient through both sides
    total = (p - 1) / p * lse[b:].sum() - cc / p
    if not stop_grad:
        w_total = w + (w if fix_aliasing else w * w)
        a_adv_clean = (adv * clean_sum).sum() * scale
        total = total + w_total * (lse[:b].sum() - a_adv_clean / p)
    else:  # the same values with the keys detached: the gradient reaches the anchor row only
        zd = z.detach().view(v, b, -1)
        lse_sg, _ = _row_lse(z, z.detach(), scale, True, b, 0, backend)
        a_clean_adv = (clean * zd[0]).sum() * scale
        a_adv_clean = (adv * zd[1:].sum(dim=0)).sum() * scale
        total = total + 2 * w * (sd / p * (lse_sg[b:].sum() - a_clean_adv)
                                 + (1 - sd) * (lse_sg[:b].sum() - a_adv_clean / p))
    return (temperature / base_temperature) * total / z.shape[0]


def asymmetric_rocl_nt_xent(z: torch.Tensor, num_views: int, temperature: float = 0.5, *,
                            hard_negatives: bool = False, stop_grad: bool = False, stop_grad_degree=0.2,
                            adv_weight: float = 1.0, tau: float = 0.1, beta: float = 1.0,
                            hn_clamp_temperature: float = 0.5, hn_rowwise: bool = False) -> torch.Tensor:
    """Asym-RoCL's NT-Xent over ``z`` = cat([x1, x2, x_adv]) (V=3, 'Rep') or cat([x, x2]) (V=2, 'None').

    ``z`` are projector outputs (normalised here with RoCL's +1e-8); the right factor of the similarity
    is detached, as ``pairwise_similarity_train``. stop_grad applies to V=3 only (as coded): the clean
    anchors' adversarial positives weigh w·sd, the adversarial anchor's clean positives w·(1-sd).
    """
    op = "asymmetric_rocl_nt_xent"
    n = _check_stack(op, z, num_views)
    if num_views not in (2, 3):
        raise ValueError(f"{op}: num_views must be 2 ('None': [x, x2]) or 3 ('Rep': [x1, x2, x_adv]), got {num_views}")
    _check_positive(op, temperature=temperature, beta=beta, hn_clamp_temperature=hn_clamp_temperature)
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"{op}: tau must be in [0, 1), got {tau!r}")
    if stop_grad:
        _check_degree(op, stop_grad_degree)
    z = _compute(z)
    m = z.shape[0]
    z_n = z / (z.norm(dim=1).view(m, 1) + 1e-8)
    sim = (1.0 / temperature) * (z_n @ z_n.T.detach())
    e = torch.exp(sim)
    pos, not_self, _ = _masks(n, num_views, z.device)
    if hard_negatives:  # NT_xent_HN: self not removed from e (the masks keep it out of p and neg)
        pos_f, not_self_f = pos.to(z.dtype), not_self.to(z.dtype)
        den = _hn_denominator(e, pos_f, not_self_f, (n - 1) * num_views, tau, beta, hn_clamp_temperature,
                              hn_rowwise)
        nll = -torch.log(e / den.view(m, 1))
    else:
        e = e * not_self.to(z.dtype)
        nll = -torch.log(e / (e.sum(dim=1).view(m, 1) + 1e-8) + 1e-8)

    def d(r, c):  # diagonal of block (r, c): each sample's term against its own other view
        return torch.diagonal(nll[r * n:(r + 1) * n, c * n:(c + 1) * n])

    if num_views == 2:
        total = d(0, 1) + d(1, 0)
    elif stop_grad:
        total = (d(0, 1) + d(1, 0) + adv_weight * ((d(0, 2) + d(1, 2)) * stop_grad_degree
                                                   + (d(2, 0) + d(2, 1)) * (1 - stop_grad_degree)))
    else:
        total = d(0, 1) + d(1, 0) + d(0, 2) + d(2, 0) + d(1, 2) + d(2, 1)
    return (1.0 / m) * total.sum()


def mean_feature_distance(f_clean: torch.Tensor, f_adv: torch.Tensor) -> torch.Tensor:
    """mean_b ||f_clean - f_adv + 1e-6||₂ (F.pairwise_distance), the adaptive degree's input (half
    precision features are compared in float32)."""
    return F.pairwise_distance(upcast(f_clean), upcast(f_adv)).mean()


VARIANTS = ("ip", "hn", "iphn")  # --set method.asymmetric=...: IP (stop-grad), HN (hard negatives), both


def given_variant(options: dict) -> str | None:
    """The A-InfoNCE variant among raw method options (as a preset_for receives them), or None when
    unset or not a variant (the method's option check then names the bad value)."""
    value = options.get("asymmetric")
    if isinstance(value, str):
        value = value.strip().lower()
    return value if value in VARIANTS else None


class AdaptiveStopGradDegree(nn.Module):
    """Asym-AdvCL's adaptive stop-grad degree (``pretraining_advCL.py: train``, ``--stop_grad_adaptive``).

    During epochs 1..warmup_epochs (1-based; the code's ``epoch + 1 <= 30``) the batch-size-weighted mean
    of the per-batch distance is accumulated and the degree is ``base``; afterwards (avg frozen):
    d > avg -> base; d < d_min -> high; else (avg - d) / (avg - d_min) * (high - base) + base.
    Everything stays a device tensor (no host sync). The running sum and count are float64 buffers: as a
    submodule of a method they are in its checkpoints, so a resume continues the same mean exactly.
    """

    def __init__(self, base: float = 0.2, warmup_epochs: int = 30, d_min: float = 0.4, high: float = 0.5):
        super().__init__()
        _check_degree("AdaptiveStopGradDegree", base)
        _check_degree("AdaptiveStopGradDegree", high)
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"AdaptiveStopGradDegree: warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        self.base, self.warmup_epochs, self.d_min, self.high = float(base), warmup_epochs, float(d_min), float(high)
        self.register_buffer("sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))  # images (exact in float64)

    def forward(self, distance: torch.Tensor, batch_size: int, epoch: int) -> torch.Tensor:
        """The degree for this batch (0-d tensor on ``distance``'s device); ``epoch`` is 1-based."""
        d = distance.detach().to(device=self.sum.device, dtype=torch.float64)
        if epoch <= self.warmup_epochs:
            self.sum.add_(d * batch_size)
            self.count.add_(batch_size)
            return torch.full((), self.base, dtype=distance.dtype, device=distance.device)
        # official avg starts at 0 (no warm-up batch seen): then d > avg, the degree is base
        avg = torch.where(self.count > 0, self.sum / self.count.clamp_min(1), torch.zeros_like(self.sum))
        ramp = (avg - d) / (avg - self.d_min) * (self.high - self.base) + self.base
        sd = torch.where(d > avg, torch.full_like(d, self.base),
                         torch.where(d < self.d_min, torch.full_like(d, self.high), ramp))
        return sd.to(device=distance.device, dtype=distance.dtype)

    def extra_repr(self) -> str:
        return f"base={self.base}, warmup_epochs={self.warmup_epochs}, d_min={self.d_min}, high={self.high}"
