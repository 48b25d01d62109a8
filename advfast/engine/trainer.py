"""The training loop shared by every method.

    trainer = Trainer(cfg)          # dataset, augment + device loader, method, optimiser, schedule
    trainer.fit()                   # train; checkpoints, logs, and the exported encoder in cfg.out

One iteration: ``loss, metrics = method.training_step(batch)`` under autocast, backward, optimiser
step, ``method.after_optimizer_step()``, schedule step. Metrics are summed on the device and read
back every ``log_every`` steps, the loop's only host synchronisation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

import advfast
from advfast.attacks import AttackGraphs
from advfast.config import TrainConfig, closest, from_dict, to_dict, validate
from advfast.engine import checkpoint as ckpt
from advfast.engine import distributed
from advfast.engine.divergence import STOP, decide, weights_finite
from advfast.engine.export import export_encoder
from advfast.engine.logging import MetricLogger, Progress
from advfast.engine.precision import resolve_precision
from advfast.engine.rundir import CHECKPOINTS, RUN_FILE, holds_run, prepare_run_dir


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite."""


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


def dataset_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """How each dataset takes cfg.image_size at load time (cifar/stl10 keep their size on disk)."""
    if cfg.image_size is None:
        return {}
    if cfg.dataset in ("digits", "imagefolder"):
        return {"size": cfg.image_size}
    if cfg.dataset == "synthetic":
        return {"image_size": cfg.image_size}
    return {}


