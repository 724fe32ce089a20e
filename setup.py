"""Builds grpo_kernels._C (csrc/) with torch's C++ extension tooling when torch and a compiler exist.

Without torch at build time (or with GRPO_KERNELS_NO_EXT=1) the package installs pure-Python and
falls back to its chunked PyTorch backend with one warning at first use. The extension is built
for the machine it is built on (-march=native by default; set GRPO_KERNELS_CPU_ARCH, e.g.
"x86-64-v3", for a portable build).
"""

import os

from setuptools import setup


def extensions():
    if os.environ.get("GRPO_KERNELS_NO_EXT", "0") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("grpo_kernels: torch is not installed at build time; skipping the C++ extension")
        return [], {}
    arch = os.environ.get("GRPO_KERNELS_CPU_ARCH", "native")
    ext = CppExtension(
        "grpo_kernels._C",
        sources=[f"csrc/{name}.cpp" for name in ("bindings", "tile_engine", "forward", "backward", "one_pass")],
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        # -ffp-contract=off: the forward and the backward must form each logit and z - max from the same
        # roundings, and GCC's default (fast) fuses a * b - c into one FMA where it sees fit: at temperature
        # 0.01 the forward's fused max came out ~1e-5 off the backward's, and dW with it. FMAs the kernels
        # want are written as fmadd / fmsub.
        extra_compile_args=["-O3", f"-march={arch}", "-fopenmp", "-std=c++17", "-ffp-contract=off"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
