#!/usr/bin/env bash
# The GPU check: on a bare CUDA machine with Python 3.12 and torch (and nvcc), installs vstore's other
# dependencies offline from gpu_bundle/ (made by tools/make_gpu_bundle.sh), builds vstore._C and
# vstore._cuda from the bundled sdist with nvcc, checks the CUDA kernel against the PyTorch path and
# the CPU kernels, runs tests/test_cuda.py, and measures build and rank throughput (tools/gpu_check.py),
# printing a markdown table. Exit status: 0 all agree; 1 a mismatch or a failed step; 2 no usable GPU.
#
# usage: tools/gpu_check.sh [--dry-run] [--bundle DIR] [--json FILE]
#   --dry-run  no GPU needed: the same steps on CPU at small sizes. The bundle is installed when this
#              Python is 3.12 (else vstore is built in place from this tree); without torch the
#              steps after the install are skipped.
# environment: PYTHON (default python3), VSTORE_CUDA_ARCH (default: the GPU's compute capability),
#              GPU_CHECK_WORK (scratch folder; default a new one under /tmp).
# About 3 minutes on an H100/H200: install and compile ~1 min, checks ~30 s, throughput ~1 min.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
dry=0
bundle=$repo/gpu_bundle
json=""
while (( $# )); do
    case "$1" in
        --dry-run) dry=1 ;;
        --bundle) bundle=$(realpath "$2"); shift ;;
        --json) json=$(realpath "$2"); shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1" >&2; exit 1 ;;
    esac
    shift
done
py=${PYTHON:-python3}
work=${GPU_CHECK_WORK:-$(mktemp -d /tmp/vstore-gpu-check.XXXXXX)}
mkdir -p "$work"
start=$SECONDS
step() { echo; echo "== $* ($(( SECONDS - start )) s)"; }

step "machine"
"$py" -c "import sys; print('python', sys.version.split()[0])"
has_torch=1
"$py" -c "import torch" 2>/dev/null || has_torch=0
if (( has_torch )); then
    "$py" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
fi
command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if (( !dry )); then
    if (( !has_torch )) || ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: torch with a usable CUDA device is needed (use --dry-run on a machine without one)" >&2
        exit 2
    fi
    arch=$("$py" -c "import torch; a, b = torch.cuda.get_device_capability(0); print(f'{a}{b}')")
else
    arch=90  # one architecture: the dry run only shows that nvcc compiles
fi
export VSTORE_CUDA_ARCH=${VSTORE_CUDA_ARCH:-$arch}

py_minor=$("$py" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
if [[ -d "$bundle" && "$py_minor" == "3.12" ]]; then
    step "install the bundle offline into $work/site"
    "$py" -m pip install --quiet --no-index --find-links "$bundle" --target "$work/site" -r "$bundle/requirements.txt"
    sdist=$(ls "$bundle"/vstore-*.tar.gz | tail -n 1)
    step "build vstore from $(basename "$sdist") (nvcc for sm_$VSTORE_CUDA_ARCH)"
    if ! "$py" -m pip install -v --no-index --find-links "$bundle" --no-deps --target "$work/site" "$sdist" \
            > "$work/build.log" 2>&1; then
        tail -n 60 "$work/build.log"
        echo "gpu_check: building vstore failed (log: $work/build.log)" >&2
        exit 1
    fi
    grep -E "vstore: (building|skipping)" "$work/build.log" | sed 's/^ *//' | sort -u
    export PYTHONPATH=$work/site
elif (( dry )); then
    step "no 3.12 bundle for this Python ($py_minor): build in place from this tree"
    "$py" setup.py build_ext --inplace -q 2>&1 | grep -E "^vstore: " || true
    export PYTHONPATH=$repo
else
    echo "gpu_check: no bundle for Python $py_minor at $bundle (run tools/make_gpu_bundle.sh; Python 3.12 needed)" >&2
    exit 1
fi

step "import"
(cd "$work" && "$py" -c "import vstore, vstore.cuda_stats as c; print(vstore.__file__); print(vstore.native_status()); print('vstore._cuda:', c.info())")
if (( !has_torch )); then
    echo "gpu_check: torch is not installed for $py: install, build and import checked; nothing more to run"
    exit 0
fi

status=0
step "tests/test_cuda.py"
(cd "$work" && "$py" -m pytest -q -p no:cacheprovider "$repo/tests/test_cuda.py") || status=1

step "kernel checks and throughput"
device=cuda
extra=()
if (( dry )); then device=cpu; extra=(--quick); fi
if [[ -n "$json" ]]; then extra+=(--json "$json"); fi
(cd "$work" && "$py" "$repo/tools/gpu_check.py" --device "$device" "${extra[@]}") || status=$?
step "done: exit status $status"
exit "$status"
