"""DeACL (Zhang et al., ECCV 2022; pantheon5100/DeACL @ 3fb81e3): a robust student distilled from a frozen
self-supervised teacher, as ``solo/methods/mocov2_distillation_AT.py: training_step, generate_training_AE``
computes it (the attack and the loss are advfast.losses.deacl, validated against the official step):

    t  = teacher(x)                                    frozen, no graph; bf16 autocast on the GPU
    x' = PGD-5 maximising -256 * sum_b cos(student(x')_b, t_b)      student in eval mode
    s  = student(cat[x, x'])                           one train-mode forward
    loss = -mean cos(s_clean, t) - trades_k * mean cos(s_adv, s_clean)

The teacher (stage 1 of the paper) is one of:
- ``--set method.teacher=RUN_DIR``: the exported encoder of any advfast-train run (simclr, acl, ...);
- ``--set method.teacher=FILE.ckpt``: a published checkpoint, e.g. solo-learn's SimCLR CIFAR-10 ResNet-18
  (the official teacher, ``simclr-cifar10-b30xch14-ep=999.ckpt``), imported by the engine through
  advfast.interop (format detected from its layout);
- ``--set method.train_teacher=true``: a first stage "teacher" runs advfast's simclr recipe (ACL's code:
  NT-Xent T 0.5, ACL's projection head, LARS with its cosine schedule) on the same loader (the same batch
  size), exported to ``<run>/stages/teacher/``; then stage "distill".

The student is the teacher's backbone copied (the official ``student_scratch=False``), normalisation
included; the teacher is never trained: eval mode, no parameter needs a gradient, its forward runs under
``no_grad``, and it lives outside the module's state (not in the optimiser, DDP or the checkpoints). Its
identity is: run.json's record of a given teacher (the engine's encoder inputs) and ``teacher_digest``, a
SHA-256 of its weights kept as a buffer, so a resume inside "distill" with other teacher weights is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advfast.config import OptimConfig
from advfast.data.presets import Flip, Original, PadCrop
from advfast.dist import gather_views
from advfast.losses.deacl import attack_loss, distillation_loss, freeze_teacher, teacher_targets
from advfast.methods import register
from advfast.methods.base import Method
from advfast.methods.hooks import EncoderInput, Stage
from advfast.methods.options import option
from advfast.methods.simclr import acl_code_preset
from advfast.models import build_encoder, build_head
from advfast.ops.contrastive import nt_xent
from advfast.ops.dtypes import upcast

# View 0: DeACL's RandomCrop(32, padding 4) + flip (the image the step trains on). View 1 exists so that the
# in-run teacher stage can draw SimCLR's two views from the same loader (a run's number of views is fixed);
# the distillation never reads it, and "Original" is the cheapest view there is.
DEACL_VIEWS = ((PadCrop(4), Flip()), (Original(),))
# DeACL's normalisation inside the model, for student and teacher alike (solo/models/resnet_add_normalize.py);
# a solo-learn teacher file records solo-learn's data-pipeline constants, which the official code replaces.
DEACL_CIFAR_MEAN, DEACL_CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
ATTACK = dict(kind="pgd", norm="linf", eps=8 / 255, alpha=2 / 255, steps=5, random_start=True)


def weights_digest(module: nn.Module) -> torch.Tensor:
    """SHA-256 of a module's state (names, dtypes, shapes, bytes) as 32 uint8 on the CPU (one host read)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


