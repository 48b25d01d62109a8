"""Build advfast and its extension advfast._C.

Switches (environment variables):
  ADVFAST_BUILD_EXT=0     skip the extension (the triton and torch backends still work)
  ADVFAST_BUILD_CUDA=0    build only the C++ CPU kernels even when nvcc is present
  CUDA_HOME               where nvcc lives (default: torch's detection, then /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0": A100, H100/H200)
  MAX_JOBS                parallel compile jobs for ninja
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def _packages():
    pkgs = [p for p in find_packages(include=["advfast", "advfast.*"])]
    return pkgs + ["advfast.kernels"]


def _extensions():
    if not _flag("ADVFAST_BUILD_EXT"):
        print("advfast: ADVFAST_BUILD_EXT=0, skipping the C++/CUDA extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if not cpp_sources:
        return [], {}

    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = (
        _flag("ADVFAST_BUILD_CUDA")
        and torch.version.cuda is not None
        and cuda_home is not None
        and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
        and bool(cuda_sources)
    )
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-g0", "-std=c++20"] + openmp  # -g0: no debug info, faster builds
    extra = {"cxx": cxx}
    macros = []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
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
