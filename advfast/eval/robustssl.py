"""The RobustSSL benchmark's fine-tuning and test settings, as data (``--protocol-set robustssl``).

Read from GodXuxilie/RobustSSL_Benchmark @19dc714, Finetuning_Methods/Vanilla_Finetuning/:
- vanilla_finetuning.py (argparse defaults: 25 epochs, SGD lr 0.1, momentum 0.9, wd 2e-4, batch 128,
  lr x0.1 at epochs 15 and 20, eps 8/255, step 2/255, 10 training / 20 test attack steps, ``--dualBN 1``,
  ``--resize 32``; ``--mode ALL`` runs SLF, ALF, AFF in that order on one ``args`` object);
- utils.py ``setup_hyperparameter(args, mode)``: per-pre-training-method overrides of batch, lr, decay
  epochs and epochs, transcribed in :func:`setup_hyperparameter` with its quirks;
- utils.py ``train_loop`` / ``pgd_attack`` / ``trades_loss`` / ``trades_loss_dual``: SLF and ALF train the
  zero-initialised fc of a frozen encoder in eval mode (ALF on PGD-10 examples, uniform random start,
  CE); AFF is TRADES (beta 6, 10 steps, start x + 0.001 N(0, 1), KL summed / batch), with dual BN
  (natural through 'normal', adversarial through 'pgd') when ``--dualBN 1``;
- utils.py ``eval_adv_test`` (PGD-20, uniform start, eval mode, test batch 128), ``runAA`` (AutoAttack
  ``version='standard'``, Linf, eps 8/255, ``bs=128``, on one shuffled batch of 10000 images, 8000 for
  STL-10, ``drop_last``), ``eval_test_OOD`` (CIFAR-10-C / CIFAR-100-C via robustbench, 15 corruptions x
  severities 1-5, 10000 images each; mean over corruptions per severity, then over severities);
- utils.py ``get_loader``: train ``Resize(resize)``, ``RandomCrop(resize if stl10 else 32, padding=4)``,
  flip; test ``Resize(resize)``; no normalisation (the model normalises);
- run_vanilla_tune.sh: ``--mode ALL --eval-AA --eval-OOD``; ``--dualBN 0`` for AdvCL, A-InfoNCE, DeACL and
  for every CIFAR-10 -> STL-10 row; cross-dataset rows keep ``--resize 32``.
The leaderboard (RobustSSL/RobustSSL.github.io leaderboard/<pretrain>-<downstream>-<MODE>.js) reports per
row ``ra1`` (AutoAttack accuracy), ``sa1`` (clean accuracy) and ``ca1`` (mean corruption accuracy), in %.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BENCHMARK = "GodXuxilie/RobustSSL_Benchmark@19dc714 Finetuning_Methods/Vanilla_Finetuning"
MODES = ("SLF", "ALF", "AFF")
# --pretraining choices of vanilla_finetuning.py
PRETRAINING = ("ACL", "AdvCL", "A-InfoNCE", "DeACL", "DynACL", "DynACL++", "DynACL-AIR", "DynACL-AIR++",
               "DynACL-RCS")
# the --pretraining name the benchmark uses for a checkpoint of each advfast.interop format
PRETRAINING_OF_FORMAT = {"acl": "ACL", "dynacl": "DynACL", "advcl": "AdvCL", "a-infonce": "A-InfoNCE",
                         "deacl": "DeACL", "robustssl": "DynACL"}
DOWNSTREAM = ("cifar10", "cifar100", "stl10")
CORRUPTIONS = ("shot_noise", "gaussian_noise", "impulse_noise", "contrast", "zoom_blur", "motion_blur",
               "glass_blur", "defocus_blur", "snow", "pixelate", "brightness", "fog", "jpeg_compression",
               "elastic_transform", "frost")


@dataclass(frozen=True)
class FinetuneSettings:
    mode: str  # SLF | ALF | AFF
    epochs: int
    batch_size: int
    lr: float
    milestones: tuple[int, ...]
    momentum: float = 0.9
    weight_decay: float = 2e-4
    train_eps: float = 8 / 255
    train_alpha: float = 2 / 255
    train_steps: int = 10
    trades_beta: float = 6.0
    dual_bn: bool = False  # AFF only: TRADES with the natural term through BN 'normal', the adversarial through 'pgd'
    frozen_encoder_mode: str = "eval"  # SLF/ALF: train_loop calls model.eval() (BN statistics frozen)
    head_init: str = "zeros"  # fc.weight / fc.bias set to zeros by get_model


@dataclass(frozen=True)
class TestSettings:
    pgd_steps: int = 20
    pgd_eps: float = 8 / 255
    pgd_alpha: float = 2 / 255
    pgd_start: str = "uniform"  # pgd_attack(randomInit=True): delta ~ U(-eps, eps)
    test_batch_size: int = 128
    autoattack_version: str = "standard"
    autoattack_norm: str = "Linf"
    autoattack_eps: float = 8 / 255
    autoattack_batch_size: int = 128
    autoattack_images: dict = field(default_factory=lambda: {"cifar10": 10000, "cifar100": 10000, "stl10": 8000})
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    corruption_images: int = 10000
    corruption_datasets: tuple[str, ...] = ("cifar10", "cifar100")  # eval_test_OOD is skipped for STL-10


@dataclass(frozen=True)
class DataSettings:
    dataset: str
    resize: int  # transforms.Resize(resize) for train and test
    crop: int  # RandomCrop(crop, padding=4) for training
    padding: int = 4
    flip: bool = True
    train_split: str = "train"
    test_split: str = "test"


TEST = TestSettings()


def data_settings(dataset: str, resize: int = 32) -> DataSettings:
    """get_loader's transforms for a downstream dataset (STL-10's 96 px images are resized to ``resize``,
    32 in every cross-dataset row of run_vanilla_tune.sh, 96 for STL-10 pre-trained models)."""
    _check(dataset, DOWNSTREAM, "downstream dataset")
    return DataSettings(dataset, resize=resize, crop=resize if dataset == "stl10" else 32)


def setup_hyperparameter(args: dict, pretraining: str | None, mode: str) -> dict:
    """utils.py setup_hyperparameter, transcribed: updates ``args`` (keys batch_size, lr, decreasing_lr,
    epochs, dataset, resize) in place for ``pretraining`` and ``mode``, and returns it.

    Kept as coded: 'DynACL-RCS' matches no branch (the code tests 'DynACL_RCS') and gets the final
    else (batch 128, lr 0.1, decay 15,20, like any method not listed, ``pretraining=None``); the
    'ACL_IR' branch is unreachable from the command line and left out; ``args.epoch = 19`` for
    DynACL-AIR++ AFF is a typo with no effect.
    """
    ds, rs = args["dataset"], args["resize"]

    def lf_by_dataset(table):
        for (d, r), (bs, lr) in table.items():
            if ds == d and (r is None or rs == r):
                args["batch_size"], args["lr"] = bs, lr

    if pretraining in ("ACL", "DynACL", "DynACL++"):
        if mode in ("SLF", "ALF"):
            lf_by_dataset({("cifar10", None): (512, 0.01), ("cifar100", None): (512, 0.05),
                           ("stl10", 96): (512, 0.1), ("stl10", 32): (128, 0.01)})
            args["decreasing_lr"] = "10,20"
        elif pretraining == "ACL":
            args.update(lr=0.1, batch_size=128, epochs=100, decreasing_lr="40,60")
        else:
            args.update(decreasing_lr="10,20" if (ds == "stl10" and rs == 96) else "15,20", batch_size=128, lr=0.1)
    elif pretraining in ("AdvCL", "A-InfoNCE", "DeACL"):
        if mode in ("SLF", "ALF"):
            args.update(decreasing_lr="15,20", batch_size=512, lr=0.01)
        else:
            args.update(batch_size=128, decreasing_lr="15,20", lr=0.1)
    elif pretraining == "DynACL-AIR":
        if mode == "SLF":
            lf_by_dataset({("cifar10", None): (512, 0.01), ("cifar100", None): (512, 0.1),
                           ("stl10", 96): (512, 0.1), ("stl10", 32): (128, 0.01)})
            if ds == "cifar10":
                args["epochs"] = 5
            args["decreasing_lr"] = "10,20"
        elif mode == "ALF":
            lf_by_dataset({("cifar10", None): (512, 0.01), ("cifar100", None): (512, 0.1),
                           ("stl10", 32): (128, 0.01), ("stl10", 96): (128, 0.1)})
            args["decreasing_lr"] = "10,20"
        else:
            args.update(batch_size=128, decreasing_lr="15,20", lr=0.1)
    elif pretraining == "DynACL-AIR++":
        if mode == "SLF":
            lf_by_dataset({("cifar10", None): (512, 0.01), ("cifar100", None): (512, 0.09), ("stl10", 96): (512, 0.1)})
            args["decreasing_lr"] = "10,20"
        elif mode == "ALF":
            lf_by_dataset({("cifar10", None): (512, 0.01), ("cifar100", None): (512, 0.1), ("stl10", 96): (128, 0.1)})
            if ds == "cifar10":
                args["epochs"] = 4
            args["decreasing_lr"] = "10,20"
        else:
            args.update(batch_size=128, decreasing_lr="15,20", lr=0.1)
    else:
        args.update(batch_size=128, decreasing_lr="15,20", lr=0.1)
    return args


def benchmark_defaults(dataset: str = "cifar10", resize: int = 32) -> dict:
    """vanilla_finetuning.py's argparse defaults for the settings setup_hyperparameter touches."""
    return {"dataset": dataset, "resize": resize, "batch_size": 128, "lr": 0.1, "epochs": 25, "decreasing_lr": "15,20"}


