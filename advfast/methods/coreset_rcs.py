"""RCS: robustness-aware coreset selection (Xu et al., NeurIPS 2023; GodXuxilie/Efficient_ACL_via_RCS,
``ACL_RCS/small_scale_datasets/RCS.py: RCS.update_subset_indice``, ``--CoresetLoss KL``) as coded.

Everything runs with the backbone and the projection head in eval mode (the official code's attacks call
``model.eval()``); only the head's Linear parameters (names containing "fc": fc1.weight, fc1.bias,
fc2.weight, fc3.weight on ACL's head) are differentiated, through ``torch.func.functional_call`` on a
private copy, so the model itself is never modified (official: steps the head in place, restores it after).

    KLmm(q, p)  = mean over all entries of Q (log Q - log P),  Q = minmax_rows(q) + 1e-8, P = minmax_rows(p) + 1e-8
    g_val       = PGD-3 on the validation rows (alpha (10/255)/3, eps 8/255) maximising
                  KLmm(model(x', 'pgd'), model(x, 'normal')); then the gradient of
                  KLmm(head(h(x'), 'pgd'), head(h(x), 'normal')) w.r.t. the head params, each reduced to
                  its mean over dim 0 and concatenated
    per batch b (the current augmentation, shuffled, ``batch_size`` images, two views):
                  x_adv = ACL's PGD (5 steps of 2/255, 'pgd' BN) on NT-Xent; loss_b = (NT-Xent(head(h(x))) +
                  NT-Xent(head(h(x_adv), 'pgd'))) / 2; G_b = its head gradients, g_b their dim-0 means
    greedy, n = int(int(fraction * N) / batch_size) times:  b* = argmax_{remaining} <g_b, g_val>;
                  take b*'s images; head -= lr * G_b* (twice: ``step_repeats``); g_val with a fresh attack

The official code reads ``args.Coreset_bs``, which no parser defines (AttributeError at the first
selection); the ImageNet-32 version of the same code uses ``args.batch_size`` there, and with it the
selected count matches the fraction (19 * 512 = 9728 of 50k at 0.2), so ``batch_size`` defaults to the
training batch. The doubled head step (``linear_layer`` is ``model.fc``, both are stepped) is kept:
``step_repeats=1`` gives the single step the code intends.

No host syncs per batch: the gains, the argmax and the head steps stay on the device; the selected
indices are read back once, at the end. Deviation: advfast's PGD clamps its random start to [0, 1]
before the first forward (official: after the first step).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call

from advfast.attacks.pgd import pgd
from advfast.ops.contrastive import nt_xent


@dataclasses.dataclass(frozen=True)
class RCSSettings:
    """The official flags (DynACL_RCS.py / ACL_RCS.py defaults)."""
    fraction: float = 0.2  # --fraction
    batch_size: int = 512  # Coreset_bs (undefined in the code): the training batch
    lr: float = 0.01  # --Coreset_lr
    step_repeats: int = 2  # the code steps the head twice per selected batch
    val_steps: int = 3  # --Coreset_pgd_iter
    val_eps: float = 8 / 255
    train_steps: int = 5  # --pgd_iter (ACL's attack; alpha = 2/255 * 5 / steps as PGD_contrastive)
    train_eps: float = 8 / 255
    temperature: float = 0.5
    warmup_epochs: int = 100  # --warmup: full data before the first selection
    interval: int = 20  # --fre
    random_start: bool = True  # both attacks start uniformly in the ball (official); False: at the clean images

    def __post_init__(self):
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"coreset fraction must be in (0, 1], got {self.fraction!r}")
        for name in ("batch_size", "step_repeats", "interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"coreset {name} must be an int >= 1, got {v!r}")
        for name in ("val_steps", "train_steps", "warmup_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"coreset {name} must be an int >= 0, got {v!r}")

    @property
    def val_alpha(self) -> float:
        return (10.0 / 255.0) / self.val_steps if self.val_steps else 0.0

    @property
    def train_alpha(self) -> float:
        return 2.0 / 255.0 * 5 / self.train_steps if self.train_steps else 0.0

    def is_selection_epoch(self, epoch: int) -> bool:
        """1-based epochs: the code selects when ``epoch >= warmup and (epoch - 1) % fre == 0`` (101, 121, ...)."""
        return epoch >= self.warmup_epochs and (epoch - 1) % self.interval == 0

    def uses_coreset(self, epoch: int) -> bool:
        """Epochs after the warm-up train on the last selected subset."""
        return epoch > self.warmup_epochs

    def num_batches(self, num_images: int) -> int:
        """How many mini-batches the greedy search takes: int(int(N * fraction) / batch_size)."""
        return int(int(num_images * self.fraction) / self.batch_size)


@dataclasses.dataclass
class RCSSelection:
    indices: torch.Tensor  # (n,) int64 on the CPU: dataset indices, in selection order
    batches: torch.Tensor  # (k,) int64: positions of the chosen mini-batches in the selection loader's order
    gains: torch.Tensor  # (k,) the greedy gain <g_b, g_val> of each chosen batch


def minmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Row-wise (x - min) / max(x - min), as RCS.normalize (not in place here)."""
    x = x - x.min(dim=1, keepdim=True).values
    return x / x.max(dim=1, keepdim=True).values