def build_config(method: str, variant: str | None = None, dataset: str = "digits",
                 overrides: list[dict[str, Any]] = ()) -> TrainConfig:
    """TrainConfig defaults <- the method's preset for ``dataset`` <- each dict of ``overrides`` in turn."""
    from advfast.config import apply_overrides

    cls = method_class(method)
    cfg = TrainConfig(method=method, variant=variant, dataset=dataset)
    apply_overrides(cfg, cls.preset(dataset, variant), f"preset of {method}")
    for o in overrides:
        apply_overrides(cfg, o)
    if (cfg.method, cfg.variant, cfg.dataset) != (method, variant, dataset):
        raise ValueError("method, variant and dataset pick the preset: give them as options, not as overrides")
    return cfg


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False):
        validate(cfg)
        self.cfg = cfg
        cls = method_class(cfg.method)
        cls.resolve_variant(cfg.variant)
        cls.parse_options(cfg.method_options)
        from advfast.models import available_archs

        if cfg.arch not in available_archs():  # before any data is read: a typo should not wait for a download
            raise ValueError(f"unknown arch {cfg.arch!r}{closest(cfg.arch, available_archs())}; "
                             f"choose from {', '.join(available_archs())}")
        self.out = Path(cfg.out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"output path {self.out} is a file; give --out a directory")
        if holds_run(self.out) and not (resume or overwrite):
            raise ValueError(f"output directory {self.out} already holds a run; pass --resume to continue it, "
                             f"--overwrite to replace it, or choose another --out")
        self.precision = resolve_precision(cfg)
        # under torchrun: the process group and this rank's device (cuda:LOCAL_RANK)
        self.dist, device = distributed.setup(self.precision.device)
        if device != self.precision.device:
            self.precision = dataclasses.replace(self.precision, device=device)
        self.device = self.precision.device
        if cfg.cuda_graph_attack:
            check_attack_graphs(self.device, self.dist.enabled)
        self._set_determinism()

        from advfast.data import DeviceLoader, build_augment, load_dataset

        dataset = load_dataset(cfg.dataset, cfg.data_dir, "train", cfg.download, **dataset_kwargs(cfg))
        if cfg.batch_size > len(dataset):
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the dataset ({cfg.dataset}: {len(dataset)} "
                             f"images); use --batch-size {len(dataset)} or less")
        self.dataset = dataset
        backend = cfg.augment_backend if cfg.augment_backend != "auto" else "torch"
        # views may depend on the variant (moco v1 vs v2): Method.augment_for
        self.augment = build_augment(cls.augment_for(cfg.variant), backend=backend, size=cfg.image_size)
        world = self.dist.world_size
        if cfg.batch_size % world:  # batch_size is the global batch: steps per epoch do not depend on world
            raise ValueError(f"batch_size {cfg.batch_size} (the global batch) is not divisible by the {world} ranks; "
                             f"use a multiple of {world}")
        self.loader = DeviceLoader(dataset, cfg.batch_size // world, self.augment, self.device, seed=cfg.seed,
                                   rank=self.dist.rank, world_size=world)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch

        torch.manual_seed(cfg.seed)  # weight init
        method = cls(cfg, dataset.num_classes, dataset.mean, dataset.std).to(self.device)
        if self.precision.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if cfg.sync_bn:  # per-branch SyncBatchNorm under torchrun on GPUs (a no-op computation in one process)
            distributed.convert_sync_bn(method, self.device)
        self.method = method
        if cfg.compile:
            self.method.encoder.compile(backend=cfg.compile_backend)
        if cfg.cuda_graph_attack:
            self.method.attack_graphs = AttackGraphs()
        if self.dist.enabled:  # same weights on every rank (seeded above), own attack randomness per rank
            torch.manual_seed(distributed.rank_seed(cfg.seed, self.dist.rank))

        from advfast.optim import build_optimizer, build_scheduler

        self.optimizer = build_optimizer(self.method.trainable_parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, steps_per_epoch=self.steps_per_epoch,
                                         epochs=cfg.epochs)
        self.scaler = self.precision.grad_scaler()
        self.step = 0
        self._epoch_start_rng: dict[str, torch.Tensor] = {}
        self._resume_rng: dict[str, torch.Tensor] | None = None
        self._stop_signal: int | None = None
        self._stop_agreed = False
        # DDP under torchrun (a collective: every rank has passed the holds_run check above)
        self._ddp_step = distributed.wrap_step(self.method, self.device) if self.dist.enabled else None

        if self.dist.is_main:  # rank 0 owns the run directory; every rank reads the checkpoint
            prepare_run_dir(self.out, resume, overwrite)
        distributed.barrier()
        self.resumed = resume and self._restore()
        if self.dist.is_main:
            ckpt.atomic_write_json(self.out / RUN_FILE, {
                "advfast_version": advfast.__version__, "config": to_dict(cfg),
                "precision": self.precision.name, "device": str(self.device),
                "steps_per_epoch": self.steps_per_epoch, "dataset_size": len(dataset),
                "world_size": self.dist.world_size})

    # ---- setup helpers -----------------------------------------------------------------------------
    def _set_determinism(self) -> None:
        if self.cfg.deterministic:  # cuBLAS reads this when its first handle is made
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(bool(self.cfg.deterministic))  # process-wide: set both ways
        if self.cfg.deterministic:
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")

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
        meta = {
            "advfast_version": advfast.__version__, "config": to_dict(self.cfg),
            "method": self.cfg.method, "variant": self.method.variant, "arch": self.cfg.arch,
            "epoch": self.step // self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
            "scheduler": _jsonable(self.scheduler.state_dict()), "scaler": self.scaler.state_dict(),
        }
        return ckpt.save_checkpoint(self.out / CHECKPOINTS, self.step, model_state=self.method.state_dict(),
                                    optimizer_state=self.optimizer.state_dict(), rng_tensors=rng, meta=meta,
                                    keep_last=self.cfg.keep_last)

    def _restore(self) -> bool:
        found = ckpt.latest_valid_checkpoint(self.out / CHECKPOINTS, warn=lambda m: print(m, flush=True))
        if found is None:
            print(f"advfast: no checkpoint in {self.out / CHECKPOINTS} yet; starting from step 0", flush=True)
            return False
        meta, parts = found
        for key, mine in (("method", self.cfg.method), ("variant", self.method.variant), ("arch", self.cfg.arch)):
            if meta.get(key) != mine:
                raise ValueError(f"the checkpoint in {self.out} is from {key} {meta.get(key)!r}, not {mine!r}; "
                                 f"resume with the run's own settings or choose another --out")
        if meta["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"the checkpoint in {self.out} has {meta['steps_per_epoch']} steps per epoch, this "
                             f"configuration {self.steps_per_epoch}; resume with the run's own dataset and batch size")
        self.method.load_state_dict({k: v.to(self.device) for k, v in parts["model"].items()}, strict=True)
        self.optimizer.load_state_dict(parts["optimizer"])
        self.scheduler.load_state_dict(meta["scheduler"])
        self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])
        rng = parts["rng"]
        self._epoch_start_rng = {k[len("epoch."):]: v for k, v in rng.items() if k.startswith("epoch.")}
        self._resume_rng = {k[len("now."):]: v for k, v in rng.items() if k.startswith("now.")}
        print(f"advfast: resuming {self.out} from step {self.step} (epoch {self.step // self.steps_per_epoch})",
              flush=True)
        return True

    # ---- the loop ----------------------------------------------------------------------------------
    def _batches(self, epoch: int):
        """The epoch's batches; on resume, the ones already trained are drawn (to replay the data
        order) but not trained on, and the RNG states are then set to those of the checkpoint."""
        skip = self.step - epoch * self.steps_per_epoch
        if self._resume_rng is not None:
            if skip == 0:  # resuming at an epoch boundary: the checkpoint's state is the epoch's start
                self._set_rng_state(self._resume_rng)
                self._resume_rng = None
            else:  # mid-epoch: replay the epoch from its start (same shuffle, same augment draws)
                self._set_rng_state(self._epoch_start_rng)
        if self._resume_rng is None:
            self._epoch_start_rng = {k: v.clone() for k, v in self._rng_state().items()}
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
            step = self._ddp_step if self._ddp_step is not None else self.method.training_step
            loss, metrics = step(self._prepare(batch))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_optimizer_step()
        self.scheduler.step()
        self.step += 1
        return loss, metrics

    def fit(self) -> dict[str, Any]:
        """Train until cfg.epochs (or cfg.max_steps, or SIGINT/SIGTERM); returns a summary."""
        cfg = self.cfg
        stop_at = min(self.total_steps, cfg.max_steps or self.total_steps)
        main = self.dist.is_main  # logs, progress, checkpoints and the export: rank 0 only
        logger = MetricLogger(self.out, resume_step=self.step if self.resumed else None) if main \
            else distributed.NullLogger()
        progress = Progress(stop_at, self.step, cfg.progress and self.step < stop_at and main,
                            desc=f"{cfg.method}" + (f"/{self.method.variant}" if self.method.variant else ""))
        sums: dict[str, torch.Tensor] = {}
        count, last = 0, None
        tick, tick_step = time.perf_counter(), self.step
        self.method.train()
        restore_signals = self._catch_signals()
        try:
            while self.step < stop_at and not self._should_stop(False):
                epoch = self.step // self.steps_per_epoch
                for batch in self._batches(epoch):
                    lr = self.optimizer.param_groups[0]["lr"]
                    loss, metrics = self.train_step(batch)
                    for key, value in {"loss": loss, **metrics}.items():
                        value = value.detach().float()
                        sums[key] = sums[key] + value if key in sums else value
                    count += 1
                    progress.update()
                    end = self.step >= stop_at or self._should_stop(self.step % cfg.log_every == 0)
                    if self.step % cfg.log_every == 0 or end:
                        weights_ok = weights_finite(self.method).float().view(1)
                        values = torch.cat([torch.stack(list(sums.values())).div_(count), weights_ok])
                        values = distributed.all_reduce_mean(values).tolist()  # rank mean: all ranks decide alike
                        weights_ok = values.pop() == 1.0  # read with the metrics: still the one sync
                        now = time.perf_counter()
                        last = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "lr": lr,
                                **dict(zip(sums, values)),
                                "images_per_s": round(cfg.batch_size * (self.step - tick_step) / max(now - tick, 1e-9), 2)}
                        sums, count, tick, tick_step = {}, 0, now, self.step
                        self._stop_if_diverged(last["loss"], weights_ok)
                        logger.log(last)
                        progress.show(loss=last["loss"], lr=lr, img_s=last["images_per_s"])
                    if self.step % cfg.ckpt_every == 0 or end:
                        # never checkpoint weights trained on a non-finite loss since the last check
                        loss_ok = torch.isfinite(torch.stack(list(sums.values()))).all() if sums else torch.tensor(True)
                        ok = torch.stack([loss_ok.to(self.device).float(),
                                          weights_finite(self.method).to(self.device).float().view(())])
                        # over all ranks: a TrainingDiverged on one rank alone would leave the others waiting
                        loss_ok, weights_ok = (v == 1.0 for v in distributed.all_reduce_mean(ok).tolist())
                        self._stop_if_diverged(0.0 if loss_ok else float("nan"), weights_ok)
                        if main:
                            self.save_checkpoint()
                    if end:
                        break
        finally:
            restore_signals()
            progress.close()
            logger.close()
        if main:
            export_encoder(self.method, self.cfg, self.out, step=self.step, image_size=self._image_size())
        distributed.barrier()  # the run directory is complete when any rank returns
        summary = {"step": self.step, "total_steps": self.total_steps, "last": last, "out": str(self.out),
                   "stopped_by": signal.Signals(self._stop_signal).name if self._stop_signal else None}
        if self._stop_signal is not None:
            print(f"advfast: stopped by {summary['stopped_by']} at step {self.step}; checkpoint saved. "
                  f"Continue with: advfast-train --resume --out {self.out}", flush=True)
        return summary

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
        return (f"{what} by step {self.step}; {where}. Lower optim.lr (--set optim.lr=...) "
                f"or use precision fp32, then --resume")

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


def _jsonable(obj):
    """Scheduler state as JSON: lambdas (None in state_dict) and plain numbers pass, the rest fails loudly."""
    return json.loads(json.dumps(obj))


def load_run_config(out: str | Path) -> TrainConfig:
    """The config a run in ``out`` was started with (for --resume)."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        raise ValueError(f"nothing to resume: {path} does not exist; start the run without --resume")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); start the run again with --overwrite") from None
    return from_dict(data["config"])
