"""The training loop shared by every method.

    trainer = Trainer(cfg)          # dataset, augment + device loader, method, optimiser, schedule
    trainer.fit()                   # train; checkpoints, logs, and the exported encoder in cfg.out

One iteration: ``loss, metrics = method.training_step(batch)`` under autocast, backward, optimiser
step, ``method.after_optimizer_step()``, schedule step. Metrics are summed on the device and read
back every ``log_every`` steps, the loop's only host synchronisation. Before each epoch's batches are
drawn, ``method.on_epoch_start(epoch)``. A method with stages after pre-training (``Method.stages()``,
advfast.engine.stages) runs them on the same loop, one step counter, each with its own step function,
optimiser and schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch

import advfast
from advfast.attacks import AttackGraphs
from advfast.config import TrainConfig, closest, from_dict, to_dict, validate
from advfast.data.build import dataset_kwargs
from advfast.engine import checkpoint as ckpt
from advfast.engine import distributed
from advfast.engine.coreset import CoresetState, EpochLayout
from advfast.engine.divergence import STOP, decide, weights_finite
from advfast.engine.logging import MetricLogger, Progress
from advfast.engine.precision import resolve_precision, training_settings
from advfast.engine.rundir import CHECKPOINTS, RUN_FILE, check_run_dir, prepare_run_dir, writable_dir_error
from advfast.engine.runlock import RunDirLocked, RunLock
from advfast.engine.stages import (STAGES_DIR, StageStep, check_same_inputs, input_record, load_encoder_inputs,
                                   plan_stages)
from advfast.models.export import export_encoder

# settings a resumed run may change with allow_change=(...) (--allow-change KEY): they change how the
# optimisation goes on, not the shapes or the meaning of what was saved
CHANGEABLE_ON_RESUME = ("optim.lr", "optim.weight_decay", "optim.momentum", "optim.min_lr", "attack.eps",
                        "attack.alpha", "attack.steps", "precision")


class RunFault(RuntimeError):
    """A fault that stopped a run after it started (exit code 1, one line): the last good checkpoint stays."""


class TrainingDiverged(RunFault):
    """The loss or the weights became NaN or infinite."""


class CheckpointWriteFailed(RunFault):
    """A run file could not be written (disk full, file too large, I/O error)."""


def method_class(name: str):
    from advfast.methods import METHODS

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}{closest(name, METHODS)}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_attack_graphs(device: torch.device, distributed_run: bool) -> None:
    """cuda_graph_attack's preconditions, checked before anything is loaded."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph_attack captures CUDA graphs and needs a CUDA device, but this run is on "
                         f"{device}; leave it off without a GPU")
    if distributed_run:
        raise ValueError("cuda_graph_attack is for single-process runs: under torchrun an attack's forward can run "
                         "collectives (shuffle-BN, SyncBatchNorm) that a per-rank graph must not capture")


