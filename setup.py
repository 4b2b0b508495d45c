"""Builds the native extension vstore._C (pybind11, C++17, OpenMP where the compiler has it), and
ships the bundled benchmark (``data/``) inside the package as ``vstore/_data`` in wheels.

Set VSTORE_NO_EXT=1 to install without native code (vstore then uses its Numba/NumPy kernels and
says so). No -march=native: float16 conversion picks F16C/AVX2 at run time.
"""

import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_data(build_py):
    """Copies ``data/`` (values, stories, sample) into the built package as ``vstore/_data``."""

    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        src, dst = os.path.join(here, "data"), os.path.join(self.build_lib, "vstore", "_data")
        if os.path.isdir(src) and not getattr(self, "editable_mode", False):
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.md"))


ext_modules = []
cmdclass = {"build_py": build_py_with_data}
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
