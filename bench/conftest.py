"""Shared setup for every benchmark file under bench/ (pytest-benchmark).

Fixtures (use them instead of importing this module: tests run with --import-mode=importlib):
  device    torch.device the suite runs on: CUDA when present, else CPU (ADVFAST_BENCH_DEVICE overrides)
  on_gpu    bool
  sync      callable that waits for the device (torch.cuda.synchronize on CUDA, a no-op on CPU)
  pick      pick(gpu=..., cpu=...) -> the value for this device: full sizes on a GPU, reduced on a CPU
  sizes     the shared named workloads (SIZES below) resolved for this device
  skip_unless_backend   skip_unless_backend(backend): skips with the dispatcher's reason when an advfast
            backend cannot run here, and skips the interpreted Triton path (a test vehicle, not a speed)
  measure   measure(fn, nbytes=None, role=None, ops=1): times `fn` with pytest-benchmark and records
            per-op time, bandwidth and speed-up for the summary printed at the end of the run;
            role="baseline" marks a reference of the benchmark group (the fastest one is the summary's
            baseline), role="copy" its copy-bandwidth probe; ops: how many ops one call of `fn` runs
            (e.g. a whole epoch of batches), so that per-op times stay comparable within the group

How timing works: one timed call runs `fn` `inner` times then synchronises (on a GPU, inner = 20, so the
synchronise does not dominate 10-microsecond kernels; on a CPU, inner = 1). pytest-benchmark's own table
therefore shows the time of `inner` ops; the summary divides by it. `nbytes` is what one op reads plus
writes; the summary reports GB/s and the percentage of the device-to-device copy bandwidth measured at
the same size (the group's role="copy" entry, e.g. dst.copy_(src) of the op's tensor size), and the
speed-up over the group's role="baseline" entry. Set the group with benchmark.group = "...".

`pytest bench --benchmark-only` times every benchmark; `pytest bench --benchmark-disable` is a quick
smoke run (each benchmark once, untimed).
`--bench-summary PATH` also writes the summary (markdown, with the device name) to PATH, e.g.
bench/results/<device>.md.
"""

from __future__ import annotations

import os
import platform
import statistics

import pytest
import torch

# Named workloads shared by the bench files: (full size on a GPU, reduced size on a CPU).
SIZES = {
    "cifar_batch": ((512, 3, 32, 32), (64, 3, 32, 32)),
    "large_batch": ((256, 3, 224, 224), (8, 3, 224, 224)),
    # CIFAR ResNet-18 parameter set at a width multiplier: 1.0 = 11.17M parameters in 62 tensors.
    "resnet18_width": (1.0, 0.25),
}
INNER = {"cuda": 20, "cpu": 1}
ROUNDS = {"cuda": 30, "cpu": 5}

_records: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--bench-summary", default=None, metavar="PATH",
                     help="also write the advfast benchmark summary (markdown) to PATH")


def _pick_device() -> torch.device:
    name = os.environ.get("ADVFAST_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return _pick_device()


@pytest.fixture(scope="session")
def on_gpu(device) -> bool:
    return device.type == "cuda"


@pytest.fixture(scope="session")
def sync(device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@pytest.fixture(scope="session")
def pick(on_gpu):
    def pick(gpu, cpu):
        return gpu if on_gpu else cpu
    return pick


@pytest.fixture(scope="session")
def sizes(pick) -> dict:
    return {name: pick(*values) for name, values in SIZES.items()}


@pytest.fixture(scope="session")
def skip_unless_backend(device):
    from advfast.ops import _dispatch

    def check(backend: str) -> None:
        if backend == "triton" and device.type == "cpu":
            pytest.skip("Triton on CPU is the interpreter (a test vehicle, not a fast path)")
        if backend in _dispatch.BACKENDS:
            reason = _dispatch.unavailable_reason(backend, device)
            if reason is not None:
                pytest.skip(reason)
    return check


@pytest.fixture
def measure(benchmark, device, sync, request):
    inner = INNER.get(device.type, 1)
    rounds = ROUNDS.get(device.type, 5)

    def run(fn, nbytes: int | None = None, role: str | None = None, ops: int = 1):
        if role not in (None, "baseline", "copy"):
            raise ValueError(f"role must be None, 'baseline' or 'copy', got {role!r}")
        def timed():
            for _ in range(inner):
                fn()
            sync()

        timed()  # first call: compilation, autotuning, allocator warm-up
        benchmark.extra_info.update(inner=inner, ops=ops, nbytes=nbytes, device=device_name(device))
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and getattr(stats, "stats", None) is not None:
            per_op = stats.stats.median / (inner * ops)
            benchmark.extra_info["per_op_s"] = per_op
            if nbytes:
                benchmark.extra_info["GB/s"] = nbytes / per_op / 1e9
            _records.append(dict(group=benchmark.group or "", name=request.node.name, per_op=per_op,
                                 nbytes=nbytes, role=role, device=device_name(device)))
    return run


def _summary_lines() -> list[str]:
    lines = [f"advfast benchmark summary on {_records[0]['device']} (median per op)", "",
             "| group | benchmark | time (us) | GB/s | % of copy | speed-up vs baseline |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    by_group: dict[str, list[dict]] = {}
    for r in _records:
        by_group.setdefault(r["group"], []).append(r)
    for group, rows in by_group.items():
        copy = [r for r in rows if r["role"] == "copy" and r["nbytes"]]
        copy_bw = statistics.median(r["nbytes"] / r["per_op"] for r in copy) if copy else None
        base = [r["per_op"] for r in rows if r["role"] == "baseline"]
        base_t = min(base) if base else None
        for r in rows:
            bw = r["nbytes"] / r["per_op"] if r["nbytes"] else None
            lines.append("| {} | {} | {:.1f} | {} | {} | {} |".format(
                group, r["name"], r["per_op"] * 1e6,
                f"{bw / 1e9:.1f}" if bw else "",
                f"{100 * bw / copy_bw:.0f}%" if bw and copy_bw else "",
                f"{base_t / r['per_op']:.2f}x" if base_t and r["role"] != "copy" else ""))
    return lines


def pytest_terminal_summary(terminalreporter, config):
    if not _records:
        return
    lines = _summary_lines()
    terminalreporter.section("advfast benchmark summary")
    for line in lines:
        terminalreporter.write_line(line)
    path = config.getoption("--bench-summary", default=None)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