@register
class DeACL(Method):
    name = "deacl"
    variants = ()
    default_variant = None
    augment_preset = DEACL_VIEWS
    encoder_inputs = (EncoderInput("teacher", required=False),)
    benchmarked = in_digits_table = True
    preset_options = {"teacher": ("RUN_DIR",)}  # --list: a given teacher turns the digits train_teacher off
    attack_graph_setups = {"deacl": {"method_options": {"train_teacher": True}}}

    @classmethod
    def iteration_passes(cls, attack_steps):
        # per image: the teacher's forward 1 (same arch as the student), the attack 2 per step (forward +
        # input-only backward) on one view, the training forward of [x, x'] 2 and its backward 4
        return 2 * attack_steps + 7

    @dataclasses.dataclass
    class Options:
        # the frozen teacher: an advfast-train run directory or a published checkpoint file (solo-learn SimCLR)
        teacher: str | None = None
        train_teacher: bool = False  # no teacher given: train one first (stage "teacher", advfast's simclr recipe)
        teacher_epochs: int | None = option(None, low=1, rule="a positive number of epochs (None: simclr's preset)")
        teacher_lr: float | None = option(None, above=0, rule="> 0 (None: simclr's lr scaled to this batch size)")
        teacher_head_hidden: int | None = option(None, low=1, rule="a positive width (None: simclr's preset)")
        trades_k: float = option(2.0, low=0, rule=">= 0 (weight of the adversarial consistency term; 2 as coded)")
        attack_scale: float = option(256.0, above=0, rule="> 0 (the attack objective's factor; 256 as coded)")
        teacher_bf16: bool = True  # the teacher's forward under bf16 autocast on the GPU, whatever the precision
        student_scratch: bool = False  # the official --student_scratch: do not initialise the student from the teacher

    def __init__(self, cfg, num_classes: int, mean, std):
        super().__init__(cfg, num_classes, mean, std)
        self.trades_k = float(self.options.trades_k)
        self.backbone = build_encoder(cfg.arch, ("normal",), mean, std)
        self.head = None
        if self.options.train_teacher:  # the in-run teacher's SimCLR head (ACL's proj_head)
            hidden = self.options.teacher_head_hidden
            if hidden is None:
                hidden = acl_code_preset(cfg.dataset).get("method_options", {}).get("head_hidden")
            self.head = build_head("acl", self.backbone.feat_dim, ("normal",), hidden=hidden, num_layers=3)
        self.register_buffer("teacher_digest", torch.zeros(32, dtype=torch.uint8))
        self.__dict__["_teacher"] = None  # plain attribute: never a submodule (state, optimiser, DDP)
        self.__dict__["_teacher_meta"] = {}
        self.__dict__["_teacher_stage_ended"] = False

    # ---- presets ---------------------------------------------------------------------------------
    @classmethod
    def preset(cls, dataset: str, variant: str | None = None) -> dict[str, Any]:
        if dataset == "digits":
            # the other digits presets' size (convnet, 16 px, batch 128, 10 epochs); DeACL's SGD with its lr
            # scaled to the batch (0.5 * 128/256) and its 10 % warmup; the simclr teacher stage (10 epochs of
            # simclr's digits recipe) comes first unless a teacher is given (preset_for)
            return dict(arch="convnet", image_size=16, epochs=10, batch_size=128, temperature=0.5,
                        optim=dict(name="sgd", lr=0.25, momentum=0.9, weight_decay=5e-4, nesterov=False,
                                   schedule="cosine", warmup_epochs=1.0, warmup_start_lr=0.0015, min_lr=0.0,
                                   step_every="epoch"),
                        attack=dict(ATTACK), log_every=10, ckpt_every=100)
        # bash_files/DeACL_cifar10_resnet18.sh: 100 epochs, batch 256, SGD 0.5/0.9/5e-4, warmup_cosine
        # (10 epochs from 0.003, cosine to 0), stepped per epoch by Lightning; solo-learn's padding-2 stem
        return dict(arch="resnet18_solo", epochs=100, batch_size=256, temperature=0.5,
                    optim=dict(name="sgd", lr=0.5, momentum=0.9, weight_decay=5e-4, nesterov=False,
                               schedule="cosine", warmup_epochs=10.0, warmup_start_lr=0.003, min_lr=0.0,
                               step_every="epoch"),
                    attack=dict(ATTACK))

    @classmethod
    def preset_for(cls, dataset: str, variant: str | None, options: dict[str, Any]) -> dict[str, Any]:
        preset = cls.preset(dataset, variant)
        if dataset == "digits" and options.get("teacher") in (None, ""):
            preset["method_options"] = dict(train_teacher=True)  # the digits demo trains its own teacher
        return preset

    @classmethod
    def check_options(cls, options, cfg) -> None:
        super().check_options(options, cfg)
        given = options.teacher not in (None, "")
        if given and options.train_teacher:
            raise ValueError("deacl: give either method.teacher (a teacher to distil from) or "
                             "method.train_teacher=true (train one first in this run), not both")
        if not given and not options.train_teacher:
            raise ValueError("deacl needs a teacher: --set method.teacher=RUN_DIR (an advfast-train run) or a "
                             "published checkpoint file (solo-learn SimCLR), or --set method.train_teacher=true to "
                             "train a simclr teacher first in the same run")
        if not options.train_teacher:
            unused = [k for k in ("teacher_epochs", "teacher_lr", "teacher_head_hidden")
                      if getattr(options, k) is not None]
            if unused:
                raise ValueError(f"method.{unused[0]} is for the in-run teacher; add --set method.train_teacher=true")

    @classmethod
    def prepare_bench_run(cls, cfg, workdir) -> None:
        """A teacher for synthetic data: a freshly initialised encoder of the run's arch, exported as an advfast
        run directory under ``workdir`` (its weights do not change the cost of a step)."""
        from types import SimpleNamespace

        from advfast.models.export import export_encoder

        out = Path(workdir) / "deacl_teacher"
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        encoder = build_encoder(cfg.arch, ("normal",), DEACL_CIFAR_MEAN, DEACL_CIFAR_STD)
        fake = SimpleNamespace(encoder=encoder, eval_branch="normal", variant=None, num_classes=10)
        export_encoder(fake, cfg, out, step=0, image_size=int(cfg.image_size or 32))
        options = {k: v for k, v in cfg.method_options.items() if k not in ("train_teacher",)}
        cfg.method_options = dict(options, teacher=str(out))

    # ---- the teacher ------------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (None before it exists: an in-run teacher appears when "distill" starts)."""
        return self._teacher

    def set_encoder_input(self, option: str, encoder: nn.Module, meta: dict) -> None:
        super().set_encoder_input(option, encoder, meta)
        if option == "teacher":
            if meta.get("format") == "solo-learn":  # the official wraps it in DeACL's normalising ResNet
                normalize = getattr(encoder, "normalize", None)
                if normalize is not None:
                    normalize.mean.copy_(torch.tensor(DEACL_CIFAR_MEAN))
                    normalize.std.copy_(torch.tensor(DEACL_CIFAR_STD))
                    encoder.build_args = dict(encoder.build_args, mean=DEACL_CIFAR_MEAN, std=DEACL_CIFAR_STD)
            self._check_teacher_fits(encoder, meta.get("run_dir") or meta.get("source") or "method.teacher")
            self.__dict__["_teacher"] = freeze_teacher(encoder)
            self.__dict__["_teacher_meta"] = dict(meta)

    def _check_teacher_fits(self, teacher: nn.Module, where) -> None:
        skip = ("mean", "std", "bn_branches")  # the student takes the teacher's normalisation; one BN branch each
        mine = {k: v for k, v in getattr(self.backbone, "build_args", {}).items() if k not in skip}
        theirs = {k: v for k, v in getattr(teacher, "build_args", {}).items() if k not in skip}
        if mine and theirs and mine != theirs:
            raise ValueError(f"method.teacher={where}: its encoder is built as {theirs}, the student as {mine}; the "
                             f"student is initialised from the teacher, so give a teacher of the run's arch")
        if getattr(teacher, "feat_dim", None) != self.backbone.feat_dim:
            raise ValueError(f"method.teacher={where}: {getattr(teacher, 'feat_dim', None)}-d features, the student "
                             f"has {self.backbone.feat_dim}-d")

    def _teacher_from_backbone(self) -> nn.Module:
        """The in-run teacher: the backbone as the teacher stage left it, frozen."""
        return freeze_teacher(copy.deepcopy(self.backbone))

    def _require_teacher(self) -> nn.Module:
        if self._teacher is None:
            if not self.options.train_teacher:
                raise RuntimeError("deacl has no teacher: give --set method.teacher=RUN_DIR (the engine loads it) or "
                                   "call set_encoder_input('teacher', encoder, meta)")
            # the teacher is the backbone as distillation starts (the engine's "distill" on_start; a method
            # driven without the engine's stages starts distilling here)
            self._set_teacher(self._teacher_from_backbone())
        return self._teacher

    def _set_teacher(self, teacher: nn.Module) -> None:
        self.__dict__["_teacher"] = teacher
        self.teacher_digest.copy_(weights_digest(teacher).to(self.teacher_digest.device))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = state_dict.get(prefix + "teacher_digest")
        if saved is not None and bool(saved.any()) and bool(self.teacher_digest.any()) and \
                not torch.equal(saved.to(self.teacher_digest.device), self.teacher_digest):
            raise ValueError("deacl: the teacher's weights differ from those this checkpoint was distilled from "
                             "(another method.teacher, or a changed stages/teacher export); resume with the same "
                             "teacher")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- stages ------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        distill = Stage("distill", self.cfg.epochs, None, parameters=lambda: list(self.backbone.parameters()),
                        on_start=self._start_distill, on_epoch_start=self._distill_epoch,
                        export=self.options.train_teacher)
        if not self.options.train_teacher:
            return [distill]
        simclr = acl_code_preset(self.cfg.dataset)
        optim = dict(simclr["optim"])
        # simclr's lr is for its own batch: scaled linearly to this run's batch (the stages share the loader)
        optim["lr"] = self.options.teacher_lr or optim["lr"] * self.cfg.batch_size / simclr["batch_size"]
        epochs = self.options.teacher_epochs or simclr["epochs"]
        teacher = Stage("teacher", int(epochs), self.teacher_step, optim=OptimConfig(**optim),
                        parameters=lambda: [*self.backbone.parameters(), *self.head.parameters()],
                        on_start=self._start_teacher, on_end=self._end_teacher,
                        on_epoch_start=self._teacher_epoch, export=True)
        return [teacher, distill]

    def _start_teacher(self) -> None:
        self.head.requires_grad_(True)
        self.backbone.requires_grad_(True)

    def _end_teacher(self) -> None:
        self.__dict__["_teacher_stage_ended"] = True

    def _teacher_epoch(self, epoch: int) -> None:
        if self.augment is not None:
            self.augment.set_views("simclr")

    def _distill_epoch(self, epoch: int) -> None:
        if self.augment is not None:
            self.augment.set_views(DEACL_VIEWS)

    def _start_distill(self) -> None:
        """The teacher, frozen (in-run: the backbone the teacher stage trained, from memory right after that
        stage or from its export after a restart), then the student initialised from it."""
        if self.options.train_teacher:
            if self.head is not None:
                self.head.requires_grad_(False)  # not trained by "distill" (DDP: every trained parameter is used)
            if self._teacher_stage_ended:
                teacher = self._teacher_from_backbone()
            else:
                teacher = self._stage_export_teacher()
            self._set_teacher(teacher)
        else:
            self._set_teacher(self._require_teacher())
        if not self.options.student_scratch:
            self._init_student()

    def _stage_export_teacher(self) -> nn.Module:
        from advfast.models.export import load_encoder

        where = Path(self.cfg.out) / "stages" / "teacher"  # the engine's stage export (advfast.engine.rundir.STAGES)
        try:
            encoder, meta = load_encoder(where)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"deacl: the in-run teacher {where} cannot be loaded ({str(e).splitlines()[0]}); the "
                             f"teacher stage's export is needed to resume distillation") from None
        self._check_teacher_fits(encoder, where)
        conv = next(p for p in self.backbone.parameters() if p.dim() == 4)
        teacher = encoder.to(conv.device)
        if not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last):
            teacher = teacher.to(memory_format=torch.channels_last)  # as the engine laid out the student
        return freeze_teacher(teacher)

    def _init_student(self) -> None:
        """The student starts as the teacher (weights, BN statistics and its input normalisation)."""
        state = self._teacher.state_dict()
        try:
            self.backbone.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"method.teacher: its weights do not fit the student ({str(e).splitlines()[0]})") from None
        args = getattr(self._teacher, "build_args", {})
        if getattr(self.backbone, "build_args", None) is not None and args.get("mean") is not None:
            self.backbone.build_args = dict(self.backbone.build_args, mean=tuple(args["mean"]), std=tuple(args["std"]))

    # ---- the steps ----------------------------------------------------------------------------------
    @property
    def encoder(self):
        return self.backbone

    def _targets(self, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.options.teacher_bf16 and x.is_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return teacher_targets(teacher, x)
        return teacher_targets(teacher, x)

    def training_step(self, batch):
        """One DeACL distillation step (stage "distill")."""
        teacher = self._require_teacher()
        x = batch.views[0]
        t = self._targets(teacher, x)
        scale = float(self.options.attack_scale)
        with self.attack_mode():  # the student in eval mode for the attack, as coded
            x_adv = self.run_attack("distill", lambda t: attack_loss(self.backbone, t, scale), x, (t,)).detach()
        s = self.backbone(torch.cat([x, x_adv]))  # one train-mode forward: BN statistics over the 2B batch
        b = x.shape[0]
        return distillation_loss(s[:b], s[b:], t, self.trades_k)

    def teacher_step(self, batch):
        """Stage "teacher": advfast's simclr step (two views, ACL's head, NT-Xent over the global batch)."""
        x = torch.cat([batch.views[0], batch.views[1]])
        z = upcast(self.head(self.backbone(x)))
        loss = nt_xent(gather_views(z, 2), 2, temperature=float(self.cfg.temperature))
        return loss, {"loss_nt_xent": loss.detach()}

