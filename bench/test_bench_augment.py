"""Augmentation throughput per backend and preset at 32x32 and 96x96 (images/s in extra_info).

Each group (preset, image size) times one batch through every backend that runs here: "torch"
(batched on the device), "dali" (skipped without DALI), and the classic per-sample "torchvision" path,
in one process and - on a GPU machine only - as the official codes run it, a DataLoader with 4 workers
("torchvision-4workers", timed over an epoch of 8 batches and reported per batch). Both classic entries
are baselines; the summary's speed-up is against the faster of them (issue 4's target is against 4
workers). images/s counts every view produced, so a two-view preset at B images makes 2B. CPU sizes are
tiny so the suite finishes in seconds here.
"""

import pytest
import torch

from advfast.data import DeviceLoader, build_augment, load_dataset
from advfast.data.dali_backend import dali_error



@pytest.fixture(autouse=True)
def _cpu_threads(on_gpu):
    # on shared CPU cores, OpenMP barriers make these small ops ~100x slower with >1 thread
    n = torch.get_num_threads()
    if not on_gpu:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PRESETS = ["simclr", "mocov2", "advcl", "rocl", "finetune"]
BACKENDS = ["torch", "dali", "torchvision", "torchvision-4workers"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("res", [32, 96])
def test_augment_throughput(benchmark, measure, device, on_gpu, pick, res, preset, backend):
    if backend == "dali" and dali_error() is not None:
        pytest.skip(dali_error())
    if backend == "torchvision-4workers" and not on_gpu:
        pytest.skip("the 4-worker DataLoader baseline is measured on GPU machines (2 shared cores here)")
    if not on_gpu and res == 96:
        pytest.skip("96x96 is measured on GPU machines; too slow for the shared CPU cores")
    batch = pick(gpu=512, cpu=16)
    data = load_dataset("synthetic", num_samples=batch * pick(gpu=8, cpu=1), image_size=res)
    benchmark.group = f"augment {preset} {res}x{res}"
    if backend == "torchvision-4workers":
        aug = build_augment(preset, "torchvision")
        loader = DeviceLoader(data, batch, aug, device, seed=0, num_workers=4)

        def run():
            for _ in loader:  # one epoch of 8 batches, worker start-up included as in training
                pass
        measure(run, role="baseline", ops=len(loader))  # per batch, comparable with the other entries
        n_images = batch * aug.num_views
    else:
        aug = build_augment(preset, backend)
        images = data.images[:batch].to(device)
        g = torch.Generator(device=device).manual_seed(0)
        measure(lambda: aug(images, g), role="baseline" if backend == "torchvision" else None)
        n_images = batch * aug.num_views
    per_op = benchmark.extra_info.get("per_op_s")
    if per_op:
        benchmark.extra_info["images_per_s"] = n_images / per_op
