"""The CMake build path (CMakeLists.txt) agrees with the setup.py build (advfast._C).

CMake builds csrc/ against libtorch into libadvfast_ops.so, CPU only (-DADVFAST_WITH_CUDA=OFF: each
.cu costs minutes on a 2-core CI machine). Both libraries register TORCH_LIBRARY(advfast), which
may happen once per process, so the CMake library runs in a subprocess on inputs saved to a file and
its outputs are compared with advfast._C's on the same inputs here.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from advfast import _ext

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _ext.has_extension(), reason=f"advfast._C is not built: {_ext.extension_error()}"),
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed (pip install cmake)"),
    pytest.mark.skipif(shutil.which("ninja") is None, reason="ninja is not installed (pip install ninja)"),
    pytest.mark.skipif(not (ROOT / "CMakeLists.txt").exists(), reason="not run from a source checkout"),
]

RUNNER = textwrap.dedent("""
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    data = torch.load(sys.argv[2])
    out = {"built_with_cuda": torch.ops.advfast.built_with_cuda(), "pgd": [], "ema": []}
    for case in data["pgd"]:
        x_adv = case["x_adv"].clone(memory_format=torch.preserve_format)
        torch.ops.advfast.pgd_step_(x_adv, case["x_nat"], case["grad"], case["eps"], case["alpha"],
                                    case["norm"], 0.0, 1.0)
        out["pgd"].append(x_adv)
    ema = [t.clone() for t in data["ema"]]
    torch.ops.advfast.ema_update_(ema, data["src"], data["momentum"])
    out["ema"] = ema
    torch.save(out, sys.argv[3])
""")


@pytest.fixture(scope="module")
def cmake_library(tmp_path_factory):
    build = tmp_path_factory.mktemp("cmake_build")
    env = dict(os.environ)  # no CUDA_HOME needed: CMakeLists.txt finds the toolkit (tools/cuda_toolkit.py)
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                 "-DADVFAST_WITH_CUDA=OFF", f"-DADVFAST_PYTHON={sys.executable}"]
    jobs = os.environ.get("MAX_JOBS", "2")
    for cmd in (configure, ["cmake", "--build", str(build), "-j", jobs]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    lib = build / "libadvfast_ops.so"
    assert lib.exists(), f"CMake built no {lib.name}: {sorted(p.name for p in build.iterdir())}"
    return lib


def _inputs():
    pgd = []
    for shape, g_dtype, channels_last, norm in [
        ((5, 3, 7, 9), torch.float32, False, 0),
        ((5, 3, 7, 9), torch.bfloat16, True, 1),
        ((3, 1037), torch.float16, False, 1),
        ((2, 3, 150, 151), torch.float32, False, 1),  # several parallel spans per sample
    ]:
        x_nat = torch.rand(shape)
        x_adv = (x_nat + 0.1 * torch.randn(shape)).clamp(0, 1)
        grad = torch.randn(shape).to(g_dtype)
        if channels_last:
            x_nat, x_adv, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x_nat, x_adv, grad))
        eps = torch.rand(shape[0]) * 0.1 + 0.01
        pgd.append({"x_adv": x_adv, "x_nat": x_nat, "grad": grad, "eps": eps,
                    "alpha": eps * torch.rand(shape[0]), "norm": norm})
    ema = [torch.randn(7), torch.randn(3, 70001), torch.randn(4, 4, dtype=torch.bfloat16),
           torch.randn(5, dtype=torch.float64), torch.tensor(3)]
    src = [torch.randn_like(t) if t.is_floating_point() else torch.tensor(9) for t in ema]
    return {"pgd": pgd, "ema": ema, "src": src, "momentum": 0.9}


def test_cmake_build_matches_setup_py_build(cmake_library, tmp_path):
    data = _inputs()
    torch.save(data, tmp_path / "inputs.pt")
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(cmake_library), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"CMake library run failed:\n{proc.stderr[-4000:]}"
    got = torch.load(tmp_path / "outputs.pt")
    assert got["built_with_cuda"] is False

    for case, cmake_out in zip(data["pgd"], got["pgd"], strict=True):
        x_adv = case["x_adv"].clone(memory_format=torch.preserve_format)
        torch.ops.advfast.pgd_step_(x_adv, case["x_nat"], case["grad"], case["eps"], case["alpha"],
                                    case["norm"], 0.0, 1.0)
        assert not torch.equal(x_adv, case["x_adv"])  # the step did something
        assert cmake_out.stride() == x_adv.stride()
        torch.testing.assert_close(cmake_out, x_adv, rtol=1e-6, atol=1e-6)

    ema = [t.clone() for t in data["ema"]]
    torch.ops.advfast.ema_update_(ema, data["src"], data["momentum"])
    for cmake_out, mine in zip(got["ema"], ema, strict=True):
        torch.testing.assert_close(cmake_out, mine, rtol=1e-6, atol=1e-6)
