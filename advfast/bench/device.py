"""The device under test: its name and software versions, synchronisation, peak memory, and its
measured matmul rate (the denominator of MFU)."""

from __future__ import annotations

import datetime
import platform
import statistics
import time

import torch

import advfast


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    """What a result must carry to be read later: device, versions, date."""
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "advfast": advfast.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_bytes=props.total_memory, compute_capability=f"{props.major}.{props.minor}",
                   driver_cuda=_driver_version())
    return env


def _driver_version() -> str | None:
    try:
        v = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
    except Exception:  # noqa: BLE001 - informative only
        v = None
    return None if v is None else str(v)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated by torch on the GPU since the last reset; None on a CPU (not measured:
    a process's resident set does not separate one configuration from the previous ones)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def matmul_rate(device: torch.device, n: int | None = None, repeats: int = 10) -> dict:
    """Measured dense matmul FLOP/s of the device: an n x n x n bf16 matmul on a GPU (n = 8192),
    fp32 on a CPU (n = 1024; bf16 matmuls on most CPUs are emulated and would flatter MFU).
    Median over ``repeats`` timed calls after a warm-up."""
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    n = n or (8192 if on_gpu else 1024)
    inner = 10 if on_gpu else 1  # several launches per timing on a GPU so the sync does not count
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        synchronize(device)
        times.append((time.perf_counter() - start) / inner)
    seconds = statistics.median(times)
    return {"flops_per_s": 2 * n ** 3 / seconds, "dtype": str(dtype).replace("torch.", ""), "n": n,
            "what": f"median of {repeats} timed {n}x{n}x{n} {str(dtype).replace('torch.', '')} torch.mm"}