def default_dual_bn(pretraining: str | None, pretrain_dataset: str, downstream: str) -> bool:
    """--dualBN as run_vanilla_tune.sh sets it: 0 for AdvCL, A-InfoNCE, DeACL and for CIFAR-10 -> STL-10
    transfer; otherwise the default 1 (only methods with two BN branches can use it)."""
    if pretraining not in PRETRAINING or pretraining in ("AdvCL", "A-InfoNCE", "DeACL"):
        return False
    return not (pretrain_dataset == "cifar10" and downstream == "stl10")


def finetune_settings(pretraining: str | None = None, downstream: str = "cifar10", pretrain_dataset: str = "cifar10",
                      resize: int = 32, mode_all: bool = True,
                      dual_bn: bool | None = None) -> dict[str, FinetuneSettings]:
    """The fine-tuning schedule of each mode, as ``vanilla_finetuning.py --pretraining P --mode ALL`` runs it.

    ``pretraining`` is one of PRETRAINING, or None for an encoder the benchmark does not list (the
    setup_hyperparameter else branch: the protocol the leaderboard page states, 25 epochs, batch 128,
    lr 0.1, decay at 15 and 20, for every mode). With ``mode_all`` (the run script's ``--mode ALL``) the
    settings one mode sets carry over to the next, as the shared ``args`` does: e.g. DynACL-AIR's
    5 SLF epochs on CIFAR-10 also apply to its ALF and AFF; ``mode_all=False`` is ``--mode SLF|ALF|AFF``.
    """
    if pretraining is not None:
        _check(pretraining, PRETRAINING, "--pretraining method")
    _check(downstream, DOWNSTREAM, "downstream dataset")
    dual = default_dual_bn(pretraining, pretrain_dataset, downstream) if dual_bn is None else dual_bn
    out = {}
    args = benchmark_defaults(downstream, resize)
    for mode in MODES:
        if not mode_all:
            args = benchmark_defaults(downstream, resize)
        setup_hyperparameter(args, pretraining, mode)
        out[mode] = FinetuneSettings(
            mode=mode, epochs=int(args["epochs"]), batch_size=int(args["batch_size"]), lr=float(args["lr"]),
            milestones=tuple(int(m) for m in args["decreasing_lr"].split(",")), dual_bn=dual and mode == "AFF")
    return out


