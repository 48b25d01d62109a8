"""One evaluation run: load a pre-trained encoder, fine-tune with a protocol, attack, report.

Two protocol sets: ``advfast`` (each official script's SLF/ALF/AFF schedule, advfast.eval.protocols) and
``robustssl`` (the RobustSSL benchmark's fine-tuning and test settings, advfast.eval.robustssl, with the
result in the leaderboard's table form)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from advfast.data import DeviceLoader, build_augment, load_dataset
from advfast.data.datasets import resized
from advfast.engine.precision import resolve_device
from advfast.io import atomic_write_text
from advfast.eval.finetune import Classifier, finetune
from advfast.eval import robustssl as rs
from advfast.eval.pretrained import ADVFAST, load_pretrained
from advfast.eval.protocols import PROTOCOLS, protocol_preset
from advfast.eval.saved_classifier import save_classifier
from advfast.eval.report import plot_eps_curve, plot_training_curves, plot_tsne, write_report
from advfast.eval.robustness import (AutocastModel, attack_table, autoattack_backend, clean_accuracy,
                                     corruption_accuracy, eps_curve, parse_attacks, robust_accuracy, smoothed_accuracy)

PROTOCOL_SETS = ("advfast", "robustssl")


@dataclass
class EvalConfig:
    checkpoint: str
    protocol: str = "slf"
    out: str = "runs/eval"
    bn_branch: str | None = None  # None: the branch the method evaluates with
    attacks: str | None = None  # None: pgd20 (advfast set), pgd20,autoattack (robustssl set)
    eps: float | None = None  # l_inf budget of pgd20/autoattack; None: 8/255
    n_eval: int | None = None  # test images to evaluate (None: all)
    dataset: str | None = None  # None: the pre-training dataset
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    seed: int = 0
    smoothing: int = 0  # RoCL's transformation-smoothed inference with this many samples (0: off)
    corruptions_dir: str | None = None
    plots: bool = True
    precision: str = "fp32"  # "fp32" | "bf16": the model's arithmetic under attack (perturbations stay fp32)
    progress: bool = True  # tqdm bars for fine-tuning epochs and attacked images
    overrides: dict = field(default_factory=dict)  # protocol schedule overrides (epochs, lr, ...)
    from_format: str | None = None  # None / "advfast": an advfast run; else an advfast.interop format (--from)
    protocol_set: str = "advfast"  # "advfast" | "robustssl"
    pretraining: str | None = None  # robustssl: the benchmark's --pretraining name whose settings apply
    pretrain_dataset: str | None = None  # a published checkpoint's pre-training dataset (default cifar10)
    downstream: str | None = None  # cifar10 | cifar100 | stl10, resized as the benchmark does
    dual_bn: bool | None = None  # robustssl AFF: the benchmark's --dualBN (None: as its run script sets it)
    n_train: int | None = None  # fine-tune on the first N training images (None: all)
    command: list | None = None  # the command line, recorded in results.json


def check_out_dir(out: str) -> None:
    """Refuse an output path that can never hold results (an existing file, or a file on the way),
    before anything slow runs."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {out} is an existing file; give a directory for results.json and plots")
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"--out {out} lies under {parent}, which is a file; give a directory")


