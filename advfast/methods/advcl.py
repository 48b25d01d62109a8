"""AdvCL (Fan et al., NeurIPS 2021) as LijieFan/AdvCL's pretraining_advCL.py runs it.

Views (data preset "advcl"): x1, x2 = SimCLR views (scale 0.2-1), org = RandomCrop(pad 4) + flip;
x_hfc = high_frequency(org, r) of the *clean* org view (unclamped), through the "normal" BN.

Model: backbone with three BN branches ["normal", "pgd", "pgd_ce"], no input normalisation;
head_proj Linear(512,512)-BN(one, shared by every branch)-ReLU-Linear(512,128), L2-normalised;
pseudo-label heads Linear(feat, K) for K in (2, 10, 50, 100, 500) on the pooled feature. The
official model also computes an unused head_pred on every forward; it is left out here (it
changes no loss and no gradient).

Attack (model in train mode, as the official code: BN batch statistics and running-stat updates):
x_cl and x_ce start independently at org + U(-eps, eps) and take 5 signed steps of 2/255 within
8/255 of org on  SupCon([x_cl ("pgd"), x1, x2, x_hfc]) + 0.2 * sum_K CE_sum(head_K(x_ce ("pgd_ce")), y_K) / n_K.
x_cl reaches only the contrastive term and x_ce only the CE term, so this is two independent
attacks, run here as one PGD call on cat([x_cl, x_ce]).

Training: loss = SupCon(T=0.5) over [x_cl ("pgd"), x1, x2, x_hfc ("normal")] scaled by T/0.07
(SupConLoss's base_temperature) + 0.2 * mean over heads of CE_mean(head_K(x_ce), y_K). Every view
is its own forward (its own BN batch), as the official code. "pgd" is the evaluation branch (the
official SLF loads bn_list.1).

SupCon with labels=None is ``ops.nt_xent(z, 4, T, positives="mean_log_prob")``: each of the 4B
anchors has 3 positives, a denominator over the 4B-1 others, and the mean log-probability over
its positives; the mean over anchors does not depend on the row layout.

Pseudo labels (ClusterFit) are looked up by dataset index (batch.indices); see
advfast.pseudo_labels and docs/methods.md for where they come from.

Deviations (all documented in docs/methods.md):
* the clean views' features are computed once per attack, not at each of its 5 steps: in train
  mode they do not depend on x_cl, so the attack is identical; only the running statistics of the
  "normal" BN and of the (not exported) head BN see fewer updates. ``method.refresh_clean_views``
  recomputes them every step, as the official code.
* ops.random_start clamps the start to [0, 1]; the official start is clamped only after step 1.
* the lr schedule is the engine's per-iteration cosine (official: per-epoch cosine, per-iteration
  warmup) and the run is 1000 epochs (the official loop runs 1002).

A-InfoNCE (Yu et al., ECCV 2022; yqy2001/A-InfoNCE, Asym-AdvCL): ``method.asymmetric=ip|hn|iphn``
replaces the SupCon by advfast.losses.asymmetric_infonce.asymmetric_supcon (as coded, with its
weightings; ``fix_aliasing`` / ``hn_rowwise`` give the corrected forms) and selects the official
shells' preset (400 epochs, lr 1.0 / 1.2 / 2.0). The attack uses the plain form with w
(``attack_plain``, the shells' --attack_ori, default for hn/iphn) or the training criterion without
stop-grad (ip). IP's adaptive degree (``adaptive_warmup_epochs``, the code's --stop_grad_adaptive)
runs two no-grad forwards of org and x_cl through the "normal" branch after the training forwards,
in train mode as coded (``asym_distance_eval`` for eval mode); its running mean is a float64
buffer of the method (resume-exact). See docs/methods_ainfonce.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advfast import pseudo_labels as pl
from advfast.data import high_frequency
from advfast.dist import all_reduce_mean, world_size
from advfast.losses.asymmetric_infonce import (VARIANTS, AdaptiveStopGradDegree, asymmetric_supcon, given_variant,
                                               mean_feature_distance)
from advfast.methods import register
from advfast.methods.base import Method
from advfast.methods.options import option
from advfast.models import build_encoder, build_head
from advfast.models.export import encoder_files
from advfast.ops.contrastive import nt_xent
from advfast.ops.dtypes import upcast

BRANCHES = ("normal", "pgd", "pgd_ce")
MAX_CLUSTERS = 1 << 20  # a K beyond this is a typo (the official largest is 500), not a head to allocate


def advcl_preset(dataset: str) -> dict[str, Any]:
    if dataset == "digits":
        # 16x16 digits, small convnet: ~11 steps of 128 per epoch. SGD as the official code with its
        # lr scaled to the batch (0.5 * 128/512); k-means on raw pixels stands in for ClusterFit
        # (demo only) with K up to 50 for ~1400 images; HFC radius scaled to the image (8 * 16/32).
        return dict(arch="convnet", image_size=16, epochs=15, batch_size=128, temperature=0.5,
                    optim=dict(name="sgd", lr=0.125, momentum=0.9, weight_decay=1e-4, schedule="cosine",
                               warmup_epochs=2.0, warmup_start_lr=0.01, min_lr=1.25e-4),
                    attack=dict(kind="pgd", norm="linf", eps=8 / 255, alpha=2 / 255, steps=3, random_start=True),
                    method_options=dict(pseudo_labels_from="raw_pixels", cluster_ks="2,10,50", head_hidden=128),
                    log_every=10, ckpt_every=100)
    return dict(arch="resnet18", epochs=1000, batch_size=512, temperature=0.5,
                optim=dict(name="sgd", lr=0.5, momentum=0.9, weight_decay=1e-4, schedule="cosine",
                           warmup_epochs=10.0, warmup_start_lr=0.01, min_lr=5e-4),
                attack=dict(kind="pgd", norm="linf", eps=8 / 255, alpha=2 / 255, steps=5, random_start=True))


# Asym-AdvCL/shell/cifar10/advcl-{IP,HN,IPHN}-cifar10.sh: lr and the loss flags per variant (tau_plus:
# the shell's --tau_plus or the parser default 0.1; attack_plain: --attack_ori)
ASYM_ADVCL = {
    "ip": dict(lr=1.0, adv_weight=1.2, tau_plus=0.1, attack_plain=False),
    "hn": dict(lr=1.2, adv_weight=1.0, tau_plus=0.12, attack_plain=True),
    "iphn": dict(lr=2.0, adv_weight=0.7, tau_plus=0.1, attack_plain=True),
}


def asym_advcl_preset(dataset: str, variant: str) -> dict[str, Any]:
    """AdvCL's preset with the A-InfoNCE shell's settings: 400 epochs (the official loop runs 402), its lr
    with the cosine floor at lr x 1e-3 (the code's eta_min), wd 1e-4 as AdvCL. digits: lr scaled to the
    batch as AdvCL's (x 128/512), the adaptive degree's averaging window 2 of the 15 epochs (30 of 400)."""
    preset = advcl_preset(dataset)
    official = ASYM_ADVCL[variant]
    lr = official["lr"] * (128 / 512 if dataset == "digits" else 1.0)
    preset["optim"] = dict(preset["optim"], lr=lr, min_lr=lr * 1e-3)
    options = {k: official[k] for k in ("adv_weight", "tau_plus", "attack_plain")}
    if variant != "hn":
        options["adaptive_warmup_epochs"] = 2 if dataset == "digits" else 30
    if dataset != "digits":
        preset["epochs"] = 400
    preset["method_options"] = dict(preset.get("method_options", {}), asymmetric=variant, **options)
    return preset


def _show(value) -> str:
    from advfast.config import show

    return show(value)


def parse_ks(value) -> tuple[int, ...]:
    """"2,10,50" or [2, 10, 50] -> (2, 10, 50)."""
    try:
        if isinstance(value, str):
            ks = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        else:
            ks = tuple(int(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"method.cluster_ks must be cluster counts such as 2,10,50, got {_show(value)}") from None
    if not ks or min(ks) < 2 or max(ks) > MAX_CLUSTERS or len(set(ks)) != len(ks):
        raise ValueError(f"method.cluster_ks must be distinct counts in [2, {MAX_CLUSTERS}], got {_show(value)}")
    return ks


@register
class AdvCL(Method):
    name = "advcl"
    variants = ()
    default_variant = None
    augment_preset = "advcl"
    benchmarked = in_digits_table = True
    digits_table_rows = {"advcl-iphn": ("method.asymmetric=iphn",)}  # A-InfoNCE (IPHN shell) on AdvCL
    attack_graph_setups = {
        "advcl": {"method_options": {"pseudo_labels_from": "raw_pixels", "cluster_ks": "2,10", "head_hidden": 16},
                  "views": 3},
        "advcl-refresh": {"method_options": {"pseudo_labels_from": "raw_pixels", "cluster_ks": "2,10",
                                             "head_hidden": 16, "refresh_clean_views": True}, "views": 3},
        "advcl-no-ce": {"method_options": {"ce_weight": 0.0, "head_hidden": 16}, "views": 3},
        # A-InfoNCE: the IP attack (plain form, w² aliasing) with the adaptive degree from the first step; HN's
        # attack through the HN criterion (no --attack_ori); IPHN as its shell
        "advcl-asym-ip": {"method_options": {"pseudo_labels_from": "raw_pixels", "cluster_ks": "2,10",
                                             "head_hidden": 16, "asymmetric": "ip", "adaptive_warmup_epochs": 0},
                          "views": 3},
        "advcl-asym-hn": {"method_options": {"ce_weight": 0.0, "head_hidden": 16, "asymmetric": "hn",
                                             "attack_plain": False}, "views": 3},
        "advcl-asym-iphn": {"method_options": {"ce_weight": 0.0, "head_hidden": 16, "asymmetric": "iphn"},
                            "views": 3},
    }

    @classmethod
    def iteration_passes(cls, attack_steps):
        # attack on [x_cl, x_ce] (2 + 2 per step); 3 clean views once under no_grad 3; train 5 forwards x 3
        # (x_cl, x1, x2, x_hfc, x_ce)
        return 4 * attack_steps + 18

    @classmethod
    def prepare_bench_run(cls, cfg, workdir) -> None:
        """ClusterFit labels for the synthetic images: uniform random K-way labels (their values do not
        change the cost of an iteration), in the labels-file format the method reads."""
        from pathlib import Path

        from safetensors.torch import save_file

        from advfast.data import load_dataset
        from advfast.data.build import dataset_kwargs

        n = len(load_dataset(cfg.dataset, cfg.data_dir, "train", False, **dataset_kwargs(cfg)).labels)
        g = torch.Generator().manual_seed(0)
        path = Path(workdir) / "pseudo_labels.safetensors"
        save_file({f"pseudo_train_{k}": torch.randint(0, k, (n,), generator=g) for k in pl.DEFAULT_KS}, str(path))
        cfg.method_options["pseudo_labels"] = str(path)

    @dataclasses.dataclass
    class Options:
        pseudo_labels: str | None = None  # labels file: generator .safetensors or the official .pkl
        pseudo_labels_from: str | None = None  # an encoder run dir (ClusterFit), or "raw_pixels" (demo only)
        cluster_ks: Any = "2,10,50,100,500"  # or a list
        # "torch" (on the device) | "sklearn" (CPU)
        kmeans_backend: str = option("torch", choices=("torch", "sklearn"), rule="torch or sklearn")
        kmeans_seed: int = option(0, low=0, rule="a non-negative integer")
        # 0 trains without ClusterFit (the paper's table 5 baseline)
        ce_weight: float = option(0.2, low=0, rule=">= 0 (0 trains without pseudo labels)")
        # SupConLoss scales by T/base_T; set it to T for an unscaled loss
        base_temperature: float = option(0.07, above=0, rule="> 0 (SupConLoss's 0.07)")
        # None: 8 * H / 32 (8 on 32x32, the official r)
        hfc_radius: float | None = option(None, low=0, rule=">= 0 pixels (None: 8 x H/32)")
        # "train" (official: BN batch stats + running updates) | "eval"
        attack_mode: str = option("train", choices=("train", "eval"))
        refresh_clean_views: bool = False  # recompute x1, x2, x_hfc at every attack step (official)
        # head_proj width (None: 512)
        head_hidden: int | None = option(None, low=1, high=1 << 16, rule="a width in [1, 65536] (None: 512)")
        normalize_input: bool = False  # the official model does not normalise its input
        loss_backend: str = "auto"  # backend of ops.nt_xent (and of A-InfoNCE's plain / IP forms)
        # ---- A-InfoNCE (Asym-AdvCL); the None defaults take the variant's official value (ASYM_ADVCL) ----
        asymmetric: str | None = option(None, choices=VARIANTS, rule="ip, hn or iphn (None: AdvCL's SupCon)")
        adv_weight: float | None = option(None, low=0, rule=">= 0 (None: the shell's w: ip 1.2, hn 1, iphn 0.7)")
        stop_grad_degree: float = option(0.2, low=0, high=1, rule="in [0, 1] (the shells' --stpg_degree 0.2)")
        # epochs averaging the clean-adversarial distance before the degree adapts; None: a fixed degree
        adaptive_warmup_epochs: int | None = option(30, low=0, rule="an int >= 0 (None: fixed degree)")
        d_min: float = option(0.4, low=0, rule=">= 0 (--d_min 0.4)")
        tau_plus: float | None = option(None, low=0, high=0.999, rule="in [0, 1) (None: hn 0.12, iphn 0.1)")
        beta: float = option(1.0, above=0, rule="> 0 (--beta 1.0)")
        hn_clamp_temperature: float = option(0.5, above=0, rule="> 0 (the code's hard-coded 0.5)")
        attack_plain: bool | None = None  # --attack_ori: attack with the plain form (None: true for hn, iphn)
        hn_rowwise: bool = False  # HCL's row-wise HN divisions (the code divides column j by row j's statistics)
        fix_aliasing: bool = False  # w, not w², on the clean->adversarial block without stop-grad
        asym_distance_eval: bool = False  # the adaptive degree's two forwards in eval mode (code: train mode)

    def __init__(self, cfg, num_classes: int, mean, std):
        super().__init__(cfg, num_classes, mean, std)
        o = self.options
        self.check_options(o, cfg, files=False)
        self.temperature = float(cfg.temperature)
        self.eval_branch = "pgd"
        norm = (mean, std) if o.normalize_input else (None, None)
        self.backbone = build_encoder(cfg.arch, BRANCHES, *norm)
        self.head = build_head("advcl", self.backbone.feat_dim, BRANCHES, hidden=o.head_hidden)
        self.ks = parse_ks(o.cluster_ks) if o.ce_weight > 0 else ()
        # fc_002, fc_010, ... as the official model names them
        self.cluster_heads = nn.ModuleDict({f"fc_{k:03d}": nn.Linear(self.backbone.feat_dim, k) for k in self.ks})
        if self.ks:
            labels = self._load_pseudo_labels(cfg)
            for k in self.ks:  # persistent: a checkpoint carries them, so a resume sees the same labels
                self.register_buffer(f"pseudo_{k}", labels[k])
        self.asym = o.asymmetric
        self.asym_degree = None
        self._epoch = 1  # 1-based, set by on_epoch_start (the adaptive degree's warm-up reads it)
        if self.asym:
            official = ASYM_ADVCL[self.asym]
            self.asym_hn, self.asym_ip = "hn" in self.asym, self.asym.startswith("ip")
            self.adv_weight = official["adv_weight"] if o.adv_weight is None else o.adv_weight
            self.tau_plus = official["tau_plus"] if o.tau_plus is None else o.tau_plus
            self.attack_plain = official["attack_plain"] if o.attack_plain is None else o.attack_plain
            if self.asym_ip and o.adaptive_warmup_epochs is not None:
                # its running mean is a buffer: in every checkpoint, so a resume adapts exactly as before
                self.asym_degree = AdaptiveStopGradDegree(o.stop_grad_degree, o.adaptive_warmup_epochs, o.d_min)

    # ---- options and pseudo labels ----------------------------------------------------------------
    @classmethod
    def check_options(cls, o, cfg, files: bool = True) -> None:
        """Every option's declared limits, the cluster counts and, with ``files``, the pseudo-label inputs
        (config.validate calls this before the run directory is touched)."""
        super().check_options(o, cfg)
        if o.asymmetric in ("hn", "iphn") and o.loss_backend not in ("auto", "torch"):
            raise ValueError(f"method.loss_backend={o.loss_backend!r} cannot compute A-InfoNCE's HN form (it needs the "
                             "materialised matrix): use auto or torch")
        if not o.ce_weight > 0:
            return
        parse_ks(o.cluster_ks)
        if files:
            cls._check_pseudo_label_inputs(o, cfg)

    @staticmethod
    def _check_pseudo_label_inputs(o, cfg) -> None:
        from pathlib import Path

        from advfast.config import check_path_text, show

        if o.pseudo_labels is None and o.pseudo_labels_from is None:
            raise ValueError(
                "advcl needs ClusterFit pseudo labels: set method.pseudo_labels=FILE (made with "
                f"`{pl.generator_command(cfg.dataset)}`, or the official .pkl) or method.pseudo_labels_from=RUN_DIR "
                "(or method.ce_weight=0 to train without them)")
        for key in ("pseudo_labels", "pseudo_labels_from"):
            if getattr(o, key) is not None:
                check_path_text(getattr(o, key), f"method.{key}")
        if o.pseudo_labels is not None:  # read, never written: it wins over a preset's pseudo_labels_from
            path = Path(o.pseudo_labels)
            if not path.is_file():
                what = ("is a folder, not a file" if path.is_dir() else
                        "is not a regular file" if path.exists() else "does not exist")
                raise ValueError(f"method.pseudo_labels {show(o.pseudo_labels, 200)} {what}; give a labels file (made "
                                 f"with `{pl.generator_command(cfg.dataset)}`, or the official .pkl)")
            return
        if o.pseudo_labels_from != "raw_pixels":
            try:
                encoder_files(o.pseudo_labels_from)
            except (OSError, ValueError) as e:  # the one-line reason, named after the option
                raise ValueError(f"method.pseudo_labels_from: {e}") from None

    def _load_pseudo_labels(self, cfg) -> dict[int, torch.Tensor]:
        """{K: labels}. ``method.pseudo_labels=FILE`` is only read (never written, whatever
        ``pseudo_labels_from`` says); ``pseudo_labels_from=raw_pixels`` computes them in memory;
        ``pseudo_labels_from=RUN`` caches them in RUN as pseudo_labels_{dataset}.safetensors (advfast's
        own documented cache next to the teacher's encoder)."""
        from advfast.data.build import build_dataset

        o = self.options
        self._check_pseudo_label_inputs(o, cfg)
        dataset = build_dataset(cfg)
        n = len(dataset.labels)
        if o.pseudo_labels is not None:
            return pl.load_pseudo_labels(o.pseudo_labels, num_images=n, ks=self.ks, dataset_name=cfg.dataset)
        if o.pseudo_labels_from == "raw_pixels":  # cheap on the demo's small dataset: computed, not cached
            device = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
            feats = pl.raw_pixel_features(dataset.images, device)
            return {k: (pl.kmeans(feats, k, seed=o.kmeans_seed) if o.kmeans_backend == "torch"
                        else pl.kmeans_sklearn(feats, k, seed=o.kmeans_seed)).labels.cpu() for k in self.ks}
        enc_weights = encoder_files(o.pseudo_labels_from)[0]
        cache = enc_weights.parent / f"pseudo_labels_{cfg.dataset}.safetensors"
        return pl.build_pseudo_labels(dataset, cache, encoder=o.pseudo_labels_from, source="encoder", ks=self.ks,
                                      seed=o.kmeans_seed, kmeans_backend=o.kmeans_backend)

    def pseudo_targets(self, indices: torch.Tensor) -> dict[int, torch.Tensor]:
        return {k: getattr(self, f"pseudo_{k}")[indices] for k in self.ks}

    # ---- pieces ----------------------------------------------------------------------------------
    @classmethod
    def preset(cls, dataset: str, variant: str | None = None) -> dict[str, Any]:
        cls.resolve_variant(variant)
        return advcl_preset(dataset)

    preset_options = {"asymmetric": VARIANTS}

    @classmethod
    def preset_for(cls, dataset: str, variant: str | None, options: dict[str, Any]) -> dict[str, Any]:
        """``method.asymmetric=ip|hn|iphn`` selects the A-InfoNCE shell's preset (asym_advcl_preset)."""
        cls.resolve_variant(variant)
        asym = given_variant(options)
        return advcl_preset(dataset) if asym is None else asym_advcl_preset(dataset, asym)

    def on_epoch_start(self, epoch: int) -> None:
        self._epoch = epoch + 1

    @property
    def encoder(self):
        return self.backbone

    def embed(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        """L2-normalised head_proj output through BN branch ``branch`` (half precision up to fp32 for the
        loss; a float64 model stays float64)."""
        return F.normalize(upcast(self.head(self.backbone(x, branch), branch)), dim=1)

    def hfc_view(self, org: torch.Tensor) -> torch.Tensor:
        radius = self.options.hfc_radius
        if radius is None:
            radius = 8.0 * org.shape[-2] / 32.0
        return high_frequency(org, radius)

    def contrastive_loss(self, views: list[torch.Tensor], attack: bool = False, degree=None) -> torch.Tensor:
        """SupConLoss(labels=None) of the stacked normalised views [x_cl, x1, x2, x_hfc], with its T/base_T
        scale; with ``asymmetric`` A-InfoNCE's loss (the attack's criterion when ``attack``: no stop-grad, HN
        unless attack_plain), ``degree`` the stop-grad degree (None: ``stop_grad_degree``)."""
        o = self.options
        if self.asym:
            return asymmetric_supcon(
                torch.cat(views), len(views), self.temperature, o.base_temperature,
                hard_negatives=self.asym_hn and not (attack and self.attack_plain),
                stop_grad=self.asym_ip and not attack,
                stop_grad_degree=o.stop_grad_degree if degree is None else degree, adv_weight=self.adv_weight,
                tau_plus=self.tau_plus, beta=o.beta, hn_clamp_temperature=o.hn_clamp_temperature,
                hn_rowwise=o.hn_rowwise, fix_aliasing=o.fix_aliasing, backend=o.loss_backend)
        loss = nt_xent(torch.cat(views), len(views), temperature=self.temperature, positives="mean_log_prob",
                       normalize=False, backend=self.options.loss_backend)
        return loss * (self.temperature / self.options.base_temperature)

    def cluster_ce(self, h: torch.Tensor, targets: dict[int, torch.Tensor], reduction: str) -> torch.Tensor:
        """Mean over the K heads of the CE of ``h`` (pooled features) against each K's labels."""
        losses = [F.cross_entropy(upcast(self.cluster_heads[f"fc_{k:03d}"](h)), targets[k], reduction=reduction)
                  for k in self.ks]
        return torch.stack(losses).mean()

    # ---- attack ----------------------------------------------------------------------------------
    def attack(self, x1, x2, x_hfc, org, targets) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x_cl, x_ce): PGD on the contrastive and the pseudo-label CE terms, from independent starts."""
        b = org.shape[0]
        use_ce = bool(self.ks)
        refresh = self.options.refresh_clean_views
        with self.attack_mode(train=self.options.attack_mode == "train"):
            def clean_views(x1, x2, x_hfc):
                return [self.embed(x1, "normal"), self.embed(x2, "normal"), self.embed(x_hfc, "normal")]

            # per-batch tensors the loss reads go in through the context (static buffers under CUDA graphs):
            # the three clean views (re-embedded at every step) or their fixed features, then the targets
            if refresh:
                views = (x1, x2, x_hfc)
            else:
                with torch.no_grad():
                    views = tuple(clean_views(x1, x2, x_hfc))
            context = views + tuple(targets[k] for k in self.ks)  # no targets without pseudo-label heads

            def make_loss(*ctx):
                ctx_views, ctx_targets = ctx[:3], dict(zip(self.ks, ctx[3:]))

                def loss_fn(x):
                    z_cl = self.embed(x[:b], "pgd")
                    rest = clean_views(*ctx_views) if refresh else list(ctx_views)
                    loss = self.contrastive_loss([z_cl] + rest, attack=True)
                    if use_ce:  # official: summed CE per head, summed over heads / number of heads
                        loss = loss + self.options.ce_weight * self.cluster_ce(self.backbone(x[b:], "pgd_ce"),
                                                                               ctx_targets, "sum")
                    return loss
                return loss_fn

            x_nat = torch.cat([org, org]) if use_ce else org
            x_adv = self.run_attack("attack", make_loss, x_nat, context)
        x_adv = x_adv.detach()
        return (x_adv[:b], x_adv[b:]) if use_ce else (x_adv, None)

    def adaptive_degree(self, org: torch.Tensor, x_cl: torch.Tensor) -> torch.Tensor:
        """A-InfoNCE's per-iteration stop-grad degree from mean_b ||f(org) - f(x_cl)|| of the pooled "normal"
        features, two no-grad forwards in train mode as coded (their BN statistics update). Under torchrun the
        distance is averaged over the ranks: the official mean over the whole batch (equal shards)."""
        with torch.no_grad(), self.attack_mode(train=not self.options.asym_distance_eval):
            d = mean_feature_distance(self.backbone(org, "normal"), self.backbone(x_cl, "normal"))
        return self.asym_degree(all_reduce_mean(d), org.shape[0] * world_size(), self._epoch)

    # ---- the recipe ------------------------------------------------------------------------------
    def training_step(self, batch):
        x1, x2, org = batch.views[0], batch.views[1], batch.views[2]
        x_hfc = self.hfc_view(org)
        targets = self.pseudo_targets(batch.indices) if self.ks else {}
        x_cl, x_ce = self.attack(x1, x2, x_hfc, org, targets)
        z_cl = self.embed(x_cl, "pgd")
        z1, z2, zh = self.embed(x1, "normal"), self.embed(x2, "normal"), self.embed(x_hfc, "normal")
        degree = self.adaptive_degree(org, x_cl) if self.asym_degree is not None else None
        loss_cl = self.contrastive_loss([z_cl, z1, z2, zh], degree=degree)
        metrics = {"loss_supcon": loss_cl.detach()}
        if degree is not None:
            metrics["stop_grad_degree"] = degree.detach()
        loss = loss_cl
        if self.ks:
            loss_ce = self.cluster_ce(self.backbone(x_ce, "pgd_ce"), targets, "mean")
            loss = loss + self.options.ce_weight * loss_ce
            metrics["loss_pseudo_ce"] = loss_ce.detach()
        return loss, metrics
