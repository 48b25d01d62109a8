"""Test-time robustness: clean accuracy, PGD-20, unseen l2 / l1 attacks, AutoAttack, corruptions,
and RoCL's transformation-smoothed inference.

Every attack runs the model in eval mode, in fp32, batched on the model's device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advfast.config import closest
from advfast.eval.finetune import ce_attack


class AutocastModel(nn.Module):
    """``model`` run under autocast in ``dtype`` (bf16 evaluation, when asked for); logits in fp32 so the
    attack's loss and the perturbation stay fp32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


@dataclass(frozen=True)
class AttackSpec:
    name: str
    norm: str  # "linf" | "l2" | "l1" | "autoattack"
    eps: float
    alpha: float = 0.0
    steps: int = 20


def attack_table(eps: float = 8 / 255) -> dict[str, AttackSpec]:
    """The named test-time attacks. ``eps`` scales the l_inf ones (8/255 on CIFAR); the unseen l2 and
    l1 budgets are RoCL's Table 1 (l2 0.25 and 0.5, l1 7.84 and 12, CIFAR-sized inputs)."""
    return {
        # ACL/AdvCL's eval_adv_test: 20 steps of 2/255 at 8/255, random start
        "pgd20": AttackSpec("pgd20", "linf", eps, eps / 4, 20),
        "pgd20-2x": AttackSpec("pgd20-2x", "linf", 2 * eps, eps / 2, 20),  # RoCL's 16/255 column
        "fgsm": AttackSpec("fgsm", "linf", eps, eps, 1),
        # unseen attacks: 20 steps with Madry's step rule 2.5 * eps / steps
        "l2-0.25": AttackSpec("l2-0.25", "l2", 0.25, 2.5 * 0.25 / 20, 20),
        "l2-0.5": AttackSpec("l2-0.5", "l2", 0.5, 2.5 * 0.5 / 20, 20),
        "l1-7.84": AttackSpec("l1-7.84", "l1", 7.84, 2.5 * 7.84 / 20, 20),
        "l1-12": AttackSpec("l1-12", "l1", 12.0, 2.5 * 12.0 / 20, 20),
        "autoattack": AttackSpec("autoattack", "autoattack", eps),
    }


def parse_attacks(names: str | list[str], eps: float = 8 / 255) -> list[AttackSpec]:
    table = attack_table(eps)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    specs = []
    for name in names:
        if name not in table:
            raise ValueError(f"unknown attack {name!r}{closest(name, table)}; choose from {', '.join(table)}")
        specs.append(table[name])
    return specs


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device):
    """Yield (x in [0, 1] float32, y) on ``device`` from uint8 images, in order."""
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255)
        yield x, labels[start:start + batch_size].to(device, non_blocking=True)


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x).argmax(1) == y).sum()


def clean_accuracy(model: nn.Module, images, labels, batch_size: int = 256) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in batches(images, labels, batch_size, device):
        correct += _correct(model, x, y)
    return correct.item() / images.shape[0]