def _check_config(cfg: EvalConfig) -> None:
    """Flag combinations that cannot mean anything, refused before anything is loaded."""
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {cfg.precision!r}: choose fp32 or bf16")
    if cfg.smoothing < 0:
        raise ValueError(f"smoothing {cfg.smoothing}: give the number of samples (>= 1), or 0 for off")
    if cfg.protocol_set not in PROTOCOL_SETS:
        raise ValueError(f"unknown protocol set {cfg.protocol_set!r}; choose from {', '.join(PROTOCOL_SETS)}")
    if cfg.n_train is not None and cfg.n_train < 1:
        raise ValueError(f"n_train {cfg.n_train}: give a number of training images >= 1")
    published = cfg.from_format not in (None, ADVFAST)
    if cfg.pretrain_dataset is not None and not published:
        raise ValueError("--pretrain-dataset describes a published checkpoint (--from); an advfast run records its own")
    if cfg.downstream is not None and cfg.downstream not in rs.DOWNSTREAM:
        raise ValueError(f"unknown downstream dataset {cfg.downstream!r}; choose from {', '.join(rs.DOWNSTREAM)}")
    if cfg.downstream is not None and cfg.dataset is not None and cfg.dataset != cfg.downstream:
        raise ValueError(f"--dataset {cfg.dataset} and --downstream {cfg.downstream} disagree; give one")
    if cfg.protocol_set != "robustssl":
        if cfg.pretraining is not None or cfg.dual_bn is not None:
            raise ValueError("--pretraining and --dual-bn are settings of --protocol-set robustssl")
        return
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol-set robustssl runs slf, alf or aff (its AFF schedule is the benchmark's); "
                         f"{cfg.protocol} belongs to the advfast set")
    if cfg.pretraining not in (None, "none") and cfg.pretraining not in rs.PRETRAINING:
        rs._check(cfg.pretraining, rs.PRETRAINING + ("none",), "--pretraining method")
    if cfg.smoothing:
        raise ValueError("--smoothing is RoCL's inference, not part of the RobustSSL benchmark; use the advfast set")


def _pretraining_name(cfg: EvalConfig) -> str | None:
    """The benchmark's --pretraining whose settings apply: --pretraining, else the one of the checkpoint's
    format; None (setup_hyperparameter's generic branch) for advfast runs and formats it does not list."""
    if cfg.pretraining is not None:
        return None if cfg.pretraining == "none" else cfg.pretraining
    return rs.PRETRAINING_OF_FORMAT.get(cfg.from_format or ADVFAST)


