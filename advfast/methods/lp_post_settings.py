"""The pseudo-label post-processing stages of DynACL++ (LP-AFT) and DynACL-AIR++ (LP-AFF), as data.

Both official stages: k-means pseudo labels on the clean ("normal") branch's pooled backbone
features of the un-augmented training set (not L2-normalised), then a linear probe (encoder frozen,
eval mode) and an adversarial full fine-tuning with TRADES on those pseudo labels, on the "pgd" branch.
They differ in K, the k-means tolerance, the TRADES start and what the result is:

* LP-AFT (PKU-ML/DYNACL ``assign_label.py`` + ``LPAFT.py``, DynACL++ SLF/ALF): K = 10 also for
  CIFAR-100 (as coded), kmeans_pytorch tol 1e-4; the 'pgd' route converted to a single-BN ResNet,
  fc zero-initialised; TRADES from x itself (no random start). At x_adv = x the KL's input gradient is
  only the rounding difference between log_softmax and softmax (~1e-19 in float64, ~1e-10 in float32,
  nonzero on every pixel), so the first sign step goes in a rounding-noise direction, an arbitrary
  +-alpha start; the later steps follow the true gradient (checked on the official trades_loss:
  docs/methods_dynacl_air.md). advfast cannot match that first step bit for bit (its rounding differs);
  ``trades_random_start`` = 0.001 (AIR's Gaussian start) is the well-defined alternative.
* LP-AFF (GodXuxilie/Enhancing_ACL_via_AIR ``LP-AFF.py``, DynACL-AIR++): K = number of classes,
  tol 1e-5; dual-BN model kept, ``trades_loss_dual(natural_mode='pgd')`` with a 0.001 * randn start.
  (The script itself crashes after clustering on an unbound ``name``; the settings are what it means.)

The k-means tolerances are kmeans_pytorch's (absolute, on (sum_k ||c_k - c_k'||)^2); advfast's k-means
(advfast.pseudo_labels.kmeans) uses scikit-learn's relative tolerance and k-means++ init, so
its labels cannot equal the official unseeded ones; advfast.methods.lp_pseudo_labels documents the
mapping used.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PseudoLabelStep:
    num_clusters: int | None  # None: the dataset's number of classes
    official_tol: float  # kmeans_pytorch's tol (absolute, on the squared sum of centre shifts)
    branch: str = "normal"  # BN branch of the features
    features: str = "backbone"  # pooled 512-d backbone output, not normalised, eval mode, un-augmented images


@dataclass(frozen=True)
class ProbeStep:
    epochs: int = 10  # --epochs_head
    lr: float = 0.01  # --lr_head, constant (MultiStepLR with no milestones)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 512
    drop_last: bool = True
    augment: str = "finetune"  # RandomCrop(32, 4) + flip
    branch: str = "pgd"
    fc_init: str = "zeros"


@dataclass(frozen=True)
class PseudoAFTStep:
    epochs: int = 25  # --epochs
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = (10, 20)  # per epoch, gamma 0.1
    batch_size: int = 512
    drop_last: bool = True
    augment: str = "finetune"
    beta: float = 6.0  # CE(clean) + beta * KL_sum / B
    attack_steps: int = 10
    step_size: float = 2 / 255
    epsilon: float = 8 / 255
    trades_random_start: float = 0.0  # std of the Gaussian start; 0: x itself
    natural_branch: str = "pgd"  # branch of the clean logits (KL target and CE)
    adv_branch: str = "pgd"
    dual_bn: bool = False  # False: the 'pgd' route as a single-BN network


@dataclass(frozen=True)
class PostProcessing:
    name: str
    official: str  # the script reproduced
    labels: PseudoLabelStep
    probe: ProbeStep
    aft: PseudoAFTStep


LP_AFT = PostProcessing(
    name="lp-aft", official="PKU-ML/DYNACL assign_label.py + LPAFT.py (DynACL++)",
    labels=PseudoLabelStep(num_clusters=10, official_tol=1e-4),
    probe=ProbeStep(),
    aft=PseudoAFTStep(trades_random_start=0.0, dual_bn=False),
)

LP_AFF = PostProcessing(
    name="lp-aff", official="GodXuxilie/Enhancing_ACL_via_AIR LP-AFF.py (DynACL-AIR++)",
    labels=PseudoLabelStep(num_clusters=None, official_tol=1e-5),
    probe=ProbeStep(),
    aft=PseudoAFTStep(trades_random_start=0.001, dual_bn=True),
)

POST_PROCESSING = {p.name: p for p in (LP_AFT, LP_AFF)}


def num_clusters(post: PostProcessing, num_classes: int) -> int:
    """K of the pseudo-label step for a dataset with ``num_classes`` classes."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return post.labels.num_clusters if post.labels.num_clusters is not None else num_classes
