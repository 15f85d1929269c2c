"""One style for the whole repo: ruff's checks (lines of at most 120 characters, sorted imports, pyflakes) and
its formatter hold on every Python file, with the settings in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).parent / "ruff"
    if not binary.exists():
        pytest.fail(f"{binary} is missing; install the dev dependencies: .venv/bin/pip install -r requirements-dev.txt")
    return subprocess.run(
        [str(binary), *args, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_checks_pass():
    result = _ruff("check")
    assert result.returncode == 0, f"fix with `.venv/bin/ruff check --fix .`:\n{result.stdout}{result.stderr}"


def test_code_is_formatted():
    result = _ruff("format", "--check")
    assert result.returncode == 0, f"fix with `.venv/bin/ruff format .`:\n{result.stdout}{result.stderr}"