def evaluate(cfg: EvalConfig, log=print) -> dict:
    """Run the protocol and every requested attack; write results.json and results.md into cfg.out as
    soon as each result exists, then the scored classifier, then the optional plots; return the
    result dictionary."""
    started = time.time()
    check_out_dir(cfg.out)
    _check_config(cfg)
    robust = cfg.protocol_set == "robustssl"
    fmt = cfg.from_format or ADVFAST
    pretraining = _pretraining_name(cfg) if robust else None
    eps = cfg.eps if cfg.eps is not None else (rs.TEST.pgd_eps if robust else 8 / 255)
    specs = parse_attacks(cfg.attacks or ("pgd20,autoattack" if robust else "pgd20"), eps)
    # fail on a missing AutoAttack package now, not after the fine-tuning
    aa_backend = autoattack_backend() if any(s.norm == "autoattack" for s in specs) else None
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    # dual-BN AFF needs every BN branch of the file: decided before loading it
    keep = False
    if robust and cfg.protocol == "aff":
        pre = cfg.pretrain_dataset or "cifar10"
        down = cfg.downstream or cfg.dataset or pre
        keep = cfg.dual_bn if cfg.dual_bn is not None else (
            fmt != ADVFAST and rs.default_dual_bn(pretraining, pre, down))
    encoder, meta = load_pretrained(cfg.checkpoint, cfg.bn_branch, fmt=fmt, dataset=cfg.pretrain_dataset,
                                    keep_branches=keep)
    branches = tuple(meta.get("encoder_branches", (meta["bn_branch"],)))
    dual = keep and len(branches) > 1
    if keep and not dual:
        if cfg.dual_bn:
            raise ValueError(f"--dual-bn 1: {cfg.checkpoint} has one BatchNorm per layer; there is no second "
                             "branch for the natural term (use --dual-bn 0)")
        log("[advfast-eval] the file has one BatchNorm per layer: AFF runs single-BN TRADES (--dualBN 0)")
    natural = None
    if dual:
        natural = "normal" if "normal" in branches and meta["bn_branch"] != "normal" else \
            next(b for b in branches if b != meta["bn_branch"])
    pretrain_dataset = meta["dataset"]
    dataset_name = cfg.downstream or cfg.dataset or pretrain_dataset
    size = meta.get("image_size")
    if robust and dataset_name not in rs.DOWNSTREAM:
        raise ValueError(f"--protocol-set robustssl evaluates on {', '.join(rs.DOWNSTREAM)} (the benchmark's "
                         f"datasets), not {dataset_name}; use --protocol-set advfast for it")
    if robust and cfg.corruptions_dir and dataset_name not in rs.TEST.corruption_datasets:
        raise ValueError(f"the benchmark has no corruption set for {dataset_name} (eval_test_OOD runs on "
                         "CIFAR-10-C / CIFAR-100-C only): drop --corruptions-dir")
    digits_kw = {"size": size} if dataset_name == "digits" and size else {}
    train = load_dataset(dataset_name, root=cfg.data_dir, split="train", download=cfg.download, **digits_kw)
    test = load_dataset(dataset_name, root=cfg.data_dir, split="test", download=cfg.download, **digits_kw)
    settings = None
    if robust:
        resize = 96 if pretrain_dataset == "stl10" else 32
        data = rs.data_settings(dataset_name, resize)
        settings = rs.finetune_settings(pretraining, dataset_name, pretrain_dataset if pretrain_dataset in rs.DOWNSTREAM
                                        else "cifar10", resize, mode_all=True, dual_bn=dual)[cfg.protocol.upper()]
        pcfg = rs.to_protocol_config(settings)
        for key, value in cfg.overrides.items():
            if not hasattr(pcfg, key):
                raise ValueError(f"unknown protocol setting {key!r}")
            setattr(pcfg, key, value)
        if pcfg.epochs < 1 or pcfg.batch_size < 1 or pcfg.lr <= 0:
            raise ValueError(f"epochs, batch_size and lr must be positive, got {pcfg.epochs}, {pcfg.batch_size}, "
                             f"{pcfg.lr}")
        train, test = resized(train, data.resize), resized(test, data.resize)
    else:
        pcfg = protocol_preset(cfg.protocol, dataset_name, train_eps=eps, train_alpha=eps / 4, **cfg.overrides)
        if cfg.downstream:  # another dataset at the encoder's resolution, resized as the benchmark does
            train, test = resized(train, size or 32), resized(test, size or 32)
    if size and tuple(test.images.shape[-2:]) != (size, size):
        raise ValueError(f"the encoder was pre-trained on {size}x{size} images but {dataset_name} test images are "
                         f"{tuple(test.images.shape[-2:])}; evaluate on the pre-training resolution")
    n_train_all = train.images.shape[0]
    if cfg.n_train is not None and cfg.n_train < n_train_all:
        train = dataclasses.replace(train, images=train.images[:cfg.n_train], labels=train.labels[:cfg.n_train])

    model = Classifier(encoder.to(device), train.num_classes, branch=meta["bn_branch"] if dual else "normal",
                       frozen=pcfg.frozen_encoder, natural_branch=natural)
    model.to(device)
    batch_size = min(pcfg.batch_size, train.images.shape[0])
    # the benchmark's DataLoader keeps the last partial batch; the advfast set keeps its drop_last
    loader = DeviceLoader(train, batch_size, build_augment(pcfg.augment, backend="torch"), device, seed=cfg.seed,
                          **({"drop_last": False} if robust else {}))
    log(f"[advfast-eval] {cfg.protocol.upper()} ({cfg.protocol_set} set): {pcfg.epochs} epochs on "
        f"{train.images.shape[0]} {dataset_name} images, branch {meta['bn_branch']}"
        f"{f' (natural term on {natural})' if dual else ''}, device {device}")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with tqdm(total=pcfg.epochs, desc=f"{cfg.protocol} fine-tuning", unit="epoch", disable=not cfg.progress,
              leave=False) as bar:
        def on_epoch(r):
            bar.update(1)
            log(f"  epoch {r['epoch']:3d}  loss {r['loss']:.4f}  train acc {100 * r['train_acc']:.2f}%")

        history = finetune(model, loader, pcfg, progress=on_epoch, generator=generator)
    scored = model if cfg.precision == "fp32" else AutocastModel(model, torch.bfloat16)

    n_eval = test.images.shape[0] if cfg.n_eval is None else min(cfg.n_eval, test.images.shape[0])
    images, labels = test.images[:n_eval], test.labels[:n_eval]
    test_batch = rs.TEST.test_batch_size if robust else 256
    result = {
        "checkpoint": os.path.abspath(cfg.checkpoint), "checkpoint_format": fmt, "protocol": cfg.protocol,
        "protocol_set": cfg.protocol_set, "dataset": dataset_name, "pretrain_dataset": pretrain_dataset,
        "bn_branch": meta["bn_branch"], "method": meta.get("method"), "arch": meta.get("arch"),
        "n_train": int(train.images.shape[0]), "n_eval": n_eval, "eps": eps, "device": str(device), "seed": cfg.seed,
        "precision": cfg.precision, "schedule": dataclasses.asdict(pcfg), "finetune_history": history.epochs,
        "command": shlex.join(cfg.command) if cfg.command else None,
    }
    if aa_backend:
        result["autoattack"] = aa_backend
    if robust:
        result["robustssl"] = {
            "benchmark": rs.BENCHMARK, "pretraining": pretraining, "mode": cfg.protocol.upper(),
            "settings": dataclasses.asdict(settings), "dual_bn": dual, "natural_branch": natural,
            "resize": data.resize, "test": {"pgd": f"PGD-{rs.TEST.pgd_steps}, step {rs.TEST.pgd_alpha:.6f}, "
                                                  f"uniform start, batch {rs.TEST.test_batch_size}",
                                           "autoattack": "standard, Linf, bs 128"},
        }
    def save(note: str | None = None):
        # results first, rewritten (atomically) as each number arrives: a later crash loses nothing
        if robust:
            result["leaderboard"] = _leaderboard(cfg, result, pretrain_dataset, dataset_name, n_train_all,
                                                 test.images.shape[0])
        result["seconds"] = round(time.time() - started, 1)
        result["files"] = write_report(cfg.out, result)
        if note:
            log(note)

    result["clean_accuracy"] = clean_accuracy(scored, images, labels, test_batch)
    log(f"  SA {100 * result['clean_accuracy']:.2f}%")
    result["robust_accuracy"] = {}
    save()
    for spec in specs:
        with tqdm(total=n_eval, desc=spec.name, unit="img", disable=not cfg.progress, leave=False) as bar:
            acc = robust_accuracy(scored, images, labels, spec, batch_size=test_batch, num_classes=train.num_classes,
                                  seed=cfg.seed, progress=bar.update)
        result["robust_accuracy"][spec.name] = acc
        log(f"  {spec.name} {100 * acc:.2f}%")
        save()
    if cfg.smoothing:
        augment = build_augment("rocl", backend="torch")
        result["smoothed"] = {
            "clean": smoothed_accuracy(model, images, labels, augment, cfg.smoothing, seed=cfg.seed),
            "pgd20-transfer": smoothed_accuracy(model, images, labels, augment, cfg.smoothing,
                                                spec=attack_table(eps)["pgd20"], seed=cfg.seed),
        }
        save()
    if cfg.corruptions_dir:
        # the robustssl set scores the benchmark's 15 corruptions (CIFAR-10-C ships 4 more)
        result["corruptions"] = corruption_accuracy(scored, cfg.corruptions_dir, n_per_severity=cfg.n_eval,
                                                    batch_size=test_batch,
                                                    corruptions=rs.TEST.corruptions if robust else None)
        save()
    result["classifier"] = save_classifier(model, cfg.out, checkpoint=cfg.checkpoint, bn_branch=meta["bn_branch"],
                                           protocol=cfg.protocol, num_classes=train.num_classes,
                                           checkpoint_format=fmt, keep_branches=keep,
                                           pretrain_dataset=cfg.pretrain_dataset if fmt != ADVFAST else None)
    save(f"[advfast-eval] wrote {os.path.join(cfg.out, 'results.md')} and the scored classifier "
         f"(advfast.eval.load_classifier({cfg.out!r}))")
    result["plots"], result["skipped"] = {}, {}
    if cfg.plots:
        _plots(cfg, model, images, labels, eps, meta, result, log)
        save()
    log(f"[advfast-eval] done in {result['seconds']} s")
    return result


