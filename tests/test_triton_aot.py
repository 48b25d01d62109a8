"""Ahead-of-time compile check: every Triton kernel, as the launchers configure it, for sm_80 and sm_90.

The interpreter tests check the maths; this checks what only real compilation shows: that every
variant the launchers can produce compiles, fits the architecture's shared memory per block, uses no
register spills and launches a grid within CUDA's limits. No GPU needed (Triton compiles to PTX and
its bundled ptxas to cubin); the compile runs in a subprocess because tests/conftest.py sets
TRITON_INTERPRET=1 for this one. Set ADVFAST_AOT_TABLE=path to keep the resource table.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from advfast.kernels import aot, configs  # noqa: E402
from advfast.kernels import contrastive as kc  # noqa: E402


def _variant(grid=(1, 1, 1)):
    return aot.Variant("m.k", (("x", "*fp32"),), (), (), 4, 3, grid)


def test_problems_flag_spills_shared_memory_and_grid():
    assert aot.Result(80, _variant(), regs=100, spill_bytes=0, smem=166_912).problems() == []
    assert "spills" in aot.Result(80, _variant(), regs=255, spill_bytes=8, smem=0).problems()[0]
    assert "shared memory" in aot.Result(80, _variant(), regs=1, spill_bytes=0, smem=166_913).problems()[0]
    assert aot.Result(90, _variant(), regs=1, spill_bytes=0, smem=232_448).problems() == []
    assert "grid[1]" in aot.Result(90, _variant((1, 65_536, 1)), regs=1, spill_bytes=0, smem=0).problems()[0]
    assert aot.Result(90, _variant(), error="CompilationError: x").problems() == ["CompilationError: x"]


@pytest.mark.parametrize("arch", configs.ARCHS)
def test_variants_cover_every_kernel_once(arch):
    variants = aot.all_variants(arch)
    assert len({v.key() for v in variants}) == len(variants)
    kernels = {v.kernel.rsplit(".", 1)[1] for v in variants}
    assert kernels == {"_lse_fwd_kernel", "_lse_bwd_dq_kernel", "_lse_bwd_dk_kernel", "_pgd_linf_kernel",
                       "_pgd_l2_partials_kernel", "_pgd_l2_apply_kernel", "_ema_kernel"}
    labels = " ".join(v.label for v in variants)
    for kind in ("16bit", "tf32 ", "tf32x3"):
        assert kind in labels
    assert "D=144" in labels and "D=512" in labels  # D=130 runs zero-padded to 144


@pytest.mark.parametrize("arch", configs.ARCHS)
def test_launchers_use_the_compiled_configuration(arch, monkeypatch):
    """The interpreter runs the per-architecture table the AOT check compiles (not a CPU-only one)."""
    import torch

    monkeypatch.setenv("ADVFAST_TRITON_ARCH", str(arch))
    q = torch.randn(5, 130)
    consts, _ = kc._config(q, 144, "bwd", None, None, None, None)
    want = configs.contrastive_config(arch, "tf32x3", "bwd", 144)
    assert (consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_D"]) == (want.BLOCK_M, want.BLOCK_N, want.BLOCK_D)


@pytest.mark.slow  # ~4 CPU-minutes with a cold Triton cache (368 compiles); seconds with a warm one
def test_every_kernel_compiles_for_sm80_and_sm90_within_limits(tmp_path):
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton without its NVIDIA backend
        pytest.skip(f"triton's NVIDIA backend is not importable: {exc}")
    out = os.environ.get("ADVFAST_AOT_TABLE") or str(tmp_path / "aot_table.txt")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "advfast.kernels.aot", "--arch", "80", "90",
                           "--jobs", str(min(4, os.cpu_count() or 1)), "--out", out],
                          env=env, capture_output=True, text=True, timeout=1800)
    print(proc.stdout)  # the resource table (pytest -s shows it)
    failing = [line for line in proc.stdout.splitlines()[1:] if not line.endswith("  ok")]
    assert proc.returncode == 0, "\n".join(failing[:40]) + "\n" + proc.stderr[-3000:]
