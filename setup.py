"""Builds the native extension vstore._C (pybind11, C++17, OpenMP where the compiler has it), the
optional CUDA extension vstore._cuda (when nvcc and a CUDA toolkit are found), and ships the bundled
benchmark (``data/``) inside the package as ``vstore/_data`` in wheels.

Set VSTORE_NO_EXT=1 to install without native code (vstore then uses its Numba/NumPy kernels and
says so). No -march=native: float16 conversion picks F16C/AVX2 at run time.

vstore._cuda is built when nvcc is found (``$CUDA_HOME/bin/nvcc``, ``$CUDA_PATH/bin/nvcc`` or
``nvcc`` on PATH) with the CUDA headers and cudart of its toolkit; setup prints one line saying that
it builds it, or why it skips it. VSTORE_NO_CUDA=1 skips it; VSTORE_CUDA_ARCH (e.g. ``90`` or
``80;90``; default: every architecture from 7.5 on that nvcc knows, plus PTX of the newest) picks the
GPU architectures. A failed nvcc compile skips the extension with a message, never the install.
"""

import os
import re
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import CCompilerError

CUDA_SOURCES = ["csrc/cuda/moments.cu"]
DEFAULT_ARCHS = (75, 80, 86, 89, 90, 100, 120)


class build_py_with_data(build_py):
    """Copies ``data/`` (values, stories, sample) into the built package as ``vstore/_data``."""

    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        src, dst = os.path.join(here, "data"), os.path.join(self.build_lib, "vstore", "_data")
        if os.path.isdir(src) and not getattr(self, "editable_mode", False):
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.md"))


def find_cuda():
    """(toolkit dict, None) when nvcc and a CUDA toolkit with headers and cudart are found, else (None, why)."""
    if os.environ.get("VSTORE_NO_CUDA", "") in ("1", "true", "yes"):
        return None, "VSTORE_NO_CUDA is set"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not os.access(nvcc, os.X_OK):
        return None, (f"no nvcc at {nvcc} (CUDA_HOME/CUDA_PATH)" if home else "nvcc not found on PATH (set CUDA_HOME)")
    try:  # nvcc may be a wrapper script: ask it where its toolkit is
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        here = re.search(r"_HERE_=(\S+)", dry.stdout + dry.stderr)
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        arch_list = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{nvcc} does not run ({e})"
    top = home or os.path.dirname(here.group(1) if here else os.path.dirname(os.path.realpath(nvcc)))
    targets = os.path.join(top, "targets")
    roots = [top, *([os.path.join(targets, t) for t in sorted(os.listdir(targets))] if os.path.isdir(targets) else [])]
    include = next((os.path.join(r, "include") for r in roots
                    if os.path.isfile(os.path.join(r, "include", "cuda_runtime.h"))), None)
    if include is None:
        return None, f"no CUDA headers (include/cuda_runtime.h) in the toolkit of {nvcc} ({top})"
    libs = [os.path.join(r, d) for r in roots for d in ("lib64", "lib")]
    static = next((d for d in libs if os.path.isfile(os.path.join(d, "libcudart_static.a"))), None)
    shared = next((d for d in libs if os.path.isfile(os.path.join(d, "libcudart.so"))), None)
    if static is None and shared is None:
        return None, f"no cudart (libcudart_static.a / libcudart.so) in the toolkit of {nvcc} ({top})"
    release = re.search(r"release (\d+\.\d+)", version)
    known = {int(a) for a in re.findall(r"compute_(\d+)", arch_list)}
    wanted = os.environ.get("VSTORE_CUDA_ARCH", "")
    archs = [a for a in re.split(r"[;, ]+", wanted) if a] if wanted else [str(a) for a in DEFAULT_ARCHS if a in known]
    if not archs:
        return None, f"nvcc at {nvcc} knows none of the architectures {DEFAULT_ARCHS} (set VSTORE_CUDA_ARCH)"
    return {"nvcc": nvcc, "home": top, "include": include, "libdir": static or shared, "static": static is not None,
            "release": release.group(1) if release else "?", "archs": archs}, None


