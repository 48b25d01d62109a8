"""How each published robust-SSL code base stores its encoder: one small description per format.

Every official code base builds the same CIFAR ResNet (3x3 stride-1 stem, no max-pool, BasicBlocks
[2, 2, 2, 2], global average pool), so a format differs only in: where the weights sit in the saved
payload, key prefixes, how BatchNorm branches are named, the downsample/shortcut names, the input
normalisation the model applies, and (solo-learn, DeACL) the stem's padding. advfast.interop.load maps
any of them onto advfast's ResNet (torchvision-style keys, ``downsample.0/1``); see docs/interop.md.

Sources (read at the commits listed in docs/interop.md):
- ACL: VITA-Group/Adversarial-Contrastive-Learning models/resnet_multi_bn.py (``batch_norm_multiple.bn_list``,
  ``Downsample_multiple.conv/.bn``, ImageNet mean/std inside), train_simCLR.py saves
  ``{'epoch', 'state_dict', 'optim'}``; fine-tuning keeps the 'pgd' branch (``--bnNameCnt 1``).
- DynACL: PKU-ML/DYNACL models/resnet_multi_bn.py ``resnet18_momentum`` (``encoder_q``/``encoder_k``),
  train_DynACL.py saves model.pt (whole wrapper) and model_encoder_k.pt (``encoder_k`` alone); the EMA
  encoder_k is the deliverable. DynACL++ (LPAFT), DynACL-AIR(++) and DynACL-RCS save the same ACL layout
  (single-BN after LPAFT.py).
- AdvCL: LijieFan/AdvCL models/resnet_cifar_multibn_ensembleFC.py (bn_list of ['normal', 'pgd', 'pgd_ce'],
  no input normalisation), pretraining_advCL.py ``checkpoint()`` saves ``{'model', 'epoch', 'rng_state'}``
  of a DataParallel model (``module.``); finetuning_advCL_SLF.py keeps ``bn_list.1``.
- A-InfoNCE: yqy2001/A-InfoNCE Asym-AdvCL (AdvCL's model and saving).
- DeACL: pantheon5100/DeACL solo/models/resnet_add_normalize.py (CIFAR mean/std inside) with the solo-learn
  CIFAR stem ``Conv2d(3, 64, 3, 1, padding=2)`` (solo/methods/base_for_adversarial_training.py); a
  PyTorch Lightning checkpoint with ``backbone.*`` keys.
- solo-learn: vturrisi/solo-learn solo/methods/base.py (same padding-2 stem, normalisation in the data
  pipeline), Lightning checkpoint with ``backbone.*``; DeACL's teacher.
- RoCL: Kim-Minseon/RoCL src/models/resnet.py (kuangliu ResNet, ``shortcut.0/1``, no normalisation),
  src/utils.py ``checkpoint()`` saves ``{'epoch', 'acc', 'model', 'optimizer_state', 'rng_state'}`` of a
  DDP model (``module.``).
- AMOC: MTandHJ/amoc models/resnet.py with models/base.py ``TriggerBN2d`` (``bn_clean``/``bn_adv``),
  CIFAR-10 mean/std applied outside the model (src/config.py); src/base.py saves
  ``encoder_q.state_dict()`` as paras.pt, src/utils.py ``save_checkpoint`` the whole MoCo under "model".
- robustssl: the layout GodXuxilie/RobustSSL_Benchmark Finetuning_Methods/Vanilla_Finetuning/utils.py
  ``get_model`` loads for ``--pretraining ACL/DynACL``: ACL's, under 'state_dict'.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PublishedFormat:
    name: str  # the --from value
    method: str  # the name the leaderboard / paper uses
    repo: str  # official code
    containers: tuple[str, ...]  # payload keys that may hold the state dict, in order (else the payload itself)
    encoder_prefixes: tuple[str, ...]  # the encoder's key prefix inside the state dict, tried in order ("" = top)
    bn: str  # "bn_list" (ACL's batch_norm_multiple), "trigger" (AMOC's TriggerBN2d) or "plain"
    branches: tuple[str, ...]  # BN branch names in the file's order (bn_list index; trigger: clean, adv)
    eval_branch: str  # the branch the method's paper evaluates
    mean: tuple[float, ...] | None  # input normalisation of the official model (None: none)
    std: tuple[float, ...] | None
    stem_padding: int = 1
    lightning: bool = False
    note: str = ""

    @property
    def arch(self) -> str:
        return "resnet18" if self.stem_padding == 1 else "resnet18_solo"


_ACL_DUAL = dict(bn="bn_list", branches=("normal", "pgd"), eval_branch="pgd", mean=IMAGENET_MEAN, std=IMAGENET_STD)
_ADVCL = dict(containers=("model", "state_dict"), encoder_prefixes=("",), bn="bn_list",
              branches=("normal", "pgd", "pgd_ce"), eval_branch="pgd", mean=None, std=None)

FORMATS: dict[str, PublishedFormat] = {f.name: f for f in (
    PublishedFormat("acl", "ACL", "VITA-Group/Adversarial-Contrastive-Learning", ("state_dict",), ("",), **_ACL_DUAL),
    PublishedFormat("dynacl", "DynACL / DynACL++ / DynACL-AIR(++) / DynACL-RCS", "PKU-ML/DYNACL",
                    ("state_dict",), ("encoder_k.", ""), **_ACL_DUAL,
                    note="model.pt holds encoder_q and the EMA encoder_k; encoder_k is used"),
    PublishedFormat("advcl", "AdvCL", "LijieFan/AdvCL", **_ADVCL),
    PublishedFormat("a-infonce", "A-InfoNCE", "yqy2001/A-InfoNCE", **_ADVCL,
                    note="the Asym-AdvCL checkpoints (the leaderboard's); Asym-RoCL ones load with --from rocl"),
    PublishedFormat("deacl", "DeACL", "pantheon5100/DeACL", ("state_dict",), ("backbone.",), bn="plain",
                    branches=("normal",), eval_branch="normal", mean=(0.4914, 0.4822, 0.4465),
                    std=(0.247, 0.243, 0.261), stem_padding=2, lightning=True),
    PublishedFormat("solo-learn", "solo-learn SimCLR (DeACL's teacher)", "vturrisi/solo-learn", ("state_dict",),
                    ("backbone.",), bn="plain", branches=("normal",), eval_branch="normal",
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), stem_padding=2, lightning=True),
    PublishedFormat("rocl", "RoCL", "Kim-Minseon/RoCL", ("model",), ("",), bn="plain", branches=("normal",),
                    eval_branch="normal", mean=None, std=None),
    PublishedFormat("amoc", "AMOC", "MTandHJ/amoc", ("model",), ("encoder_q.", ""), bn="trigger",
                    branches=("clean", "adv"), eval_branch="adv", mean=(0.4914, 0.4824, 0.4467),
                    std=(0.2471, 0.2435, 0.2617)),
    PublishedFormat("robustssl", "RobustSSL benchmark (ACL layout)", "GodXuxilie/RobustSSL_Benchmark",
                    ("state_dict_dual", "state_dict", "model"), ("",), **_ACL_DUAL),
)}

# the module names BatchNorm layers carry in these layouts (the stem's, the blocks', the downsample's)
_BN_NAMES = ("bn1", "bn2", "bn3", "downsample.bn", "downsample.1", "shortcut.1")


def get_format(name: str) -> PublishedFormat:
    key = name.lower().replace("_", "-")
    if key not in FORMATS:
        from advfast.config import closest
        from advfast.interop.errors import InteropError

        raise InteropError(f"unknown checkpoint format {name!r}{closest(key, FORMATS)}; choose from "
                           f"{', '.join(FORMATS)}")
    return FORMATS[key]


def describe_layout(keys) -> str | None:
    """The format a set of state-dict keys looks like (for error messages), or None."""
    keys = list(keys)
    joined = "\n".join(keys)
    if ".bn_adv." in joined or ".bn_clean." in joined:
        return "amoc"
    if ".bn_list.2." in joined:
        return "advcl (or a-infonce)"
    if "encoder_k." in joined and ".bn_list." in joined:
        return "dynacl"
    if ".bn_list." in joined:
        return "acl" if any(k.endswith("normalize.mean") for k in keys) else "advcl (or a-infonce)"
    if ".shortcut." in joined:
        return "rocl"
    if any(k.startswith("backbone.") for k in keys):
        return "deacl" if any(k.startswith("backbone.normalize.") for k in keys) else "solo-learn"
    return None