def _leaderboard(cfg: EvalConfig, result: dict, pretrain_dataset: str, dataset: str, n_train_all: int,
                 n_test_all: int) -> dict:
    """The result as a row of the RobustSSL leaderboard's table (ra1 = AutoAttack, sa1 = clean, ca1 = mean
    corruption accuracy, in %; None where not measured), and every way this run differs from the
    benchmark's protocol: the row is ``comparable`` only when there is none."""
    robust_acc, corr = result.get("robust_accuracy", {}), result.get("corruptions")
    aa = robust_acc.get("autoattack")
    row = {"ra1": None if aa is None else round(100 * aa, 2), "sa1": round(100 * result["clean_accuracy"], 2),
           "ca1": None if corr is None else round(100 * corr["mean"], 2)}
    if dataset not in rs.TEST.corruption_datasets:
        row["ca1"] = 0.0  # the leaderboard's value where no corruption set exists (STL-10)
    differences = [f"--{k} {v} overrides the benchmark's {k}" for k, v in sorted(cfg.overrides.items())]
    if result["n_train"] < n_train_all:
        differences.append(f"fine-tuned on {result['n_train']} of {n_train_all} training images")
    if result["n_eval"] < n_test_all:
        differences.append(f"tested on {result['n_eval']} of {n_test_all} test images")
    if aa is None:
        differences.append("AutoAttack not run (no ra1)")
    elif result.get("autoattack", {}).get("package") != "autoattack":
        differences.append("AutoAttack by torchattacks, not the reference autoattack package the benchmark runs")
    if corr is None and dataset in rs.TEST.corruption_datasets:
        differences.append("no corruption accuracy (no ca1): pass --corruptions-dir")
    if cfg.eps is not None and cfg.eps != rs.TEST.pgd_eps:
        differences.append(f"eps {cfg.eps:.6f} instead of 8/255")
    if cfg.precision != "fp32":
        differences.append(f"{cfg.precision} arithmetic under attack")
    return {"table": rs.leaderboard_table_name(pretrain_dataset, dataset, cfg.protocol.upper()), "row": row,
            "comparable": not differences, "differences": differences}