def stale(target, sources):
    """Whether ``target`` is missing or older than any of ``sources``."""
    return not os.path.exists(target) or any(os.path.getmtime(s) > os.path.getmtime(target) for s in sources)


def nvcc_arch_flags(archs):
    """-gencode flags: SASS for every architecture, PTX of the newest (``native``: the GPU present)."""
    if archs == ["native"]:
        return ["-arch=native"]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [*flags, f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


ext_modules = []
cmdclass = {"build_py": build_py_with_data}
if os.environ.get("VSTORE_NO_EXT", "") not in ("1", "true", "yes"):
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    sys.path.insert(0, os.path.dirname(__file__))
    from vstore._version import __version__

    class build_ext_with_cuda(build_ext):
        """pybind11's build_ext, plus: the ``.cu`` sources of an extension are compiled with nvcc first."""

        def build_extension(self, ext):
            cuda = getattr(ext, "cuda", None)
            if cuda is None:
                return super().build_extension(ext)
            objects = []
            try:
                for src in ext.cuda_sources:
                    obj = os.path.join(self.build_temp, "cuda", f"{os.path.basename(src)}.sm{'-'.join(cuda['archs'])}.o")
                    os.makedirs(os.path.dirname(obj), exist_ok=True)
                    if not self.force and not stale(obj, [src, *ext.depends]):
                        objects.append(obj)
                        continue
                    cmd = [cuda["nvcc"], "-c", src, "-o", obj, "-std=c++17", "-O3", "-Icsrc/cuda",
                           f"-I{cuda['include']}", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                           *nvcc_arch_flags(cuda["archs"])]
                    print(" ".join(cmd))
                    subprocess.run(cmd, check=True)
                    objects.append(obj)
                ext.extra_objects = [*objects, *ext.extra_objects]
                return super().build_extension(ext)
            except (OSError, subprocess.CalledProcessError, CCompilerError) as e:
                print(f"vstore: skipping vstore._cuda: building it failed ({e}); vstore runs without the CUDA kernel")
                return None

    openmp = sys.platform.startswith("linux")
    ext_modules.append(
        Pybind11Extension(
            "vstore._C",
            sorted(["csrc/bindings.cpp", *[os.path.join("csrc/vstore", f) for f in os.listdir("csrc/vstore") if f.endswith(".cpp")]]),
            include_dirs=["csrc"],
            cxx_std=17,
            define_macros=[("VSTORE_VERSION", f'"{__version__}"')],
            # sqrt need not set errno and comparisons need not keep FP exception flags, so branch-free
            # loops with sqrt and selects vectorise; neither option changes a computed value
            extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", *(["-fopenmp"] if openmp else [])],
            extra_link_args=["-fopenmp"] if openmp else [],
        )
    )
    cuda, why = find_cuda()
    if cuda is None:
        print(f"vstore: skipping vstore._cuda (the optional CUDA kernel): {why}")
    else:
        print(f"vstore: building vstore._cuda with {cuda['nvcc']} (CUDA {cuda['release']} at {cuda['home']}; "
              f"sm {','.join(cuda['archs'])}; cudart {'static' if cuda['static'] else 'shared'})")
        cuda_ext = Pybind11Extension(
            "vstore._cuda",
            ["csrc/cuda/bindings.cpp"],
            include_dirs=["csrc/cuda"],
            depends=[*CUDA_SOURCES, "csrc/cuda/moments.hpp"],  # relink when the .cu changes
            cxx_std=17,
            define_macros=[("VSTORE_VERSION", f'"{__version__}"')],
            extra_compile_args=["-O3"],
            library_dirs=[cuda["libdir"]],
            libraries=["cudart_static", "dl", "rt", "pthread"] if cuda["static"] else ["cudart"],
            runtime_library_dirs=[] if cuda["static"] else [cuda["libdir"]],
        )
        cuda_ext.cuda = cuda
        cuda_ext.cuda_sources = CUDA_SOURCES
        ext_modules.append(cuda_ext)
    cmdclass["build_ext"] = build_ext_with_cuda

setup(ext_modules=ext_modules, cmdclass=cmdclass)
