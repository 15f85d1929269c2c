#!/bin/sh
# make setup: the project's virtual environment, with the PyTorch build this machine can use.
#
#   PYTHON   the interpreter to build it from (3.11 or newer; default python3)
#   VENV     where (default .venv)
#   TORCH    auto (default): PyPI's CUDA build where an NVIDIA GPU shows (nvidia-smi lists one, or
#            the driver is loaded), else PyTorch's CPU build; or cpu, or cuda, to choose yourself
#   DRY_RUN  1: check and choose, print the commands, install nothing
#
# PyPI's torch for Linux is the CUDA build (several GB, useless without a GPU); the CPU build lives on
# PyTorch's own index. A CPU wheel that pip already finds without any index (a wheelhouse in pip's
# find-links) is taken first, so offline machines and CI never reach for that index.
set -eu

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH=${TORCH:-auto}
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

run() {
    echo "+ $*"
    [ "${DRY_RUN:-0}" = 1 ] || "$@"
}

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "make setup: no $PYTHON here; install Python 3.11 or newer, or name one: make setup PYTHON=python3.11" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    found=$("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo "an unknown version")
    echo "make setup: HiveMiner needs Python 3.11 or newer; $PYTHON is $found." >&2
    echo "  Install 3.11 (Debian/Ubuntu: apt install python3.11 python3.11-venv) and run: make setup PYTHON=python3.11" >&2
    exit 2
fi

case "$TORCH" in
auto)
    if nvidia-smi -L >/dev/null 2>&1 || [ -e /proc/driver/nvidia/version ]; then
        TORCH=cuda
        why="an NVIDIA GPU is here"
    else
        TORCH=cpu
        why="no NVIDIA GPU found (nvidia-smi, /proc/driver/nvidia)"
    fi
    ;;
cpu | cuda) why="TORCH=$TORCH" ;;
*)
    echo "make setup: TORCH must be auto, cpu or cuda, got '$TORCH'" >&2
    exit 2
    ;;
esac
if [ "$TORCH" = cuda ]; then
    echo "make setup: $why: installing PyPI's CUDA build of torch $TORCH_VERSION (TORCH=cpu for the CPU build)"
else
    echo "make setup: $why: installing PyTorch's CPU build of torch $TORCH_VERSION (TORCH=cuda for the CUDA build)"
fi

PY="$VENV/bin/python"
run "$PYTHON" -m venv "$VENV"
run "$PY" -m pip install -q --upgrade pip
if [ "$TORCH" = cpu ]; then
    # the wheel alone first, then its dependencies from the usual indexes (torch==X accepts X+cpu)
    if [ "${DRY_RUN:-0}" = 1 ]; then
        run "$PY" -m pip install -q --no-deps --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION+cpu"
    elif ! "$PY" -m pip install -q --no-index --no-deps "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
        run "$PY" -m pip install -q --no-deps --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION+cpu"
    fi
fi
run "$PY" -m pip install -q "torch==$TORCH_VERSION"
run "$PY" -m pip install -q -r requirements.txt -r requirements-dev.txt
run "$PY" -m pip install -q --no-deps -e .
run "$PY" -m pip check
