"""Throughput of the engine's real training iteration, per method and configuration.

What is timed: ``Trainer.train_step`` (the engine's iteration: the method's training_step under
autocast, backward, optimiser step, momentum/queue updates, schedule step) fed with batches drawn
from the configuration's data path, so augmentation is in the time:

* GPU augmentation on: the Trainer's own DeviceLoader (dataset on the device, batched torch
  augmentation), cycled over epochs.
* off: torchvision per-image transforms in ``workers`` DataLoader worker processes (advfast.data's
  classic path), batches pinned and copied to the device, with one DataLoader spanning every epoch
  of the run (as a training run keeps its workers busy; restarting them per epoch of the small
  synthetic set would charge the eager path for worker start-ups a real run does not pay).

Not timed: the Trainer's loop around train_step (metric sums, the logging sync every log_every
steps, checkpoints), which is the same in every configuration.

The data is CIFAR-shaped synthetic images (advfast.data "synthetic"); the method's preset for
cifar10 gives the batch size, architecture and attack (``Sizes`` can shrink them for a CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from advfast import attacks, ops
from advfast.bench import device as dev
from advfast.bench.configs import CONFIGS, COUNTING, EAGER, Switches
from advfast.bench.flops import count_flops, expected_passes, forward_flops_per_image

EPOCH_IMAGES = 50_000  # CIFAR-10's training set: "seconds per epoch" is for this many images


@dataclass(frozen=True)
class Sizes:
    """Workload and timing sizes. None keeps the method's preset value."""

    name: str
    image_size: int
    arch: str | None = None
    batch_size: int | None = None
    max_attack_steps: int | None = None
    max_queue: int | None = None
    warmup: int = 5  # untimed iterations first (compilation, cudnn autotuning, allocator, workers)
    steps: int = 10  # iterations per timed repeat
    repeats: int = 5
    workers: int = 4  # DataLoader workers of the CPU (torchvision) augmentation path, as the official codes


# GPU: the paper settings (preset batch, arch and attack; 32x32). CPU: enough to run every code path
# in seconds, not to say anything about speed.
FULL = Sizes("full", image_size=32)
TINY = Sizes("tiny", image_size=16, arch="convnet", batch_size=32, max_attack_steps=2, max_queue=1024,
             warmup=1, steps=2, repeats=3, workers=1)
SIZES = {"full": FULL, "tiny": TINY}


def pick_sizes(name: str, device: torch.device) -> Sizes:
    if name == "auto":
        return FULL if device.type == "cuda" else TINY
    if name not in SIZES:
        raise ValueError(f"--size must be auto, full or tiny, got {name!r}")
    return SIZES[name]


def method_names() -> tuple[str, ...]:
    """The registered methods that declare themselves benchmarked (``Method.benchmarked``), in
    registration order."""
    from advfast.methods import METHODS

    return tuple(name for name, cls in METHODS.items() if cls.benchmarked)


def check_methods(names) -> list[str]:
    """Method names in order (comma-separated string or list), each one of method_names()."""
    from advfast.config import closest

    known = method_names()
    if isinstance(names, str):
        names = [n for n in (p.strip() for p in names.split(",")) if n]
    if not names:
        raise ValueError(f"--methods is empty; choose from {', '.join(known)}")
    out = []
    for n in names:
        if n not in known:
            raise ValueError(f"unknown method {n!r}{closest(n, known)}; choose from {', '.join(known)}")
        if n not in out:
            out.append(n)
    return out


# ---- building a Trainer for a method x configuration ---------------------------------------------------
def bench_config(method: str, switches: Switches, sizes: Sizes, device: torch.device, workdir: Path):
    """The method's cifar10 preset on synthetic CIFAR-shaped data, with ``switches`` applied."""
    from advfast.engine import build_config, method_class

    cls = method_class(method)
    cfg = build_config(method, None, "cifar10")
    cfg.dataset, cfg.image_size = "synthetic", sizes.image_size
    if sizes.arch is not None:
        cfg.arch = sizes.arch
    if sizes.batch_size is not None:
        cfg.batch_size = sizes.batch_size
    if sizes.max_attack_steps is not None and cfg.attack.kind == "pgd":
        cfg.attack.steps = min(cfg.attack.steps, sizes.max_attack_steps)
    if sizes.max_queue is not None:
        for key in cls.queue_options:
            if key in cfg.method_options:
                cfg.method_options[key] = min(int(cfg.method_options[key]), sizes.max_queue)
    switches = switches.on_device(device.type)
    cfg.device = str(device)
    cfg.precision = "bf16" if switches.bf16 else "fp32"
    cfg.channels_last = "on" if switches.channels_last else "off"
    cfg.compile = switches.compile
    cfg.cuda_graph_attack = switches.cuda_graph_attack
    cfg.augment_backend = "torch" if switches.gpu_augment else "torchvision"
    cfg.out = str(workdir / "run")
    cfg.progress = False
    cls.prepare_bench_run(cfg, workdir)  # e.g. advcl's pseudo-label file
    return cfg