def to_protocol_config(settings: FinetuneSettings, augment: str = "finetune"):
    """The advfast.eval.protocols.ProtocolConfig running ``settings`` (dual_bn included). frozen_encoder_mode
    and head_init are advfast's Classifier defaults (frozen encoder in eval mode, zero-initialised head)."""
    from advfast.eval.protocols import ProtocolConfig

    return ProtocolConfig(protocol=settings.mode.lower(), epochs=settings.epochs, batch_size=settings.batch_size,
                          lr=settings.lr, milestones=settings.milestones, momentum=settings.momentum,
                          weight_decay=settings.weight_decay, train_eps=settings.train_eps,
                          train_alpha=settings.train_alpha, train_steps=settings.train_steps,
                          trades_beta=settings.trades_beta, augment=augment, dual_bn=settings.dual_bn)


def leaderboard_row(clean: float, autoattack: float, corruption: float | None = None) -> dict:
    """One row of the leaderboard's table (accuracies in [0, 1] -> %, 2 decimals): ra1, sa1, ca1
    (ca1 is 0 on the leaderboard where no corruption accuracy exists, e.g. STL-10)."""
    return {"ra1": round(100 * autoattack, 2), "sa1": round(100 * clean, 2),
            "ca1": 0.0 if corruption is None else round(100 * corruption, 2)}


def leaderboard_table_name(pretrain_dataset: str, downstream: str, mode: str) -> str:
    """The leaderboard data file a result belongs to, e.g. cifar10-stl10-SLF."""
    _check(mode, MODES, "mode")
    return f"{pretrain_dataset}-{downstream}-{mode}"


def _check(value, allowed, what: str) -> None:
    if value not in allowed:
        from advfast.config import closest

        raise ValueError(f"unknown {what} {value!r}{closest(str(value), allowed)}; choose from {', '.join(allowed)}")
