"""Builds the native extension vstore._C (pybind11, C++17, OpenMP where the compiler has it).

Set VSTORE_NO_EXT=1 to install without native code (vstore then uses its Numba/NumPy kernels and
says so). No -march=native: float16 conversion picks F16C/AVX2 at run time.
"""

import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("VSTORE_NO_EXT", "") not in ("1", "true", "yes"):
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    sys.path.insert(0, os.path.dirname(__file__))
    from vstore._version import __version__

    openmp = sys.platform.startswith("linux")
    ext_modules.append(
        Pybind11Extension(
            "vstore._C",
            sorted(["csrc/bindings.cpp", *[os.path.join("csrc/vstore", f) for f in os.listdir("csrc/vstore") if f.endswith(".cpp")]]),
            include_dirs=["csrc"],
            cxx_std=17,
            define_macros=[("VSTORE_VERSION", f'"{__version__}"')],
            extra_compile_args=["-O3", *(["-fopenmp"] if openmp else [])],
            extra_link_args=["-fopenmp"] if openmp else [],
        )
    )
    cmdclass["build_ext"] = build_ext

setup(ext_modules=ext_modules, cmdclass=cmdclass)
