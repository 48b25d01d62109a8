"""Build advfast and its extension advfast._C.

Switches (environment variables):
  ADVFAST_BUILD_EXT=0     skip the extension (the triton and torch backends still work)
  ADVFAST_BUILD_CUDA=0    build only the C++ CPU kernels even when nvcc is present
  CUDA_HOME / CUDA_PATH   the CUDA toolkit (default: found by tools/cuda_toolkit.py: CUDA_HOME,
                          CUDA_PATH, the nvcc on PATH seen through symlinks and wrappers, /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0+PTX": SASS for A100 and H100/H200,
                          plus sm_90 PTX that newer GPUs JIT-compile)
  MAX_JOBS                parallel compile jobs for ninja
"""

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def _cuda_toolkit_module():
    """tools/cuda_toolkit.py, loaded by path: advfast is not installed yet while it builds."""
    spec = importlib.util.spec_from_file_location(
        "advfast_cuda_toolkit", os.path.join(ROOT, "tools", "cuda_toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_home(torch_cuda: str | None):
    """(toolkit root, None) when the CUDA kernels can be built, else (None, one-line reason)."""
    if not _flag("ADVFAST_BUILD_CUDA"):
        return None, "ADVFAST_BUILD_CUDA=0"
    if torch_cuda is None:
        return None, "the installed torch is a CPU-only build (install a CUDA build of torch)"
    toolkit = _cuda_toolkit_module()
    found = toolkit.find_cuda_toolkit()
    if found.root is None:
        return None, f"{found.why_not()}; to enable: {toolkit.HOW_TO_ENABLE}"
    release = toolkit.nvcc_release(found.root)
    if release is not None and release.split(".")[0] != torch_cuda.split(".")[0]:
        return None, (f"the CUDA toolkit at {found.root} is CUDA {release}, torch was built with CUDA "
                      f"{torch_cuda}; to enable: set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x toolkit")
    return found.root, None


def _packages():
    pkgs = [p for p in find_packages(include=["advfast", "advfast.*"])]
    return pkgs + ["advfast.kernels"]


def _extensions():
    if not _flag("ADVFAST_BUILD_EXT"):
        print("advfast: ADVFAST_BUILD_EXT=0, skipping the C++/CUDA extension", file=sys.stderr)
        return [], {}
    import torch

    cuda_home, no_cuda = _cuda_home(torch.version.cuda)
    if cuda_home is not None:
        # torch's cpp_extension reads CUDA_HOME once, at import; its own guess (the parent of the nvcc
        # on PATH) is wrong for a wrapper script such as /usr/local/bin/nvcc.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home  # in case it was imported before with another value

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if not cpp_sources:
        return [], {}

    with_cuda = cuda_home is not None and bool(cuda_sources)
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-g0", "-std=c++20"] + openmp  # -g0: no debug info, faster builds
    extra = {"cxx": cxx}
    macros = []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        macros.append(("ADVFAST_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "advfast._C", cpp_sources + cuda_sources, extra_compile_args=extra,
            define_macros=macros, extra_link_args=openmp, include_dirs=[os.path.join(ROOT, "csrc")])
        kind = f"C++ + CUDA (arch {os.environ['TORCH_CUDA_ARCH_LIST']}, CUDA_HOME={cuda_home})"
    else:
        ext = cpp_extension.CppExtension(
            "advfast._C", cpp_sources, extra_compile_args=extra, define_macros=macros,
            extra_link_args=openmp, include_dirs=[os.path.join(ROOT, "csrc")])
        kind = "C++ CPU only"
        if no_cuda is not None and cuda_sources:
            print(f"advfast: CUDA kernels skipped: {no_cuda}", file=sys.stderr)
    print(f"advfast: building advfast._C ({kind})", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=_packages(),
    package_dir={"advfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    include_package_data=False,
)