def _optional(name: str, result: dict, log, step):
    """Run one optional step (a plot); one that cannot run is skipped with a one-line note."""
    try:
        return step()
    except ImportError as exc:
        why = f"{exc.name or 'a package'} is not installed ({exc})"
    except Exception as exc:  # noqa: BLE001 - an optional output must never cost the results
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    result["skipped"][name] = why
    log(f"[advfast-eval] {name} skipped: {why}")
    return None


EPS_CURVE_IMAGES = 256  # the eps curve attacks 4 budgets: on the first 256 test images, not all


def _plots(cfg: EvalConfig, model, images, labels, eps: float, meta: dict, result: dict, log) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    plots = result["plots"]
    n = min(1000, images.shape[0])

    def tsne():
        with torch.no_grad():
            device = next(model.parameters()).device
            feats = torch.cat([model.features(images[i:i + 256].to(device).float() / 255).float().cpu()
                               for i in range(0, n, 256)]).numpy()
        return plot_tsne(feats, labels[:n].numpy(), os.path.join(cfg.out, "tsne.png"),
                         f"t-SNE of {meta.get('method', 'encoder')} features ({meta['bn_branch']} BN)", cfg.seed)

    path = _optional("tsne", result, log, tsne)
    if path:
        plots["tsne"] = path

    n_curve = min(EPS_CURVE_IMAGES, images.shape[0])
    curve = eps_curve(model, images[:n_curve], labels[:n_curve], np.linspace(0, 2 * eps, 5), seed=cfg.seed)
    result["eps_curve"] = {"n_images": n_curve, "images": f"the first {n_curve} of the {images.shape[0]} "
                           "evaluated test images", "accuracy": {str(k): v for k, v in curve.items()}}
    atomic_write_text(os.path.join(cfg.out, "eps_curve.json"), json.dumps(result["eps_curve"], indent=2))
    path = _optional("eps_curve plot", result, log, lambda: plot_eps_curve(
        curve, os.path.join(cfg.out, "accuracy_vs_eps.png"),
        f"{cfg.protocol.upper()}: PGD-20 accuracy against eps\n(first {n_curve} test images)"))
    if path:
        plots["eps_curve"] = path
    metrics = meta.get("metrics_path")
    if metrics and os.path.isfile(metrics):
        path = _optional("training_curves", result, log, lambda: plot_training_curves(
            metrics, os.path.join(cfg.out, "training_curves.png"),
            f"pre-training of {meta.get('method', 'the encoder')}"))
        if path:
            plots["training_curves"] = path
