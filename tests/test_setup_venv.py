"""``make setup`` (deploy/setup-venv.sh): the Python it needs, and the torch build the machine can use.

Run dry (``DRY_RUN=1``: the checks and the choice, the commands printed, nothing installed), with a
stand-in ``nvidia-smi`` for a machine with or without a GPU. The real install is the one every
``make test`` on a fresh clone starts with.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "setup-venv.sh"
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


def _stub(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def _setup(tmp_path: Path, gpu: bool, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _stub(bin_dir / "nvidia-smi", "exit 0" if gpu else "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    variables = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "VENV": str(tmp_path / "venv"),
        "DRY_RUN": "1",
        **env,
    }
    return subprocess.run(["sh", str(SCRIPT)], env=variables, capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.skipif(
    NVIDIA_DRIVER.exists(), reason="an NVIDIA driver is loaded here: every machine looks like a GPU host"
)
def test_a_machine_without_a_gpu_gets_the_cpu_build_and_is_told_so(tmp_path):
    done = _setup(tmp_path, gpu=False)
    assert done.returncode == 0, done.stderr
    assert "no NVIDIA GPU found" in done.stdout and "PyTorch's CPU build of torch 2.13.0" in done.stdout
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu" in done.stdout
    assert not (tmp_path / "venv").exists()  # dry: nothing made


def test_a_gpu_host_gets_pypis_cuda_build_unless_told_otherwise(tmp_path):
    done = _setup(tmp_path, gpu=True)
    assert done.returncode == 0, done.stderr
    assert "PyPI's CUDA build" in done.stdout and "+cpu" not in done.stdout
    chosen = _setup(tmp_path, gpu=True, TORCH="cpu")
    assert chosen.returncode == 0 and "TORCH=cpu: installing PyTorch's CPU build" in chosen.stdout


def test_an_unknown_torch_choice_is_refused(tmp_path):
    done = _setup(tmp_path, gpu=False, TORCH="rocm")
    assert done.returncode == 2 and "TORCH must be auto, cpu or cuda, got 'rocm'" in done.stderr


def test_an_old_or_missing_python_stops_with_what_to_do(tmp_path):
    old = _stub(tmp_path / "python3.10", 'case "$2" in *exit*) exit 1 ;; *) echo 3.10.12 ;; esac')
    done = _setup(tmp_path, gpu=False, PYTHON=str(old))
    assert done.returncode == 2
    assert "needs Python 3.11 or newer" in done.stderr and "is 3.10.12" in done.stderr
    assert "make setup PYTHON=python3.11" in done.stderr and "+ " not in done.stdout  # stopped before any command
    missing = _setup(tmp_path, gpu=False, PYTHON="python2.9-nowhere")
    assert missing.returncode == 2 and "no python2.9-nowhere here" in missing.stderr
