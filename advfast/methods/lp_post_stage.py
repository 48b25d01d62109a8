"""DynACL++'s LP-AFT and DynACL-AIR++'s LP-AFF as post-training stages of any ACL-family method.

The settings are data in advfast.methods.lp_post_settings (LP_AFT, LP_AFF); this module runs them on the
engine's stages (advfast.methods.hooks.Stage). Interface, for a method with a dual-BN encoder
(``method.encoder(x, branch)``, branches "normal" and "pgd"), ``method.eval_branch``, ``method.num_classes``
and ``method.cfg``::

    def __init__(self, cfg, num_classes, mean, std):
        super().__init__(cfg, num_classes, mean, std)
        ...                                    # every module, the encoder included
        add_lp_modules(self, "lp-aft")         # last: the probe head and the pseudo-label buffer

    def stages(self):
        return [self.main_stage(export=True)] + lp_aft_stages(self)      # (lp_aff_stages for "lp-aff")

``add_lp_modules`` creates ``self.lp_head`` (the linear probe: ``nn.Linear(feat_dim, max(num_classes, K))``,
zero-initialised as both scripts do, frozen until its stage) and ``self.lp_labels`` (a buffer module holding
the pseudo labels of the training set and their k-means objective; empty until computed). It draws no random
numbers, so a method's pre-training with the modules is bit-identical to the one without them.

What the stages do (``method.encoder`` is the "trained model": for DynACL the encoder it exports, the EMA
one, as the README's LP-AFT input ``model_encoder_k.pt``):

1. pseudo labels, before the first probe batch: features of the un-augmented training set (the run's
   dataset, reloaded through advfast.data.build_dataset, at the run's image size) through the encoder's
   "normal" branch, eval mode, fp32, the pooled output not normalised (quirk 12 of docs/methods_dynacl_air.md);
   k-means (advfast.pseudo_labels.kmeans, the ClusterFit k-means) with K as coded (LP-AFT 10, LP-AFF the
   number of classes), seeded from cfg.seed; under torchrun rank 0's labels are broadcast. They are computed
   in the probe stage's ``on_epoch_start`` when the buffer is empty, not in ``on_start``: ``on_start`` also
   runs when a resume lands in the stage, *before* the checkpoint is loaded, i.e. with untrained weights.
   ``on_epoch_start`` runs after the load, so a resume finds the labels in the checkpoint (the buffer is part
   of the method's state) and never reclusters; a resume from the checkpoint written at the end of
   pre-training (buffer still empty) computes them from the loaded weights, as the uninterrupted run did.
2. ``<name>-probe``: the linear probe, encoder frozen in eval mode, CE on the pseudo labels through the
   "pgd" branch, SGD lr 0.01 mom 0.9 wd 1e-4 constant (ProbeStep).
3. the pseudo-label TRADES adversarial fine-tuning of encoder and head (PseudoAFTStep): the attack in eval
   mode (KL(p(x) || p(x')) summed, 10 steps of 2/255 in 8/255, start x itself for LP-AFT, x + 0.001 N(0, 1)
   for LP-AFF), the loss CE + 6 KL / B in train mode, natural and adversarial forwards separately (their own
   BN batch statistics, as the scripts); SGD lr 0.1 mom 0.9 wd 1e-4, x0.1 after epochs 10 and 20. The
   AFT is one stage ``<name>`` (optim.schedule=step every 10 epochs, per epoch: MultiStepLR([10, 20]) over
   25 epochs), one optimiser throughout as the script.
   It exports the encoder to ``<run>/stages/<name>/``; it is also the run's ``encoder.safetensors``
   (method.encoder after the last stage, its eval branch "pgd"): the encoder the leaderboard's "++" rows
   evaluate. Pre-training's export stays in ``<run>/stages/pretrain/``.
   LP-AFT trains the 'pgd' route as the script's single-BN network: the "normal" BN parameters are frozen
   and nothing runs through them. LP-AFF keeps the dual-BN model; as AIR's trades_loss_dual, its attack
   takes the KL target through "normal" (eval mode, no gradient), its loss both logits through "pgd".

Every parameter not trained by a stage is frozen in its ``on_start`` (torchrun's DDP needs every trainable
parameter in the loss). The views: the stages set every view of the run's augmentation to RandomCrop(pad 4) +
flip (the "finetune" preset's view, the scripts' ``RandomCrop(32, padding=4)`` + flip) in their
``on_epoch_start`` and train on view 0; batches are the run's (batch size, drop_last), the pseudo label of an
image is read at ``batch.indices``.

Digits: the AFT's epochs are divided by 5 (2 + 2 + 1), the probe keeps its 10 (cheap: a frozen forward);
advfast.methods.lp_post_settings.for_dataset.
Not on the attack-graph (CUDA graph) path: TRADES runs eagerly.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from advfast.attacks import input_only_gradients
from advfast.attacks.trades import trades_ascent
from advfast.config import OptimConfig
from advfast.data.presets import PRESETS
from advfast.losses.trades import trades_loss
from advfast.methods.hooks import Stage
from advfast.methods.lp_post_settings import POST_PROCESSING, PostProcessing, for_dataset, num_clusters
from advfast.methods.lp_pseudo_labels import cluster_pseudo_labels
from advfast.ops.dtypes import upcast

FEATURE_CHUNK = 1024  # images per forward of the feature pass (the scripts use 5000; memory only)
FINETUNE_VIEW = PRESETS["finetune"][0]  # PadCrop(4) + Flip()


class PseudoLabelBuffer(nn.Module):
    """The pseudo labels of the training set (int64 (N,), empty until computed) and their k-means objective,
    as buffers: part of every checkpoint. N is unknown when the method is built, so loading a state dict
    resizes the buffer to the saved one (in place: DDP keeps its reference)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("labels", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("objective", torch.zeros((), dtype=torch.float64))

    @property
    def ready(self) -> bool:
        return self.labels.numel() > 0

    def set(self, labels: torch.Tensor, objective: float) -> None:
        self.labels.resize_(labels.shape).copy_(labels)
        self.objective.fill_(objective)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "labels")
        if isinstance(saved, torch.Tensor) and saved.dim() == 1:
            self.labels.resize_(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _post(post) -> PostProcessing:
    if isinstance(post, PostProcessing):
        return post
    if post not in POST_PROCESSING:
        raise ValueError(f"unknown post-processing {post!r}; choose one of {', '.join(POST_PROCESSING)}")
    return POST_PROCESSING[post]


def add_lp_modules(method: nn.Module, post: str | PostProcessing = "lp-aft") -> None:
    """Create the modules the LP stages train and fill, on ``method`` (call at the end of its ``__init__``,
    once the encoder exists): ``method.lp_head`` and ``method.lp_labels``. No random numbers are drawn."""
    post = _post(post)
    encoder = method.encoder
    feat_dim = getattr(encoder, "feat_dim", 0)
    if not feat_dim:
        raise ValueError(f"{type(method).__name__}.encoder has no feat_dim; call add_lp_modules after the encoder "
                         f"is built")
    k = num_clusters(post, method.num_classes)
    # skip_init: no kaiming draw (the global RNG, hence pre-training, stays as without these modules)
    head = nn.utils.skip_init(nn.Linear, feat_dim, max(method.num_classes, k))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    head.requires_grad_(False)  # trained by its stages only (pre-training's optimiser and DDP never see it)
    method.lp_head = head
    method.lp_labels = PseudoLabelBuffer()
    method.__dict__["lp_post"] = post  # plain attribute: settings, not state


def lp_aft_stages(method: nn.Module, post: PostProcessing | None = None, *,
                  trades_random_start: float | None = None) -> list[Stage]:
    """DynACL++'s stages (PKU-ML/DYNACL assign_label.py + LPAFT.py), epochs scaled for digits.
    ``trades_random_start``: the std of the TRADES start instead of the coded 0.0 (x itself), e.g. 0.001
    (ACL's and AIR's Gaussian start, well defined where the coded one is rounding noise: quirk 10).
    ``post``: other settings, used as given (tests)."""
    return _stages(method, post, "lp-aft", trades_random_start, None)


def lp_aff_stages(method: nn.Module, post: PostProcessing | None = None, *,
                  trades_random_start: float | None = None, attack_target_branch: str | None = None) -> list[Stage]:
    """DynACL-AIR++'s stages (GodXuxilie/Enhancing_ACL_via_AIR LP-AFF.py), epochs scaled for digits.
    ``attack_target_branch``: "pgd" for the attack's KL target through 'pgd' (PKU-ML/DYNACL's
    trades_loss_dual(natural_mode='pgd'), LPAFT_AFF.py) instead of AIR's coded 'normal';
    ``trades_random_start`` as for lp_aft_stages (coded: 0.001). ``post``: other settings, used as given."""
    return _stages(method, post, "lp-aff", trades_random_start, attack_target_branch)


def _stages(method, post, name, random_start, target) -> list[Stage]:
    made = method.__dict__.get("lp_post")
    if made is None or not isinstance(getattr(method, "lp_labels", None), PseudoLabelBuffer):
        raise ValueError(f"{type(method).__name__}: call add_lp_modules(self, {name!r}) at the end of __init__ "
                         f"before using {name} stages")
    if made.name != name:
        raise ValueError(f"{type(method).__name__}: add_lp_modules was called for {made.name!r}, the stages are "
                         f"{name!r}; use the same post-processing in both")
    post = for_dataset(made, method.cfg.dataset) if post is None else _post(post)  # given: used as is
    if num_clusters(post, method.num_classes) != num_clusters(made, method.num_classes):
        raise ValueError("the stages' K differs from the one add_lp_modules sized the probe head for")
    if random_start is not None:
        if not (isinstance(random_start, (int, float)) and 0 <= random_start < 1):
            raise ValueError(f"trades_random_start must be a number in [0, 1) (the start's std), got {random_start!r}")
        post = dataclasses.replace(post, aft=dataclasses.replace(post.aft, trades_random_start=float(random_start)))
    if target is not None:
        if target not in ("normal", "pgd"):
            raise ValueError(f"attack_target_branch must be normal or pgd, got {target!r}")
        post = dataclasses.replace(post, aft=dataclasses.replace(post.aft, attack_target_branch=target))
    return LPPostProcess(method, post).stages()


@dataclasses.dataclass
class _Branches:
    features: str  # the pseudo-label features ("normal")
    probe: str  # probe and AFT forwards ("pgd")
    natural: str
    adv: str
    attack_target: str


class LPPostProcess:
    """The stages of one post-processing ``post`` (already scaled for the dataset) on ``method``."""

    def __init__(self, method: nn.Module, post: PostProcessing):
        self.method, self.post = method, post
        self.k = num_clusters(post, method.num_classes)
        b = self._branch
        self.branches = _Branches(b(post.labels.branch), b(post.probe.branch), b(post.aft.natural_branch),
                                  b(post.aft.adv_branch), b(post.aft.attack_target_branch))

    def _branch(self, name: str) -> str:
        """A settings branch ("normal" / "pgd") on this encoder: "pgd" is the method's evaluation branch
        (the adversarial one of a dual-BN encoder), "normal" the clean one."""
        branches = tuple(getattr(self.method.encoder, "branches", ("normal",)))
        if name in branches:
            return name
        if name == "pgd":
            return self.method.eval_branch
        return branches[0]

    # ---- the stages ------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        p, a, name = self.post.probe, self.post.aft, self.post.name
        probe_optim = _sgd(p.lr, p.momentum, p.weight_decay)
        out = [Stage(f"{name}-probe", p.epochs, self.probe_step, optim=probe_optim,
                     parameters=lambda: list(self.method.lp_head.parameters()), on_start=self.start_probe,
                     on_epoch_start=self.epoch_start)]
        out.append(Stage(name, a.epochs, self.aft_step, optim=_step_sgd(a), parameters=self.aft_parameters,
                         on_start=self.start_aft, on_epoch_start=self.epoch_start, export=True))
        return out

    def epoch_start(self, epoch: int) -> None:
        n = self.method.augment.num_views if self.method.augment is not None else 1
        if self.method.augment is not None:
            self.method.augment.set_views((FINETUNE_VIEW,) * n)
        if not self.method.lp_labels.ready:  # after a resume's checkpoint load: never reclusters a resumed run
            self.compute_labels()

    def _freeze_all(self) -> None:
        for p in self.method.parameters():
            p.requires_grad_(False)

    def start_probe(self) -> None:
        self._freeze_all()
        self.method.lp_head.requires_grad_(True)

    def aft_parameters(self) -> list:
        """The encoder's parameters on the branches the AFT uses (the other BN branches' affine parameters
        are left out: they take no part, as in the script's single-BN 'pgd' network) and the head's."""
        used = {self.branches.natural, self.branches.adv}
        skip = set()
        for module in self.method.encoder.modules():
            bns = getattr(module, "bns", None)  # a multi-branch BN (advfast.models.multibn)
            if isinstance(bns, nn.ModuleDict):
                for branch, bn in bns.items():
                    if branch not in used:
                        skip.update(id(q) for q in bn.parameters())
        out = [q for q in self.method.encoder.parameters() if id(q) not in skip]
        return out + list(self.method.lp_head.parameters())

    def start_aft(self) -> None:
        self._freeze_all()
        for p in self.aft_parameters():
            p.requires_grad_(True)

    # ---- pseudo labels ---------------------------------------------------------------------------
    def compute_labels(self) -> None:
        from advfast import dist

        feats = lp_features(self.method, self.branches.features)
        result = cluster_pseudo_labels(feats, self.k, seed=int(self.method.cfg.seed))
        labels = result.labels.to(feats.device)
        if dist.is_active():  # one labelling for every rank (each computed its own from the same weights)
            torch.distributed.broadcast(labels, 0)
        self.method.lp_labels.set(labels.to(self.method.lp_labels.labels.device), result.objective)
        if dist.is_main():
            counts = torch.bincount(labels, minlength=self.k).tolist()
            print(f"advfast: {self.post.name} pseudo labels: k-means K={self.k} on {feats.shape[0]} training images "
                  f"({feats.shape[1]}-d '{self.branches.features}' features), {result.iterations} rounds, within-"
                  f"cluster SS {result.objective:.6g}, cluster sizes {counts}", flush=True)

    def _targets(self, batch) -> torch.Tensor:
        labels = self.method.lp_labels.labels
        if not self.method.lp_labels.ready:
            raise RuntimeError(f"{self.post.name}: no pseudo labels yet; the stage's on_epoch_start computes them "
                               f"before its first batch")
        return labels[batch.indices.to(labels.device)]

    def logits(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return upcast(self.method.lp_head(self.method.encoder(x, branch)))

    # ---- steps -----------------------------------------------------------------------------------
    def probe_step(self, batch):
        x, y = batch.views[0], self._targets(batch)
        with self.method.attack_mode(), torch.no_grad():  # the script's model.eval(); the encoder is frozen
            f = self.method.encoder(x, self.branches.probe)
        logits = upcast(self.method.lp_head(f))
        loss = F.cross_entropy(logits, y)
        return loss, {"lp_probe_acc": (logits.argmax(1) == y).float().mean().detach()}

    def aft_step(self, batch):
        a, br = self.post.aft, self.branches
        x, y = batch.views[0], self._targets(batch)
        with self.method.attack_mode(), input_only_gradients(self.method):
            x_adv = trades_attack(lambda v: self.logits(v, br.attack_target), lambda v: self.logits(v, br.adv),
                                  x, a.epsilon, a.step_size, a.attack_steps, a.trades_random_start)
        nat = self.logits(x, br.natural)  # train mode; two forwards, each with its own BN batch statistics
        adv = self.logits(x_adv, br.adv)
        loss = trades_loss(nat, adv, y, a.beta)
        return loss, {"lp_aft_acc": (nat.argmax(1) == y).float().mean().detach(),
                      "lp_aft_adv_acc": (adv.argmax(1) == y).float().mean().detach()}


def _sgd(lr: float, momentum: float, weight_decay: float) -> OptimConfig:
    return OptimConfig(name="sgd", lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False,
                       schedule="constant", warmup_epochs=0.0)


def _step_sgd(a) -> OptimConfig:
    """The AFT's SGD with MultiStepLR(milestones, 0.1) stepped per epoch, as torch StepLR: the milestones
    are multiples of the first one (10, 20 in 25 epochs; 2, 4 in digits' 5)."""
    every = a.milestones[0] if a.milestones else a.epochs
    if tuple(a.milestones) != tuple(range(every, a.epochs, every)):
        raise ValueError(f"the AFT's lr milestones {a.milestones} are not every {every} epochs up to {a.epochs}")
    return OptimConfig(name="sgd", lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay, nesterov=False,
                       schedule="step", step_every="epoch", step_epochs=every, gamma=0.1, warmup_epochs=0.0)


def trades_attack(target_logits, adv_logits, x: torch.Tensor, eps: float, alpha: float, steps: int,
                  start_std: float) -> torch.Tensor:
    """TRADES' inner maximisation, as PKU-ML/DYNACL's trades_loss (``start_std`` 0: from x itself) and AIR's
    trades_loss_dual (``start_std`` 0.001: x + 0.001 N(0, 1), the global RNG): ascend
    KL(softmax(target_logits(x)) || softmax(adv_logits(x'))) (summed) by signed steps inside the eps-ball and
    [0, 1] (advfast.attacks.trades.trades_ascent). The caller sets the modes (eval, as both scripts).
    The start draws with ``randn_like`` from the global RNG, as the scripts' ``torch.randn(x.shape).cuda()``."""
    if start_std < 0:
        raise ValueError(f"start_std must be >= 0, got {start_std}")
    x_start = x.detach().clone() if start_std == 0 else (x + start_std * torch.randn_like(x)).detach()
    return trades_ascent(target_logits, adv_logits, x, x_start, eps, alpha, steps)


def lp_features(method: nn.Module, branch: str = "normal", dataset=None) -> torch.Tensor:
    """The pooled encoder features (fp32, not normalised) of the un-augmented training set through ``branch``,
    in eval mode, in dataset order: the pseudo-label step's input. ``dataset``: the run's training set
    (default: reloaded from ``method.cfg``, as the engine loaded it)."""
    from advfast.data import build_augment
    from advfast.data.build import build_dataset

    cfg = method.cfg
    data = build_dataset(cfg, "train") if dataset is None else dataset
    plain = build_augment("none", backend="torch", size=cfg.image_size)  # the image as is, at the run's size
    device = next(method.encoder.parameters()).device
    out = []
    with method.attack_mode(), torch.no_grad(), torch.autocast(device.type, enabled=False):
        for s in range(0, len(data), FEATURE_CHUNK):
            x = plain(data.images[s:s + FEATURE_CHUNK].to(device))[0]
            out.append(upcast(method.encoder(x, branch)))
    return torch.cat(out)