def project_l1(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each sample of ``delta`` onto the l1 ball of radius eps
    (Duchi et al. 2008: sort, cumulative sum, soft threshold)."""
    flat = delta.flatten(1)
    abs_flat = flat.abs()
    outside = abs_flat.sum(1) > eps
    if not bool(outside.any()):
        return delta
    u, _ = abs_flat.sort(dim=1, descending=True)
    cssv = u.cumsum(1)
    ks = torch.arange(1, u.shape[1] + 1, device=u.device, dtype=u.dtype)
    cond = u * ks > (cssv - eps)
    rho = cond.to(torch.long).cumsum(1).argmax(1, keepdim=True)  # last index where cond holds
    theta = (cssv.gather(1, rho) - eps) / (rho + 1).to(u.dtype)
    projected = flat.sign() * (abs_flat - theta).clamp_min(0)
    return torch.where(outside[:, None], projected, flat).view_as(delta)


def l1_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
              sparsity: float = 0.95, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sparse l1 descent (Tramer & Boneh 2019): each step moves along the sign of the top (1 - sparsity)
    fraction of gradient coordinates, normalised to unit l1 norm, then projects onto the l1 ball and [0, 1].
    Starts from a random point in the ball."""
    model.eval()
    d = x[0].numel()
    noise = torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1
    delta = project_l1(noise * (eps / d), eps)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        g = grad.flatten(1)
        k = max(1, int(round((1 - sparsity) * g.shape[1])))
        threshold = g.abs().topk(k, dim=1).values[:, -1:]
        direction = torch.where(g.abs() >= threshold, g.sign(), torch.zeros_like(g))
        direction = direction / direction.abs().sum(1, keepdim=True).clamp_min(1e-12)
        delta = delta.detach() + alpha * direction.view_as(delta)
        delta = project_l1(delta, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def _package_version(module, distribution: str) -> str:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version(distribution)
    except (ImportError, PackageNotFoundError):
        return "unknown"


def autoattack_backend() -> dict:
    """Which AutoAttack implementation autoattack_examples runs: the reference `autoattack` package
    (fra31/auto-attack, what the RobustSSL benchmark runs) when importable, else torchattacks' port;
    {"package", "version", "version_setting": "standard"}. Raises RuntimeError when neither is installed."""
    try:
        import autoattack
    except ImportError:
        autoattack = None
    if autoattack is not None:
        return {"package": "autoattack", "version": _package_version(autoattack, "autoattack"),
                "version_setting": "standard"}
    try:
        import torchattacks
    except ImportError:
        raise RuntimeError("the autoattack attack needs torchattacks or the reference autoattack package: "
                           "pip install 'advfast[eval]'  (or: pip install --no-deps torchattacks)") from None
    return {"package": "torchattacks", "version": _package_version(torchattacks, "torchattacks"),
            "version_setting": "standard"}


def autoattack_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, num_classes: int,
                        seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """AutoAttack 'standard' (APGD-CE, APGD-T, FAB-T, Square) at l_inf eps: the reference `autoattack`
    package when installed, else torchattacks' port (see autoattack_backend). ``batch_size`` is the
    reference package's ``bs`` (default: all of x at once)."""
    model.eval()
    if autoattack_backend()["package"] == "autoattack":
        from autoattack import AutoAttack as ReferenceAutoAttack

        # its device defaults to 'cuda': name the model's, so it also runs on a CPU
        adversary = ReferenceAutoAttack(model, norm="Linf", eps=eps, version="standard", verbose=False, seed=seed,
                                        device=x.device)
        return adversary.run_standard_evaluation(x, y, bs=batch_size or x.shape[0])
    import torchattacks

    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=num_classes,
                                     seed=seed)
    return attack(x, y)


def robust_accuracy(model: nn.Module, images, labels, spec: AttackSpec, batch_size: int = 256,
                    num_classes: int = 10, seed: int = 0, progress=None) -> float:
    """Accuracy on adversarial examples made per batch against ``model`` itself (white box)."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in batches(images, labels, batch_size, device):
        if spec.norm in ("linf", "l2"):
            x_adv = ce_attack(model, x, y, spec.eps, spec.alpha, spec.steps, norm=spec.norm, generator=generator)
        elif spec.norm == "l1":
            x_adv = l1_attack(model, x, y, spec.eps, spec.alpha, spec.steps, generator=generator)
        else:
            x_adv = autoattack_examples(model, x, y, spec.eps, num_classes, seed, batch_size)
        correct += _correct(model, x_adv, y)
        if progress is not None:
            progress(y.numel())
    return correct.item() / images.shape[0]


def corruption_accuracy(model: nn.Module, directory: str, n_per_severity: int | None = None,
                        batch_size: int = 256, corruptions: tuple[str, ...] | None = None) -> dict[str, float]:
    """Accuracy on CIFAR-10-C style data: ``directory`` holds labels.npy and one <corruption>.npy per
    corruption, each (5 * n, H, W, C) uint8 ordered by severity 1..5. Returns per-corruption
    ("<name>/<severity>", and "<name>" over severities) and per-severity ("severity/<s>", over corruptions)
    accuracies and their mean under "mean" (equal counts: the mean over corruptions then severities, as
    the RobustSSL benchmark's eval_test_OOD, equals the mean over severities then corruptions).
    ``corruptions`` names the files to use (all must exist); default: every .npy in the folder."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"corruption directory {directory} does not exist (expected CIFAR-10-C: "
                                "labels.npy and one <corruption>.npy per corruption)")
    labels_path = os.path.join(directory, "labels.npy")
    if not os.path.isfile(labels_path):
        raise FileNotFoundError(f"{labels_path} is missing (CIFAR-10-C ships labels.npy beside the corruptions)")
    labels = np.load(labels_path, allow_pickle=False)
    names = sorted(f[:-4] for f in os.listdir(directory) if f.endswith(".npy") and f != "labels.npy")
    if corruptions is not None:
        missing = [c for c in corruptions if c not in names]
        if missing:
            raise FileNotFoundError(f"{directory} lacks {len(missing)} of the {len(corruptions)} corruptions "
                                    f"evaluated ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
        names = list(corruptions)
    if not names:
        raise FileNotFoundError(f"no <corruption>.npy files in {directory}")
    per_severity = labels.shape[0] // 5
    if per_severity * 5 != labels.shape[0]:
        raise ValueError(f"{labels_path}: {labels.shape[0]} labels is not 5 severities of equal size")
    take = per_severity if n_per_severity is None else min(n_per_severity, per_severity)
    results: dict[str, float] = {}
    for name in names:
        path = os.path.join(directory, name + ".npy")
        data = np.load(path, mmap_mode="r", allow_pickle=False)
        if data.shape[0] != labels.shape[0] or data.ndim != 4 or data.dtype != np.uint8:
            raise ValueError(f"{path}: expected uint8 (N={labels.shape[0]}, H, W, C), got {data.dtype} {data.shape}")
        accs = []
        for severity in range(5):
            rows = slice(severity * per_severity, severity * per_severity + take)
            images = torch.from_numpy(np.array(data[rows])).permute(0, 3, 1, 2).contiguous()
            y = torch.from_numpy(labels[rows].astype(np.int64))
            acc = clean_accuracy(model, images, y, batch_size)
            results[f"{name}/{severity + 1}"] = acc
            accs.append(acc)
        results[name] = float(np.mean(accs))
    for severity in range(1, 6):
        results[f"severity/{severity}"] = float(np.mean([results[f"{n}/{severity}"] for n in names]))
    results["mean"] = float(np.mean([results[n] for n in names]))
    return results


@torch.no_grad()
def smoothed_logits(model, x: torch.Tensor, augment, samples: int, generator: torch.Generator | None = None):
    """RoCL's transformation-smoothed classifier (eq. 8): the head applied to the encoder's feature
    averaged over ``samples`` random transformations t(x) (the first view of ``augment``)."""
    model.eval()
    images = (x * 255).round().to(torch.uint8)
    total = None
    for _ in range(samples):
        view = augment(images, generator)[0]
        feats = model.features(view)
        total = feats if total is None else total + feats
    return model.head(total / samples)


def smoothed_accuracy(model, images, labels, augment, samples: int, spec: AttackSpec | None = None,
                      batch_size: int = 256, seed: int = 0) -> float:
    """Accuracy of the smoothed classifier on clean inputs, or on ``spec``'s examples made against the
    unsmoothed model (the transfer setting of RoCL's Table 3)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    correct = 0
    for x, y in batches(images, labels, batch_size, device):
        if spec is not None:
            x = ce_attack(model, x, y, spec.eps, spec.alpha, spec.steps, norm=spec.norm, generator=generator)
        correct += int((smoothed_logits(model, x, augment, samples, generator).argmax(1) == y).sum())
    return correct / images.shape[0]


def eps_curve(model, images, labels, eps_values, batch_size: int = 256, seed: int = 0) -> dict[float, float]:
    """PGD-20 robust accuracy at each l_inf eps (step eps/4)."""
    out = {}
    for eps in eps_values:
        spec = AttackSpec(f"pgd20@{eps:.4f}", "linf", float(eps), float(eps) / 4, 20)
        out[float(eps)] = clean_accuracy(model, images, labels, batch_size) if eps == 0 else \
            robust_accuracy(model, images, labels, spec, batch_size, seed=seed)
    return out