def build_config(method: str, variant: str | None = None, dataset: str = "digits",
                 overrides: list[dict[str, Any]] = ()) -> TrainConfig:
    """TrainConfig defaults <- the method's preset for ``dataset`` <- each dict of ``overrides`` in turn.

    The preset may depend on the method options the overrides give (``Method.preset_for``: e.g. AIR's or
    A-InfoNCE's own schedules when ``method.air`` / ``method.asymmetric`` is set); those options still win
    over any the preset sets."""
    from advfast.config import apply_overrides
    from advfast.methods.coreset_rcs import rcs_preset

    cls = method_class(method)
    cfg = TrainConfig(method=method, variant=variant, dataset=dataset)
    # the engine option coreset=rcs: its schedule per dataset (official on CIFAR, scaled on digits); unused
    # unless coreset=rcs, and under the method's preset and the overrides
    apply_overrides(cfg, {"rcs": rcs_preset(dataset)}, "coreset preset")
    given: dict[str, Any] = {}
    for o in overrides:
        if isinstance(o, dict) and isinstance(o.get("method_options"), dict):
            given.update(o["method_options"])
    apply_overrides(cfg, cls.preset_for(dataset, variant, given), f"preset of {method}")
    for o in overrides:
        apply_overrides(cfg, o)
    if (cfg.method, cfg.variant, cfg.dataset) != (method, variant, dataset):
        raise ValueError("method, variant and dataset pick the preset: give them as options, not as overrides")
    return cfg


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                 allow_change: tuple[str, ...] = (), break_lock: bool = False):
        """Validate and build everything first; the run directory is touched last (lock, then on
        ``overwrite`` the old run's files removed), so a bad setting never costs the old run.
        ``allow_change``: dotted keys (CHANGEABLE_ON_RESUME) that may differ from the run's run.json on
        resume; ``break_lock``: take the run directory's lock even from a live or remote owner."""
        validate(cfg)
        self.cfg = cfg
        cls = self._check_settings(resume, allow_change)
        self._encoder_inputs = load_encoder_inputs(cls, cls.parse_options(cfg.method_options), cfg)  # reads only
        self._check_run_dir(resume, overwrite)
        self._setup_device()
        self._lock: RunLock | None = None
        self._break_lock = break_lock
        # process-wide settings (determinism, TF32) hold while the Trainer builds and trains, not after
        with training_settings(cfg.deterministic, self.device):
            self._build(cls, resume, overwrite)

    # ---- __init__, step by step --------------------------------------------------------------------
    def _check_settings(self, resume: bool, allow_change):
        """Every setting that can be checked without reading data: returns the method class."""
        cfg = self.cfg
        self.allow_change = tuple(allow_change)
        bad = [k for k in self.allow_change if k not in CHANGEABLE_ON_RESUME]
        if bad:
            raise ValueError(f"--allow-change {bad[0]}: only {', '.join(CHANGEABLE_ON_RESUME)} can change on resume")
        if self.allow_change and not resume:
            raise ValueError("--allow-change is for --resume: a new run takes any setting")
        return method_class(cfg.method)  # validate(cfg) has checked its variant, options and the arch

    def _check_run_dir(self, resume: bool, overwrite: bool) -> None:
        """The run directory can take this run (reads only); on resume, the saved run's settings."""
        self.out = Path(self.cfg.out)
        check_run_dir(self.out, resume, overwrite)
        problem = writable_dir_error(self.out)
        if problem:
            raise ValueError(problem)
        self._saved_run = read_run_file(self.out) if resume else None
        self._changes = self._changed_settings(self._saved_run) if resume else []
        if resume:
            check_same_inputs(self._saved_run.get("encoder_inputs"), input_record(self._encoder_inputs),
                              self.out / RUN_FILE)

    def _setup_device(self) -> None:
        """Precision and device; under torchrun the process group and this rank's device (cuda:LOCAL_RANK)."""
        self.precision = resolve_precision(self.cfg)
        self.dist, device = distributed.setup(self.precision.device)
        if device != self.precision.device:
            self.precision = dataclasses.replace(self.precision, device=device)
        self.device = self.precision.device
        if self.cfg.cuda_graph_attack:
            check_attack_graphs(self.device, self.dist.enabled)

    def _build(self, cls, resume: bool, overwrite: bool) -> None:
        self._build_data(cls)
        self._build_method(cls)
        self._build_coreset()
        self._plan(resume)
        self._build_loop_state()
        # everything is built: now the disk. Rank 0 locks the run directory for the whole job
        self._take_lock(create=not resume)
        try:
            found = self._find_checkpoint() if resume else None  # reads only: a refusal leaves the run as it was
            self._enter_stage(self.plan.index_at(found[0]["step"]) if found else 0)
            self.resumed = found is not None and self._restore(found)
            if self.dist.is_main:
                prepare_run_dir(self.out, resume, overwrite)
            distributed.barrier()
            if self.dist.is_main:
                self._write_run_file(self.dataset)
        except BaseException:
            self._release_lock()
            raise

    def _build_data(self, cls) -> None:
        """The dataset, the augmentation of the method's views and this rank's device loader."""
        cfg = self.cfg
        from advfast.data import DeviceLoader, build_augment, load_dataset

        dataset = load_dataset(cfg.dataset, cfg.data_dir, "train", cfg.download, **dataset_kwargs(cfg))
        if cfg.batch_size > len(dataset):
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the dataset ({cfg.dataset}: {len(dataset)} "
                             f"images); use --batch-size {len(dataset)} or less")
        self.dataset = dataset
        backend = cfg.augment_backend if cfg.augment_backend != "auto" else "torch"
        # views may depend on the variant (moco v1 vs v2) and the options (AIR's un-augmented third view)
        self.augment = build_augment(cls.augment_for(cfg.variant, cfg.method_options), backend=backend,
                                     size=cfg.image_size)
        world = self.dist.world_size
        if cfg.batch_size % world:  # batch_size is the global batch: steps per epoch do not depend on world
            raise ValueError(f"batch_size {cfg.batch_size} (the global batch) is not divisible by the {world} ranks; "
                             f"use a multiple of {world}")
        self.loader = DeviceLoader(dataset, cfg.batch_size // world, self.augment, self.device, seed=cfg.seed,
                                   rank=self.dist.rank, world_size=world)
        self.steps_per_epoch = len(self.loader)

    def _build_method(self, cls) -> None:
        """The method, seeded, on the device (channels-last, SyncBN, compile, attack graphs as configured),
        with its augmentation and its encoder inputs."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # weight init
        method = cls(cfg, self.dataset.num_classes, self.dataset.mean, self.dataset.std).to(self.device)
        if self.precision.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if cfg.sync_bn:  # per-branch SyncBatchNorm under torchrun on GPUs (a no-op computation in one process)
            distributed.convert_sync_bn(method, self.device)
        self.method = method
        if cfg.compile:  # one compiled variant per BN branch and mode: advfast.models.compiled
            for encoder in self.method.compile_targets():
                advfast.models.compile_encoder(encoder, backend=cfg.compile_backend)
        if cfg.cuda_graph_attack:
            self.method.attack_graphs = AttackGraphs()
        self.method.augment = self.augment  # on_epoch_start may change the views
        for name, (encoder, meta) in self._encoder_inputs.items():
            self.method.set_encoder_input(name, encoder.to(self.device), meta)
        if self.dist.enabled:  # same weights on every rank (seeded above), own attack randomness per rank
            torch.manual_seed(distributed.rank_seed(cfg.seed, self.dist.rank))

    def _build_coreset(self) -> None:
        """``coreset=rcs``: the held-out validation split (seeded), the selection pool (the loader's full-data
        epochs draw from it too), the selection loader and the epoch layout (full-data epochs, then coreset
        epochs of fewer steps). Without it the layout is uniform and nothing else changes."""
        cfg = self.cfg
        self.coreset: CoresetState | None = None
        self.layout = EpochLayout(self.steps_per_epoch)
        if cfg.coreset == "none":
            return
        from advfast.data import DeviceLoader
        from advfast.data.loader import mix_seed
        from advfast.data.torch_ops import resize
        from advfast.methods.coreset_rcs import holdout_split, settings_from_config, val_rows_as_coded

        objective = self.method.coreset_objective()
        if objective is None:
            raise ValueError(f"coreset=rcs: {cfg.method} defines its selection objective for ACL-DS's dual BN only, "
                             f"not for variant {self.method.variant} with these options; use the ds variant")
        if len(self.method.stages()) != 1:
            raise ValueError(f"coreset=rcs applies to single-stage pre-training; {cfg.method} declares stages "
                             f"{', '.join(s.name for s in self.method.stages())}")
        settings = settings_from_config(cfg)
        pool, val = holdout_split(len(self.dataset), cfg.rcs.val_fraction, mix_seed(cfg.seed, 0x56414C))
        select_from = pool if objective.pool == "holdout" else None
        self.loader.set_subset(select_from)
        self.steps_per_epoch = len(self.loader)
        n_pool = len(select_from) if select_from is not None else len(self.dataset)
        k = settings.num_batches(n_pool)  # greedy picks of whole selection batches: the coreset is k of them
        world, local = self.dist.world_size, cfg.batch_size // self.dist.world_size
        core_steps = (k * settings.batch_size // world) // local
        if k < 1 or core_steps < 1:
            raise ValueError(f"coreset=rcs: rcs.fraction {settings.fraction} of the {n_pool}-image pool is "
                             f"{int(n_pool * settings.fraction)} images, less than one selection batch of "
                             f"{settings.batch_size} or one training batch of {cfg.batch_size}; raise rcs.fraction "
                             f"or lower rcs.batch_size")
        # every rank selects alike over the whole pool (world 1, the selection batch), its own seed stream
        chooser = DeviceLoader(self.dataset, settings.batch_size, self.augment, self.device,
                               seed=mix_seed(cfg.seed, 0x53454C), rank=0, world_size=1)
        chooser.set_subset(select_from)
        images = self.dataset.images.index_select(0, val).to(self.device).float().div_(255)
        size = self._image_size()
        val_x = val_rows_as_coded(resize(images, (size, size)), settings.batch_size)
        self.coreset = CoresetState(objective, settings, chooser, val_x, select_from, val, k * settings.batch_size)
        # the official loop trains on the subset from the first selection epoch or after the warm-up, whichever
        # comes first (with interval 1 the selection at epoch `warmup` is one epoch early)
        first = next(e for e in range(settings.warmup_epochs + 1)
                     if e >= settings.warmup_epochs or settings.is_selection_epoch(e + 1))
        self.layout = EpochLayout(self.steps_per_epoch, core_steps, first)

    def _coreset_epoch(self, epoch: int) -> None:
        """Before epoch ``epoch``'s batches: the pool on a full-data epoch; else the coreset, selected anew on a
        selection epoch (rank 0's indices broadcast: one collective per selection) and reused until the next
        (also from a checkpoint: a resume between selections does not select again)."""
        c = self.coreset
        if epoch < self.layout.warmup:
            self.loader.set_subset(c.pool)
            return
        if c.settings.is_selection_epoch(epoch + 1) and c.selected_at != epoch:
            from advfast.methods.coreset_rcs import select_with, selection_generator

            started = time.perf_counter()
            c.chooser.set_epoch(epoch)
            sel = select_with(c.objective, c.chooser, c.val_x, c.settings,
                              selection_generator(self.cfg.seed, epoch, self.device))
            indices = sel.indices
            if self.dist.enabled:  # the ranks selected alike (same data, generator, weights); rank 0's decide
                indices = indices.to(self.device)
                torch.distributed.broadcast(indices, src=0)
            c.indices, c.selected_at = indices, epoch
            if self.dist.is_main:
                print(f"advfast: RCS selected {indices.numel()} of {c.chooser.num_images()} images before epoch "
                      f"{epoch + 1} in {time.perf_counter() - started:.1f}s (greedy gains {sel.gains[0].item():.3g}"
                      f"..{sel.gains[-1].item():.3g})", flush=True)
        if c.indices is None:
            raise RuntimeError(f"coreset epoch {epoch + 1} has no selection (the checkpoint holds none)")
        self.loader.set_subset(c.indices)
        if len(self.loader) != self.layout.steps_in(epoch):
            raise RuntimeError(f"the coreset gives {len(self.loader)} steps, the schedule planned "
                               f"{self.layout.steps_in(epoch)}")

    def _plan(self, resume: bool) -> None:
        """The method's stages laid out in steps; pre-training alone is one stage of cfg.epochs."""
        cfg = self.cfg
        self.plan = plan_stages(self.method.stages(), self.steps_per_epoch, cfg.method)
        if not self.layout.uniform:  # one stage (_build_coreset): its epochs have two lengths
            self.plan = dataclasses.replace(self.plan, total=self.layout.start(cfg.epochs))
        self.total_steps = self.plan.total
        if resume and cfg.max_steps is not None and cfg.max_steps > self.total_steps:
            epochs = "+".join(str(s.epochs) for s in self.plan.stages)  # the stages' epochs (one: cfg.epochs)
            raise ValueError(f"max_steps {cfg.max_steps} is beyond the run's {self.total_steps} planned steps "
                             f"(epochs {epochs} x {self.steps_per_epoch}), where its learning-rate schedule "
                             f"ends; give --set max_steps={self.total_steps} or less")

    def _build_loop_state(self) -> None:
        self.scaler = self.precision.grad_scaler()
        self.step = 0
        self._epoch_start_rng: dict[str, torch.Tensor] = {}
        self._resume_rng: dict[str, torch.Tensor] | None = None
        self._stop_signal: int | None = None
        self._stop_agreed = False

    # ---- stages --------------------------------------------------------------------------------------
    def _enter_stage(self, index: int) -> None:
        """Start stage ``index``: its on_start, a fresh optimiser and schedule, its step under DDP (a
        collective under torchrun: every rank enters the same stage)."""
        from advfast.optim import build_optimizer, build_scheduler

        stage = self.plan.stages[index]
        self.stage_index, self.stage = index, stage
        if stage.on_start is not None:
            stage.on_start()
        optim_cfg = stage.optim if stage.optim is not None else self.cfg.optim
        params = stage.parameters() if stage.parameters is not None else self.method.trainable_parameters()
        self.optimizer = build_optimizer(params, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, steps_per_epoch=self.steps_per_epoch,
                                         epochs=stage.epochs)
        if not self.dist.enabled:
            self._ddp_step = None
        elif stage.training_step is None:  # pre-training: the method itself under DDP
            self._ddp_step = distributed.wrap_step(self.method, self.device)
        else:
            self._ddp_step = distributed.wrap_step(StageStep(self.method, stage.training_step), self.device)

    def _finish_stage(self) -> None:
        """The stage has trained its last step: its on_end, its export, then the next stage (if any)."""
        stage = self.stage
        if stage.on_end is not None:
            stage.on_end()
        if stage.export and self.dist.is_main:
            with self._writing(f"the encoder after stage {stage.name}"):
                where = self.out / STAGES_DIR / stage.name
                where.mkdir(parents=True, exist_ok=True)
                export_encoder(self.method, self.cfg, where, step=self.step, image_size=self._image_size())
        if self.stage_index + 1 < len(self.plan.stages):
            self._enter_stage(self.stage_index + 1)
            self.method.train()

    def _stage_record(self) -> dict[str, Any]:
        """The stage a checkpoint or a metrics row belongs to; nothing for single-stage methods (their
        files are as before stages existed)."""
        if len(self.plan.stages) == 1:
            return {}
        return {"stage": self.stage.name, "stage_index": self.stage_index,
                "stage_step": self.step - self.plan.starts[self.stage_index]}

    def _write_run_file(self, dataset) -> None:
        history = list((self._saved_run or {}).get("changes", []))
        history += [dict(c, step=self.step) for c in self._changes]
        for c in self._changes:
            print(f"advfast: resuming with {c['key']} changed from {c['from']!r} to {c['to']!r} at step {self.step} "
                  f"(--allow-change; recorded in {self.out / RUN_FILE})", flush=True)
        record = {"advfast_version": advfast.__version__, "config": to_dict(self.cfg),
                  "precision": self.precision.name, "device": str(self.device),
                  "steps_per_epoch": self.steps_per_epoch, "dataset_size": len(dataset),
                  "world_size": self.dist.world_size}
        if history:
            record["changes"] = history
        if self._encoder_inputs:
            record["encoder_inputs"] = input_record(self._encoder_inputs)
        if self.coreset is not None:  # the seeded split, saved for inspection and to check a resume against
            c = self.coreset
            record["coreset"] = {"kind": self.cfg.coreset, "pool": c.objective.pool,
                                 "pool_size": c.chooser.num_images(), "coreset_size": c.size,
                                 "coreset_steps_per_epoch": self.layout.core,
                                 "validation_indices": c.val_indices.tolist()}
        try:
            ckpt.atomic_write_json(self.out / RUN_FILE, record)
        except OSError as e:
            raise CheckpointWriteFailed(f"could not write {self.out / RUN_FILE} ({e.strerror or e}); "
                                        f"free space in {self.out} and run again") from None

    # ---- the run directory's lock ------------------------------------------------------------------
    def _take_lock(self, create: bool) -> None:
        """Rank 0 takes the lock; every rank learns whether it got it (no rank waits on a refused one)."""
        error = None
        if self.dist.is_main and (self._lock is None or not self._lock.held):
            try:
                if create:
                    self.out.mkdir(parents=True, exist_ok=True)
                self._lock = RunLock(self.out, break_lock=self._break_lock,
                                     note=lambda m: print(m, flush=True)).acquire()
                self._unlock_at_exit = weakref.finalize(self, self._lock.release)
            except (RunDirLocked, OSError) as e:
                error = e if isinstance(e, RunDirLocked) else \
                    ValueError(f"cannot lock {self.out} ({getattr(e, 'strerror', None) or e}); choose another --out")
        if distributed.max_over_ranks(int(error is not None), self.device):
            if error is not None:
                raise error
            raise RunDirLocked(f"rank 0 could not lock {self.out}; see its message")

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    # ---- resume: what may differ from the saved run ------------------------------------------------
    def _changed_settings(self, saved: dict | None) -> list[dict[str, Any]]:
        """The allow_change keys whose value differs from run.json, as {"key", "from", "to"}."""
        if saved is None:
            return []
        mine, theirs = _flat(to_dict(self.cfg)), _flat(saved["config"])
        return [{"key": k, "from": theirs.get(k), "to": mine.get(k)} for k in self.allow_change
                if mine.get(k) != theirs.get(k)]

    def _apply_changes(self, saved_config: dict) -> None:
        """After the checkpoint is loaded: the optimiser settings named in allow_change take effect (the
        checkpoint restored its own). An lr rescales the schedule from the checkpoint's lr, which keeps
        its shape; the others are set as given."""
        if "optim.lr" in self.allow_change:
            old = _flat(saved_config).get("optim.lr")
            if isinstance(old, (int, float)) and old > 0 and old != self.cfg.optim.lr:
                ratio = float(self.cfg.optim.lr) / float(old)
                self.scheduler.base_lrs = [b * ratio for b in self.scheduler.base_lrs]
                for group in self.optimizer.param_groups:
                    group["lr"] *= ratio
                    if "initial_lr" in group:
                        group["initial_lr"] *= ratio
        if "optim.min_lr" in self.allow_change:
            self.scheduler.min_lr = float(self.cfg.optim.min_lr)
        for name in ("weight_decay", "momentum"):
            if f"optim.{name}" in self.allow_change:
                for group in self.optimizer.param_groups:
                    if name in group:
                        group[name] = getattr(self.cfg.optim, name)

    # ---- RNG state -----------------------------------------------------------------------------------
    def _generators(self) -> dict[str, torch.Generator]:
        """Every torch.Generator held by the loader and the augment, by attribute name (stable)."""
        found: dict[str, torch.Generator] = {}
        for owner_name, owner in (("loader", self.loader), ("augment", self.augment)):
            for attr, value in sorted(vars(owner).items()):
                if isinstance(value, torch.Generator):
                    found[f"{owner_name}.{attr}"] = value
        return found

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                state[f"torch_cuda{i}"] = s
        for name, gen in self._generators().items():
            state[f"gen.{name}"] = gen.get_state()
        return state

    def _set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["torch_cpu"])
        cuda = sorted((k for k in state if k.startswith("torch_cuda")), key=lambda k: int(k[10:]))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([state[k] for k in cuda][:torch.cuda.device_count()])
        for name, gen in self._generators().items():
            if f"gen.{name}" in state:
                gen.set_state(state[f"gen.{name}"])
        if self.dist.rank > 0:  # the checkpoint holds rank 0's global stream: this rank's own, per step
            torch.manual_seed(distributed.rank_seed(self.cfg.seed, self.dist.rank, self.step))

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        rng = {f"now.{k}": v for k, v in self._rng_state().items()}
        rng.update({f"epoch.{k}": v for k, v in self._epoch_start_rng.items()})
        coreset = {}
        if self.coreset is not None and self.coreset.indices is not None:
            # the current selection, reused by a resume until the next one; the selection's own randomness is
            # a function of (seed, epoch) (selection_generator, the chooser's draws): no state to save
            rng["coreset.indices"] = self.coreset.indices.cpu()
            rng["coreset.epoch"] = torch.tensor([self.coreset.selected_at], dtype=torch.int64)
            coreset = {"coreset": {"epoch": self.layout.epoch_of(self.step),
                                   "selected_before_epoch": self.coreset.selected_at + 1,
                                   "images": int(self.coreset.indices.numel())}}
        meta = {
            "advfast_version": advfast.__version__, "config": to_dict(self.cfg),
            "method": self.cfg.method, "variant": self.method.variant, "arch": self.cfg.arch,
            # the sidecar's "epoch" is step // steps_per_epoch (checkpoint.read_sidecar checks it); a coreset run's
            # real epoch is in its "coreset" record
            "epoch": self.step // self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
            "scheduler": _jsonable(self.scheduler.state_dict()), "scaler": self.scaler.state_dict(),
            **self._stage_record(), **coreset,
        }
        return ckpt.save_checkpoint(self.out / CHECKPOINTS, self.step, model_state=self.method.state_dict(),
                                    optimizer_state=self.optimizer.state_dict(), rng_tensors=rng, meta=meta,
                                    keep_last=self.cfg.keep_last)

    def _find_checkpoint(self):
        """The newest whole checkpoint as (meta, parts) (damaged ones are skipped with a warning each).
        Never starts over: no whole checkpoint is a one-line CheckpointError."""
        skipped: list[str] = []

        def warn(message: str) -> None:
            skipped.append(message)
            print(message, flush=True)

        found = ckpt.latest_valid_checkpoint(self.out / CHECKPOINTS, warn=warn)
        if found is None:
            what = f"{len(skipped)} damaged checkpoint(s), none whole" if skipped else "no checkpoint"
            raise ckpt.CheckpointError(f"nothing to resume in {self.out}: {what} in {self.out / CHECKPOINTS} "
                                       f"(the run stopped before its first checkpoint?); start it again with "
                                       f"--overwrite")
        return found

    def _restore(self, found) -> bool:
        """Load checkpoint ``found`` into the stage it belongs to (entered by the caller); one that does
        not fit this model is a one-line CheckpointError."""
        meta, parts = found
        for key, mine in (("method", self.cfg.method), ("variant", self.method.variant), ("arch", self.cfg.arch)):
            if meta.get(key) != mine:
                raise ValueError(f"the checkpoint in {self.out} is from {key} {meta.get(key)!r}, not {mine!r}; "
                                 f"resume with the run's own settings or choose another --out")
        if meta["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"the checkpoint in {self.out} has {meta['steps_per_epoch']} steps per epoch, this "
                             f"configuration {self.steps_per_epoch}; resume with the run's own dataset and batch size")
        if meta.get("stage", self.stage.name) != self.stage.name:
            raise ValueError(f"the checkpoint in {self.out} is from stage {meta['stage']!r}, where this {self.cfg.method} "
                             f"run has stage {self.stage.name!r}; resume with the run's own settings")
        where = self.out / CHECKPOINTS / meta["tensors"]
        try:
            self.method.load_state_dict({k: v.to(self.device) for k, v in parts["model"].items()}, strict=True)
            self.optimizer.load_state_dict(parts["optimizer"])
            self.scheduler.load_state_dict(meta["scheduler"])
            self.scaler.load_state_dict(meta["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            detail = next((ln.strip() for ln in str(e).splitlines() if ln.strip() and "Error(s)" not in ln), str(e))
            raise ckpt.CheckpointError(f"the checkpoint {where} does not fit this {self.cfg.method} model "
                                       f"(another run's? {detail[:200]}); resume with the run's own settings or "
                                       f"choose another --out") from None
        self.step = int(meta["step"])
        self._apply_changes(meta["config"])
        rng = parts["rng"]
        if self.coreset is not None and "coreset.indices" in rng:
            self.coreset.indices = rng["coreset.indices"].to(torch.int64)
            self.coreset.selected_at = int(rng["coreset.epoch"].view(-1)[0])
        self._epoch_start_rng = {k[len("epoch."):]: v for k, v in rng.items() if k.startswith("epoch.")}
        self._resume_rng = {k[len("now."):]: v for k, v in rng.items() if k.startswith("now.")}
        print(f"advfast: resuming {self.out} from step {self.step} (epoch {self.layout.epoch_of(self.step)})",
              flush=True)
        return True

    # ---- the loop ----------------------------------------------------------------------------------
    def _batches(self, epoch: int):
        """The epoch's batches; on resume, the ones already trained are drawn (to replay the data
        order) but not trained on, and the RNG states are then set to those of the checkpoint."""
        skip = self.step - self.layout.start(epoch)
        if self._resume_rng is not None:
            if skip == 0:  # resuming at an epoch boundary: the checkpoint's state is the epoch's start
                self._set_rng_state(self._resume_rng)
                self._resume_rng = None
            else:  # mid-epoch: replay the epoch from its start (same shuffle, same augment draws)
                self._set_rng_state(self._epoch_start_rng)
        if self._resume_rng is None:
            self._epoch_start_rng = {k: v.clone() for k, v in self._rng_state().items()}
        if self.stage.on_epoch_start is not None:  # views may change here: before the epoch's first draw
            self.stage.on_epoch_start(epoch - self.layout.epoch_of(self.plan.starts[self.stage_index]))
        if self.coreset is not None:  # after on_epoch_start: the selection sees the epoch's views
            self._coreset_epoch(epoch)
        self.loader.set_epoch(epoch)
        for i, batch in enumerate(self.loader):
            if i < skip:
                continue
            if self._resume_rng is not None:
                self._set_rng_state(self._resume_rng)
                self._resume_rng = None
            yield batch

    def _prepare(self, batch):
        if not self.precision.channels_last:
            return batch
        views = [v.contiguous(memory_format=torch.channels_last) for v in batch.views]
        return dataclasses.replace(batch, views=views) if dataclasses.is_dataclass(batch) else batch._replace(views=views)

    def train_step(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.precision.autocast():
            step = self._ddp_step or self.stage.training_step or self.method.training_step
            loss, metrics = step(self._prepare(batch))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.stage.after_optimizer_step is not None:
            self.stage.after_optimizer_step()
        if not self.layout.uniform:  # the schedule in epoch units: the next iteration's epoch progress
            self.scheduler.last_epoch = self.layout.virtual_step(self.step + 1) - 1
        self.scheduler.step()
        self.step += 1
        return loss, metrics

    def fit(self) -> dict[str, Any]:
        """Train until cfg.epochs (or cfg.max_steps, or SIGINT/SIGTERM); returns a summary. The run
        directory stays locked and the process-wide settings applied until it returns or raises."""
        self._take_lock(create=True)
        try:
            with training_settings(self.cfg.deterministic, self.device):
                return self._fit()
        finally:
            self._release_lock()

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        stop_at = min(self.total_steps, cfg.max_steps or self.total_steps)
        main = self.dist.is_main  # logs, progress, checkpoints and the export: rank 0 only
        logger, progress = self._open_logs(stop_at)
        window = _MetricWindow(self.step)
        last = None
        self.method.train()
        restore_signals = self._catch_signals()
        try:
            while self.step < stop_at and not self._should_stop(False):
                for batch in self._batches(self.layout.epoch_of(self.step)):
                    lr = self.optimizer.param_groups[0]["lr"]
                    loss, metrics = self.train_step(batch)
                    window.add({"loss": loss, **metrics})
                    progress.update()
                    end = self.step >= stop_at or self._should_stop(self.step % cfg.log_every == 0)
                    if self.step % cfg.log_every == 0 or end:
                        last = self._log(window, lr, logger, progress)
                    stage_done = self.step == self.plan.end(self.stage_index)
                    if self.step % cfg.ckpt_every == 0 or end or stage_done:
                        self._check_finite_since_log(window)  # never checkpoint or export diverged weights
                        if stage_done:
                            self._finish_stage()
                        if main:
                            with self._writing(f"checkpoint {self.step}"):
                                self.save_checkpoint()
                    if end:
                        break
        finally:
            restore_signals()
            progress.close()
            logger.close()
        return self._finish_run(last)

    # ---- _fit, step by step --------------------------------------------------------------------------
    def _open_logs(self, stop_at: int):
        main = self.dist.is_main
        with self._writing("the metrics"):
            logger = MetricLogger(self.out, resume_step=self.step if self.resumed else None) if main \
                else distributed.NullLogger()
        progress = Progress(stop_at, self.step, self.cfg.progress and self.step < stop_at and main,
                            desc=f"{self.cfg.method}" + (f"/{self.method.variant}" if self.method.variant else ""))
        return logger, progress

    def _log(self, window: "_MetricWindow", lr: float, logger, progress) -> dict[str, Any]:
        """One metrics row: the window's means over all ranks (the loop's one host sync), the weights
        checked for NaN/Inf with them; TrainingDiverged on either."""
        weights_ok = weights_finite(self.method).float().view(1)
        values = torch.cat([torch.stack(list(window.sums.values())).div_(window.count), weights_ok])
        values = distributed.all_reduce_mean(values).tolist()  # rank mean: all ranks decide alike
        weights_ok = values.pop() == 1.0  # read with the metrics: still the one sync
        now = time.perf_counter()
        stage = {"stage": self.stage.name} if len(self.plan.stages) > 1 else {}
        row = {"step": self.step, "epoch": round(self.layout.progress(self.step), 4), **stage, "lr": lr,
               **dict(zip(window.sums, values)),
               "images_per_s": round(self.cfg.batch_size * (self.step - window.tick_step) / max(now - window.tick, 1e-9), 2)}
        window.reset(now, self.step)
        self._stop_if_diverged(row["loss"], weights_ok)
        with self._writing("the metrics"):
            logger.log(row)
        progress.show(loss=row["loss"], lr=lr, img_s=row["images_per_s"])
        return row

    def _check_finite_since_log(self, window: "_MetricWindow") -> None:
        """The losses since the last log and the weights are finite on every rank, else TrainingDiverged."""
        sums = window.sums
        loss_ok = torch.isfinite(torch.stack(list(sums.values()))).all() if sums else torch.tensor(True)
        ok = torch.stack([loss_ok.to(self.device).float(),
                          weights_finite(self.method).to(self.device).float().view(())])
        # over all ranks: a TrainingDiverged on one rank alone would leave the others waiting
        loss_ok, weights_ok = (v == 1.0 for v in distributed.all_reduce_mean(ok).tolist())
        self._stop_if_diverged(0.0 if loss_ok else float("nan"), weights_ok)

    def _finish_run(self, last) -> dict[str, Any]:
        """The encoder export, then the summary (and how to continue after a signal)."""
        if self.dist.is_main:
            with self._writing("the encoder"):
                export_encoder(self.method, self.cfg, self.out, step=self.step, image_size=self._image_size())
        distributed.barrier()  # the run directory is complete when any rank returns
        summary = {"step": self.step, "total_steps": self.total_steps, "last": last, "out": str(self.out),
                   "stopped_by": signal.Signals(self._stop_signal).name if self._stop_signal else None}
        if self._stop_signal is not None:
            print(f"advfast: stopped by {summary['stopped_by']} at step {self.step}; checkpoint saved. "
                  f"Continue with: advfast-train --resume --out {self.out}", flush=True)
        return summary

    @contextlib.contextmanager
    def _writing(self, what: str):
        """A failed write (disk full, file too large, I/O error) stops the run with one line; the write
        itself was atomic, so the previous files are intact and no temporary file is left."""
        try:
            yield
        except OSError as e:
            kept = ckpt.list_checkpoints(self.out / CHECKPOINTS)
            last = f"the last checkpoint {kept[-1]} is intact" if kept else "no checkpoint was written yet"
            raise CheckpointWriteFailed(f"could not write {what} to {self.out} at step {self.step} "
                                        f"({e.strerror or e}); {last}. Free space, then: advfast-train --resume "
                                        f"--out {self.out}") from None

    def _image_size(self) -> int:
        return int(self.cfg.image_size or self.dataset.images.shape[-1])

    def _should_stop(self, agree: bool) -> bool:
        """SIGINT/SIGTERM was caught. Under torchrun a signal on any rank stops every rank at the same
        step: the ranks agree on it at log steps (``agree``), the loop's only sync."""
        if not self.dist.enabled:
            return self._stop_signal is not None
        if agree and not self._stop_agreed:
            signum = distributed.max_over_ranks(self._stop_signal or 0, self.device)
            if signum:  # every rank reports the stop (and exits with its code), not only the signalled one
                self._stop_signal = self._stop_signal or signum
                self._stop_agreed = True
        return self._stop_agreed

    def _stop_if_diverged(self, loss: float, weights_ok: bool) -> None:
        """TrainingDiverged on a non-finite loss or weights (fp16: skipped steps pass, see divergence.py)."""
        enabled = self.scaler.is_enabled()
        scale = self.scaler.get_scale() if enabled else None
        if decide(math.isfinite(loss), weights_ok, enabled, scale) == STOP:
            # a non-finite loss is the cause when both are (its gradients then poison the weights)
            bad_loss = not math.isfinite(loss)
            raise TrainingDiverged(self._diverged_message(loss if bad_loss or weights_ok else "weights"))

    def _diverged_message(self, value) -> str:
        kept = ckpt.list_checkpoints(self.out / CHECKPOINTS)
        where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
        what = "the weights hold NaN/Inf" if isinstance(value, str) else f"loss became {value}"
        lower = f"{self.cfg.optim.lr / 10:g}"
        if kept:
            how = (f"continue with a lower learning rate: advfast-train --resume --out {self.out} "
                   f"--allow-change optim.lr --set optim.lr={lower}")
        else:
            how = f"start again with a lower learning rate: add --overwrite --set optim.lr={lower} to the command"
        return f"{what} by step {self.step}; {where}. To {how}"

    def _catch_signals(self):
        """SIGINT/SIGTERM finish the current step, save a checkpoint and stop (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self._stop_signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return lambda: [signal.signal(s, h) for s, h in previous.items()]


class _MetricWindow:
    """Metrics summed on the device since the last log row, and when that window began."""

    def __init__(self, step: int):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.tick, self.tick_step = time.perf_counter(), step

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def reset(self, now: float, step: int) -> None:
        self.sums, self.count, self.tick, self.tick_step = {}, 0, now, step


def _jsonable(obj):
    """Scheduler state as JSON: lambdas (None in state_dict) and plain numbers pass, the rest fails loudly."""
    return json.loads(json.dumps(obj))


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; method_options are "method.<key>" as on the command line."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{'method' if k == 'method_options' and not prefix else k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def read_run_file(out: str | Path) -> dict[str, Any]:
    """A run's run.json, checked to be advfast's (a config mapping and the fields the Trainer writes);
    ValueError (one line, naming the file) when it is missing, unreadable or damaged."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        raise ValueError(f"nothing to resume: {path} does not exist; start the run without --resume")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e.__class__.__name__}); start the run again with --overwrite") \
            from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or \
            not isinstance(data["config"].get("method"), str) or not isinstance(data.get("steps_per_epoch"), int):
        raise ValueError(f"{path} is damaged (no advfast config in it); start the run again with --overwrite")
    return data


def load_run_config(out: str | Path) -> TrainConfig:
    """The config a run in ``out`` was started with (for --resume), validated like a new one."""
    path = Path(out) / RUN_FILE
    data = read_run_file(out)
    try:
        cfg = from_dict(data["config"])
        validate(cfg)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise ValueError(f"{path} is damaged ({first[:200]}); start the run again with --overwrite") from None
    return cfg
