"""Training throughput per method: the engine's real iteration (Trainer.train_step, data included),
"eager" (the official codes' way) against "fast" (every optimisation), and the ablation rows that
turn one optimisation off in "fast" at a time.

One timed round = ``steps`` iterations then a device sync; warm-up iterations (compilation, cudnn
autotuning, DataLoader workers) run before timing. pytest-benchmark's table shows seconds per round;
extra_info has images/s (from the median round) and the sizes. On a GPU: the presets' full sizes
and every row. On a CPU: tiny sizes (convnet, 16x16, batch 32, at most 2 attack steps) so every code
path runs in CI; the ablation only for acl there. For the readable table with speed-ups, memory and
MFU use ``advfast-bench`` (advfast/bench/cli.py), which runs the same harness.
"""

import dataclasses

import pytest
import torch

from advfast.bench.configs import ABLATION, CONFIGS
from advfast.bench.harness import method_names, pick_sizes, same_as_fast, session


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread(device):
    # on a CPU shared by many processes, OpenMP threads spinning against each other cost more than they give
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def method_sizes(device):
    sizes = pick_sizes("auto", device)
    if device.type == "cpu":  # keep `pytest bench --benchmark-only` within its CPU budget
        sizes = dataclasses.replace(sizes, warmup=1, steps=1, repeats=3)
    return sizes


@pytest.mark.parametrize("config", ["eager", "fast", *ABLATION, "fast-graphs"])
@pytest.mark.parametrize("method", method_names())
def test_method_throughput(benchmark, device, on_gpu, method_sizes, method, config):
    if config in ABLATION and not on_gpu and method != "acl":
        pytest.skip("on a CPU the ablation runs for acl only (tiny sizes say nothing about speed)")
    if same_as_fast(config, device):
        pytest.skip(f"{config} is the same as fast on {device.type} (compile and CUDA graphs run on CUDA only)")
    sizes = method_sizes
    benchmark.group = f"method {method}"
    with session(method, CONFIGS[config], sizes, device) as s:
        s.run(sizes.warmup)
        benchmark.pedantic(s.run, args=(sizes.steps,), rounds=sizes.repeats, iterations=1, warmup_rounds=0)
        loss = float(s.last_loss.detach())
        batch = s.cfg.batch_size
        benchmark.extra_info.update(method=method, config=config, batch_size=batch, steps_per_round=sizes.steps,
                                    arch=s.cfg.arch, image_size=s.cfg.image_size, final_loss=loss)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["images_per_s"] = batch * sizes.steps / stats.stats.median
    assert loss == loss and abs(loss) != float("inf"), f"{method} {config}: loss {loss}"