class Session:
    """One method under one configuration: a Trainer and its batch source, ready to step."""

    def __init__(self, method: str, switches: Switches, sizes: Sizes, device: torch.device, workdir: Path):
        from advfast.engine import Trainer

        self.method_name, self.sizes, self.device = method, sizes, device
        self.switches = switches.on_device(device.type)
        self.cfg = bench_config(method, switches, sizes, device, workdir)
        self.trainer = Trainer(self.cfg, overwrite=True)
        if device.type == "cuda" and self.switches == EAGER:
            # the eager path as the official codes run it: PyTorch's default fp32 matmuls, no TF32 (the
            # Trainer sets "high" for every run; each Session's Trainer sets it again)
            torch.set_float32_matmul_precision("highest")
        self._batches = self._device_batches() if self.switches.gpu_augment else self._worker_batches()
        self.last_loss: torch.Tensor | None = None

    # ---- batch sources ---------------------------------------------------------------------------------
    def _device_batches(self):
        loader = self.trainer.loader
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield from loader

    def _worker_batches(self):
        from advfast.data.loader import Batch, mix_seed
        from advfast.data.torchvision_backend import BatchViews

        loader = self.trainer.loader  # the classic DeviceLoader: images on the CPU, torchvision augment
        b = loader.batch_size

        def items():  # (batch indices, seed) for every batch of every epoch, as DeviceLoader draws them
            for epoch in itertools.count():
                loader.set_epoch(epoch)
                shard = loader.epoch_indices()
                for k in range(len(loader)):
                    yield shard[k * b:(k + 1) * b], mix_seed(loader.seed, epoch, loader.rank, 2, k)

        # enough batches for the whole session (an IterableDataset-free sampler must have a length)
        total = self.sizes.warmup + self.sizes.steps * self.sizes.repeats + 8
        data = torch.utils.data.DataLoader(
            BatchViews(loader.images, loader.labels, loader.augment), batch_size=None,
            sampler=list(itertools.islice(items(), total)), num_workers=self.sizes.workers,
            pin_memory=self.device.type == "cuda")
        for views, labels, idx in data:
            yield Batch([v.to(self.device, non_blocking=True) for v in views],
                        labels.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True))

    def next_batch(self):
        return next(self._batches)

    # ---- stepping ------------------------------------------------------------------------------------------
    def switch_context(self):
        """The process-wide switches this configuration needs while it steps."""
        stack = contextlib.ExitStack()
        stack.enter_context(attacks.attack_gradients("input" if self.switches.input_grads else "full"))
        if not self.switches.fused_ops:
            stack.enter_context(ops.auto_backend("torch"))
        return stack

    def step(self, batch) -> torch.Tensor:
        with self.switch_context():
            loss, _ = self.trainer.train_step(batch)
        self.last_loss = loss
        return loss

    def run(self, steps: int) -> None:
        """``steps`` iterations, each drawing its batch (augmentation included), then a device sync."""
        with self.switch_context():
            for _ in range(steps):
                self.last_loss, _ = self.trainer.train_step(self.next_batch())
        dev.synchronize(self.device)

    def close(self) -> None:
        self._batches.close()  # stops DataLoader workers
        self.trainer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.switches.compile:
            torch._dynamo.reset()


@contextlib.contextmanager
def session(method: str, switches: Switches, sizes: Sizes, device: torch.device):
    with tempfile.TemporaryDirectory(prefix="advfast-bench-") as tmp:
        s = Session(method, switches, sizes, device, Path(tmp))
        try:
            yield s
        finally:
            s.close()


