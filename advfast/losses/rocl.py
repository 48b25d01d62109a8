"""RoCL's NT-Xent exactly as the official code computes it (Kim-Minseon/RoCL, src/loss.py).

Two things make it differ from a textbook NT-Xent, and neither is a feature of the fused
``advfast.ops.nt_xent``, so it is written here as a plain torch function (the matrix is only
3B x 3B, which is small next to the ResNet forward):

* ``pairwise_similarity`` multiplies the normalised outputs by their *detached* transpose, so the
  gradient reaches each sample only through its role as an anchor (the row side), never through
  its role as a positive or negative of other anchors. This holds in the attack and in training.
* with V stacked views (V=2: the 'None' loss; V=3: the 'Rep' loss over [x1, x2, x_adv]) each
  anchor has V-1 positives, each its own ``-log(e_ij / (sum_k e_ik + 1e-8) + 1e-8)`` term with the
  denominator over all V*N-1 others (positives included); the sum of these terms is divided by
  V*N, the number of anchors. With V=3 this is about twice a mean-over-positives loss.

The paper's eq. 3 (positives summed inside the log, symmetric gradient) is
``advfast.ops.nt_xent(z, num_views, temperature, positives="sum_in_numerator")``.
"""

from __future__ import annotations

import torch

from advfast.ops.dtypes import upcast


def rocl_nt_xent(z: torch.Tensor, num_views: int, temperature: float = 0.5,
                 detach_right: bool = True) -> torch.Tensor:
    """Official RoCL NT-Xent over ``z`` = cat of ``num_views`` blocks of N rows (view-major).

    ``z`` are projector outputs (not normalised; the official code normalises with a +1e-8).
    Computed in float32 at least (exp of logits up to 1/T), whatever the autocast dtype.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D tensor (V*N, D), got {getattr(z, 'shape', type(z))}")
    if num_views < 2:
        raise ValueError(f"num_views must be >= 2 (an anchor needs a positive), got {num_views}")
    if z.shape[0] % num_views != 0:
        raise ValueError(f"z has {z.shape[0]} rows, not a multiple of num_views={num_views}; "
                         "stack the views as cat([view_1, ..., view_V]) of equal batch size")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = upcast(z)
    total = z.shape[0]
    n = total // num_views

    z_n = z / (z.norm(dim=1, keepdim=True) + 1e-8)
    right = z_n.detach() if detach_right else z_n
    sim = (z_n @ right.t()) / temperature
    not_self = 1.0 - torch.eye(total, dtype=z.dtype, device=z.device)
    e = torch.exp(sim) * not_self
    neg_log_prob = -torch.log(e / (e.sum(dim=1, keepdim=True) + 1e-8) + 1e-8)

    # positives of anchor i (view a, sample s) are rows (view b != a, sample s)
    idx = torch.arange(total, device=z.device)
    same_sample = (idx[:, None] % n) == (idx[None, :] % n)
    positive = same_sample & (idx[:, None] != idx[None, :])
    return (neg_log_prob * positive).sum() / total
