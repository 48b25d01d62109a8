"""Find the CUDA toolkit that advfast._C (setup.py) and libadvfast_ops (CMakeLists.txt) build against.

Runs at build time, before advfast is installed, with nothing but the standard library. A usable
toolkit has `bin/nvcc`, `include/cuda_runtime.h` and libcudart (in `lib64/`, `lib/` or
`targets/*/lib/`). Candidates, first usable wins:

1. `CUDA_HOME`, then `CUDA_PATH`, when set (a set but unusable one is reported and skipped);
2. the `nvcc` on PATH, resolved through symlinks (`.../bin/nvcc` -> `...`);
3. where that nvcc says it lives (`nvcc --dryrun` prints `_HERE_=<root>/bin`): this sees through
   wrapper scripts such as an `/usr/local/bin/nvcc` that execs the real one;
4. `/usr/local/cuda`.

torch's own guess (`torch.utils.cpp_extension.CUDA_HOME`) is the parent of the nvcc on PATH, which
for a wrapper in /usr/local/bin is /usr/local: no libcudart there, and the link fails after minutes
of compiling. Hence this module.

Command line (CMakeLists.txt uses it): `python tools/cuda_toolkit.py` prints the toolkit root, or
nothing, and on stderr the one-line reason when none is usable; it always exits 0.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

DEFAULT_ROOT = "/usr/local/cuda"
HOW_TO_ENABLE = ("set CUDA_HOME to a CUDA toolkit that has bin/nvcc, include/cuda_runtime.h and "
                 "lib64/libcudart.so")


class Detection:
    """The toolkit found (root is None when none is usable) and why each candidate was rejected."""

    def __init__(self, root: str | None, rejected: list[str]):
        self.root, self.rejected = root, rejected

    def __repr__(self):
        return f"Detection(root={self.root!r}, rejected={self.rejected!r})"

    @property
    def nvcc(self) -> str | None:
        return None if self.root is None else os.path.join(self.root, "bin", "nvcc")

    def why_not(self) -> str:
        """One line: why no toolkit is usable."""
        if not self.rejected:
            return "no CUDA toolkit found (no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda)"
        return "no usable CUDA toolkit: " + "; ".join(self.rejected)


def cudart_libraries(root: str) -> list[str]:
    """libcudart shared or static libraries under a toolkit root (lib64/, lib/, targets/*/lib/)."""
    found = []
    for lib_dir in [os.path.join(root, "lib64"), os.path.join(root, "lib")] + sorted(
            glob.glob(os.path.join(root, "targets", "*", "lib"))):
        found += sorted(glob.glob(os.path.join(lib_dir, "libcudart.so*")))
        found += sorted(glob.glob(os.path.join(lib_dir, "libcudart_static.a")))
    return found


def problem(root: str) -> str | None:
    """None when `root` is a usable toolkit, else what it lacks."""
    if not os.path.isdir(root):
        return "not a directory"
    nvcc = os.path.join(root, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        return "no executable bin/nvcc"
    headers = [os.path.join(root, "include", "cuda_runtime.h")] + glob.glob(
        os.path.join(root, "targets", "*", "include", "cuda_runtime.h"))
    if not any(os.path.isfile(h) for h in headers):
        return "no include/cuda_runtime.h"
    if not cudart_libraries(root):
        return "no libcudart in lib64/, lib/ or targets/*/lib/"
    return None


def nvcc_release(root: str, timeout: float = 30.0) -> str | None:
    """The CUDA release ("13.0") `root/bin/nvcc --version` reports, None when it cannot say."""
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _root_of(nvcc_path: str) -> str:
    """`<root>/bin/nvcc` -> `<root>`."""
    return os.path.dirname(os.path.dirname(os.path.abspath(nvcc_path)))


def ask_nvcc(nvcc: str, timeout: float = 30.0) -> str | None:
    """The toolkit root an nvcc reports for itself (`_HERE_=<root>/bin` in its --dryrun output)."""
    try:
        proc = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+?)\s*$", proc.stdout + proc.stderr, re.MULTILINE)
    return os.path.realpath(os.path.dirname(match.group(1))) if match else None


def _candidates(env, which, default_root):
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            yield f"{var}={env[var]}", env[var]
    nvcc = which("nvcc", path=env.get("PATH"))
    if nvcc:
        yield f"nvcc on PATH ({nvcc})", _root_of(os.path.realpath(nvcc))
        reported = ask_nvcc(nvcc)
        if reported:
            yield f"the toolkit nvcc reports ({reported})", reported
    yield default_root, default_root


def find_cuda_toolkit(env=None, which=shutil.which, default_root: str = DEFAULT_ROOT) -> Detection:
    """The first usable toolkit among the candidates (see the module docstring)."""
    env = os.environ if env is None else env
    rejected, seen = [], set()
    for label, root in _candidates(env, which, default_root):
        real = os.path.realpath(root)
        if real in seen:
            continue
        seen.add(real)
        why = problem(root)
        if why is None:
            return Detection(os.path.abspath(root), rejected)
        if root != default_root or os.path.exists(root):  # an absent default is no news
            rejected.append(f"{label}: {why}")
    return Detection(None, rejected)


if __name__ == "__main__":
    found = find_cuda_toolkit()
    if found.root:
        print(found.root)
    else:
        print(f"advfast: {found.why_not()}", file=sys.stderr)