# ---- measurements ------------------------------------------------------------------------------------------
def spread(samples: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of ``samples``."""
    s = sorted(samples)
    q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else (s[0], s[0], s[0])
    return {"median": statistics.median(s), "q1": q1, "q3": q3, "min": s[0], "max": s[-1], "n": len(s)}


def count_iteration_flops(method: str, sizes: Sizes, device: torch.device) -> dict:
    """FLOPs of one training iteration of ``method`` (model FLOPs: input-only attack gradients, counted
    on a plain fp32 copy with torch ops) and F, the encoder's forward FLOPs per image."""
    with session(method, COUNTING, sizes, device) as s:
        batch = s.next_batch()
        flops, _ = count_flops(s.step, batch)
        image_shape = tuple(batch.views[0].shape[1:])
        forward = forward_flops_per_image(s.trainer.method.encoder, image_shape)
        b = s.cfg.batch_size
        steps = s.cfg.attack.steps if s.cfg.attack.kind == "pgd" else (1 if s.cfg.attack.kind == "fgsm" else 0)
        return {"flops_per_iter": flops, "forward_flops_per_image": forward,
                "passes_per_image": flops / (b * forward), "expected_passes": expected_passes(method, steps)}


def measure(method: str, config: str, sizes: Sizes, device: torch.device, flops: dict | None = None,
            peak_flops_per_s: float | None = None) -> dict:
    """Time ``method`` under ``config``: a result row (see advfast.bench.report for the fields)."""
    switches = CONFIGS[config]
    with session(method, switches, sizes, device) as s:
        dev.reset_peak_memory(device)
        s.run(sizes.warmup)
        times = []
        for _ in range(sizes.repeats):
            start = time.perf_counter()
            s.run(sizes.steps)
            times.append((time.perf_counter() - start) / sizes.steps)
        peak = dev.peak_memory(device)
        loss = float(s.last_loss.detach())
        cfg = s.cfg
        ran = s.switches
    step = spread(times)
    b = cfg.batch_size
    row = {
        "method": method, "variant": cfg.variant, "config": config, "switches": ran.as_dict(),
        "arch": cfg.arch, "image_size": cfg.image_size, "batch_size": b,
        "attack": f"{cfg.attack.kind}-{cfg.attack.steps}" if cfg.attack.kind == "pgd" else cfg.attack.kind,
        "precision": cfg.precision, "step_s": step,
        "images_per_s": b / step["median"], "images_per_s_q1": b / step["q3"], "images_per_s_q3": b / step["q1"],
        "s_per_epoch": EPOCH_IMAGES * step["median"] / b,
        "peak_mem_bytes": peak, "final_loss": loss,
        "warmup_steps": sizes.warmup, "timed_steps": sizes.steps, "repeats": sizes.repeats,
        "workers": None if ran.gpu_augment else sizes.workers,
    }
    if flops is not None:
        row.update(flops)
        if peak_flops_per_s:
            row["mfu"] = flops["flops_per_iter"] / step["median"] / peak_flops_per_s
    return row


def same_as_fast(config: str, device: torch.device) -> bool:
    """An ablation row that runs exactly "fast" on this device (compile is off on a CPU anyway)."""
    return config != "fast" and CONFIGS[config].on_device(device.type) == CONFIGS["fast"].on_device(device.type)


def run_all(methods, configs, sizes: Sizes, device: torch.device, log=print) -> dict:
    """Every method x config: the rows plus the device and its matmul rate (see advfast.bench.report)."""
    rate = dev.matmul_rate(device)
    log(f"advfast-bench: {dev.device_name(device)}; peak {rate['dtype']} matmul {rate['flops_per_s'] / 1e12:.2f} TFLOP/s; "
        f"sizes {sizes.name}")
    rows, skipped = [], []
    for method in methods:
        flops = count_iteration_flops(method, sizes, device)
        for config in configs:
            if same_as_fast(config, device):
                skipped.append({"method": method, "config": config,
                                "reason": f"identical to fast on {device.type} (compile and CUDA graphs run on CUDA only)"})
                continue
            row = measure(method, config, sizes, device, flops, rate["flops_per_s"])
            rows.append(row)
            log(f"  {method:9s} {config:22s} {row['images_per_s']:10.1f} images/s")
    return {"environment": dev.environment(device), "matmul_peak": rate,
            "sizes": dataclasses.asdict(sizes), "epoch_images": EPOCH_IMAGES, "rows": rows, "skipped": skipped}
