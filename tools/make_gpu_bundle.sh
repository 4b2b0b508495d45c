#!/usr/bin/env bash
# Builds gpu_bundle/: everything tools/gpu_check.sh installs offline on a bare CUDA machine that has
# Python 3.12 and torch but none of vstore's other dependencies: wheels for CPython 3.12 / manylinux
# x86_64 of the packages the check imports (pinned to the versions installed here, so the GPU machine
# runs what CI tests), their dependencies, the build requirements (setuptools, wheel, pybind11), and
# vstore's sdist (csrc/ included: the GPU machine compiles vstore._C and vstore._cuda from it).
#
# usage: tools/make_gpu_bundle.sh [--full] [DIR]     (DIR default: gpu_bundle, gitignored)
#   --full  also numba (+ llvmlite) and scipy. Left out by default: the check does not import them
#           (the CPU kernels come from the compiled vstore._C), and with them the bundle outgrows the
#           64 MiB a device session carries to the GPU machine.
# Needs the package registry (pip download); nothing is installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
full=0
if [[ "${1:-}" == "--full" ]]; then full=1; shift; fi
out=${1:-gpu_bundle}
py=${PYTHON:-python}
packages=(numpy zarr numcodecs crc32c transformers tokenizers safetensors huggingface-hub rich pytest
          setuptools wheel pybind11)
if (( full )); then packages+=(numba llvmlite scipy); fi

# pin each to the version installed here (unpinned where it is not installed)
pins=$("$py" - "${packages[@]}" <<'PY'
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
PY
)
# pip takes only the platform tags it is given: list the manylinux generations a wheel may carry
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
done
rm -rf "$out"
mkdir -p "$out"
printf '%s\n' $pins > "$out/requirements.txt"
# PIP_CONSTRAINT is cleared: a machine-wide constraints file pins this interpreter's world, not 3.12's
PIP_CONSTRAINT= "$py" -m pip download --quiet --dest "$out" --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" -r "$out/requirements.txt"
VSTORE_NO_EXT=1 "$py" setup.py -q sdist --dist-dir "$out" > "$out/sdist.log" 2>&1 || { cat "$out/sdist.log"; exit 1; }
rm -f "$out/sdist.log"
rm -rf vstore.egg-info
echo "gpu_bundle: $(ls "$out" | wc -l) files, $(du -sh "$out" | cut -f1) in $out"
