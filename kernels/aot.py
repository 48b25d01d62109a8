"""Ahead-of-time compilation of every Triton kernel for real GPU targets, without a GPU.

Each kernel module lists the variants its launchers can produce for an architecture
(``aot_variants(arch)``: the launch configuration comes from the same functions the launchers call).
This module compiles every distinct variant once with ``triton.compile(ASTSource(...), target=...)``,
runs the ptxas that ships with Triton with ``-v`` on the PTX for registers and spills, reads the shared
memory from the compiled metadata, and reports what does not fit the architecture:

    python -m advfast.kernels.aot --arch 80 90 [--jobs 2] [--out table.txt]

exits 1 when a variant fails to compile, spills, needs more shared memory than the architecture
allows per block, or launches a grid beyond CUDA's limits. It needs no GPU, but must run with
TRITON_INTERPRET unset (the interpreter replaces compilation).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) and register file limits.
SMEM_PER_BLOCK = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
MAX_GRID = (2**31 - 1, 65_535, 65_535)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compile of one kernel: what ``triton.compile`` needs, plus the largest grid it launches."""

    kernel: str  # "module.function"
    signature: tuple  # ((name, type), ...) for every argument, "constexpr" for constexprs
    constexprs: tuple  # ((name, value), ...); tl dtypes are given by name, e.g. "fp32"
    divisible: tuple  # argument names specialised as multiples of 16 (pointers, aligned ints)
    num_warps: int
    num_stages: int
    grid: tuple = (1, 1, 1)
    label: str = ""  # what the variant stands for (dtype, D, ...), for the table

    def key(self):
        return (self.kernel, self.signature, self.constexprs, self.divisible, self.num_warps, self.num_stages)


@dataclasses.dataclass
class Result:
    arch: int
    variant: Variant
    regs: int = -1
    spill_bytes: int = -1
    smem: int = -1
    error: str = ""

    def problems(self) -> list[str]:
        out = []
        if self.error:
            return [self.error]
        if self.spill_bytes > 0:
            out.append(f"{self.spill_bytes} B of register spills")
        limit = SMEM_PER_BLOCK.get(self.arch)
        if limit is not None and self.smem > limit:
            out.append(f"{self.smem} B shared memory > {limit} B per block on sm_{self.arch}")
        for axis, (g, cap) in enumerate(zip(self.variant.grid, MAX_GRID)):
            if g > cap:
                out.append(f"grid[{axis}] = {g} > {cap}")
        return out


def _ptxas() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if os.path.exists(bundled):
        return bundled
    found = shutil.which("ptxas")
    if found is None:
        raise RuntimeError("no ptxas: neither bundled with triton nor on PATH")
    return found


def _tl_value(v):
    import triton.language as tl

    if isinstance(v, str) and v in _DTYPES:
        return getattr(tl, _DTYPES[v])
    return v


_DTYPES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}


def _resolve(kernel: str):
    import importlib

    module, name = kernel.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(arch: int, v: Variant) -> Result:
    """Compile ``v`` for sm_<arch>; never raises (errors land in Result.error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(arch, v)
    try:
        fn = _resolve(v.kernel)
        names = fn.arg_names
        sig = dict(v.signature)
        consts = {(names.index(k),): _tl_value(val) for k, val in v.constexprs}
        attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in v.divisible}
        src = ASTSource(fn, {n: sig[n] for n in names}, constexprs=consts, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
        res.smem = int(ck.metadata.shared)
        res.regs, res.spill_bytes = _ptxas_usage(ck.asm["ptx"], arch)
    except Exception as exc:  # report every failure in the table instead of stopping at the first
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    return res


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill bytes = stores + loads) from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    log = out.stderr + out.stdout
    regs = max(int(m) for m in _PTXAS_LINE.findall(log))
    spills = sum(int(a) + int(b) for a, b in _SPILL.findall(log))
    return regs, spills


def all_variants(arch: int) -> list[Variant]:
    """Every launcher variant of every kernel module for ``arch``, each compile key once."""
    from advfast.kernels import contrastive, ema_update, pgd_step

    seen, out = set(), []
    for module in (contrastive, pgd_step, ema_update):
        for v in module.aot_variants(arch):
            if v.key() in seen:
                continue
            seen.add(v.key())
            out.append(v)
    return out


def run(archs, jobs: int = 1) -> list[Result]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces compilation")
    tasks = [(a, v) for a in archs for v in all_variants(a)]
    if jobs <= 1:
        return [compile_one(a, v) for a, v in tasks]
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_one, *zip(*tasks)))


def table(results: list[Result]) -> str:
    lines = [f"{'arch':<6}{'kernel':<26}{'variant':<44}{'warps':>6}{'stages':>7}{'regs':>6}"
             f"{'spill B':>8}{'smem B':>9}  status"]
    for r in results:
        v = r.variant
        status = "; ".join(r.problems()) or "ok"
        lines.append(f"sm_{r.arch:<3}{v.kernel.rsplit('.', 1)[1]:<26}{v.label:<44}{v.num_warps:>6}"
                     f"{v.num_stages:>7}{r.regs:>6}{r.spill_bytes:>8}{r.smem:>9}  {status}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    bad = [a for a in args.arch if a not in SMEM_PER_BLOCK]
    if bad:
        print(f"aot: unknown arch {bad}; choose from {sorted(SMEM_PER_BLOCK)}", file=sys.stderr)
        return 2
    results = run(args.arch, args.jobs)
    text = table(results)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    failures = [r for r in results if r.problems()]
    print(f"{len(results)} variants compiled, {len(failures)} failing", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
