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
  AIR's ``finetuning_utils.trades_loss_dual`` computes the attack's KL target through the 'normal'
  branch whatever ``natural_mode`` says (``model(x_natural, 'normal')``; PKU-ML/DYNACL's own
  trades_loss_dual uses ``natural_mode`` there): ``attack_target_branch='normal'``, as coded. The loss
  itself uses 'pgd' for both logits.
  (The script itself crashes after clustering on an unbound ``name``; the settings are what it means.)

Both scripts give the probe head as many outputs as the dataset has classes
(``nn.Linear(512, num_classes)``), whatever K is (LP-AFT on CIFAR-100: 100 outputs, labels 0-9), zero
initialised; advfast keeps that (``max(num_classes, K)`` outputs, so a dataset with fewer classes than K
still fits the labels).

The k-means tolerances are kmeans_pytorch's (absolute, on (sum_k ||c_k - c_k'||)^2); advfast's k-means
(advfast.pseudo_labels.kmeans) uses scikit-learn's relative tolerance and k-means++ init, so
its labels cannot equal the official unseeded ones; advfast.methods.lp_pseudo_labels documents the
mapping used.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


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
    natural_branch: str = "pgd"  # branch of the clean logits of the loss (CE and the KL target)
    adv_branch: str = "pgd"
    attack_target_branch: str = "pgd"  # branch of the attack's KL target p(x) (AIR's trades_loss_dual: 'normal')
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
    aft=PseudoAFTStep(trades_random_start=0.001, attack_target_branch="normal", dual_bn=True),
)

POST_PROCESSING = {p.name: p for p in (LP_AFT, LP_AFF)}


def num_clusters(post: PostProcessing, num_classes: int) -> int:
    """K of the pseudo-label step for a dataset with ``num_classes`` classes."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return post.labels.num_clusters if post.labels.num_clusters is not None else num_classes


# digits: a 10-epoch pre-training, where CIFAR's 25 AFT epochs (TRADES-10, about an ACL epoch each) would be
# 2.5x the run itself: the AFT's epochs and lr steps are divided by DIGITS_AFT_DIVISOR (5 epochs, lr 0.1 /
# 0.01 / 0.001 for 2 / 2 / 1 epochs: the same shape). The probe keeps its 10 epochs: it costs one frozen
# forward per image, and a digits epoch is 11 steps (2 epochs would leave the zero-initialised head ~22 steps
# at lr 0.01 to fit the pseudo labels before the AFT starts; the script gives it 970).
DIGITS_AFT_DIVISOR = 5


def for_dataset(post: PostProcessing, dataset: str) -> PostProcessing:
    """``post`` with its epoch counts for ``dataset``: as coded, or the AFT scaled down for digits."""
    if dataset != "digits":
        return post
    d = DIGITS_AFT_DIVISOR
    aft = replace(post.aft, epochs=max(1, post.aft.epochs // d),
                  milestones=tuple(sorted({max(1, m // d) for m in post.aft.milestones})))
    return replace(post, aft=aft)


def lr_segments(aft: PseudoAFTStep) -> list[tuple[int, float]]:
    """(epochs, lr) of each constant-lr piece of the AFT's MultiStepLR(milestones, gamma 0.1), stepped
    per epoch: [(10, 0.1), (10, 0.01), (5, 0.001)] as coded."""
    bounds = [m for m in aft.milestones if 0 < m < aft.epochs]
    if list(bounds) != sorted(set(bounds)):
        raise ValueError(f"milestones must increase strictly, got {aft.milestones}")
    edges = [0, *bounds, aft.epochs]
    return [(edges[i + 1] - edges[i], aft.lr * 0.1 ** i) for i in range(len(edges) - 1)]
