"""CUDA toolkit detection for the build (tools/cuda_toolkit.py, used by setup.py and CMakeLists.txt),
run against fake toolkit layouts in temporary directories: wrappers, symlinks, missing pieces, a
CUDA_HOME that points at the wrong place. No real CUDA is needed.
"""

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "tools" / "cuda_toolkit.py"

pytestmark = pytest.mark.skipif(not MODULE.exists(), reason="not run from a source checkout")


@pytest.fixture(scope="module")
def cuda_toolkit():
    spec = importlib.util.spec_from_file_location("advfast_cuda_toolkit_test", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_toolkit(root: Path, cudart: str | None = "lib64", headers: bool = True) -> Path:
    """A toolkit whose nvcc answers --version and --dryrun as the real one does."""
    _script(root / "bin" / "nvcc",
            'case "$*" in *--version*) echo "Cuda compilation tools, release 12.4, V12.4.131";;\n'
            '*--dryrun*) echo "#\\$ _HERE_=$(cd "$(dirname "$0")" && pwd)" >&2;; esac\n')
    if headers:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cuda_runtime.h").write_text("")
    if cudart is not None:
        (root / cudart).mkdir(parents=True)
        (root / cudart / "libcudart.so").write_text("")
    return root


def wrapper(bin_dir: Path, target: Path) -> Path:
    """An nvcc on PATH that is a shell script exec'ing the real one (as /usr/local/bin/nvcc here)."""
    return _script(bin_dir / "nvcc", f'exec "{target}" "$@"\n')


def find(cuda_toolkit, tmp_path, **env):
    return cuda_toolkit.find_cuda_toolkit(env, default_root=str(tmp_path / "no-default"))


def test_valid_cuda_home_is_used(cuda_toolkit, tmp_path):
    kit = fake_toolkit(tmp_path / "cuda")
    found = find(cuda_toolkit, tmp_path, CUDA_HOME=str(kit), PATH="")
    assert found.root == str(kit) and found.nvcc == str(kit / "bin" / "nvcc")
    assert cuda_toolkit.nvcc_release(found.root) == "12.4"


def test_wrapper_nvcc_on_path_is_seen_through(cuda_toolkit, tmp_path):
    # torch's guess would be the wrapper's parent (tmp/usr-local): no headers, no libcudart there
    kit = fake_toolkit(tmp_path / "cuda-12.4")
    bin_dir = tmp_path / "usr-local" / "bin"
    wrapper(bin_dir, kit / "bin" / "nvcc")
    found = find(cuda_toolkit, tmp_path, PATH=str(bin_dir))
    assert found.root == os.path.realpath(kit)
    assert any("usr-local" in r for r in found.rejected)


def test_symlinked_nvcc_on_path_resolves_to_its_toolkit(cuda_toolkit, tmp_path):
    kit = fake_toolkit(tmp_path / "cuda")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvcc").symlink_to(kit / "bin" / "nvcc")
    found = find(cuda_toolkit, tmp_path, PATH=str(bin_dir))
    assert found.root == str(kit)


def test_cuda_home_at_the_wrong_place_falls_back_to_nvcc(cuda_toolkit, tmp_path):
    kit = fake_toolkit(tmp_path / "cuda")
    wrong = tmp_path / "usr-local"
    bin_dir = wrong / "bin"
    wrapper(bin_dir, kit / "bin" / "nvcc")
    found = find(cuda_toolkit, tmp_path, CUDA_HOME=str(wrong), PATH=str(bin_dir))
    assert found.root == os.path.realpath(kit)
    assert found.rejected[0].startswith(f"CUDA_HOME={wrong}: no include/cuda_runtime.h")


def test_cuda_path_is_honoured_after_cuda_home(cuda_toolkit, tmp_path):
    kit = fake_toolkit(tmp_path / "cuda")
    found = find(cuda_toolkit, tmp_path, CUDA_HOME=str(tmp_path / "missing"), CUDA_PATH=str(kit), PATH="")
    assert found.root == str(kit)
    assert found.rejected == [f"CUDA_HOME={tmp_path / 'missing'}: not a directory"]


def test_toolkit_without_libcudart_is_not_usable(cuda_toolkit, tmp_path):
    kit = fake_toolkit(tmp_path / "cuda", cudart=None)
    found = find(cuda_toolkit, tmp_path, CUDA_HOME=str(kit), PATH="")
    assert found.root is None
    line = found.why_not()
    assert "\n" not in line and "no libcudart" in line and str(kit) in line


def test_toolkit_without_headers_is_not_usable(cuda_toolkit, tmp_path):
    kit = fake_toolkit(tmp_path / "cuda", headers=False)
    assert find(cuda_toolkit, tmp_path, CUDA_HOME=str(kit), PATH="").root is None


@pytest.mark.parametrize("lib_dir", ["lib", "targets/x86_64-linux/lib"])
def test_libcudart_in_lib_or_targets_is_found(cuda_toolkit, tmp_path, lib_dir):
    kit = fake_toolkit(tmp_path / "cuda", cudart=lib_dir)
    assert find(cuda_toolkit, tmp_path, CUDA_HOME=str(kit), PATH="").root == str(kit)


def test_default_root_is_the_last_resort(cuda_toolkit, tmp_path):
    kit = fake_toolkit(tmp_path / "cuda")
    found = cuda_toolkit.find_cuda_toolkit({"PATH": ""}, default_root=str(kit))
    assert found.root == str(kit)


def test_nothing_found_says_why_in_one_line(cuda_toolkit, tmp_path):
    found = find(cuda_toolkit, tmp_path, PATH=str(tmp_path))
    assert found.root is None and found.nvcc is None
    assert found.why_not().startswith("no CUDA toolkit found")


def test_command_line_prints_the_root_or_the_reason_and_exits_0(tmp_path):
    kit = fake_toolkit(tmp_path / "cuda")
    env = {"PATH": os.environ["PATH"], "CUDA_HOME": str(kit)}
    proc = subprocess.run([sys.executable, str(MODULE)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == str(kit)
    env["CUDA_HOME"] = str(fake_toolkit(tmp_path / "broken", cudart=None))
    proc = subprocess.run([sys.executable, str(MODULE)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0
    if proc.stdout.strip():  # this machine has a real toolkit elsewhere (nvcc on PATH, /usr/local/cuda)
        assert proc.stdout.strip() != env["CUDA_HOME"]
    else:
        assert proc.stderr.count("\n") == 1 and "no libcudart" in proc.stderr