def minmax_kl(q_src: torch.Tensor, p_src: torch.Tensor) -> torch.Tensor:
    """RCS's ``kl_loss(nat=q_src, adv=p_src)``: KLDivLoss('mean')(log(minmax(p) + 1e-8), minmax(q) + 1e-8)."""
    q, log_p = minmax_rows(q_src) + 1e-8, torch.log(minmax_rows(p_src) + 1e-8)
    return (q * (torch.log(q) - log_p)).mean()  # KLDivLoss's 'mean' written out (its meaning is to change)


def val_rows_as_coded(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The rows the official validation step attacks: per loader batch of ``batch_size`` items (each item two
    identical copies, interleaved), the first half of the interleaved rows, i.e. the batch's first half of
    the images, each twice (500 validation images in one batch of 512 -> images 0..249, each twice)."""
    out = []
    for chunk in images.split(batch_size):
        out.append(torch.repeat_interleave(chunk, 2, dim=0)[:chunk.shape[0]])
    return torch.cat(out)


def _nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return nt_xent(z, 2, temperature=temperature, positives="mean_log_prob", normalize=True)


class _RCSRun:
    """One selection: the head's differentiated params on a private copy, the model in eval mode."""

    def __init__(self, backbone, head: nn.Module, settings: RCSSettings, param_names, clean_branch, adv_branch,
                 generator):
        self.backbone, self.head, self.s = backbone, head, settings
        self.clean, self.adv, self.generator = clean_branch, adv_branch, generator
        named = dict(head.named_parameters())
        names = [n for n in named if "fc" in n] if param_names is None else list(param_names)
        missing = [n for n in names if n not in named]
        if not names or missing:
            what = f"missing {missing}" if missing else "none found"
            raise ValueError(f"RCS differentiates the head's Linear params; {what} among the head's parameters "
                             f"({', '.join(named) or 'it has none'})")
        self.names = names
        self.params = {n: named[n].detach().clone() for n in names}
        self.frozen = {n: p.detach() for n, p in named.items() if n not in self.params}
        self.frozen.update({n: b for n, b in head.named_buffers()})

    def head_out(self, h: torch.Tensor, branch: str, params=None) -> torch.Tensor:
        return functional_call(self.head, {**self.frozen, **(params or self.params)}, (h, branch))

    def model_out(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return self.head_out(self.backbone(x, branch), branch)

    def grads(self, loss_of_params: Callable[[dict], torch.Tensor]) -> list[torch.Tensor]:
        params = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        with torch.enable_grad():
            loss = loss_of_params(params)
        return list(torch.autograd.grad(loss, [params[n] for n in self.names]))

    @staticmethod
    def summary(grads: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([g.mean(dim=0).reshape(-1) for g in grads])

    def val_grad(self, val_x: torch.Tensor, h_val: torch.Tensor) -> torch.Tensor:
        """g_val: a fresh PGD on the validation rows with the current head, then the KLmm gradient."""
        nat = self.head_out(h_val, self.clean).detach()
        x_adv = pgd(lambda x: minmax_kl(self.model_out(x, self.adv), nat), val_x, self.s.val_eps,
                    self.s.val_alpha, self.s.val_steps, random_start=self.s.random_start, generator=self.generator)
        with torch.no_grad():
            h_adv = self.backbone(x_adv, self.adv)
        return self.summary(self.grads(lambda p: minmax_kl(self.head_out(h_adv, self.adv, p),
                                                           self.head_out(h_val, self.clean, p))))

    def batch_grads(self, x1: torch.Tensor, x2: torch.Tensor) -> list[torch.Tensor]:
        """G_b: head gradients of the ACL loss (clean + adversarial NT-Xent) / 2 on one mini-batch."""
        x = torch.cat([x1, x2])
        t = self.s.temperature
        x_adv = pgd(lambda xx: _nt_xent(self.model_out(xx, self.adv), t), x, self.s.train_eps, self.s.train_alpha,
                    self.s.train_steps, random_start=self.s.random_start, generator=self.generator)
        with torch.no_grad():
            h, h_adv = self.backbone(x, self.clean), self.backbone(x_adv, self.adv)
        return self.grads(lambda p: (_nt_xent(self.head_out(h, self.clean, p), t)
                                     + _nt_xent(self.head_out(h_adv, self.adv, p), t)) / 2)


def rcs_select(backbone: Callable[[torch.Tensor, str], torch.Tensor], head: nn.Module,
               train_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], val_x: torch.Tensor,
               num_images: int, settings: RCSSettings = RCSSettings(), *, param_names=None,
               clean_branch: str = "normal", adv_branch: str = "pgd",
               generator: torch.Generator | None = None) -> RCSSelection:
    """Select the coreset. ``backbone(x, branch)`` -> pooled features and ``head(h, branch)`` -> projections
    (the model's own modules, put in eval mode here and restored after); ``train_batches`` yields
    ``(dataset_indices, view1, view2)`` mini-batches of ``settings.batch_size`` over the whole training set
    (current augmentation, shuffled); ``val_x``: the validation rows (see :func:`val_rows_as_coded`);
    ``num_images``: N of the training set (the budget is int(N * fraction)).
    """
    k = settings.num_batches(num_images)
    if k < 1:
        raise ValueError(f"coreset fraction {settings.fraction} of {num_images} images is less than one batch of "
                         f"{settings.batch_size}; raise the fraction or lower the coreset batch size")
    modules = [m for m in (backbone, head) if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        run = _RCSRun(backbone, head, settings, param_names, clean_branch, adv_branch, generator)
        with torch.no_grad():
            h_val = backbone(val_x, clean_branch)  # the backbone is fixed during a selection: computed once
        g_val = run.val_grad(val_x, h_val)
        full, summaries, index_rows = [], [], []
        for idx, x1, x2 in train_batches:
            g = run.batch_grads(x1, x2)
            full.append(g)
            summaries.append(run.summary(g))
            index_rows.append(idx.to(x1.device, torch.long))
        nb = len(summaries)
        if nb < k:
            raise ValueError(f"the selection loader gave {nb} batches, fewer than the {k} to select")
        summaries = torch.stack(summaries)
        stacked = [torch.stack([g[i] for g in full]) for i in range(len(run.names))]
        del full  # the stacked copies are all the greedy steps need
        padded = torch.full((nb, max(r.numel() for r in index_rows)), -1, dtype=torch.long, device=summaries.device)
        for i, r in enumerate(index_rows):
            padded[i, :r.numel()] = r
        remaining = torch.ones(nb, dtype=torch.bool, device=summaries.device)
        chosen, gains = [], []
        for j in range(k):
            gain = (summaries @ g_val).masked_fill(~remaining, -math.inf)
            r = torch.argmax(gain).view(1)  # first maximum in loader order, as argmax over the official index_list
            chosen.append(r)  # index_select below, never gain[r]: a 0-d index tensor may be read back to the host
            gains.append(gain.index_select(0, r))
            if j == k - 1:
                break
            for _ in range(settings.step_repeats):
                run.params = {n: run.params[n] - settings.lr * stacked[i].index_select(0, r).squeeze(0)
                              for i, n in enumerate(run.names)}
            g_val = run.val_grad(val_x, h_val)
            remaining = remaining.index_fill(0, r, False)
        batches = torch.cat(chosen)
        rows = padded.index_select(0, batches).reshape(-1)
        rows = rows[rows >= 0]  # the one read-back of the selection
        return RCSSelection(indices=rows.cpu(), batches=batches.cpu(), gains=torch.cat(gains).cpu())
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


# ---- the engine option ``coreset=rcs`` (advfast.engine.trainer) ------------------------------------------------

POOLS = ("holdout", "full")


@dataclasses.dataclass(frozen=True)
class CoresetObjective:
    """A method's declaration for ``coreset=rcs`` (``Method.coreset_objective``): the selection loss is ACL's
    NT-Xent on ``head(backbone(x, branch), branch)`` with ``clean_branch`` / ``adv_branch`` BN.
    ``pool``: where the coreset is drawn from and what the full-data epochs train on - "holdout" (the
    training set minus the validation share: ``ACL_RCS.py``) or "full" (the whole set for both, as
    ``DynACL_RCS.py``; the validation images are then also in the pool)."""
    backbone: Callable[[torch.Tensor, str], torch.Tensor]
    head: nn.Module
    clean_branch: str = "normal"
    adv_branch: str = "pgd"
    temperature: float = 0.5
    pool: str = "holdout"

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"CoresetObjective.pool must be one of {', '.join(POOLS)}, got {self.pool!r}")


# per-dataset schedule of the selections: CIFAR-style datasets keep the official 100/20 (RCSConfig's defaults);
# the digits demo (10 epochs of 11 steps) selects at epochs 4, 7 and 10 (1-based), so several selections happen
DATASET_PRESETS = {"digits": dict(warmup_epochs=3, interval=3)}


def rcs_preset(dataset: str) -> dict:
    """The ``rcs`` config section's overrides for ``dataset`` (applied under the method's preset)."""
    return dict(DATASET_PRESETS.get(dataset, {}))


def settings_from_config(cfg) -> RCSSettings:
    """RCSSettings of a TrainConfig: its ``rcs`` section, the selection batch (None: the training batch, the value
    the official ImageNet-32 version uses for the undefined ``Coreset_bs``) and the run's own attack for the batch
    gradients (ACL's PGD-5: the official ``--pgd_iter``)."""
    r, a = cfg.rcs, cfg.attack
    steps = a.steps if a.kind != "none" else 0
    return RCSSettings(fraction=float(r.fraction), batch_size=int(r.batch_size or cfg.batch_size), lr=float(r.lr),
                       step_repeats=int(r.step_repeats), val_steps=int(r.val_steps), val_eps=8 / 255,
                       train_steps=int(steps), train_eps=float(a.eps), temperature=float(cfg.temperature),
                       warmup_epochs=int(r.warmup_epochs), interval=int(r.interval),
                       random_start=bool(a.random_start))


def holdout_split(num_images: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, validation) dataset indices, int64 on the CPU: ``num_images - int(num_images * (1 - val_fraction))``
    validation images drawn at random (seeded; the official ``np.random.choice`` of the 99%), in ascending order
    as ``np.delete`` leaves them, the rest the pool."""
    n_val = num_images - int(num_images * (1.0 - val_fraction))
    if n_val < 1 or n_val >= num_images:
        raise ValueError(f"rcs.val_fraction {val_fraction} of {num_images} images leaves {n_val} validation images; "
                         f"it must hold at least one and leave a training pool")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(num_images, generator=g)
    return perm[n_val:].clone(), perm[:n_val].sort().values


def selection_generator(seed: int, epoch: int, device) -> torch.Generator:
    """The attacks' random starts of the selection at (0-based) ``epoch``: a function of (seed, epoch) only, so a
    resume that repeats a selection draws the same starts and every rank of a DDP run draws alike."""
    from advfast.data.loader import mix_seed

    return torch.Generator(device=device).manual_seed(mix_seed(seed, epoch, 0x52435300))


def select_with(objective: CoresetObjective, loader, val_x: torch.Tensor, settings: RCSSettings,
                generator: torch.Generator) -> RCSSelection:
    """``rcs_select`` over an ``advfast.data.DeviceLoader`` (its current epoch and views; each batch's
    ``indices`` are dataset positions) with the method's declared objective."""
    settings = dataclasses.replace(settings, temperature=float(objective.temperature))
    batches = ((b.indices, b.views[0], b.views[1]) for b in loader)
    return rcs_select(objective.backbone, objective.head, batches, val_x, loader.num_images(), settings,
                      clean_branch=objective.clean_branch, adv_branch=objective.adv_branch, generator=generator)
