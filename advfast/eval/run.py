"""One evaluation run: load a pre-trained encoder, fine-tune with a protocol, attack, report."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from advfast.data import DeviceLoader, build_augment, load_dataset
from advfast.engine.precision import resolve_device
from advfast.io import atomic_write_text
from advfast.eval.finetune import Classifier, finetune
from advfast.eval.pretrained import load_pretrained
from advfast.eval.protocols import protocol_preset
from advfast.eval.saved_classifier import save_classifier
from advfast.eval.report import plot_eps_curve, plot_training_curves, plot_tsne, write_report
from advfast.eval.robustness import (AutocastModel, attack_table, clean_accuracy, corruption_accuracy, eps_curve,
                                     parse_attacks, robust_accuracy, smoothed_accuracy)


@dataclass
class EvalConfig:
    checkpoint: str
    protocol: str = "slf"
    out: str = "runs/eval"
    bn_branch: str | None = None  # None: the branch the method evaluates with
    attacks: str = "pgd20"
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


def evaluate(cfg: EvalConfig, log=print) -> dict:
    """Run the protocol and every requested attack; write results.json and results.md into cfg.out as
    soon as each result exists, then the scored classifier, then the optional plots; return the
    result dictionary."""
    started = time.time()
    check_out_dir(cfg.out)
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {cfg.precision!r}: choose fp32 or bf16")
    if cfg.smoothing < 0:
        raise ValueError(f"smoothing {cfg.smoothing}: give the number of samples (>= 1), or 0 for off")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    encoder, meta = load_pretrained(cfg.checkpoint, cfg.bn_branch)
    dataset_name = cfg.dataset or meta["dataset"]
    size = meta.get("image_size")
    train = load_dataset(dataset_name, root=cfg.data_dir, split="train", download=cfg.download,
                         **({"size": size} if dataset_name == "digits" and size else {}))
    test = load_dataset(dataset_name, root=cfg.data_dir, split="test", download=cfg.download,
                        **({"size": size} if dataset_name == "digits" and size else {}))
    if size and tuple(test.images.shape[-2:]) != (size, size):
        raise ValueError(f"the encoder was pre-trained on {size}x{size} images but {dataset_name} test images are "
                         f"{tuple(test.images.shape[-2:])}; evaluate on the pre-training resolution")
    eps = cfg.eps if cfg.eps is not None else 8 / 255
    specs = parse_attacks(cfg.attacks, eps)
    pcfg = protocol_preset(cfg.protocol, dataset_name, train_eps=eps, train_alpha=eps / 4, **cfg.overrides)

    model = Classifier(encoder.to(device), train.num_classes, branch="normal", frozen=pcfg.frozen_encoder)
    model.to(device)
    batch_size = min(pcfg.batch_size, train.images.shape[0])
    loader = DeviceLoader(train, batch_size, build_augment(pcfg.augment, backend="torch"), device, seed=cfg.seed)
    log(f"[advfast-eval] {cfg.protocol.upper()}: {pcfg.epochs} epochs on {train.images.shape[0]} {dataset_name} "
        f"images, branch {meta['bn_branch']}, device {device}")
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
    result = {
        "checkpoint": os.path.abspath(cfg.checkpoint), "protocol": cfg.protocol, "dataset": dataset_name,
        "bn_branch": meta["bn_branch"], "method": meta.get("method"), "arch": meta.get("arch"),
        "n_eval": n_eval, "eps": eps, "device": str(device), "seed": cfg.seed, "precision": cfg.precision,
        "schedule": dataclasses.asdict(pcfg), "finetune_history": history.epochs,
    }

    def save(note: str | None = None):
        # results first, rewritten (atomically) as each number arrives: a later crash loses nothing
        result["seconds"] = round(time.time() - started, 1)
        result["files"] = write_report(cfg.out, result)
        if note:
            log(note)

    result["clean_accuracy"] = clean_accuracy(scored, images, labels)
    log(f"  SA {100 * result['clean_accuracy']:.2f}%")
    result["robust_accuracy"] = {}
    save()
    for spec in specs:
        with tqdm(total=n_eval, desc=spec.name, unit="img", disable=not cfg.progress, leave=False) as bar:
            acc = robust_accuracy(scored, images, labels, spec, num_classes=train.num_classes, seed=cfg.seed,
                                  progress=bar.update)
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
        result["corruptions"] = corruption_accuracy(scored, cfg.corruptions_dir,
                                                    n_per_severity=cfg.n_eval)
        save()
    result["classifier"] = save_classifier(model, cfg.out, checkpoint=cfg.checkpoint, bn_branch=meta["bn_branch"],
                                           protocol=cfg.protocol, num_classes=train.num_classes)
    save(f"[advfast-eval] wrote {os.path.join(cfg.out, 'results.md')} and the scored classifier "
         f"(advfast.eval.load_classifier({cfg.out!r}))")
    result["plots"], result["skipped"] = {}, {}
    if cfg.plots:
        _plots(cfg, model, images, labels, eps, meta, result, log)
        save()
    log(f"[advfast-eval] done in {result['seconds']} s")
    return result


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
