"""advfast-eval: fine-tune a pre-trained encoder with SLF, ALF or AFF and measure its robustness."""

from __future__ import annotations

import argparse
import math
import sys

from advfast.eval.protocols import PROTOCOLS
from advfast.interop.formats import FORMATS

PROTOCOL_SETS = ("advfast", "robustssl")  # advfast.eval.run.PROTOCOL_SETS (not imported: it pulls in torch)


class _OneLineParser(argparse.ArgumentParser):
    """Input errors end in one line and exit code 2, not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, low: float, low_inclusive: bool, what: str):
    """An argparse type: a finite number of `kind` that is > low (>= low when low_inclusive)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not low_inclusive) \
                or abs(value) > 2 ** 63 - 1:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="advfast-eval",
        description="Evaluate a pre-trained encoder: SLF (linear, clean), ALF (linear, PGD-10) or AFF "
                    "(full TRADES fine-tuning), scored by clean accuracy and test-time attacks.")
    p.add_argument("--checkpoint", required=True,
                   help="an advfast-train run directory, or its encoder.safetensors / a checkpoint file; with "
                        "--from, a checkpoint file saved by a published code base")
    p.add_argument("--from", dest="from_format", default=None, choices=FORMATS, metavar="FORMAT",
                   help="read --checkpoint as a published checkpoint of this code base: "
                        f"{', '.join(FORMATS)} (docs/interop.md); default: an advfast run")
    p.add_argument("--pretrain-dataset", default=None, choices=("cifar10", "cifar100", "stl10"),
                   help="with --from: the dataset the checkpoint was pre-trained on (default cifar10)")
    p.add_argument("--protocol-set", default="advfast", choices=PROTOCOL_SETS,
                   help="advfast (default): each official script's SLF/ALF/AFF schedule; robustssl: the RobustSSL "
                        "benchmark's fine-tuning and test settings (PGD-20, standard AutoAttack, CIFAR-10-C), "
                        "results in its leaderboard's table form")
    p.add_argument("--pretraining", default=None, metavar="METHOD",
                   help="robustssl: the benchmark's --pretraining whose per-method settings apply "
                        "(ACL, AdvCL, A-InfoNCE, DeACL, DynACL, DynACL++, DynACL-AIR, DynACL-AIR++, DynACL-RCS, "
                        "or none for the generic ones); default: the --from format's, none for advfast runs")
    p.add_argument("--dual-bn", default=None, type=int, choices=(0, 1),
                   help="robustssl AFF: the benchmark's --dualBN (natural term on BN 'normal', adversarial on "
                        "'pgd'); default: as its run script sets it")
    p.add_argument("--downstream", default=None, choices=("cifar10", "cifar100", "stl10"),
                   help="fine-tune and test on this dataset, resized as the benchmark does (STL-10 to 32 px)")
    p.add_argument("--protocol", default="slf", choices=PROTOCOLS + ("aff_long",),
                   help="slf, alf, aff (25 epochs on CIFAR-type data), or aff_long: AFF with the 100-epoch "
                        "schedule of ACL's README (lr /10 at 40 and 60; not for digits)")
    p.add_argument("--bn-branch", default=None,
                   help="BatchNorm branch of the encoder to evaluate (default: the method's eval branch)")
    p.add_argument("--attacks", default=None,
                   help="comma-separated: pgd20, pgd20-2x, fgsm, l2-0.25, l2-0.5, l1-7.84, l1-12, autoattack "
                        "(default: pgd20; with --protocol-set robustssl: pgd20,autoattack)")
    p.add_argument("--eps", type=_fraction, default=None,
                   help="l_inf budget of pgd20 / autoattack and of ALF/AFF training attacks (default 8/255)")
    p.add_argument("--n-eval", type=_number(int, 1, True, "a whole number >= 1"), default=None,
                   help="evaluate on the first N test images (and N per corruption severity)")
    p.add_argument("--n-train", type=_number(int, 1, True, "a whole number >= 1"), default=None,
                   help="fine-tune on the first N training images (a quick check; results then differ)")
    p.add_argument("--dataset", default=None, help="default: the pre-training dataset")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=_number(int, 0, True, "a whole number >= 0"), default=0)
    p.add_argument("--smoothing", type=_number(int, 0, True, "a number of samples >= 0"), default=0,
                   help="RoCL's transformation-smoothed inference with this many samples (0: off)")
    p.add_argument("--corruptions-dir", default=None, help="a CIFAR-10-C directory for corruption accuracy")
    p.add_argument("--epochs", type=_number(int, 1, True, "a whole number >= 1"), default=None,
                   help="override the protocol's epochs")
    p.add_argument("--lr", type=_number(float, 0.0, False, "a finite learning rate > 0"), default=None,
                   help="override the protocol's learning rate")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="arithmetic of the model under attack (default fp32; perturbations are always fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true",
                   help="skip the optional plots (t-SNE, accuracy against eps, training curves); results.json, "
                        "results.md and the classifier are written either way, before any plot")
    p.add_argument("--out", required=True,
                   help="directory for results.json, results.md, the scored classifier and plots")
    return p


def _fraction(text: str) -> float:
    """'8/255' or '0.0314'."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 8/255 or 0.03, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"eps must lie in (0, 1] for images in [0, 1], got {text}")
    return value


def eval_main(argv: list[str] | None = None) -> int:
    command = ["advfast-eval", *(sys.argv[1:] if argv is None else argv)]
    args = build_parser().parse_args(argv)
    from advfast.eval.run import EvalConfig, evaluate

    overrides = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
    cfg = EvalConfig(checkpoint=args.checkpoint, protocol=args.protocol, out=args.out, bn_branch=args.bn_branch,
                     attacks=args.attacks, eps=args.eps, n_eval=args.n_eval, dataset=args.dataset,
                     data_dir=args.data_dir, download=args.download, device=args.device, seed=args.seed,
                     smoothing=args.smoothing, corruptions_dir=args.corruptions_dir, plots=not args.no_plots,
                     precision=args.precision, progress=not args.no_progress,
                     overrides=overrides, from_format=args.from_format, protocol_set=args.protocol_set,
                     pretraining=args.pretraining, pretrain_dataset=args.pretrain_dataset,
                     downstream=args.downstream, dual_bn=None if args.dual_bn is None else bool(args.dual_bn),
                     n_train=args.n_train, command=command)
    try:
        evaluate(cfg, log=lambda msg: print(msg, file=sys.stderr))
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as exc:
        print(f"advfast-eval: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a fault during fine-tuning, not an input error
        print(f"advfast-eval: {exc}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    sys.exit(eval_main())


if __name__ == "__main__":
    main()
